"""Validation of uploaded training images: size in bytes, pixel count, real format, full decode."""

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from service.errors import ApiError

FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
MAX_IMAGES = 10


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    extension: str


def check_image(name: str, data: bytes, max_bytes: int, max_pixels: int) -> CheckedImage:
    label = f"image '{name}'"
    if not data:
        raise ApiError(422, "invalid_image", f"{label} is empty")
    if len(data) > max_bytes:
        raise ApiError(
            413, "image_too_large", f"{label} is {len(data)} bytes; the limit is {max_bytes} bytes per image"
        )
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; our own limit is checked below.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
                if fmt not in FORMATS:
                    raise ApiError(415, "unsupported_image_format", f"{label} is {fmt}; send PNG, JPEG or WebP")
                if width * height > max_pixels:
                    raise ApiError(
                        422,
                        "image_too_many_pixels",
                        f"{label} has {width}x{height} pixels; the limit is {max_pixels} pixels",
                    )
                img.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(
            422, "image_too_many_pixels", f"{label} has too many pixels; the limit is {max_pixels}"
        ) from None
    except Exception:
        raise ApiError(415, "unsupported_image_format", f"{label} is not a readable PNG, JPEG or WebP image") from None
    return CheckedImage(data=data, extension=FORMATS[fmt])
