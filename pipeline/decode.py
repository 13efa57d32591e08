"""Stage 2: image bytes → uint8 RGB array at the model's input size, or an error reason.

Plain Python (no Ray import), so it is unit-testable and usable from a plain loop.

The uint8 output is exactly what torchvision's ``ImageClassification`` preset holds
between ``center_crop`` and ``convert_image_dtype`` when it is given a PIL image:
resize and crop run here on the CPU, the float conversion and normalisation run on the
model's device (see ``predict.py``). Splitting there keeps the array sent between
stages 4× smaller than float32 and leaves the numbers identical to torchvision's.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Pillow's own default decompression-bomb limit (Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 89_478_485

# Extensions of the image files read from folders and picked out of WebDataset samples.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DecodeError(Exception):
    """An image that cannot become a model input; its message is the row's error reason."""


@dataclass(frozen=True)
class Preprocess:
    """Resize/crop geometry of a torchvision ``ImageClassification`` preset.

    ``mean``/``std`` are not here: they stay in the preset object and are applied on
    the model's device.
    """

    resize_size: int
    crop_size: int
    interpolation: str = "bilinear"
    antialias: bool = True

    @classmethod
    def from_transforms(cls, transforms) -> Preprocess:
        """Reads the geometry out of a torchvision ``ImageClassification`` preset."""
        resize = transforms.resize_size
        crop = transforms.crop_size
        return cls(
            resize_size=int(resize[0] if isinstance(resize, (list, tuple)) else resize),
            crop_size=int(crop[0] if isinstance(crop, (list, tuple)) else crop),
            interpolation=transforms.interpolation.value,
            antialias=bool(transforms.antialias),
        )


def open_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes image bytes to an RGB PIL image with EXIF orientation applied.

    Raises:
        DecodeError: empty, truncated or unrecognised data, or more than ``max_pixels``.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # The pixel limit is enforced below, against our own setting.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"image has {width}x{height}={width * height} pixels, above the limit of {max_pixels}"
                )
            img.load()  # Forces the full decode: a truncated file fails here, not later.
            img = ImageOps.exif_transpose(img)
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from None
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
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = F.resize(
        img,
        [spec.resize_size],
        interpolation=InterpolationMode(spec.interpolation),
        antialias=spec.antialias,
    )
    img = F.center_crop(img, [spec.crop_size])
    return np.asarray(img, dtype=np.uint8)


def decode(data: bytes, spec: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """bytes → uint8 (crop, crop, 3). Raises DecodeError with a short reason."""
    img = open_rgb(data, max_pixels)
    try:
        return preprocess(img, spec)
    except Exception as e:
        raise DecodeError(_short(e)) from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def decode_batch(
    batch: dict[str, np.ndarray], spec: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """The decode stage over a batch of (id, source, bytes, error) rows.

    This is the one place that catches per image: whatever goes wrong with one image
    becomes its row's ``error``; the row is never dropped.

    Returns:
        id, source, status, error and image (uint8 (N, crop, crop, 3); zeros on error rows).
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
    status = np.where(errors == None, C.STATUS_OK, C.STATUS_ERROR).astype(object)  # noqa: E711
    return {
        C.ID: batch[C.ID],
        C.SOURCE: batch[C.SOURCE],
        C.STATUS: status,
        C.ERROR: errors,
        C.IMAGE: images,
    }


def text_or_none(values) -> list[str | None]:
    """A nullable string column as Python values.

    Ray hands an all-null string column to numpy UDFs as float NaNs, not Nones.
    """
    return [v if isinstance(v, str) else None for v in values]


def decode_jpeg_batch(datas: list[bytes], spec: Preprocess, device: str = "cuda"):
    """Batched JPEG decode on ``device`` (nvJPEG on CUDA), then resize and crop there.

    Images that are not JPEG, or that the batched decoder rejects, fall back to the CPU
    path one by one; those that fail there too get an error reason.

    Returns:
        (uint8 tensor (N, crop, crop, 3) on ``device``, list of error reasons or None).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    out = torch.zeros((len(datas), spec.crop_size, spec.crop_size, 3), dtype=torch.uint8, device=device)
    errors: list[str | None] = [None] * len(datas)
    jpeg = [i for i, d in enumerate(datas) if d[:3] == b"\xff\xd8\xff"]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg:
        raw = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpeg]
        try:
            imgs = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
            decoded = dict(zip(jpeg, imgs, strict=True))
        except RuntimeError:
            decoded = {}  # one bad file fails the batch: every JPEG takes the CPU path below
    for i, data in enumerate(datas):
        if i in decoded:
            img = F.resize(
                decoded[i],
                [spec.resize_size],
                interpolation=InterpolationMode(spec.interpolation),
                antialias=spec.antialias,
            )
            out[i] = F.center_crop(img, [spec.crop_size]).permute(1, 2, 0)
        else:
            try:
                out[i] = torch.from_numpy(decode(data, spec).copy()).to(device)
            except DecodeError as e:
                errors[i] = str(e)
    return out, errors
