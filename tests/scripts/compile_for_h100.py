"""Compile every Triton kernel for an H100 (sm_90) with Triton's ahead-of-time path: the real
compiler and ptxas, no GPU needed. Run without TRITON_INTERPRET; prints one line per kernel."""

import triton
from triton.backends.compiler import GPUTarget

from kernels.decoder_tokens import _decoder_tokens_bwd, _decoder_tokens_fwd
from kernels.masked_mse import _masked_mse_bwd, _masked_mse_fwd
from kernels.visible_tokens import _visible_tokens_bwd, _visible_tokens_fwd

H100 = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, pointers: dict[str, str], ints: list[str], constexprs: dict) -> None:
    signature = {
        **pointers,
        **{name: "i32" for name in ints},
        **{name: "constexpr" for name in constexprs},
    }
    if "eps" in signature:
        signature["eps"] = "fp32"
    order = list(fn.arg_names)
    kernel = triton.compile(
        triton.compiler.ASTSource(
            fn=fn, signature={k: signature[k] for k in order}, constexprs=constexprs
        ),
        target=H100,
    )
    print(f"{fn.__name__}: compiled for sm_{H100.arch}, {kernel.metadata.num_warps} warps")


for dtype in ("bf16", "fp32"):
    t = f"*{dtype}"
    tiles = {"BLOCK_T": 8, "BLOCK_D": 512}
    compile_kernel(
        _visible_tokens_fwd,
        {
            "x_ptr": t,
            "pos_ptr": "*fp32",
            "cls_ptr": "*fp32",
            "ids_keep_ptr": "*i64",
            "out_ptr": "*fp32",
        },
        ["L", "K", "D"],
        tiles,
    )
    compile_kernel(
        _visible_tokens_bwd,
        {"grad_out_ptr": "*fp32", "ids_restore_ptr": "*i64", "grad_x_ptr": t},
        ["L", "K", "D"],
        tiles,
    )
    compile_kernel(
        _decoder_tokens_fwd,
        {
            "x_ptr": t,
            "mask_token_ptr": "*fp32",
            "ids_restore_ptr": "*i64",
            "pos_ptr": "*fp32",
            "out_ptr": "*fp32",
        },
        ["L", "K", "D"],
        tiles,
    )
    compile_kernel(
        _decoder_tokens_bwd,
        {
            "grad_out_ptr": "*fp32",
            "ids_restore_ptr": "*i64",
            "grad_x_ptr": t,
            "grad_token_partial_ptr": "*fp32",
        },
        ["L", "K", "D"],
        tiles,
    )
    sizes = ["C", "H", "W", "grid_w", "L", "P", "stride_pn", "stride_pl", "eps"]
    for patch, norm in ((16, True), (14, False)):
        meta = {"PATCH": patch, "NORM": norm, "BLOCK": 1024}
        compile_kernel(
            _masked_mse_fwd,
            {"img_ptr": t, "pred_ptr": t, "mask_ptr": "*fp32", "loss_ptr": "*fp32"},
            sizes,
            meta,
        )
        compile_kernel(
            _masked_mse_bwd,
            {"img_ptr": t, "pred_ptr": t, "mask_ptr": "*fp32", "scale_ptr": "*fp32", "grad_ptr": t},
            sizes,
            meta,
        )
