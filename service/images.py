"""Validation of uploaded training images (size in bytes, pixel count, real format, full decode),
and heat maps laid over generated ones."""

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


def overlay(image: Image.Image, grid: list[list[float]]) -> bytes:
    """``grid`` (a map over the image's latent patches) as a red heat map over ``image``, a PNG:
    the map scaled to its own maximum, upsampled smoothly to the image's size."""
    peak = max((value for row in grid for value in row), default=0.0) or 1.0
    heat = Image.new("L", (len(grid[0]), len(grid)))
    heat.putdata([round(255 * value / peak) for row in grid for value in row])
    heat = heat.resize(image.size, Image.Resampling.BILINEAR)
    red = Image.new("RGB", image.size, (255, 0, 0))
    # At most 70 % red where the map peaks, so the image stays readable under it.
    alpha = heat.point(lambda level: level * 7 // 10)
    out = io.BytesIO()
    Image.composite(red, image.convert("RGB"), alpha).save(out, format="PNG")
    return out.getvalue()
