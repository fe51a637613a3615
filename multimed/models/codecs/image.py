"""PNG / JPEG / TIFF read and write with Pillow, as float32 [C, H, W] in [0, 1]."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image, ImageOps

from multimed.models.errors import InputError

# Checked from the header, before any pixels are decoded, so a decompression bomb costs nothing.
MAX_SIDE = 4096
FORMATS = ("PNG", "JPEG", "TIFF")


def read_image(data: bytes, modality: str, channels: int) -> np.ndarray:
    """Image bytes -> float32 [channels, H, W] in [0, 1]; channels 1 is luminance ('L'), 3 RGB.
    Only the first frame of a multi-page file is read."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InputError(modality, f"image input must be bytes, got {type(data).__name__}")
    # Pillow's plugins raise assorted exception types on corrupt input (OSError, ValueError,
    # SyntaxError, EOFError, ...): for untrusted bytes every one of them means a bad image.
    try:
        im = Image.open(BytesIO(bytes(data)), formats=FORMATS)  # reads the header only
    except Exception as e:
        raise InputError(modality, f"not a readable PNG/JPEG/TIFF image ({e})") from None
    with im:
        if max(im.size) > MAX_SIDE:
            raise InputError(modality, f"image is {im.size[0]}x{im.size[1]}, over {MAX_SIDE}")
        try:
            return _pixels(im, channels)
        except Exception as e:
            raise InputError(modality, f"image data is corrupt ({e})") from None


def _pixels(im: Image.Image, channels: int) -> np.ndarray:
    """Decode to float32 [channels, H, W] in [0, 1], with one float copy (a 4096 x 4096 RGB
    image is 192 MiB as float32)."""
    im = ImageOps.exif_transpose(im)  # camera JPEGs store their rotation as a tag
    if im.mode.startswith("I"):  # 16/32-bit grayscale: convert("L") would clip, not scale
        gray = np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return np.repeat(gray[None], channels, axis=0)
    stored = np.asarray(im.convert("L" if channels == 1 else "RGB"))  # uint8 [H, W(, 3)]
    stored = stored.reshape(*stored.shape[:2], channels).transpose(2, 0, 1)
    array = np.ascontiguousarray(stored, dtype=np.float32)
    array /= 255.0
    return array


def write_png(image: np.ndarray) -> bytes:
    """float [C, H, W] in [0, 1] (C = 1 or 3) -> 8-bit PNG bytes."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [1 or 3, H, W], got shape {image.shape}")
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
    buffer = BytesIO()
    Image.fromarray(pixels[..., 0] if image.shape[0] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()
