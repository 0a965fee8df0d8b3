"""The tile layout shared by the token-copy kernels: program (sample n, row tile, column tile)."""

from __future__ import annotations

import triton
import triton.language as tl


def token_grid(samples: int, rows: int, width: int) -> tuple[tuple[int, int, int], dict[str, int]]:
    """Launch grid and tile sizes covering [samples, rows, width]: tiles of about 4K elements,
    columns a power of two up to 512."""
    block_d = min(max(16, triton.next_power_of_2(width)), 512)
    block_t = max(1, min(64, 4096 // block_d))
    grid = (samples, triton.cdiv(rows, block_t), triton.cdiv(width, block_d))
    return grid, {"BLOCK_T": block_t, "BLOCK_D": block_d}


@triton.jit
def token_tile(num_rows, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sample, row and column indices, and which rows and columns exist."""
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    return n, rows, cols, rows < num_rows, cols < D
