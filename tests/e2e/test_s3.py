"""Object storage against a real S3 wire protocol (moto's server on 127.0.0.1)."""

import hashlib

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline import columns as C
from tests.conftest import ALL, BROKEN
from tests.faultproxy import FaultProxy

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
    fs = pyarrow_s3(endpoint)
    files = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
        if f.path.endswith(".parquet") and "/_" not in f.path
    ]
    return pq.read_table(files, filesystem=fs), files


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
    table, _ = read_back(s3_server, f"data/out/{fmt}")
    assert table.schema.equals(C.output_schema("both", 512), check_metadata=False)
    assert sorted(table[C.ID].to_pylist()) == sorted(to_id(k) for k in ALL)
    assert table[C.STATUS].to_pylist().count("error") == len(BROKEN)
    root = prefix.split("/shard-")[0]
    assert all(src.startswith(f"s3://data/{root}/") for src in table[C.SOURCE].to_pylist())
    with open(resnet18_checkpoint, "rb") as f:  # the checkpoint came from the bucket
        assert table[C.WEIGHTS][0].as_py() == "sha256:" + hashlib.sha256(f.read()).hexdigest()

    # Nothing staged is left; the report sits beside the data, where readers skip it.
    fs = pyarrow_s3(s3_server)
    names = [f.path for f in fs.get_file_info(pafs.FileSelector(f"data/out/{fmt}", recursive=True))]
    assert not [n for n in names if "_staging-" in n]
    assert f"data/out/{fmt}/_report.json" in names
    report = fs.open_input_stream(f"data/out/{fmt}/_report.json").read().decode()
    assert f'"rows": {len(ALL)}' in report and "testing" not in report  # no credentials


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


def test_the_output_lease_on_s3_is_a_conditional_put(s3):
    """Create-exclusive with If-None-Match: *, take-over and release with If-Match, on
    moto's S3 server: two runs never hold one output root."""
    import json
    import time

    from pipeline.commit import LOCK, Lease, LeaseHeld, Root

    s3.mkdir("out")
    root = Root("s3://out/features", {"s3": {"endpoint_url": s3.endpoint_url}})
    assert root.s3
    with Lease(root, "run-a") as a:
        assert json.loads(root.read_bytes(LOCK))["run_id"] == "run-a"
        with pytest.raises(LeaseHeld, match="is in use by run run-a"):
            Lease(Root("s3://out/features"), "run-b").acquire()
        a.check()
    assert not root.exists(LOCK)

    stale = {"run_id": "dead", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600,
             "expires_after_s": 120, "started": "x"}  # fmt: skip
    root.fs.pipe_file(root.abs(LOCK), json.dumps(stale).encode())
    with Lease(root, "run-c") as c:
        assert json.loads(root.read_bytes(LOCK))["run_id"] == "run-c"
        assert not c._swap(json.dumps(stale).encode(), b"{}")  # a compare-and-swap on old bytes fails
        assert c._swap(c._mine, c._mine)  # and on the current bytes succeeds
    assert not root.exists(LOCK)
