"""The CPU decoder (the decode stage): image bytes → uint8 RGB at the crop size, with Pillow.

Plain Python (no Ray import, torch only inside torchvision's resize), so it is
unit-testable and usable from a plain loop. Any format Pillow reads; EXIF orientation is
applied with ``ImageOps.exif_transpose``; wide integer and float modes are scaled to 8 bits.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.decode.geometry import DecodeError, Preprocess, _short, open_header, torchvision_resize_crop


def open_rgb(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, spec: Preprocess | None = None
) -> Image.Image:
    """Decodes image bytes to an RGB PIL image with EXIF orientation applied.

    Raises:
        DecodeError: empty, truncated or unrecognised data, or too many pixels, as stored or,
            given ``spec``, once resized.
    """
    img = open_header(data, max_pixels, spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()  # Forces the full decode: a truncated file fails here, not later.
            img = ImageOps.exif_transpose(img)
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, EOFError...
        raise DecodeError(_short(e)) from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB; wide integer and float modes are scaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's convert() clips these to 0..255; scale them into 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
        elif img.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255):
            top = 65535.0
        else:
            top = 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Avoids Pillow's warning; alpha is then dropped.
    return img.convert("RGB")


def preprocess(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """Resizes the shorter side and center-crops with torchvision, as its preset does.

    Returns:
        uint8 array of shape (crop, crop, 3).
    """
    return np.asarray(torchvision_resize_crop(img, spec), dtype=np.uint8)


def decode(data: bytes, spec: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """bytes → uint8 (crop, crop, 3). Raises DecodeError with a short reason."""
    img = open_rgb(data, max_pixels, spec)
    try:
        return preprocess(img, spec)
    except Exception as e:
        raise DecodeError(_short(e)) from None


def decode_batch(
    batch: dict[str, np.ndarray], spec: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """The decode stage over a batch of (id, source, bytes, error) rows.

    This is the one place that catches per image: whatever goes wrong with one image
    becomes its row's ``error``; the row is never dropped.

    Returns:
        id, source, error and image (uint8 (N, crop, crop, 3); zeros on error rows), and
        the batch's source_version when it has one. The model actor sets each row's status
        from its error.
    """
    from pipeline import columns as C

    n = len(batch[C.ID])
    images = np.zeros((n, spec.crop_size, spec.crop_size, 3), dtype=np.uint8)
    errors = np.asarray(text_or_none(batch[C.ERROR]), dtype=object)
    for i, data in enumerate(batch[C.BYTES]):
        if errors[i] is not None:
            continue  # the reader already said why there are no bytes
        try:
            images[i] = decode(data, spec, max_pixels)
        except DecodeError as e:
            errors[i] = str(e)
    out = {C.ID: batch[C.ID], C.SOURCE: batch[C.SOURCE], C.ERROR: errors, C.IMAGE: images}
    if C.SOURCE_VERSION in batch:
        out[C.SOURCE_VERSION] = batch[C.SOURCE_VERSION]
    return out


def text_or_none(values) -> list[str | None]:
    """A nullable string column as Python values.

    Ray hands an all-null string column to numpy UDFs as float NaNs, not Nones.
    """
    return [v if isinstance(v, str) else None for v in values]
