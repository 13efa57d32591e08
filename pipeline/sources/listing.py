"""Listing (one recursive LIST per prefix, no HEAD per object), format detection, and
grouping the listing into shards."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from pipeline.bulk import bulk
from pipeline.sources.base import Format, InputError, Shard, has_ext
from pipeline.sources.registry import AUTO, formats, lookup
from pipeline.storage import url_to_fs

# Image files per read task for folders: enough to amortise a task, small enough to spread.
FILES_PER_SHARD = 64


@dataclass(frozen=True)
class Listing:
    format: str
    root: str
    files: tuple[tuple[str, int], ...]  # (uri, size)
    skipped: int  # files under the root that are not inputs: of another format, or by rule
    versions: dict[str, str] = field(default_factory=dict, compare=False)  # uri → size:ETag|mtime
    skips: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (uri, why) of each skipped

    def skipped_why(self) -> dict[str, int]:
        """Why files were skipped → how many."""
        out: dict[str, int] = {}
        for _, why in self.skips:
            out[why] = out.get(why, 0) + 1
        return out

    def only(self, uris: set[str]) -> Listing:
        """The same listing restricted to ``uris`` (for incremental runs)."""
        files = tuple(f for f in self.files if f[0] in uris)
        return replace(self, files=files, versions={u: self.versions[u] for u, _ in files})


def expand_braces(pattern: str) -> list[str]:
    """WebDataset-style brace expansion: ``shard-{000..009}.tar``, ``{a,b}.tar``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def list_input(uri: str, fmt: str = AUTO, storage_options: dict | None = None) -> Listing:
    """Lists the input files and settles the format.

    Raises:
        InputError: nothing there, nothing of the format, or an unknown format.
    """
    if fmt != AUTO:
        lookup(fmt)
    fs, _ = url_to_fs(expand_braces(uri)[0], storage_options)
    found: dict[str, int] = {}
    versions: dict[str, str] = {}
    skips: list[tuple[str, str]] = []
    root = None
    # A name that exists is taken literally: "img[1].jpg" or "{a}.tar" is a file, not a pattern.
    literal = any(ch in uri for ch in "*?[{") and _exists(fs, fs._strip_protocol(uri))
    patterns = [uri] if literal else expand_braces(uri)
    paths = [fs._strip_protocol(p) for p in patterns]
    braces = None if literal else _list_braces(fs, uri, paths)
    for pattern, path in zip(patterns, paths, strict=True):
        try:
            if braces is not None and path.rstrip("/") in braces:
                base, entries = braces[path.rstrip("/")]
            elif not literal and any(ch in path for ch in "*?["):
                hits = fs.glob(path, detail=True)
                base = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]
                entries = {p: d for p, d in hits.items() if d.get("type") != "directory"}
            else:
                base, entries = _list_one(fs, path)
        except FileNotFoundError:
            raise InputError(f"input not found: {pattern}") from None
        except PermissionError as e:
            raise InputError(f"input not readable: {pattern} ({e})") from None
        root = root if root is not None else base
        for p, d in entries.items():
            why = skip_reason(p[len(base) :] if p.startswith(base) else p.rsplit("/", 1)[-1], d)
            if why:
                skips.append((p, why))
            else:
                found[p] = int(d.get("size") or 0)
                versions[p] = _version(d)
    if not found:
        if skips:
            counts = Listing("", "", (), 0, skips=tuple(skips)).skipped_why()
            why = "; ".join(f"{n} {reason}" for reason, n in counts.items())
            raise InputError(f"input holds no input file: {uri} ({why})")
        raise InputError(f"input is empty: {uri}")

    chosen = _detect(found, uri) if fmt == AUTO else lookup(fmt)
    exts = chosen.extensions
    keep = [p for p in sorted(found) if has_ext(p, exts)]
    if not keep:
        raise InputError(f"no {chosen.name} files ({', '.join(exts)}) under {uri}")
    other = [(p, f"not {chosen.files}") for p in sorted(found) if not has_ext(p, exts)]
    uris = {p: fs.unstrip_protocol(p) for p in keep}
    every = [(fs.unstrip_protocol(p), why) for p, why in sorted(skips) + other]
    return Listing(
        chosen.name,
        fs.unstrip_protocol(root),
        tuple((uris[p], found[p]) for p in keep),
        skipped=len(every),
        versions={uris[p]: versions[p] for p in keep},
        skips=tuple(every),
    )


def skip_reason(rel: str, info: dict) -> str | None:
    """Why a listed file is not an input, whatever its extension, or None: an image file is
    an input whatever its name (``_DSC0001.JPG`` is a camera's). Skipped by rule: what is
    not a regular file (a FIFO would block its read for good), macOS's AppleDouble ``._*``
    companions, editors' temporary files, and a Delta table's log."""
    if info.get("type", "file") != "file":
        return "not regular files (FIFOs, sockets, devices)"
    parts = [part for part in rel.split("/") if part]
    name = parts[-1] if parts else rel
    if name.startswith("._"):
        return "macOS AppleDouble files (._*)"
    if name.endswith("~") or name.startswith(".~lock.") or (name.startswith(".") and name.endswith(".swp")):
        return "editor temporary files"
    if "_delta_log" in parts[:-1]:
        return "a Delta table's log"
    return None


def _list_one(fs, path: str) -> tuple[str, dict]:
    """A folder (one recursive listing) or a single file (one ``info``): (base, entries)."""
    if fs.isdir(path):
        return path.rstrip("/"), fs.find(path, detail=True)
    return path.rsplit("/", 1)[0], {path: fs.info(path)}


def _list_braces(fs, uri: str, paths: list[str]) -> dict[str, tuple[str, dict]] | None:
    """A plain brace pattern from one listing of each folder its names are in (one LIST,
    paginated, on an object store; never a HEAD per name), and a recursive listing of each
    name that is a folder. Nothing else under those folders is walked.

    Returns expanded name → (base, entries) as ``_list_one`` would give it: a name that is a
    folder → everything under it; else the listed file of that name. Names that matched
    nothing are absent: the caller looks them up one by one (an empty folder, a symbolic
    link, or "input not found"). None: not such a pattern (globs left after expansion, a
    brace in the first part of the path, HTTP) or a listing was refused; the caller then
    looks every name up as before.
    """
    if "{" not in uri or "http" in _protocols(fs):
        return None
    names = {p.rstrip("/") for p in paths}
    if any(ch in n for n in names for ch in "*?[") or not all("/" in n.lstrip("/") for n in names):
        return None
    parents: dict[str, set[str]] = {}  # b/shards → {b/shards/s-0.tar, ...}
    for n in names:
        parents.setdefault(n.rsplit("/", 1)[0], set()).add(n)
    out: dict[str, tuple[str, dict]] = {}
    try:
        for parent, mine in parents.items():
            try:
                listed = fs.ls(parent, detail=True)
            except FileNotFoundError:
                continue
            for d in listed:
                name = d["name"].rstrip("/")
                if name not in mine:
                    continue
                if d.get("type") == "directory":  # a folder wins, as fs.isdir does
                    out[name] = (name, fs.find(name, detail=True))
                else:
                    out[name] = (parent, {name: d})
    except PermissionError:  # no right to LIST (only to GET): one lookup per name, as before
        return None
    return out


def _protocols(fs) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _exists(fs, path: str) -> bool:
    try:
        return fs.exists(path)
    except Exception:
        return False


def _version(info: dict) -> str:
    """What tells one version of a file from the next: size plus ETag (object stores) or mtime."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{int(info.get('size') or 0)}:{str(tag).strip(chr(34))}"


def _detect(found: dict[str, int], uri: str) -> Format:
    """A container format (tars, Parquet) if there is exactly one among the files, else
    loose files (images); the first registered wins among loose formats."""
    present = [f for f in formats() if any(has_ext(p, f.extensions) for p in found)]
    containers = [f for f in present if f.container]
    if len(containers) > 1:
        raise InputError(f"{uri} mixes {_nouns(containers, 'and')}; pass --format")
    if present:
        return (containers or present)[0]
    raise InputError(f"no {_nouns(formats(), 'or')} under {uri}")


def _nouns(fmts, word: str) -> str:
    """'image files, tar shards or Parquet files'."""
    nouns = [f.files for f in fmts]
    return f"{', '.join(nouns[:-1])} {word} {nouns[-1]}" if len(nouns) > 1 else nouns[0]


@bulk
def shards(listing: Listing) -> list[Shard]:
    """Groups the listing into read units: one per container file, chunks of loose files."""
    v = listing.versions
    if lookup(listing.format).container:
        return [
            Shard(listing.format, listing.root, (u,), s, (v[u],) if u in v else ()) for u, s in listing.files
        ]
    out = []
    for i in range(0, len(listing.files), FILES_PER_SHARD):
        chunk = listing.files[i : i + FILES_PER_SHARD]
        uris = tuple(u for u, _ in chunk)
        versions = tuple(v[u] for u in uris) if all(u in v for u in uris) else ()
        out.append(Shard(listing.format, listing.root, uris, sum(s for _, s in chunk), versions))
    return out
