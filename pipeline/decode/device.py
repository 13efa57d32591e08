"""The device decoder (``--decode gpu``): JPEG bytes → uint8 RGB at the crop size, on the model's device.

torchvision's batched ``decode_jpeg`` (nvJPEG on CUDA), then what makes its crops match
the CPU decoder's (Pillow): libjpeg-turbo's chroma upsampling redone after nvJPEG
(``refine_chroma``), EXIF orientation turned on the device (``exif_orient``), and
Pillow's two-pass resize (``_resize_like_pil``). What it does not take goes to the CPU
decoder (``decode``), which gives broken files their reason.

No Ray; torch and torchvision are imported inside the functions, so importing this module
costs the CPU decode stage nothing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from PIL import Image

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.decode.cpu import decode
from pipeline.decode.geometry import DecodeError, Preprocess, open_header, torchvision_resize_crop


def decode_jpeg_batch(
    datas: list[bytes],
    spec: Preprocess,
    device="cuda",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    compile: bool = False,
):
    """Batched JPEG decode on ``device`` (nvJPEG on CUDA), then resize and crop there.

    The ``--decode gpu`` path. RGB and greyscale JPEGs go to torchvision's batched
    ``decode_jpeg`` in one call; if it rejects the batch, each is tried alone. Whatever is
    left (other formats, CMYK JPEGs, unusual chroma subsampling, JPEGs over ``max_pixels``
    or that the device decoder refuses, broken files) takes the CPU path, ``decode``, one
    by one, which gives broken files their error reason.

    The crops match the CPU path's (Pillow): on CUDA the chroma is upsampled again as
    libjpeg-turbo does it (``refine_chroma``), and resize and crop are computed as Pillow
    computes them (``_resize_like_pil``). Images of one stored shape, subsampling and EXIF
    orientation are processed together, a few kernel launches per group rather than per
    image: photo collections hold few distinct sizes. ``compile``: run ``refine_chroma``
    through ``torch.compile``, which fuses its few dozen full-size passes into a few.

    Returns:
        (uint8 tensor (N, crop, crop, 3) on ``device``, list of error reasons or None).
    """
    import torch

    device = torch.device(device)
    out = torch.zeros((len(datas), spec.crop_size, spec.crop_size, 3), dtype=torch.uint8, device=device)
    errors: list[str | None] = [None] * len(datas)
    headers = {i: h for i, d in enumerate(datas) if (h := _device_jpeg_header(d, max_pixels, spec))}
    jpeg = list(headers)
    decoded = {
        i: img
        for i, img in zip(jpeg, _device_decode([datas[i] for i in jpeg], device), strict=True)
        if img is not None
    }
    groups: dict[tuple, list[int]] = {}
    for i, img in decoded.items():
        groups.setdefault((tuple(img.shape), headers[i]), []).append(i)
    # nvJPEG upsamples subsampled chroma by repeating it; libjpeg-turbo, which Pillow and
    # torchvision's CPU decoder use, interpolates it.
    repeats_chroma = device.type == "cuda"
    for ((_, h, w), header), rows in groups.items():
        # Bounds the float32 copies of one pass to about 1 GiB.
        step = max(1, _PASS_BUDGET // (3 * h * w))
        for k in range(0, len(rows), step):
            part = rows[k : k + step]
            x = torch.stack([decoded[i] for i in part])
            if repeats_chroma and header.sampling != (1, 1):
                x = (_compiled_refine_chroma() if compile else refine_chroma)(x, header.sampling)
            x = exif_orient(x, header.orientation)
            out[part] = resize_crop(x, spec).permute(0, 2, 3, 1)
    for i, data in enumerate(datas):
        if i in decoded:
            continue
        try:
            out[i] = torch.from_numpy(decode(data, spec, max_pixels).copy()).to(device)
        except DecodeError as e:
            errors[i] = str(e)
    return out, errors


@functools.cache
def _compiled_refine_chroma():
    import torch

    return torch.compile(refine_chroma, dynamic=True)


# Elements (float32) of one batched pass in ``decode_jpeg_batch``.
_PASS_BUDGET = 1 << 28

# JPEG colour modes (as Pillow reads them from the header) that go to the device decoder.
# CMYK/YCCK take the CPU path: Pillow's conversion of Adobe CMYK is the reference there.
_DEVICE_JPEG_MODES = ("RGB", "L")


class JpegHeader(NamedTuple):
    orientation: int  # EXIF orientation, 1 to 8 (1 when untagged)
    sampling: tuple[int, int]  # chroma subsampling (vertical, horizontal): (2, 2) is 4:2:0


def _device_jpeg_header(data: bytes, max_pixels: int, spec: Preprocess | None = None) -> JpegHeader | None:
    """What the device path needs of a JPEG it may take: an RGB or greyscale one whose
    header Pillow reads (without decoding), within the pixel limit (``size_error``), with
    chroma subsampled by 1 or 2 each way. None for anything else (the CPU path takes it,
    and gives a refused one its reason)."""
    if not data or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        img = open_header(data, max_pixels, spec)  # lazy: reads the header only
        mode = img.mode
        orientation = int(img.getexif().get(0x0112, 1))
        sampling = (1, 1)
        if mode == "RGB":
            (_, h0, v0, _), (_, h1, v1, _), (_, h2, v2, _) = img.layer
            if (h1, v1) != (h2, v2) or h0 % h1 or v0 % v1:
                return None
            sampling = (v0 // v1, h0 // h1)
    except Exception:
        return None
    if mode not in _DEVICE_JPEG_MODES or not 1 <= orientation <= 8 or not set(sampling) <= {1, 2}:
        return None
    return JpegHeader(orientation, sampling)


def refine_chroma(rgb, sampling: tuple[int, int]):
    """RGB decoded with repeated chroma → RGB with chroma upsampled as libjpeg-turbo does.

    ``rgb``: uint8 (N, 3, H, W), as stored (before any EXIF turn). ``sampling``: chroma
    subsampling (vertical, horizontal), each 1 or 2.

    nvJPEG gives each block of 2x2 (4:2:0) or 2x1 pixels the same chroma; libjpeg-turbo
    (Pillow, torchvision's CPU decoder) interpolates it with its "fancy" triangle filter.
    The two differ by up to 30 grey levels at colour edges, which pulled a calibrated
    ResNet-50's features to cosine 0.983 of the Pillow path on an H100. Here the chroma
    planes are read back out of the RGB (averaged over each block), upsampled with
    libjpeg-turbo's integer arithmetic (``jdsample.c``), and turned into RGB with its
    integer tables (``jdcolor.c``).
    """
    import torch
    from torch.nn.functional import avg_pool2d, pad

    fy, fx = sampling
    h, w = rgb.shape[-2:]
    x = rgb.to(torch.float32)
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cbcr = torch.stack(((b - y) / 1.772 + 128, (r - y) / 1.402 + 128), 1)
    # A clipped channel (0 or 255) hides the chroma: such pixels weigh almost nothing.
    weight = ((rgb > 0) & (rgb < 255)).all(1, keepdim=True).to(torch.float32).add_(1e-3)
    edges = (0, (-w) % fx, 0, (-h) % fy)
    num = avg_pool2d(pad(cbcr * weight, edges, mode="replicate"), (fy, fx))
    c = (num / avg_pool2d(pad(weight, edges, mode="replicate"), (fy, fx))).round_().clamp_(0, 255)
    chroma = fancy_upsample(c.to(torch.int32), sampling)[..., :h, :w]
    return ycc_to_rgb(y.round_().clamp_(0, 255).to(torch.int32), chroma)


def fancy_upsample(c, sampling: tuple[int, int]):
    """libjpeg-turbo's "fancy" chroma upsampling (``jdsample.c``: h2v2, h2v1, h1v2), in integers.

    ``c``: int32 (..., h, w) chroma samples. Each output sample weighs its nearer input 3/4
    and the next one 1/4, with libjpeg's rounding; the edges repeat their last sample.
    """
    import torch

    def neighbours(t, dim):
        first, last = t.narrow(dim, 0, 1), t.narrow(dim, t.shape[dim] - 1, 1)
        before = torch.cat((first, t.narrow(dim, 0, t.shape[dim] - 1)), dim)
        after = torch.cat((t.narrow(dim, 1, t.shape[dim] - 1), last), dim)
        return before, after

    def interleave(even, odd, dim):
        return torch.stack((even, odd), dim).flatten(dim - 1, dim)

    fy, fx = sampling
    if (fy, fx) == (2, 2):
        above, below = neighbours(c, -2)
        s = interleave(3 * c + above, 3 * c + below, -2)  # column sums, at 4x scale
        left, right = neighbours(s, -1)
        return interleave((3 * s + left + 8) >> 4, (3 * s + right + 7) >> 4, -1)
    if fx == 2:
        left, right = neighbours(c, -1)
        return interleave((3 * c + left + 1) >> 2, (3 * c + right + 2) >> 2, -1)
    if fy == 2:
        above, below = neighbours(c, -2)
        return interleave((3 * c + above + 1) >> 2, (3 * c + below + 2) >> 2, -2)
    return c


def ycc_to_rgb(y, cbcr):
    """libjpeg's YCbCr → RGB in integers (``jdcolor.c``).

    ``y``: int32 (N, H, W); ``cbcr``: int32 (N, 2, H, W). Returns uint8 (N, 3, H, W).
    """
    import torch

    cb, cr = (cbcr - 128).unbind(1)
    half = 1 << 15
    r = y + ((91881 * cr + half) >> 16)  # FIX(1.40200)
    g = y + ((-22554 * cb - 46802 * cr + half) >> 16)  # FIX(0.34414), FIX(0.71414)
    b = y + ((116130 * cb + half) >> 16)  # FIX(1.77200)
    return torch.stack((r, g, b), 1).clamp_(0, 255).to(torch.uint8)


def exif_orient(img, orientation: int):
    """Turns decoded (..., C, H, W) tensors upright, as ``PIL.ImageOps.exif_transpose`` does.

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
    """The preset's resize of the shorter side and center crop: a PIL image, or a uint8 tensor
    (C, H, W) or (N, C, H, W)."""
    from torchvision.transforms import functional as F

    if isinstance(img, Image.Image) or not _pil_like(spec):
        return torchvision_resize_crop(img, spec)
    return F.center_crop(_resize_like_pil(img, spec), [spec.crop_size])


def _pil_like(spec: Preprocess) -> bool:
    return spec.antialias and spec.interpolation in ("bilinear", "bicubic")


def _resize_like_pil(img, spec: Preprocess):
    """Pillow's antialiased resize, on any device: width first, then height, each rounded to uint8.

    ``img`` is one CHW uint8 tensor or a batch (N, C, H, W) of one shape.

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
    x = (img if img.ndim == 4 else img.unsqueeze(0)).to(torch.float32)
    for shape in ((h, ow), (oh, ow)):
        if shape != tuple(x.shape[-2:]):
            x = interpolate(x, size=shape, mode=spec.interpolation, antialias=True, align_corners=False)
            x = x.add_(0.5).floor_().clamp_(0, 255)
    x = x.to(torch.uint8)
    return x if img.ndim == 4 else x[0]
