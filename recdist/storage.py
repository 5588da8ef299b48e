"""Every path is a URI (local path, file://, s3://): one place resolves filesystems and commits outputs.

S3 endpoint and credentials come from the standard AWS environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), the same way for AWS, MinIO or a test server.
Outputs are committed by a marker file written last: a directory without it does not exist for readers.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recdist.errors import StorageError

MANIFEST = "manifest.json"


ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def prefer_jemalloc() -> None:
    """Arrow's buffers from jemalloc, in this process and the ones it starts (a local Ray cluster's workers), unless
    $ARROW_DEFAULT_MEMORY_POOL already names a pool. Arrow's default, mimalloc, hands memory back and faults it in
    again at every shard when threads read and write Parquet side by side: the outputs stage's predictions pass
    took 23 s with it on 2 cores and 16 s with jemalloc (and 2.2x the system time)."""
    if os.environ.get(ARROW_POOL_ENV):
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc: keep its default
        return
    os.environ[ARROW_POOL_ENV] = "jemalloc"


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def _s3_options() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    return {
        "client_kwargs": client_kwargs,
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}},
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


_S3_ENV = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
)  # fmt: skip
"""The environment an S3 filesystem is built from: a change in any of them builds a new one."""


@functools.lru_cache(maxsize=8)
def _s3_filesystem(env: tuple[str | None, ...], pid: int) -> fsspec.AbstractFileSystem:
    """One S3 filesystem per environment and process: building one (a botocore client) costs ~0.1-0.3 s,
    which every call paid before."""
    import s3fs

    return s3fs.S3FileSystem(**_s3_options())


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        fs = _s3_filesystem(tuple(os.environ.get(k) for k in _S3_ENV), os.getpid())
        return fs, uri.split("://", 1)[1].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(
            f"unsupported URI scheme in {uri!r}",
            where=uri,
            fix="use a local path, file:///abs/path or s3://bucket/prefix (download http(s):// files first)",
        )
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), absolute(path)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a URI (what Ray Data and Ray Train's storage_filesystem take)."""
    fs, path = filesystem(uri)
    if is_s3(str(uri)):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def absolute(uri: str) -> str:
    """A local path made absolute; a URI with a scheme (s3://, file://) as it is. For every path handed to Ray
    workers and actors, whose working directory is not the driver's."""
    uri = str(uri)
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if "://" in uri:
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_committed(uri: str, marker: str = MANIFEST) -> bool:
    """True when the output directory at `uri` was committed (its marker file is present)."""
    return exists(join(uri, marker))


_WRITE_ERRORS = {
    errno.EACCES: ("permission denied", "choose an output path you may write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose an output path you may write to, or change its permissions"),
    errno.EROFS: ("the filesystem is read-only", "choose an output path on a writable filesystem"),
    errno.ENOSPC: (
        "no space left on the device",
        "free space there (`df -h PATH` shows what is left) or choose an output path on a disk with room; "
        "nothing half-written was kept",
    ),
    errno.EFBIG: (
        "a file outgrew the largest file allowed (this process's `ulimit -f`, or the filesystem's limit)",
        "raise the limit (`ulimit -f unlimited`) or choose an output path on a filesystem that takes larger files; "
        "nothing half-written was kept",
    ),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or choose an output path elsewhere"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose an output path under a directory"),
    errno.EEXIST: ("a part of the path is a file, not a directory", "choose an output path under a directory"),
}
"""The OS's refusals to write, each with what it means and the fix (everything else stays an OSError)."""


@contextmanager
def writing(uri: str) -> Iterator[None]:
    """Turn the OS's refusals to write `uri` (permissions, a read-only or full disk, a file where a directory
    should be) into StorageError naming the path and the fix: the user's problem, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        what, fix = _WRITE_ERRORS[e.errno]
        raise StorageError(f"cannot write {uri}: {what}", where=str(e.filename or uri), fix=fix) from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never half of one."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        fs.pipe_file(path, data)  # one PUT: atomic on S3
        return
    with writing(uri), _local_replacement(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def _local_replacement(path: str) -> Iterator[str]:
    """A temporary sibling of `path` to write; it replaces `path` on success and is removed on failure."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def link(src: str, dst: str) -> None:
    """`dst` as a copy of the file `src` that costs no writing where it can: a hard link on a local disk (a copy
    across devices), a server-side copy on S3 (no bytes through this process). A file is never changed in place
    here (every write replaces it), so a link is as safe as a copy."""
    (fs, path), (source_fs, source) = filesystem(dst), filesystem(src)
    if not source_fs.exists(source):
        fix = "restore that run's files, or run this one without what reads them (a cold run)"
        raise StorageError(f"cannot link {src}: it is gone", where=src, fix=fix)
    if is_s3(dst) != is_s3(src):
        write_bytes(dst, read_bytes(src))
        return
    if is_s3(dst):
        fs.copy(source, path)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.link(source, path)
    except OSError:  # another device, or a file system without hard links
        shutil.copyfile(source, path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise StorageError(f"file not found: {uri}", where=uri, fix="check the path") from e
    except IsADirectoryError as e:
        raise StorageError(f"{uri} is a directory, not a file", where=uri, fix="name the file itself") from e
    except PermissionError as e:
        raise StorageError(
            f"permission denied reading {uri}", where=uri, fix="check the file's permissions (or your S3 keys)"
        ) from e


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def shard_threads(shards: int) -> int:
    """Threads for `shards` independent shards or files (Polars, Arrow, hashlib and the kernels release the GIL):
    this machine's cores, at most 8 (memory: a shard per thread)."""
    return max(1, min(shards, os.cpu_count() or 1, 8))


def write_parquet(table: pa.Table, uri: str, **kwargs: Any) -> None:
    """Write one Parquet file (zstd unless `compression` is given, with page checksums) atomically."""
    kwargs.setdefault("compression", "zstd")
    kwargs.setdefault("write_page_checksum", True)
    fs, path = filesystem(uri)
    if not is_s3(uri):
        with writing(uri), _local_replacement(path) as tmp:
            pq.write_table(table, tmp, **kwargs)
        return
    # Whole file in memory, then one PUT: a streamed upload would commit a truncated object on a crash.
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    fs.pipe_file(path, sink.getvalue().to_pybytes())


def parquet_schema(uri: str) -> pa.Schema:
    """The schema of one Parquet file, from its footer only."""
    afs, path = arrow_filesystem(uri)
    try:
        return pq.read_schema(path, filesystem=afs)
    except FileNotFoundError as e:
        raise StorageError(f"Parquet file not found: {uri}", fix="check the path") from e


def read_parquet(uri: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    afs, path = arrow_filesystem(uri)
    try:
        return pq.read_table(path, columns=columns, filters=filters, filesystem=afs)
    except FileNotFoundError as e:
        raise StorageError(f"Parquet file not found: {uri}", fix="check the path") from e


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under `uri`, sorted."""
    fs, path = filesystem(uri)
    try:  # a file lists itself: it has no entries under it
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if p.rstrip("/") != path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_writable(uri: str) -> None:
    """Fail early, before any work, when an output cannot be written: locally a read-only disk, permissions or
    a file on the path (a probe directory is made and removed in the nearest existing parent, so nothing is
    left); on S3 the bucket, the keys and the endpoint."""
    if not is_s3(uri):
        parent = os.path.dirname(filesystem(uri)[1])
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        with writing(uri):
            if not os.path.isdir(parent):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), parent)
            probe = os.path.join(parent, f".recdist-write-probe-{uuid.uuid4().hex[:8]}")
            os.mkdir(probe)
            os.rmdir(probe)
        return
    from botocore.exceptions import BotoCoreError  # connection failures are BotoCoreErrors, not OSErrors

    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    probe = f"{path}/.recdist-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except FileNotFoundError as e:
        raise StorageError(
            f"S3 bucket {bucket!r} does not exist",
            where=uri,
            fix="create the bucket or point the output at an existing one",
        ) from e
    except PermissionError as e:
        raise StorageError(
            f"S3 refused access to bucket {bucket!r} (wrong or missing credentials?)",
            where=uri,
            fix="set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the pod's Secret) to keys that may write there",
        ) from e
    except (OSError, BotoCoreError) as e:
        raise StorageError(
            f"S3 endpoint unreachable or failing for bucket {bucket!r}: {type(e).__name__}",
            where=_s3_options()["client_kwargs"].get("endpoint_url", "the default AWS endpoint"),
            fix="check AWS_ENDPOINT_URL and the network path to it",
        ) from e


@contextmanager
def staged_output(uri: str, *, overwrite: bool = False, marker: str = MANIFEST) -> Iterator[str]:
    """Build an output directory under a staging name and move it into place only when it is whole.

    Yields the staging URI to write into; the block must write `marker` last. On any error the staging
    directory is removed and an existing output is untouched. An existing complete output is replaced only
    with `overwrite=True`; an incomplete leftover (no marker) is replaced silently.
    """
    fs, path = filesystem(uri)
    if not is_s3(uri) and os.path.isfile(path):
        raise StorageError(
            f"output {uri} is a file, not a directory", where=uri, fix="choose a directory for the output (--out)"
        )
    if fs.exists(path) and listdir(uri):
        if fs.exists(posixpath.join(path, marker)) and not overwrite:
            raise StorageError(
                f"output already exists: {uri}",
                where=uri,
                fix="pass --overwrite to replace it, or choose another output path",
            )
    check_writable(uri)
    staging_path = f"{path}.staging-{uuid.uuid4().hex[:8]}"
    staging = f"s3://{staging_path}" if is_s3(uri) else staging_path
    try:
        yield staging
        if not fs.exists(posixpath.join(staging_path, marker)):
            raise RuntimeError(f"staged output {staging} has no {marker}; refusing to commit it")
        with writing(uri):
            _commit(fs, staging_path, path, marker, remote=is_s3(uri))
    except BaseException:
        if fs.exists(staging_path):
            fs.rm(staging_path, recursive=True)
        raise


def replace_dir(staging: str, uri: str, marker: str = MANIFEST) -> None:
    """Swap the committed directory `staging` (a sibling built beside it) in at `uri`: locally one rename (the
    old one is renamed aside first, then removed); on S3, which has no rename, the old marker goes first and the
    new marker is copied last, so readers see the old directory, none, or the new one, never a mix."""
    fs, path = filesystem(uri)
    with writing(uri):
        _commit(fs, filesystem(staging)[1], path, marker, remote=is_s3(uri))


LEFTOVER_TAGS = (".staging-", ".old-", ".tmp-")
"""What staged_output, replace_dir and write_bytes name their temporary siblings: leftovers once their run died."""


def remove_leftovers(root: str) -> list[str]:
    """Remove the temporary siblings (LEFTOVER_TAGS) anywhere under `root` that killed runs left; returns them.
    Only for a directory whose run holds its lock (recdist.runlock): a live run's are not leftovers."""
    fs, path = filesystem(root)
    if not fs.exists(path):
        return []
    found = [p for p in fs.find(path, withdirs=True) if any(t in posixpath.basename(p) for t in LEFTOVER_TAGS)]
    removed: list[str] = []
    for p in sorted(found, key=len):
        if any(p.startswith(r + "/") for r in removed) or not fs.exists(p):
            continue
        fs.rm(p, recursive=True)
        removed.append(p)
    return [f"s3://{p}" if is_s3(root) else p for p in removed]


def _commit(fs: fsspec.AbstractFileSystem, staging: str, dest: str, marker: str, *, remote: bool) -> None:
    if not remote:
        old = None
        if os.path.exists(dest):
            old = f"{dest}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        os.rename(staging, dest)  # atomic on one filesystem
        if old:
            fs.rm(old, recursive=True)
        return
    # S3 has no rename: drop the old marker first, copy everything but the marker, then the marker last.
    if fs.exists(posixpath.join(dest, marker)):
        fs.rm_file(posixpath.join(dest, marker))
    if fs.exists(dest):
        fs.rm(dest, recursive=True)
    files = [f for f in fs.find(staging) if posixpath.basename(f) != marker]
    for src in files:
        fs.copy(src, dest + src[len(staging) :])
    fs.copy(posixpath.join(staging, marker), posixpath.join(dest, marker))
    fs.rm(staging, recursive=True)
