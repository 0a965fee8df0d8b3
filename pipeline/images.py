"""Check one source image and turn it into JPEG bytes DALI's decoders accept."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold
CONVERTED_QUALITY = 95
_DALI_JPEG_MODES = ("RGB", "L")


class RejectedImage(Exception):
    """The file cannot become a training sample; the message says why."""


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    width: int
    height: int
    conversion: str | None  # what was converted, or None when the original bytes are kept


def prepare_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Original bytes for RGB/grayscale JPEGs, an RGB JPEG (quality 95) for anything else PIL reads.

    Each image is decoded once: kept JPEGs at 1/8 scale (DCT scaling still reads every byte, so
    truncation shows), converted ones in full because their pixels are needed anyway.
    """
    if not data:
        raise RejectedImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise RejectedImage(f"{width}x{height} exceeds the pixel limit of {max_pixels}")
            if img.format == "JPEG" and img.mode in _DALI_JPEG_MODES:
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
                return PreparedImage(data, width, height, None)
            source = f"{img.format} {img.mode}"
            img.load()
            out = io.BytesIO()
            img.convert("RGB").save(out, format="JPEG", quality=CONVERTED_QUALITY)
            return PreparedImage(out.getvalue(), width, height, f"{source} -> RGB JPEG")
    except RejectedImage:
        raise
    except Image.DecompressionBombError as err:
        raise RejectedImage(f"exceeds the pixel limit: {err}") from None
    except UnidentifiedImageError:
        raise RejectedImage("not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RejectedImage(f"corrupt or truncated image: {err}") from None
