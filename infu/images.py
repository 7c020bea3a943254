"""Safe image probing and decoding shared by every step.

One place decides what a bad image is: bytes that are not an image (``not_image``), an empty file or
an image whose data is corrupt or truncated (``bad_image``), and a header that claims more pixels than allowed
(``too_large``, a decompression-bomb guard applied before any pixel is decoded). Decoding applies the
EXIF orientation and converts every colour mode (grayscale, CMYK, palette, alpha) to RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Largest accepted width x height (64 MP); anything above is rejected as ``too_large``."""

EXIF_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
_EXTENSION_BY_MIME = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
}


class BadImageError(ValueError):
    """An input that is not a usable image; ``reason`` is the reject reason recorded for it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What a fully decoded image looks like once EXIF orientation is applied."""

    width: int
    height: int
    mime: str
    mode: str
    orientation: int

    @property
    def extension(self) -> str:
        return extension_for_mime(self.mime)


def extension_for_mime(mime: str) -> str:
    """File extension used in shards for an image mime type."""
    return _EXTENSION_BY_MIME.get(mime, mime.rsplit("/", 1)[-1])


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImageError("bad_image", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadImageError("too_large", str(error)) from error
    except UnidentifiedImageError as error:
        raise BadImageError("not_image", "not a recognised image format") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError("bad_image", f"unreadable image header: {error}") from error
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImageError("bad_image", f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise BadImageError("too_large", f"{width}x{height} exceeds the {max_pixels}-pixel limit")
    return image


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject an otherwise valid image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError("bad_image", f"corrupt or truncated image data: {error}") from error


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check that ``data`` is a complete, decodable image and describe it.

    JPEGs are decoded at reduced DCT scale (``draft``): every byte is still read, so truncation is
    detected, at a fraction of the cost of a full decode.
    """
    image = _open(data, max_pixels)
    mime = Image.MIME.get(image.format or "", f"image/{(image.format or 'unknown').lower()}")
    orientation = _orientation(image)
    width, height = image.size
    mode = image.mode
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
    _load(image)
    if _orientation(image) in _SWAPS_AXES:  # a TIFF's load() turns it upright and drops the tag itself
        width, height = height, width
    return ImageInfo(width=width, height=height, mime=mime, mode=mode, orientation=orientation)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB with EXIF orientation applied; transparency is composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 256.0).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode bytes to an upright RGB image, raising :class:`BadImageError` on bad input.

    With ``min_size`` (upright width, height), a JPEG is decoded at the smallest DCT scale (1/2, 1/4,
    1/8) that still covers it: much cheaper when the image is downscaled afterwards anyway."""
    image = _open(data, max_pixels)
    if min_size is not None and image.format == "JPEG":
        width, height = min_size
        image.draft(image.mode, (height, width) if _orientation(image) in _SWAPS_AXES else (width, height))
    _load(image)
    return to_rgb(image)


ImageInput = str | Path | bytes | Image.Image | np.ndarray


def load_rgb(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Path, bytes, PIL image or HxWx3 uint8 RGB array -> upright RGB PIL image."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        if source.ndim == 2:
            source = np.stack([source] * 3, axis=-1)
        if source.ndim != 3 or source.shape[2] not in (3, 4) or source.dtype != np.uint8:
            raise BadImageError(
                "bad_image", f"expected an HxWx3 uint8 array, got {source.shape} {source.dtype}"
            )
        return to_rgb(Image.fromarray(source))
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BadImageError("unreadable", f"{path}: {error}") from error
        try:
            return decode_image(data, max_pixels)
        except BadImageError as error:
            raise BadImageError(error.reason, f"{path}: {error.detail}") from error
    return decode_image(source, max_pixels)


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
