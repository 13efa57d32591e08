"""bytes → uint8 RGB at the model's input size, or an error reason."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF
from torchvision.transforms._presets import ImageClassification

from pipeline import columns as C
from pipeline.decode import (
    DecodeError,
    Preprocess,
    _device_jpeg_header,
    decode,
    decode_batch,
    decode_jpeg_batch,
    fancy_upsample,
    open_header,
    open_rgb,
    refine_chroma,
    ycc_to_rgb,
)
from pipeline.samples import photo_like
from tests.conftest import BROKEN, GOOD, _encode

SPEC = Preprocess(resize_size=256, crop_size=224)


@pytest.mark.parametrize("key", sorted(GOOD))
def test_every_mode_and_format_becomes_rgb_at_crop_size(key):
    out = decode(GOOD[key], SPEC)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out.std() > 1  # real content, not a blank frame


@pytest.mark.parametrize(
    "key, reason",
    [
        ("bad/empty.jpg", "empty file"),
        ("bad/truncated.jpg", "truncated"),
        ("bad/not_image.png", "not a recognised image"),
        ("bad/page.jpg", "not a recognised image"),
    ],
)
def test_broken_inputs_raise_a_short_reason(key, reason):
    with pytest.raises(DecodeError, match=reason):
        decode(BROKEN[key], SPEC)


def test_pixel_limit_is_an_error_before_decoding():
    data = GOOD["good/cat.jpg"]  # 320x240 = 76800 pixels; 341x256 = 87296 once resized
    with pytest.raises(DecodeError, match="has 320x240=76800 pixels, above the limit of 76799"):
        decode(data, SPEC, max_pixels=76_799)
    with pytest.raises(DecodeError, match="would be 341x256=87296 pixels once resized"):
        decode(data, SPEC, max_pixels=87_295)
    assert decode(data, SPEC, max_pixels=87_296).shape == (224, 224, 3)


def test_exif_orientation_is_applied():
    img = open_rgb(GOOD["modes/rotated.jpg"])
    assert img.size == (240, 320)  # stored 320x240, orientation 6 turns it upright


def test_16_bit_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    rgb = np.asarray(open_rgb(buf.getvalue()))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_gif_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    rgb = np.asarray(open_rgb(buf.getvalue()))
    assert tuple(rgb[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("key", ["good/cat.jpg", "good/dog.png", "modes/gray.png"])
def test_uint8_then_normalize_equals_torchvision_preset(key):
    """Our CPU half plus the actor's half is exactly torchvision's ImageClassification."""
    preset = ImageClassification(crop_size=224, resize_size=256)
    img = open_rgb(GOOD[key])
    expected = preset(img)
    x = torch.from_numpy(decode(GOOD[key], Preprocess.from_transforms(preset))).permute(2, 0, 1)
    ours = TF.normalize(TF.convert_image_dtype(x, torch.float32), preset.mean, preset.std)
    assert torch.equal(ours, expected)


def test_decode_batch_keeps_every_row_and_the_readers_errors():
    batch = {
        C.ID: np.array(["a", "b", "c"], dtype=object),
        C.SOURCE: np.array(["s"] * 3, dtype=object),
        C.BYTES: np.array([GOOD["good/cat.jpg"], BROKEN["bad/page.jpg"], None], dtype=object),
        # Ray hands an all-null column over as NaNs; the reader's own reasons are strings.
        C.ERROR: np.array([np.nan, np.nan, "cannot read file"], dtype=object),
    }
    out = decode_batch(batch, SPEC)
    assert C.STATUS not in out  # the actor sets it, from the error
    assert out[C.ERROR][0] is None
    assert "not a recognised image" in out[C.ERROR][1]
    assert out[C.ERROR][2] == "cannot read file"
    assert out[C.IMAGE].shape == (3, 224, 224, 3)
    assert out[C.IMAGE][0].std() > 1 and not out[C.IMAGE][1:].any()


def test_device_decoder_on_cpu_matches_the_cpu_path_and_its_error_reasons():
    """``--decode gpu``'s decoder, run on the CPU: torchvision's decode_jpeg and a Pillow-like
    tensor resize for JPEGs, the CPU path for the rest and for the errors."""
    keys = sorted(GOOD) + sorted(BROKEN)
    datas = [{**GOOD, **BROKEN}[k] for k in keys]
    images, errors = decode_jpeg_batch(datas, SPEC, "cpu")
    assert images.shape == (len(keys), 224, 224, 3) and images.dtype == torch.uint8
    for key, data, img, error in zip(keys, datas, images.numpy(), errors, strict=True):
        try:
            expected = decode(data, SPEC)
        except DecodeError as e:
            assert error == str(e) and not img.any(), key
            continue
        assert error is None, key
        diff = np.abs(img.astype(int) - expected.astype(int))
        if data[:3] == b"\xff\xd8\xff":
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, key
        else:
            assert diff.max() == 0, key


def test_device_decoder_keeps_the_pixel_limit():
    limit = 100 * 100
    _, errors = decode_jpeg_batch([GOOD["good/cat.jpg"]], SPEC, "cpu", max_pixels=limit)
    with pytest.raises(DecodeError) as e:
        decode(GOOD["good/cat.jpg"], SPEC, max_pixels=limit)
    assert errors == [str(e.value)] and "above the limit" in errors[0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decoder_turns_every_exif_orientation_as_pillow_does(orientation):
    """torchvision's decode_jpeg ignores EXIF orientation on CUDA; ours turns the image itself."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = Image.fromarray(
        np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, np.ones((40, 40), np.uint8))
    )
    data = io.BytesIO()
    img.convert("RGB").save(data, "JPEG", quality=95, exif=exif)
    spec = Preprocess(resize_size=100, crop_size=100)  # keeps the whole shorter side
    images, errors = decode_jpeg_batch([data.getvalue()], spec, "cpu")
    diff = np.abs(images[0].numpy().astype(int) - decode(data.getvalue(), spec).astype(int))
    assert errors == [None] and diff.max() <= 1


def _jpeg_planes(data: bytes, fy: int, fx: int):
    """libjpeg-turbo's own planes, through Pillow: full-size Y, and the chroma as stored
    (decoded at 1/2 scale, which libjpeg-turbo does without upsampling the chroma)."""
    img = Image.open(io.BytesIO(data))
    img.draft("YCbCr", img.size)
    y = torch.from_numpy(np.asarray(img)[..., 0].astype(np.int32))[None]
    w, h = img.size
    img = Image.open(io.BytesIO(data))
    img.draft("YCbCr", (w // fx, h // fy))
    chroma = torch.from_numpy(np.asarray(img)[..., 1:].astype(np.int32)).permute(2, 0, 1)[None]
    return y, chroma


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 251)])
def test_fancy_upsampling_and_colour_conversion_are_libjpeg_turbos(size):
    """From libjpeg-turbo's own Y and 4:2:0 chroma planes, ours give Pillow's RGB exactly."""
    data = _encode_jpeg(photo_like(11, size), quality=90)
    y, chroma = _jpeg_planes(data, 2, 2)
    w, h = size
    rgb = ycc_to_rgb(y, fancy_upsample(chroma, (2, 2))[..., :h, :w])
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(rgb[0].permute(1, 2, 0).numpy(), pil)


@pytest.mark.parametrize("size", [(500, 375), (333, 251)])
def test_refine_chroma_undoes_nvjpegs_repeated_chroma(size):
    """nvJPEG repeats each 4:2:0 chroma sample over its 2x2 block (seen on an H100: its
    crops matched this simulation to the third decimal of the mean error). refine_chroma
    turns that back into libjpeg-turbo's interpolated chroma, near enough to Pillow."""
    data = _encode_jpeg(photo_like(12, size), quality=90)
    y, chroma = _jpeg_planes(data, 2, 2)
    w, h = size
    repeated = ycc_to_rgb(y, chroma.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :h, :w])
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)

    def error(rgb):
        return np.abs(rgb[0].permute(1, 2, 0).numpy().astype(int) - pil)

    before, after = error(repeated), error(refine_chroma(repeated, (2, 2)))
    assert before.mean() > 0.4 and before.max() >= 15
    assert after.mean() < 0.05 and (after > 1).mean() < 0.01, (after.mean(), (after > 1).mean())


def test_device_path_reads_orientation_and_subsampling_and_leaves_cmyk_to_pillow():
    base = photo_like(13, (64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    assert _device_jpeg_header(_encode_jpeg(base, subsampling=2, exif=exif), 10**9) == (6, (2, 2))
    assert _device_jpeg_header(_encode_jpeg(base, subsampling=1), 10**9) == (1, (1, 2))
    assert _device_jpeg_header(_encode_jpeg(base, subsampling=0), 10**9) == (1, (1, 1))
    assert _device_jpeg_header(_encode_jpeg(base.convert("L")), 10**9) == (1, (1, 1))
    assert _device_jpeg_header(GOOD["modes/cmyk.jpg"], 10**9) is None
    assert _device_jpeg_header(GOOD["good/dog.png"], 10**9) is None
    assert _device_jpeg_header(_encode_jpeg(base), 64 * 48 - 1) is None


def _encode_jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **{"quality": 90, **kw})
    return buf.getvalue()


def test_a_thin_strip_is_refused_by_its_size_once_resized():
    """4000x2 is 8,000 pixels, but 131 million once its shorter side is scaled to 256."""
    strip = _encode(Image.new("RGB", (4000, 2), (200, 30, 30)), "PNG")
    with pytest.raises(DecodeError, match="would be 512000x256=131072000 pixels once resized"):
        decode(strip, SPEC)
    out = decode_batch(
        {C.ID: np.array(["s"], object), C.SOURCE: np.array(["s"], object),
         C.BYTES: np.array([strip], object), C.ERROR: np.array([None], object)},
        SPEC,
    )  # fmt: skip
    assert "once resized" in out[C.ERROR][0]
    assert decode(strip, SPEC, max_pixels=200_000_000).shape == (224, 224, 3)


def test_max_pixels_above_pillows_own_limit_is_honoured():
    """Pillow refuses twice its MAX_IMAGE_PIXELS at open; --max-pixels is the only limit."""
    big = _encode(Image.new("1", (15_000, 12_500)), "PNG")  # 187.5M pixels, a few KB
    with pytest.raises(DecodeError, match="above the limit of 89478485"):
        open_header(big)
    assert open_header(big, max_pixels=200_000_000).size == (15_000, 12_500)
    with pytest.raises(DecodeError, match="above the limit of 100"):
        open_header(big, max_pixels=100)
