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
    return np.asarray(resize_crop(img, spec), dtype=np.uint8)


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
        id, source, error and image (uint8 (N, crop, crop, 3); zeros on error rows). The
        model actor sets each row's status from its error.
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
    return {
        C.ID: batch[C.ID],
        C.SOURCE: batch[C.SOURCE],
        C.ERROR: errors,
        C.IMAGE: images,
    }


def text_or_none(values) -> list[str | None]:
    """A nullable string column as Python values.

    Ray hands an all-null string column to numpy UDFs as float NaNs, not Nones.
    """
    return [v if isinstance(v, str) else None for v in values]


def decode_jpeg_batch(
    datas: list[bytes], spec: Preprocess, device="cuda", max_pixels: int = DEFAULT_MAX_PIXELS
):
    """Batched JPEG decode on ``device`` (nvJPEG on CUDA), then resize and crop there.

    The ``--decode gpu`` path. JPEGs go to torchvision's batched ``decode_jpeg`` in one
    call; if it rejects the batch, each is tried alone. Whatever is left (other formats,
    JPEGs over ``max_pixels`` or that the device decoder refuses, broken files) takes
    the CPU path, ``decode``, one by one, which gives broken files their error reason.
    Resize and crop run on the device too, computed as Pillow computes them
    (``_resize_like_pil``), so the crops match the CPU path's.

    Returns:
        (uint8 tensor (N, crop, crop, 3) on ``device``, list of error reasons or None).
    """
    import torch

    out = torch.zeros((len(datas), spec.crop_size, spec.crop_size, 3), dtype=torch.uint8, device=device)
    errors: list[str | None] = [None] * len(datas)
    orientation = {i: o for i, d in enumerate(datas) if (o := _jpeg_orientation(d, max_pixels))}
    jpeg = list(orientation)
    decoded = dict(zip(jpeg, _device_decode([datas[i] for i in jpeg], device), strict=True))
    for i, data in enumerate(datas):
        img = decoded.get(i)
        if img is not None:
            out[i] = resize_crop(exif_orient(img, orientation[i]), spec).permute(1, 2, 0)
            continue
        try:
            out[i] = torch.from_numpy(decode(data, spec, max_pixels).copy()).to(device)
        except DecodeError as e:
            errors[i] = str(e)
    return out, errors


def _jpeg_orientation(data: bytes, max_pixels: int) -> int | None:
    """The EXIF orientation (1 to 8; 1 when untagged) of a JPEG that the device decoder may
    take: one whose header Pillow reads (without decoding) and within the pixel limit.
    None for anything else."""
    if not data or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        width, height = img.size
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:
        return None
    if width * height > max_pixels or not 1 <= orientation <= 8:
        return None
    return orientation


def exif_orient(img, orientation: int):
    """Turns a decoded CHW tensor upright, as ``PIL.ImageOps.exif_transpose`` does.

    torchvision's ``decode_jpeg`` ignores ``apply_exif_orientation`` on CUDA, so the
    device path does it here, with the same flips and rotations on every device.
    """
    import torch

    hw = (-2, -1)
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(hw)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, hw)
    if orientation == 7:
        return img.transpose(-2, -1).flip(hw)
    if orientation == 8:
        return torch.rot90(img, 1, hw)
    return img


def _device_decode(datas: list[bytes], device) -> list:
    """Decoded CHW uint8 tensors, as stored (no EXIF turn), or None where the decoder refused."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    kw = {"mode": ImageReadMode.RGB, "device": device}
    try:
        return list(decode_jpeg(raw, **kw))
    except RuntimeError:
        pass  # one bad file fails the whole batch: try each alone
    out = []
    for r in raw:
        try:
            out.append(decode_jpeg(r, **kw))
        except RuntimeError:
            out.append(None)
    return out


def resize_crop(img, spec: Preprocess):
    """The preset's resize of the shorter side and center crop: a PIL image, or a CHW uint8 tensor."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    if isinstance(img, Image.Image) or not _pil_like(spec):
        img = F.resize(
            img,
            [spec.resize_size],
            interpolation=InterpolationMode(spec.interpolation),
            antialias=spec.antialias,
        )
    else:
        img = _resize_like_pil(img, spec)
    return F.center_crop(img, [spec.crop_size])


def _pil_like(spec: Preprocess) -> bool:
    return spec.antialias and spec.interpolation in ("bilinear", "bicubic")


def _resize_like_pil(img, spec: Preprocess):
    """Pillow's antialiased resize, on any device: width first, then height, each rounded to uint8.

    torchvision's tensor resize does both axes in one float pass. Its pixels differ from
    Pillow's by one grey level in about 17% of places, and that was enough to pull the
    calibrated ResNet-50's features to cosine 0.992 of the reference (the fidelity test
    asks 0.999). Pillow rounds to 8 bits between its two passes, half up; the same two
    passes with torch's antialiased ``interpolate`` (whose weights are Pillow's) give the
    same pixels, except about one in 10,000.
    """
    import torch
    from torch.nn.functional import interpolate

    h, w = img.shape[-2:]
    size = spec.resize_size
    # torchvision's rule: the shorter side becomes ``size``, the longer keeps the aspect ratio.
    oh, ow = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    x = img.unsqueeze(0).to(torch.float32)
    for shape in ((h, ow), (oh, ow)):
        if shape != tuple(x.shape[-2:]):
            x = interpolate(x, size=shape, mode=spec.interpolation, antialias=True, align_corners=False)
            x = x.add_(0.5).floor_().clamp_(0, 255)
    return x[0].to(torch.uint8)
