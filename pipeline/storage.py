"""fsspec options for object stores, settled once on the driver and shipped to the workers.

Credentials are never here: s3fs/botocore take them from the standard AWS chain
(environment, profile, instance role) in each process. What is here (an endpoint, the
anonymous flag, the retry policy) is safe to pickle into Ray tasks and is never written
to output files or reports.
"""

from __future__ import annotations

import os
import re

from pipeline.errors import BadInputError

# botocore's "standard" retry mode retries throttling (503 SlowDown), 500/502/504,
# connection resets and read timeouts with exponential backoff and jitter.
RETRIES = {"max_attempts": 10, "mode": "standard"}
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


def storage_options(endpoint_url: str | None = None, anonymous: bool = False) -> dict:
    """Options for every fsspec file system the run opens.

    Args:
        endpoint_url: an S3-compatible endpoint (MinIO, Ceph, R2). Defaults to
            ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` from the driver's
            environment, so workers on other nodes use the same one.
        anonymous: read public buckets without credentials.

    Returns:
        A mapping of protocol to keyword arguments, for ``options_for``.
    """
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    s3: dict = {
        "config_kwargs": {
            "retries": dict(RETRIES),
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
        }
    }
    if endpoint:
        s3["endpoint_url"] = endpoint
    if anonymous:
        s3["anon"] = True
    return {"s3": s3}


def options_for(uri: str, options: dict | None) -> dict:
    """The keyword arguments for the file system of ``uri`` (s3a/s3n count as s3)."""
    if not options:
        return {}
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3a", "s3n"):
        protocol = "s3"
    return dict(options.get(protocol, {}))


def delta_options(uri: str, options: dict | None) -> dict[str, str]:
    """delta-rs's storage options for the table at ``uri``: the endpoint and anonymous flag
    that fsspec gets (``storage_options``), in delta-rs's own keys. Credentials are not
    here: delta-rs, like s3fs, takes them from the standard AWS chain of the process. Its
    client retries throttling, 5xx answers and timeouts with backoff (10 times by default).
    """
    protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if protocol not in ("s3", "s3a", "s3n"):
        return {}
    s3 = options_for(uri, options)
    out = {"timeout": f"{READ_TIMEOUT_S}s", "connect_timeout": f"{CONNECT_TIMEOUT_S}s"}
    endpoint = s3.get("endpoint_url")
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["AWS_REGION"] = region
    if s3.get("anon"):
        out["AWS_SKIP_SIGNATURE"] = "true"
    return out


def is_hidden(relpath: str) -> bool:
    """Parquet readers (pyarrow, Spark, DuckDB) skip paths with a part starting with _ or ."""
    return any(part.startswith(("_", ".")) for part in relpath.split("/") if part)


def url_to_fs(uri: str, options: dict | None = None):
    """fsspec's ``url_to_fs`` with the run's options for that protocol. A local path (no
    scheme) is taken literally: fsspec would read ``a::b`` as a chain of file systems and
    open ``a``.

    Raises:
        BadInputError: fsspec refuses the URI (an unknown protocol, say).
    """
    import fsspec

    if "://" not in uri:
        return fsspec.filesystem("file"), os.path.abspath(uri) if uri else uri
    try:
        return fsspec.core.url_to_fs(uri, **options_for(uri, options))
    except (ValueError, ImportError) as e:
        raise BadInputError(f"cannot open {redact(uri)}: {e}") from None


def arrow_fs(uri: str, options: dict | None = None):
    """The fsspec file system behind ``uri``, wrapped for pyarrow (and so for Ray)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = url_to_fs(uri, options)
    return PyFileSystem(FSSpecHandler(fs))


def open_file(uri: str, mode: str = "rb", options: dict | None = None):
    import fsspec

    if "://" not in uri:  # literally, as url_to_fs takes it
        fs, path = url_to_fs(uri)
        return fs.open(path, mode)
    try:
        return fsspec.open(uri, mode, **options_for(uri, options))
    except (ValueError, ImportError) as e:
        raise BadInputError(f"cannot open {redact(uri)}: {e}") from None


# A URI's secrets: "user:password@", and the query string of an HTTP(S) URL (a presigned
# URL carries the key id, signature and session token there). Other schemes keep theirs:
# "?" is a legal character of file and object names.
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s]+@")
# "user:password@" without its scheme, as a client quotes a URI's host back
# ('Invalid bucket name "AKIA…:secret@bucket"'): anything of that shape before a host.
_BARE_USERINFO = re.compile(r"""(?<![\w.+%-])[^\s/"'`@:<>]+:[^\s/"'`@<>]+@(?=[\w.-])""")
_QUERY = re.compile(r"\b(https?://[^\s?#\"'`]*)\?[^\s#\"'`]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it removed, wherever they appear.

    Applied to whatever leaves a run: printed lines, logs, commitInfo, Parquet metadata and
    the ``source``/``id`` columns, and the text of a client's error about such a URI.
    """
    text = _USERINFO.sub(r"\1<redacted>@", text)
    return _QUERY.sub(r"\1?<redacted>", _BARE_USERINFO.sub("<redacted>@", text))


def redact_all(value):
    """``redact`` over every string inside nested dicts, lists and tuples (keys too)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_all(k): redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(v) for v in value)
    return value


# Schemes fsspec serves with the same file system (s3fs, gcsfs, adlfs).
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}
# Object stores: their credentials come from the process's chain, never from a URI.
OBJECT_STORES = {"s3", "gs", "az", "adl", "oss"}


def check_uri(uri: str, flag: str) -> str:
    """Refuses, in one line, a URI that would not mean what it says: credentials in an
    object-store URI (s3fs and delta-rs would take ``KEY:SECRET@bucket`` for a bucket's
    name, and the error would print the secret), or fsspec's ``::`` chaining in a URI
    with a scheme. A local path is taken literally, ``::`` included (``url_to_fs``)."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    scheme = _SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
    if scheme in OBJECT_STORES and "@" in rest.split("/", 1)[0]:
        raise BadInputError(
            f"{flag} {redact(uri)}: an object-store URI carries no credentials; they come from the "
            "standard chain (environment, profile, instance role)"
        )
    if "::" in uri:
        raise BadInputError(
            f"{flag} {redact(uri)}: '::' (fsspec's chaining of file systems) is not supported"
        )
    return uri


def canonical_uri(uri: str, resolve_links: bool = True) -> str:
    """``uri`` in one absolute spelling, settled on the driver before anything else.

    Local paths (and ``file://`` URIs) become absolute paths: relative to the driver's
    folder, with ``.`` and ``..`` resolved, and symbolic links too unless
    ``resolve_links`` is false (an input is known by the path it is given as: a ``current``
    link re-pointed at new files names the same inputs). Object-store URIs keep their
    scheme and bucket, with ``.``, ``..`` and repeated slashes removed from the key.
    Patterns keep their wildcard parts; only the part of the path that exists is resolved.
    """
    if not uri:
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
        uri = uri[len("localhost") :] if uri.startswith("localhost/") else uri
    if "://" not in uri:
        trailing = "/" if uri.endswith("/") and len(uri) > 1 else ""
        path = os.path.expanduser(uri)
        return (os.path.realpath(path) if resolve_links else os.path.abspath(path)) + trailing
    scheme, rest = uri.split("://", 1)
    scheme = _SCHEME_ALIASES.get(scheme.lower(), scheme.lower())  # one store, one spelling
    bucket, _, key = rest.partition("/")
    parts: list[str] = []
    for part in key.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    trailing = "/" if key.endswith("/") and parts else ""
    return f"{scheme}://{bucket}" + ("/" + "/".join(parts) if parts else "") + trailing


def pattern_base(uri: str) -> str:
    """The folder or file a (possibly wildcard or brace) input names: the path up to the
    last "/" before its first wildcard, or the whole path when it has none."""
    magic = [i for i in (uri.find(c) for c in "*?[{") if i >= 0]
    if not magic or os.path.exists(uri):
        return uri.rstrip("/")
    return uri[: min(magic)].rsplit("/", 1)[0]


def overlap(input_uri: str, output_uri: str) -> str | None:
    """How ``output_uri`` overlaps the input, or None: equal, inside it, or containing it,
    however either is spelled (symbolic links resolved). Writing there could overwrite,
    delete or re-read the input."""
    src = canonical_uri(pattern_base(input_uri)).rstrip("/")
    out = canonical_uri(output_uri).rstrip("/")
    if out == src:
        return "is the input"
    if out.startswith(src + "/"):
        return f"is inside the input {src}"
    if src.startswith(out + "/"):
        return f"contains the input {src}"
    return None
