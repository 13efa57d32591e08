"""Stage 2: image bytes → uint8 RGB array at the model's input size, or an error reason.

Plain Python (no Ray import), so it is unit-testable and usable from a plain loop; torch
is imported only where an image is resized or decoded on a device.

The uint8 output is exactly what torchvision's ``ImageClassification`` preset holds
between ``center_crop`` and ``convert_image_dtype`` when it is given a PIL image:
resize and crop run here, the float conversion and normalisation run on the model's
device (see ``predict.py``). Splitting there keeps the array sent between stages 4×
smaller than float32 and leaves the numbers identical to torchvision's.

- ``geometry``: what both decoders share: ``Preprocess``, the size limits, the header, ``DecodeError``.
- ``cpu``: the decode stage's Pillow decoder (``decode``, ``decode_batch``).
- ``device``: the ``--decode gpu`` decoder (``decode_jpeg_batch``: nvJPEG, then Pillow's numbers).
"""

from pipeline.decode.cpu import decode, decode_batch, open_rgb, preprocess, text_or_none, to_rgb
from pipeline.decode.device import (
    JpegHeader,
    decode_jpeg_batch,
    exif_orient,
    fancy_upsample,
    refine_chroma,
    resize_crop,
    ycc_to_rgb,
)
from pipeline.decode.device import _compiled_refine_chroma as _compiled_refine_chroma
from pipeline.decode.device import _device_jpeg_header as _device_jpeg_header
from pipeline.decode.geometry import (
    DecodeError,
    Preprocess,
    open_header,
    resized_size,
    size_error,
)

__all__ = [
    "DecodeError",
    "JpegHeader",
    "Preprocess",
    "decode",
    "decode_batch",
    "decode_jpeg_batch",
    "exif_orient",
    "fancy_upsample",
    "open_header",
    "open_rgb",
    "preprocess",
    "refine_chroma",
    "resize_crop",
    "resized_size",
    "size_error",
    "text_or_none",
    "to_rgb",
    "ycc_to_rgb",
]
