"""Listing, format detection and the three readers, without Ray."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import columns as C
from pipeline.sources import InputError, Shard, expand_braces, list_input, read_shard, shards
from tests.conftest import ALL, BROKEN, GOOD, wds_samples, write_tar


def rows(listing, image_column="image"):
    out = []
    for shard in shards(listing):
        for table in read_shard(shard, image_column=image_column, id_column="id"):
            out += table.to_pylist()
    return out


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x-{1..2}") == ["a/x-1", "a/x-2", "b/x-1", "b/x-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_folder_ids_are_relative_paths_with_any_case_extension(images_dir):
    listing = list_input(images_dir)
    assert listing.format == "images"
    assert listing.skipped == 1  # notes.txt
    got = rows(listing)
    assert sorted(r[C.ID] for r in got) == sorted(ALL)
    by_id = {r[C.ID]: r for r in got}
    assert by_id["good/cat.jpg"][C.BYTES] == GOOD["good/cat.jpg"]
    assert by_id["good/cat.jpg"][C.SOURCE].startswith("file://")
    assert by_id["bad/empty.jpg"][C.BYTES] == b""


def test_single_file_and_glob(images_dir):
    assert [u for u, _ in list_input(f"{images_dir}/good/cat.jpg").files] == [
        f"file://{images_dir}/good/cat.jpg"
    ]
    assert len(list_input(f"{images_dir}/good/*.jpg").files) == 1  # cat.jpg (UPPER.JPG is *.JPG)


def test_webdataset_brace_pattern_picks_the_image_member(wds_dir):
    listing = list_input(f"{wds_dir}/shard-{{000000..000001}}.tar")
    assert listing.format == "webdataset" and len(listing.files) == 2
    got = {r[C.ID]: r for r in rows(listing)}
    assert sorted(got) == sorted(k.rsplit(".", 1)[0] for k in ALL)
    assert got["good/cat"][C.BYTES] == GOOD["good/cat.jpg"]
    assert got["good/UPPER"][C.BYTES] == GOOD["good/UPPER.JPG"]
    assert got["good/cat"][C.SOURCE].endswith("shard-000000.tar")


def test_webdataset_sample_without_image_and_truncated_shard(tmp_path):
    write_tar(str(tmp_path / "a.tar"), [("k1", {"jpg": GOOD["good/cat.jpg"]}), ("k2", {"json": b"{}"})])
    got = {r[C.ID]: r for r in rows(list_input(str(tmp_path)))}
    assert got["k1"][C.ERROR] is None
    assert "no image member (has json)" in got["k2"][C.ERROR]

    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 3])  # cut inside k1's bytes
    got = rows(list_input(str(tmp_path)))
    assert len(got) == 1 and got[0][C.BYTES] is None
    assert "unreadable tar shard after 0 samples" in got[0][C.ERROR]


def test_parquet_binary_column_with_ids(parquet_dir):
    listing = list_input(parquet_dir)
    assert listing.format == "parquet"
    got = {r[C.ID]: r for r in rows(listing)}
    assert sorted(got) == sorted(ALL)
    assert got["bad/truncated.jpg"][C.BYTES] == BROKEN["bad/truncated.jpg"]


def test_parquet_hf_struct_without_id_column(hf_parquet_dir):
    listing = list_input(hf_parquet_dir)
    got = [(r[C.ID], r[C.BYTES]) for r in rows(listing, image_column="img")]
    assert [i for i, _ in got] == [f"train.parquet#{n}" for n in range(len(ALL))]
    assert [b for _, b in got] == list(ALL.values())


def test_parquet_missing_image_column_and_null_bytes(tmp_path):
    pq.write_table(
        pa.table({"id": ["x", "y"], "image": pa.array([None, b"abc"], pa.binary())}),
        tmp_path / "a.parquet",
    )
    pq.write_table(pa.table({"pixels": [b"1", b"2", b"3"]}), tmp_path / "b.parquet")
    got = {r[C.ID]: r[C.ERROR] for r in rows(list_input(str(tmp_path)))}
    assert got == {
        "x": "no image bytes (null)",
        "y": None,
        "b.parquet#0": "no column 'image' in this file",
        "b.parquet#1": "no column 'image' in this file",
        "b.parquet#2": "no column 'image' in this file",
    }


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing"), "input not found"),
        (lambda p: str(p), "input is empty"),
        (
            lambda p: (p / "x.txt").write_text("x") and str(p),
            "no image files, tar shards or Parquet",
        ),
    ],
)
def test_bad_inputs_fail_with_one_clear_error(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        list_input(make(tmp_path))


def test_mixed_tar_and_parquet_needs_format(tmp_path, parquet_dir):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="mixes tar shards and Parquet"):
        list_input(str(tmp_path))
    assert list_input(str(tmp_path), "parquet").format == "parquet"


def test_unknown_format():
    with pytest.raises(InputError, match="unknown format 'zip'"):
        list_input("/tmp", "zip")


def test_images_are_grouped_into_shards(tmp_path):
    from pipeline import sources

    for i in range(sources.FILES_PER_SHARD + 3):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"x")
    parts = shards(list_input(str(tmp_path)))
    assert [len(s.uris) for s in parts] == [sources.FILES_PER_SHARD, 3]


def _tar_with(path, members, mode="w"):
    """A tar of (TarInfo fields, data) members, written by tarfile itself."""
    import io
    import tarfile

    with tarfile.open(path, mode) as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for k, v in fields.items():
                setattr(info, k, v)
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def test_tar_members_follow_webdatasets_naming_rules(tmp_path, caplog):
    """Keys starting with _ are samples; AppleDouble ._ files, directories and symbolic
    links are skipped and counted; a hard link reads its target's bytes."""
    import tarfile

    cat, dog = GOOD["good/cat.jpg"], GOOD["good/UPPER.JPG"]
    _tar_with(
        tmp_path / "s.tar",
        [
            ({"name": "photos", "type": tarfile.DIRTYPE}, b""),
            ({"name": "photos/_private.jpg"}, cat),
            ({"name": "photos/._private.jpg"}, b"\x00\x05\x16\x07 AppleDouble"),
            ({"name": "__meta__.json"}, b"{}"),
            ({"name": "photos/again.jpg", "type": tarfile.LNKTYPE, "linkname": "photos/_private.jpg"}, b""),
            ({"name": "photos/soft.jpg", "type": tarfile.SYMTYPE, "linkname": "_private.jpg"}, b""),
            ({"name": "photos/dog.jpg"}, dog),
            ({"name": "photos/dog.cls"}, b"7"),
        ],
    )
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        got = {r[C.ID]: r for r in rows(list_input(str(tmp_path)))}
    assert sorted(got) == ["__meta__", "photos/_private", "photos/again", "photos/dog"], sorted(got)
    assert got["photos/_private"][C.BYTES] == cat and got["photos/again"][C.BYTES] == cat
    assert got["photos/dog"][C.BYTES] == dog
    assert all(got[k][C.ERROR] is None for k in ("photos/_private", "photos/again", "photos/dog"))
    assert got["__meta__"][C.ERROR] == "sample has no image member (has json)"  # as WebDataset groups it
    assert "3 tar members skipped" in caplog.text  # the folder, ._private.jpg, soft.jpg


@pytest.mark.parametrize("name, mode", [("s.tar.gz", "w:gz"), ("s.tgz", "w:gz"), ("s.tar", "w")])
def test_compressed_tar_shards_are_read(tmp_path, name, mode):
    _tar_with(
        tmp_path / name,
        [({"name": "a.jpg"}, GOOD["good/cat.jpg"]), ({"name": "b.png"}, GOOD["good/dog.png"])],
        mode,
    )
    listing = list_input(str(tmp_path))
    assert listing.format == "webdataset" and len(listing.files) == 1
    got = {r[C.ID]: r[C.BYTES] for r in rows(listing)}
    assert got == {"a": GOOD["good/cat.jpg"], "b": GOOD["good/dog.png"]}


def test_file_names_with_glob_characters_are_read_literally(tmp_path):
    names = ["img[1].jpg", "a*b.jpg", "what?.jpg", "{x,y}.jpg"]
    for n in names:
        (tmp_path / n).write_bytes(GOOD["good/cat.jpg"])
    got = {r[C.ID]: r for r in rows(list_input(str(tmp_path)))}
    assert sorted(got) == sorted(names)
    assert all(r[C.BYTES] == GOOD["good/cat.jpg"] and r[C.ERROR] is None for r in got.values())
    for n in names:  # one such file, named as the input
        [(uri, _)] = list_input(str(tmp_path / n)).files
        assert uri.endswith(n)


def test_a_parquet_file_of_the_wrong_layout_becomes_error_rows_and_the_rest_is_read(tmp_path):
    """One malformed file used to fail the whole run, good files included."""
    cat = GOOD["good/cat.jpg"]
    pq.write_table(pa.table({"id": ["good"], "image": pa.array([cat], pa.binary())}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": pa.array([1, 2], pa.int64())}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"image": pa.array(["x.jpg"], pa.string())}), tmp_path / "c.parquet")
    no_bytes = pa.array([{"path": "p.jpg"}], pa.struct([("path", pa.string())]))
    pq.write_table(pa.table({"image": no_bytes}), tmp_path / "d.parquet")
    odd_ids = pa.array([{"k": 1}], pa.struct([("k", pa.int64())]))
    pq.write_table(
        pa.table({"id": odd_ids, "image": pa.array([cat], pa.large_binary())}), tmp_path / "e.parquet"
    )
    got = {r[C.ID]: r for r in rows(list_input(str(tmp_path)))}
    assert got["good"][C.BYTES] == cat and got["good"][C.ERROR] is None
    assert got["b.parquet#0"][C.ERROR] == "column 'image' holds int64, not image bytes (binary)"
    assert got["b.parquet#1"][C.ERROR] == got["b.parquet#0"][C.ERROR]
    assert got["c.parquet#0"][C.ERROR] == "column 'image' holds string, not image bytes (binary)"
    assert got["d.parquet#0"][C.ERROR].startswith("column 'image' is a struct without a 'bytes' field")
    assert got["e.parquet#0"][C.BYTES] == cat  # ids that cannot be text: <file>#<row>
    assert len(got) == 6


def test_a_parquet_file_that_breaks_midway_keeps_its_rows_and_names_the_rest(tmp_path):
    images = [GOOD["good/cat.jpg"], GOOD["good/dog.png"]] * 50
    path = tmp_path / "a.parquet"
    table = pa.table({"image": pa.array(images, pa.binary())})
    pq.write_table(table, path, row_group_size=50, use_dictionary=False, compression="none")
    meta = pq.ParquetFile(path).metadata
    offset = meta.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    assert offset + 300 < len(data) - meta.serialized_size
    data[offset + 8 : offset + 300] = b"\xff" * 292  # the second row group's first page
    path.write_bytes(bytes(data))
    got = rows(list_input(str(tmp_path)))
    assert len(got) == 100
    assert [r[C.BYTES] for r in got[:50]] == images[:50]
    assert all(
        r[C.BYTES] is None and "unreadable Parquet row group 1 after row 50" in r[C.ERROR] for r in got[50:]
    )
    assert [r[C.ID] for r in got[50:]] == [f"a.parquet#{i}" for i in range(50, 100)]


def test_a_presigned_input_url_is_read_but_its_query_never_stored(http_dir):
    folder, host = http_dir
    (folder / "cat.jpg").write_bytes(GOOD["good/cat.jpg"])
    url = f"http://{host}/cat.jpg?X-Amz-Signature=s1gnature&X-Amz-Security-Token=t0ken"
    [row] = rows(list_input(url, "images"))
    assert row[C.BYTES] == GOOD["good/cat.jpg"] and row[C.ERROR] is None
    assert row[C.SOURCE] == f"http://{host}/cat.jpg?<redacted>" and "s1gnature" not in row[C.ID]


@pytest.fixture
def registry_restored():
    """Formats a test registers are gone after it."""
    from pipeline.sources import formats, unregister

    before = {f.name for f in formats()}
    yield
    for f in formats():
        if f.name not in before:
            unregister(f.name)


def test_a_new_format_is_one_module_plus_one_registry_line(tmp_path, registry_restored):
    import io

    from pipeline.samples import photo_like
    from pipeline.sources import register
    from tests import fake_format

    register(fake_format.FORMAT)  # the one line; the rest is the module

    buf = io.BytesIO()
    photo_like(9, (64, 48)).save(buf, "JPEG")
    (tmp_path / "cat.jpg").write_bytes(buf.getvalue())
    (tmp_path / "album.fake").write_text("cat.jpg\nmissing.jpg\n")
    (tmp_path / "more.fake").write_text("cat.jpg\n")

    listing = list_input(str(tmp_path))  # auto: a container format wins over loose images
    assert listing.format == "fake" and listing.skipped == 1  # cat.jpg
    assert [len(s.uris) for s in shards(listing)] == [1, 1]  # one shard per list
    got = {r[C.ID]: r for r in rows(listing)}
    assert sorted(got) == ["album.fake#cat.jpg", "album.fake#missing.jpg", "more.fake#cat.jpg"]
    assert got["album.fake#cat.jpg"][C.BYTES] == buf.getvalue()
    assert got["album.fake#cat.jpg"][C.SOURCE] == f"file://{tmp_path}/album.fake"
    assert got["album.fake#missing.jpg"][C.BYTES] is None
    assert got["album.fake#missing.jpg"][C.ERROR] == "cannot read missing.jpg: FileNotFoundError"
    assert list_input(str(tmp_path), "images").format == "images"  # the others are untouched
    with pytest.raises(InputError, match="choose one of auto, images, webdataset, parquet, fake$"):
        list_input(str(tmp_path), "zip")


def test_the_registry_is_restored_after_a_test_that_registered_a_format():
    with pytest.raises(InputError, match="choose one of auto, images, webdataset, parquet$"):
        list_input("/tmp", "zip")


class _CountingFS:
    """A local file system that counts the per-name lookups (a HEAD each on S3)."""

    def __init__(self):
        from fsspec.implementations.local import LocalFileSystem

        calls = self.calls = {"info": 0, "isdir": 0, "isfile": 0, "exists": 0}

        class Counting(LocalFileSystem):
            cachable = False

            def info(self, path, **kwargs):
                calls["info"] += isinstance(path, str)  # not the DirEntry of a folder listing
                return super().info(path, **kwargs)

            def isdir(self, path):
                calls["isdir"] += 1
                return super().isdir(path)

            def isfile(self, path):
                calls["isfile"] += 1
                return super().isfile(path)

            def exists(self, path, **kwargs):
                calls["exists"] += 1
                return super().exists(path, **kwargs)

        self.fs = Counting()

    def url_to_fs(self, uri, options=None):
        return self.fs, self.fs._strip_protocol(uri)


def test_a_brace_pattern_is_one_listing_not_a_lookup_per_name(tmp_path, monkeypatch):
    import os

    from pipeline.sources import listing as listing_module

    folder = tmp_path / "shards"
    (folder / "sub").mkdir(parents=True)
    for i in range(300):
        (folder / f"shard-{i:03d}.tar").write_bytes(b"x" * (i % 7))
    for decoy in ["shard-300.tar", "shard-0000.tar", "other-001.tar", "sub/shard-001.tar", ".shard-002.tar"]:
        (folder / decoy).write_bytes(b"decoy")
    (folder / "_hidden.tar").write_bytes(b"hidden")

    counted = {}
    for n in (30, 300):
        counting = _CountingFS()
        monkeypatch.setattr(listing_module, "url_to_fs", counting.url_to_fs)
        listing = list_input(f"{folder}/shard-{{000..{n - 1:03d}}}.tar")
        counted[n] = counting.calls
        paths = [f"{folder}/shard-{i:03d}.tar" for i in range(n)]
        assert listing.format == "webdataset" and listing.root == f"file://{folder}"
        assert listing.files == tuple((f"file://{p}", i % 7) for i, p in enumerate(paths))
        assert listing.versions == {
            f"file://{p}": f"{i % 7}:{os.stat(p).st_mtime}" for i, p in enumerate(paths)
        }
        assert listing.skipped == 0
    assert counted[30] == counted[300], counted  # no lookup per name
    assert sum(counted[300].values()) <= 4, counted

    # a name of the pattern that starts with "_" is an input, as from a folder
    listing = list_input(f"{folder}/{{_hidden,shard-001}}.tar")
    assert [u for u, _ in listing.files] == [f"file://{folder}/_hidden.tar", f"file://{folder}/shard-001.tar"]


def test_a_brace_pattern_with_a_missing_name_names_the_first_missing_one(tmp_path):
    for i in (0, 2, 4):
        (tmp_path / f"shard-{i}.tar").write_bytes(b"x")
    with pytest.raises(InputError) as e:
        list_input(f"{tmp_path}/shard-{{0..4}}.tar")
    assert str(e.value) == f"input not found: {tmp_path}/shard-1.tar"
    with pytest.raises(InputError) as e:
        list_input(f"{tmp_path}/none/shard-{{0..4}}.tar")  # the folder before the brace is missing
    assert str(e.value) == f"input not found: {tmp_path}/none/shard-0.tar"


def test_a_brace_pattern_over_folders_lists_everything_under_each(tmp_path):
    files = ["x/a.jpg", "x/sub/b.jpg", "y/c.jpg", "x/_private/d.jpg", "y/.DS_Store", "xy/e.jpg", "z/f.jpg"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"x")
    (tmp_path / "empty").mkdir()  # an empty folder adds nothing, as before
    listing = list_input(f"{tmp_path}/{{x,y,empty}}/")
    assert listing.root == f"file://{tmp_path}/x"
    assert [u for u, _ in listing.files] == [
        f"file://{tmp_path}/{f}" for f in ["x/_private/d.jpg", "x/a.jpg", "x/sub/b.jpg", "y/c.jpg"]
    ]
    assert listing.skipped_why() == {"not image files": 1}  # y/.DS_Store
    assert list_input(f"{tmp_path}/{{y,x}}").root == f"file://{tmp_path}/y"


def test_read_tasks_cover_every_shard_once_and_are_made_without_ray(tmp_path):
    """Planning is a list of read tasks, a few shards each; no block is put anywhere."""
    from pipeline.sources.datasource import SHARDS_PER_TASK, ShardDatasource, split, tasks_for

    many = [Shard("webdataset", "/r", (f"/r/shard-{i:06d}.tar",), 10) for i in range(100_000)]
    tasks = ShardDatasource(many).get_read_tasks(200)
    assert len(tasks) == 100_000 // SHARDS_PER_TASK
    assert sum(t.metadata.size_bytes for t in tasks) == 10 * 100_000
    assert tasks_for(2, 200) == 2 and tasks_for(0, 200) == 0 and tasks_for(1000, 200) == 250
    groups = split(list(range(10)), 4)
    assert [list(g) for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]

    write_tar(str(tmp_path / "a.tar"), wds_samples()[:3])
    write_tar(str(tmp_path / "b.tar"), wds_samples()[3:5])
    listing = list_input(str(tmp_path))
    (task,) = ShardDatasource(shards(listing)).get_read_tasks(1)
    rows = [r for table in task() for r in table.to_pylist()]
    assert [r[C.ID] for r in rows] == [k for k, _ in wds_samples()[:5]]


def test_a_brace_pattern_never_walks_folders_it_does_not_name(tmp_path, monkeypatch):
    """Listing recursively from the folder above the brace walked every unrelated subtree."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.sources import listing as listing_module

    walked: list[str] = []

    class Recording(LocalFileSystem):
        cachable = False

        def ls(self, path, detail=False, **kwargs):
            walked.append(self._strip_protocol(path))
            return super().ls(path, detail=detail, **kwargs)

    fs = Recording()
    monkeypatch.setattr(listing_module, "url_to_fs", lambda uri, options=None: (fs, fs._strip_protocol(uri)))
    big = tmp_path / "big"
    (big / "other" / "deep").mkdir(parents=True)
    for i in range(50):
        (big / "other" / "deep" / f"{i}.tar").write_bytes(b"x")
    (big / "a.tar").write_bytes(b"a")
    (big / "b.tar").write_bytes(b"bb")
    got = list_input(str(big / "{a,b}.tar"), "webdataset")
    assert [u.rsplit("/", 1)[-1] for u, _ in got.files] == ["a.tar", "b.tar"]
    assert not any("other" in p for p in walked), walked


def test_an_image_is_an_input_whatever_its_name_and_what_is_skipped_says_why(tmp_path):
    """Images named with a leading ``_`` or ``.`` (a camera's ``_DSC0001.JPG``) were dropped
    in silence. Now only files skipped by rule are left out, each counted with its reason:
    a FIFO (whose read would block for good: it is never opened), AppleDouble ``._*``."""
    import os

    jpeg = GOOD["good/cat.jpg"]
    (tmp_path / "_hidden").mkdir()
    for name in ("ok.jpg", "_DSC0001.JPG", "_x.jpg", ".y.jpg", "_hidden/z.jpg", "._ok.jpg"):
        (tmp_path / name).write_bytes(jpeg)
    (tmp_path / "notes.txt").write_text("not an image")
    os.mkfifo(tmp_path / "fifo.jpg")
    listing = list_input(str(tmp_path))
    assert sorted(u.rsplit(f"{tmp_path.name}/", 1)[1] for u, _ in listing.files) == [
        ".y.jpg", "_DSC0001.JPG", "_hidden/z.jpg", "_x.jpg", "ok.jpg"
    ]  # fmt: skip
    assert listing.skipped == 3 and listing.skipped_why() == {
        "macOS AppleDouble files (._*)": 1,
        "not regular files (FIFOs, sockets, devices)": 1,
        "not image files": 1,
    }
    assert [u.rsplit("/", 1)[1] for u, _ in list_input(str(tmp_path / "_x.jpg")).files] == ["_x.jpg"]
    with pytest.raises(InputError, match=r"input holds no input file: .*fifo.jpg \(1 not regular files"):
        list_input(str(tmp_path / "fifo.jpg"))


def test_an_input_file_without_an_image_gets_an_error_row_saying_so(tmp_path):
    """An empty tar or Parquet file is an input too: its row tells that it held nothing (and
    the nightly job knows it is done, instead of running it again every night)."""
    import tarfile

    tarfile.open(tmp_path / "empty.tar", "w").close()
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    for fmt, name, noun in (
        ("webdataset", "empty.tar", "tar shard"),
        ("parquet", "empty.parquet", "Parquet file"),
    ):
        [shard] = shards(list_input(str(tmp_path / name), fmt))
        rows = [r for t in read_shard(shard) for r in t.to_pylist()]
        assert [(r[C.ID], r[C.BYTES], r[C.ERROR]) for r in rows] == [
            (name, None, f"no images in this {noun}")
        ]
        assert rows[0][C.SOURCE_VERSION] == shard.versions[0]
