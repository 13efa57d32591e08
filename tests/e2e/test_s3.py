"""Object storage against a real S3 wire protocol (moto's server on 127.0.0.1)."""

import hashlib

import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable

from pipeline import cli
from pipeline import columns as C
from tests.conftest import ALL, BROKEN
from tests.faultproxy import FaultProxy
from tests.tables import columns

pytestmark = pytest.mark.e2e


def pyarrow_s3(endpoint: str) -> pafs.S3FileSystem:
    """pyarrow's own S3 client, not ours: what a warehouse job would read with."""
    return pafs.S3FileSystem(
        endpoint_override=endpoint.removeprefix("http://"),
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )


def read_back(endpoint: str, prefix: str):
    """The table's rows: its log read by delta-rs, its files by pyarrow's own S3 client."""
    fs = pyarrow_s3(endpoint)
    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    delta = DeltaTable(f"s3://{prefix}", storage_options=options)
    data = delta.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(prefix, fs))
    return data.to_table(), delta


@pytest.fixture
def bucket(s3, images_dir, wds_dir, parquet_dir, resnet18_checkpoint):
    s3.mkdir("data")
    s3.put(images_dir, "data/images", recursive=True)
    s3.put(f"{wds_dir}/", "data/wds", recursive=True)
    s3.put(f"{parquet_dir}/", "data/pq", recursive=True)
    s3.put(resnet18_checkpoint, "data/models/resnet18.pth")
    s3.pipe("data/conf/run.yaml", b"model: resnet18\nweights: s3://data/models/resnet18.pth\nbatch-size: 8\n")
    return "data"


@pytest.mark.parametrize(
    "fmt, prefix, to_id",
    [
        ("images", "images", lambda k: k),
        ("webdataset", "wds/shard-{000000..000001}.tar", lambda k: k.rsplit(".", 1)[0]),
        ("parquet", "pq", lambda k: k),
    ],
)
def test_read_every_format_and_write_back_to_a_bucket(
    fmt, prefix, to_id, bucket, s3_server, ray_cluster, resnet18_checkpoint, capsys
):
    """Input, output, checkpoint and --config all on s3://, found through AWS_ENDPOINT_URL."""
    code = cli.main(
        [
            "run",
            "--config",
            "s3://data/conf/run.yaml",
            "--input",
            f"s3://data/{prefix}",
            "--output",
            f"s3://data/out/{fmt}/",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    table, delta = read_back(s3_server, f"data/out/{fmt}")
    assert columns(table.schema) == columns(C.output_schema("both", 512))
    assert sorted(table[C.ID].to_pylist()) == sorted(to_id(k) for k in ALL)
    assert table[C.STATUS].to_pylist().count("error") == len(BROKEN)
    root = prefix.split("/shard-")[0]
    assert all(src.startswith(f"s3://data/{root}/") for src in table[C.SOURCE].to_pylist())
    with open(resnet18_checkpoint, "rb") as f:  # the checkpoint came from the bucket
        assert table[C.WEIGHTS][0].as_py() == "sha256:" + hashlib.sha256(f.read()).hexdigest()

    # One commit made the rows visible; it records the run, and no credentials.
    info = delta.history(1)[0]["pipeline"]
    assert info["rows"] == len(ALL) and info["errors"] == len(BROKEN) and info["format"] == fmt
    fs = pyarrow_s3(s3_server)
    log = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(f"data/out/{fmt}/_delta_log"))
        if f.path.endswith(".json")
    ]
    assert not [p for p in log if b"testing" in fs.open_input_stream(p).read()]


def test_missing_bucket_and_key_fail_before_any_work(s3, capsys, tmp_path):
    s3.mkdir("empty-bucket")
    cases = [
        (["--input", "s3://no-such-bucket/shards/"], "error: input not found: s3://no-such-bucket/shards/"),
        (["--input", "s3://empty-bucket/missing/"], "error: input not found: s3://empty-bucket/missing/"),
        (["--output", "s3://no-such-bucket/out/"], "error: output bucket no-such-bucket does not exist"),
        (
            ["--weights", "s3://empty-bucket/nope.pth"],
            "error: checkpoint not found: s3://empty-bucket/nope.pth",
        ),
    ]
    s3.pipe("empty-bucket/in/a.jpg", ALL["good/cat.jpg"])
    for extra, expected in cases:
        args = {"--input": "s3://empty-bucket/in/", "--output": str(tmp_path / "o"), "--weights": "none"}
        args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
        code = cli.main(["run", *[x for kv in args.items() for x in kv]])
        err = capsys.readouterr().err
        assert code == 2 and err.strip() == expected, err


def test_listing_is_one_list_per_prefix_not_a_head_per_object(s3, s3_server):
    from pipeline.sources import list_input
    from pipeline.storage import storage_options

    s3.mkdir("many")
    for i in range(50):
        s3.pipe(f"many/in/sub{i % 5}/{i:03d}.jpg", b"x")
    proxy = FaultProxy(s3_server, every=0).start()
    try:
        listing = list_input("s3://many/in", "auto", storage_options(proxy.url))
    finally:
        proxy.stop()
    assert len(listing.files) == 50
    per_object = [r for r in proxy.requests if r[1].split("?")[0].endswith(".jpg")]
    assert per_object == [] and len(proxy.requests) <= 4, proxy.requests


def test_transient_faults_are_retried_and_every_row_lands_once(
    s3, s3_server, ray_cluster, resnet18_checkpoint, capsys
):
    s3.mkdir("flaky")
    for key, data in ALL.items():
        s3.pipe(f"flaky/in/{key}", data)
    s3.put(resnet18_checkpoint, "flaky/m.pth")
    proxy = FaultProxy(s3_server, every=3).start()
    try:
        code = cli.main(
            [
                "run",
                "--input",
                "s3://flaky/in",
                "--output",
                "s3://flaky/out",
                "--model",
                "resnet18",
                "--weights",
                "s3://flaky/m.pth",
                "--s3-endpoint-url",
                proxy.url,
            ]
        )
    finally:
        proxy.stop()
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert proxy.faults["503"] >= 3 and proxy.faults["reset"] >= 3, proxy.faults
    table, _ = read_back(s3_server, "flaky/out")
    ids = table[C.ID].to_pylist()
    assert sorted(ids) == sorted(ALL) and len(set(ids)) == len(ids)
    assert table[C.STATUS].to_pylist().count("error") == len(BROKEN)
