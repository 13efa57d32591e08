"""Shared fixtures: small real images of every kind, checkpoints, a local Ray, a reference model."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import models as tvm
from torchvision.transforms._presets import ImageClassification

from bench.fidelity import calibrated_state_dict
from pipeline.models import SplitClassifier
from pipeline.samples import photo_like

# Good images: id → bytes. Every mode and format the decoder must turn into RGB.
GOOD = {}
# Broken inputs: id → bytes. Each must become an error row.
BROKEN = {}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _build_inputs() -> None:
    base = photo_like(1, (320, 240))
    GOOD["good/cat.jpg"] = _encode(base, "JPEG", quality=90)
    GOOD["good/UPPER.JPG"] = _encode(photo_like(2, (240, 320)), "JPEG", quality=90)
    GOOD["good/dog.png"] = _encode(photo_like(3, (300, 300)), "PNG")
    GOOD["good/bird.webp"] = _encode(photo_like(4, (256, 200)), "WEBP", quality=90)
    GOOD["good/fish.bmp"] = _encode(photo_like(5, (200, 256)), "BMP")
    GOOD["good/anim.gif"] = _encode(photo_like(6, (240, 240)).convert("P"), "GIF")
    GOOD["good/scan.tiff"] = _encode(photo_like(7, (260, 230)), "TIFF")
    GOOD["modes/gray.png"] = _encode(base.convert("L"), "PNG")
    GOOD["modes/gray_alpha.png"] = _encode(base.convert("LA"), "PNG")
    GOOD["modes/rgba.png"] = _encode(base.convert("RGBA"), "PNG")
    GOOD["modes/cmyk.jpg"] = _encode(base.convert("CMYK"), "JPEG", quality=90)
    ramp = (np.linspace(0, 65535, 240 * 320).reshape(240, 320)).astype(np.uint16)
    GOOD["modes/deep16.png"] = _encode(Image.fromarray(ramp), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    GOOD["modes/rotated.jpg"] = _encode(photo_like(8, (320, 240)), "JPEG", quality=90, exif=exif)

    jpeg = GOOD["good/cat.jpg"]
    BROKEN["bad/empty.jpg"] = b""
    BROKEN["bad/truncated.jpg"] = jpeg[: len(jpeg) // 2]
    BROKEN["bad/not_image.png"] = b"this is plain text, not a picture\n" * 10
    BROKEN["bad/page.jpg"] = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"


_build_inputs()
ALL = {**GOOD, **BROKEN}
# Good RGB photo-like images that the fidelity checks compare with torchvision.
FIDELITY_IDS = [
    "good/cat.jpg",
    "good/UPPER.JPG",
    "good/dog.png",
    "good/bird.webp",
    "modes/rotated.jpg",
]


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory) -> str:
    """A folder of every input kind, with a nested folder and a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    for rel, data in ALL.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "notes.txt").write_text("not an input")
    return str(root)


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def wds_samples() -> list[tuple[str, dict[str, bytes]]]:
    """WebDataset samples keyed like the folder ids (without extension), with a label member."""
    out = []
    for rel, data in ALL.items():
        key, ext = rel.rsplit(".", 1)
        out.append((key, {ext.lower(): data, "cls": b"3"}))
    return out


@pytest.fixture(scope="session")
def wds_dir(tmp_path_factory) -> str:
    """Two shards named for a brace pattern: shard-000000.tar, shard-000001.tar."""
    root = tmp_path_factory.mktemp("wds")
    samples = wds_samples()
    half = len(samples) // 2
    write_tar(str(root / "shard-000000.tar"), samples[:half])
    write_tar(str(root / "shard-000001.tar"), samples[half:])
    return str(root)


@pytest.fixture(scope="session")
def parquet_dir(tmp_path_factory) -> str:
    """Parquet with a binary ``image`` column and an ``id`` column, in two files."""
    root = tmp_path_factory.mktemp("pq")
    items = list(ALL.items())
    half = len(items) // 2
    for i, part in enumerate((items[:half], items[half:])):
        table = pa.table({"id": [k for k, _ in part], "image": pa.array([v for _, v in part], pa.binary())})
        pq.write_table(table, str(root / f"part-{i}.parquet"))
    return str(root)


@pytest.fixture(scope="session")
def hf_parquet_dir(tmp_path_factory) -> str:
    """Hugging Face datasets layout: ``img`` struct {bytes, path}, no id column."""
    root = tmp_path_factory.mktemp("hf")
    items = list(ALL.items())
    struct = pa.array(
        [{"bytes": v, "path": k} for k, v in items],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"img": struct, "label": list(range(len(items)))}), str(root / "train.parquet"))
    return str(root)


@pytest.fixture(scope="session")
def resnet18_checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(calibrated_state_dict("resnet18"), path)
    return str(path)


def reference(name: str, checkpoint: str, images: dict[str, bytes], transforms=None):
    """torchvision's model and preset, run directly: id → (features, softmax probabilities)."""
    from PIL import ImageOps

    model = tvm.get_model(name, weights=None)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model = SplitClassifier(model).eval()
    transforms = transforms or ImageClassification(crop_size=224, resize_size=256)
    out = {}
    with torch.inference_mode():
        for key, data in images.items():
            img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
            feats, logits = model(transforms(img).unsqueeze(0))
            out[key] = (feats[0].numpy(), logits.softmax(1)[0].numpy())
    return out


# Test-only credentials for the local S3 server. They are set before Ray starts, so
# workers inherit them as they would inherit an instance role's on a cluster.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray per test module, with 2 CPUs like the machines it must fit."""
    import psutil
    import ray

    os.environ.update(AWS_TEST_ENV)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    session = ray._private.worker._global_node.get_session_dir_path()
    try:
        yield ray
    finally:
        # Its processes, taken while they are still our descendants: once the raylet is
        # gone a worker belongs to init. One was seen to outlive ray.shutdown() (a model
        # actor's process, 1 GB, idle for good); whatever is left after 10 s is ended here.
        # Only this Ray's: its workers ("ray::…") and the processes naming its session dir.
        started = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.pid not in before and _of_ray(p, session)
        ]
        ray.shutdown()
        _, alive = psutil.wait_procs(started, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def _of_ray(p, session: str) -> bool:
    import psutil

    try:
        cmdline = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(cmdline) and (cmdline[0].startswith("ray::") or any(session in arg for arg in cmdline))


MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # until the test session closes our end
"""


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, port 0, as s3fs's and Ray's own tests use; in a process
    of its own, because delta-rs holds this process's GIL while it waits for an answer (a
    server in one of our threads would never answer it)."""
    import subprocess
    import sys

    os.environ.update(AWS_TEST_ENV)
    server = subprocess.Popen(
        [sys.executable, "-c", MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env={**os.environ, **AWS_TEST_ENV},
    )  # fmt: skip
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """An s3fs file system on the local server, with AWS_ENDPOINT_URL set as a user would."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    yield fs
    for bucket in fs.ls(""):
        fs.rm(bucket, recursive=True)
    fs.invalidate_cache()


@pytest.fixture
def http_dir(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (query strings and credentials are ignored)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield folder, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
