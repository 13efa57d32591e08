"""What the CPU and device decoders share: the preset's geometry, the size checks and the header.

``Preprocess`` is the resize/crop of a torchvision ``ImageClassification`` preset; both
decoders refuse the same images (``size_error``, ``open_header``) with the same reasons
(``DecodeError``) and crop the same way (``torchvision_resize_crop`` is the reference).
Plain Python: no Ray, and torch only inside ``torchvision_resize_crop``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from pipeline.config import DEFAULT_MAX_PIXELS


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


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's resize of the shorter side to ``size``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def size_error(width: int, height: int, max_pixels: int, spec: Preprocess | None = None) -> str | None:
    """Why an image of this size is refused, or None.

    ``max_pixels`` bounds the image as stored and, given ``spec``, after the preset's resize:
    a strip of a few thousand pixels (4000x2) grows to hundreds of millions when its
    shorter side is scaled up to 256.
    """
    if width < 1 or height < 1:
        return f"image has no pixels ({width}x{height})"
    if width * height > max_pixels:
        return f"image has {width}x{height}={width * height} pixels, above the limit of {max_pixels}"
    if spec is not None:
        rw, rh = resized_size(width, height, spec.resize_size)
        if rw * rh > max_pixels:
            return (
                f"image of {width}x{height} would be {rw}x{rh}={rw * rh} pixels once resized, "
                f"above the limit of {max_pixels}"
            )
    return None


def open_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, spec: Preprocess | None = None):
    """Opens image bytes lazily (Pillow reads the header only) and checks the size.

    ``max_pixels`` is the only limit: Pillow's own decompression-bomb limit is raised to
    it when it is larger, never lowered.

    Raises:
        DecodeError: empty or unrecognised data, or too many pixels (``size_error``).
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # The pixel limit is enforced here, against our own setting.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from None
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, EOFError...
        raise DecodeError(_short(e)) from None
    reason = size_error(*img.size, max_pixels, spec)
    if reason:
        raise DecodeError(reason)
    return img


def _short(e: BaseException) -> str:
    """An exception as a one-line error reason: its type and the first 200 characters of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def torchvision_resize_crop(img, spec: Preprocess):
    """The preset's resize of the shorter side and center crop, with torchvision's own functions.

    ``img``: a PIL image (Pillow resizes it: the CPU path, and the reference) or a uint8
    tensor (C, H, W) or (N, C, H, W). The device path's ``resize_crop`` takes this for
    the presets whose resize it does not redo as Pillow does.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = F.resize(
        img,
        [spec.resize_size],
        interpolation=InterpolationMode(spec.interpolation),
        antialias=spec.antialias,
    )
    return F.center_crop(img, [spec.crop_size])
