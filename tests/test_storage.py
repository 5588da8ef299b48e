"""recdist.storage on a local directory and on s3:// (a real S3 API server on loopback): the same contract.

Whole files or nothing, outputs committed only with their manifest, existing outputs never clobbered by
accident, and S3 problems (bucket, keys, endpoint) reported early as StorageError without leaking keys.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import FAKE_AWS_ACCESS_KEY_ID, FAKE_AWS_SECRET_ACCESS_KEY

from recdist import storage
from recdist.errors import StorageError


class Interrupted(Exception):
    """Stands in for a crash or a kill in the middle of writing."""


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path) -> str:
    """An empty place to write: a local directory, or a prefix in a fresh bucket on the S3 test server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def table(n: int = 5, offset: float = 0.0) -> pa.Table:
    return pa.table(
        {
            "user_idx": pa.array(range(n), pa.int32()),
            "rating": pa.array([offset + i / 2 for i in range(n)], pa.float32()),
        }
    )


def commit(uri: str, files: dict[str, bytes], **kwargs) -> None:
    """Write `files` and a manifest into a staged output at `uri`."""
    with storage.staged_output(uri, **kwargs) as stage:
        for name, data in files.items():
            storage.write_bytes(storage.join(stage, name), data)
        storage.write_json(storage.join(stage, storage.MANIFEST), {"files": sorted(files)})


# --- whole files -----------------------------------------------------------------------------------------------


def test_bytes_json_and_parquet_round_trip(root):
    storage.write_bytes(storage.join(root, "raw", "blob.bin"), b"\x00\x01payload")
    storage.write_json(storage.join(root, "meta.json"), {"n_users": 3, "scale": [0.5, 5.0]})
    storage.write_parquet(table(), storage.join(root, "t.parquet"))

    assert storage.read_bytes(storage.join(root, "raw", "blob.bin")) == b"\x00\x01payload"
    assert storage.read_json(storage.join(root, "meta.json")) == {"n_users": 3, "scale": [0.5, 5.0]}
    back = storage.read_parquet(storage.join(root, "t.parquet"))
    assert back.equals(table()) and back.schema == table().schema
    assert storage.read_parquet(storage.join(root, "t.parquet"), columns=["rating"]).column_names == ["rating"]
    fs, path = storage.filesystem(storage.join(root, "t.parquet"))
    with fs.open(path, "rb") as f:
        assert pq.ParquetFile(f).metadata.row_group(0).column(0).compression == "ZSTD"


def test_rewriting_replaces_the_whole_file_and_leaves_no_temporaries(root):
    storage.write_bytes(storage.join(root, "f.bin"), b"x" * 1000)
    storage.write_bytes(storage.join(root, "f.bin"), b"short")
    storage.write_parquet(table(5), storage.join(root, "t.parquet"))
    storage.write_parquet(table(2, offset=1.0), storage.join(root, "t.parquet"))

    assert storage.read_bytes(storage.join(root, "f.bin")) == b"short"
    assert storage.read_parquet(storage.join(root, "t.parquet")).equals(table(2, offset=1.0))
    assert storage.listdir(root) == ["f.bin", "t.parquet"]


def test_interrupted_parquet_write_keeps_the_old_file_and_leaves_nothing_else(root, monkeypatch):
    target = storage.join(root, "t.parquet")
    storage.write_parquet(table(), target)

    def crash_half_way(tbl, where, **kwargs):
        if isinstance(where, str):
            with open(where, "wb") as f:
                f.write(b"PAR1 half a file")
        else:
            where.write(b"PAR1 half a file")
        raise Interrupted

    monkeypatch.setattr(storage.pq, "write_table", crash_half_way)
    with pytest.raises(Interrupted):
        storage.write_parquet(table(50, offset=2.0), target)
    monkeypatch.undo()

    assert storage.read_parquet(target).equals(table())
    assert storage.listdir(root) == ["t.parquet"]


def test_failed_local_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = str(tmp_path / "f.bin")
    storage.write_bytes(target, b"old")

    def crash(fd):
        raise Interrupted

    monkeypatch.setattr(storage.os, "fsync", crash)
    with pytest.raises(Interrupted):
        storage.write_bytes(target, b"new")
    assert storage.read_bytes(target) == b"old"
    assert storage.listdir(str(tmp_path)) == ["f.bin"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_refused_writes_are_storage_errors_with_the_path_and_a_fix(tmp_path, monkeypatch, code):
    target = str(tmp_path / "f.bin")
    storage.write_bytes(target, b"old")

    def refuse(fd):  # the OS refusing the write, at the last step before the file would replace the old one
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(storage.os, "fsync", refuse)
    with pytest.raises(StorageError) as err:
        storage.write_bytes(target, b"new")
    assert target in err.value.what and err.value.where and err.value.fix
    assert storage.read_bytes(target) == b"old" and storage.listdir(str(tmp_path)) == ["f.bin"]


def test_an_output_under_a_file_or_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    for out in (tmp_path / "notes.txt" / "out", tmp_path / "notes.txt"):
        with pytest.raises(StorageError, match="is a file|not a directory") as err:
            with storage.staged_output(str(out)):
                raise AssertionError("the block must not run")
        assert err.value.where and err.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep"


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs directory (root only: skipped elsewhere); unmounted after."""
    mounted: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        where = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                               capture_output=True).returncode:  # fmt: skip
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(where)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_read_only_output_is_refused_before_any_work(tmpfs):
    out = tmpfs("1m", read_only=True) / "out"
    with pytest.raises(StorageError, match="read-only") as err:
        with storage.staged_output(str(out)):
            raise AssertionError("the block must not run")
    assert str(out) in err.value.what and "writable" in err.value.fix


def test_a_full_disk_commits_nothing_and_leaves_nothing(tmpfs):
    disk = tmpfs("64k")
    storage.write_bytes(str(disk / "old.bin"), b"kept")
    big = pa.table({"x": pa.array(range(200_000), pa.int64())})  # ~1.6 MB raw: cannot fit
    with pytest.raises(StorageError, match="no space left") as err:
        with storage.staged_output(str(disk / "out")) as stage:
            storage.write_parquet(big, storage.join(stage, "part.parquet"), compression="none")
            storage.write_json(storage.join(stage, storage.MANIFEST), {})
    assert "df -h" in err.value.fix
    assert sorted(os.listdir(disk)) == ["old.bin"] and storage.read_bytes(str(disk / "old.bin")) == b"kept"


def test_missing_files_are_storage_errors_naming_the_path(root):
    with pytest.raises(StorageError, match="not found") as err:
        storage.read_bytes(storage.join(root, "nothing.json"))
    assert "nothing.json" in str(err.value)
    with pytest.raises(StorageError, match="nothing.parquet"):
        storage.read_parquet(storage.join(root, "nothing.parquet"))


def test_listdir_and_exists(root):
    assert storage.listdir(root) == [] and not storage.exists(root)
    storage.write_bytes(storage.join(root, "b", "x.bin"), b"1")
    storage.write_bytes(storage.join(root, "a.bin"), b"2")

    assert storage.listdir(root) == ["a.bin", "b"]
    assert storage.listdir(storage.join(root, "b")) == ["x.bin"]
    assert storage.exists(storage.join(root, "a.bin")) and storage.exists(storage.join(root, "b"))
    assert not storage.exists(storage.join(root, "c.bin"))


def test_unsupported_scheme_is_a_storage_error():
    with pytest.raises(StorageError, match="unsupported URI scheme") as err:
        storage.filesystem("gs://bucket/out")
    assert "s3://" in str(err.value)  # says what would work


# --- staged outputs --------------------------------------------------------------------------------------------


def test_staged_output_commits_the_whole_directory_with_its_manifest(root):
    out = storage.join(root, "run")
    commit(out, {"model.bin": b"weights", "part/p0.bin": b"rows"})

    assert storage.is_committed(out)
    assert storage.read_bytes(storage.join(out, "model.bin")) == b"weights"
    assert storage.read_bytes(storage.join(out, "part", "p0.bin")) == b"rows"
    assert storage.read_json(storage.join(out, "manifest.json")) == {"files": ["model.bin", "part/p0.bin"]}
    assert storage.listdir(root) == ["run"]  # the staging directory is gone


def test_staged_output_without_manifest_commits_nothing(root):
    out = storage.join(root, "run")
    with pytest.raises(RuntimeError, match="manifest.json"):
        with storage.staged_output(out) as stage:
            storage.write_bytes(storage.join(stage, "model.bin"), b"weights")

    assert not storage.exists(out) and storage.listdir(root) == []


def test_interrupted_staged_output_commits_nothing(root):
    out = storage.join(root, "run")
    with pytest.raises(Interrupted):
        with storage.staged_output(out) as stage:
            storage.write_bytes(storage.join(stage, "model.bin"), b"weights")
            raise Interrupted

    assert not storage.exists(out) and not storage.is_committed(out)
    assert storage.listdir(root) == []


def test_committed_output_is_refused_without_overwrite_and_left_intact(root):
    out = storage.join(root, "run")
    commit(out, {"model.bin": b"v1"})
    ran = False
    with pytest.raises(StorageError, match="already exists") as err:
        with storage.staged_output(out):
            ran = True

    assert not ran, "the block must not run when its output would be refused"
    assert "--overwrite" in str(err.value) and "run" in str(err.value)
    assert storage.read_bytes(storage.join(out, "model.bin")) == b"v1" and storage.is_committed(out)
    assert storage.listdir(root) == ["run"]


def test_overwrite_replaces_the_whole_output(root):
    out = storage.join(root, "run")
    commit(out, {"model.bin": b"v1", "old-only.bin": b"stale"})
    commit(out, {"model.bin": b"v2"}, overwrite=True)

    assert storage.listdir(out) == ["manifest.json", "model.bin"]  # nothing of v1 survives
    assert storage.read_bytes(storage.join(out, "model.bin")) == b"v2"
    assert storage.listdir(root) == ["run"]


def test_interrupted_overwrite_keeps_the_old_output(root):
    out = storage.join(root, "run")
    commit(out, {"model.bin": b"v1"})
    with pytest.raises(Interrupted):
        with storage.staged_output(out, overwrite=True) as stage:
            storage.write_bytes(storage.join(stage, "model.bin"), b"v2")
            raise Interrupted

    assert storage.is_committed(out) and storage.read_bytes(storage.join(out, "model.bin")) == b"v1"
    assert storage.listdir(root) == ["run"]


def test_uncommitted_leftover_is_replaced_without_overwrite(root):
    out = storage.join(root, "run")
    storage.write_bytes(storage.join(out, "half.bin"), b"from a crashed run")
    assert not storage.is_committed(out)

    commit(out, {"model.bin": b"v1"})
    assert storage.listdir(out) == ["manifest.json", "model.bin"]


# --- S3 problems, found before any work ------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket closes


def assert_no_credentials(err: pytest.ExceptionInfo) -> None:
    text = str(err.value)
    assert FAKE_AWS_ACCESS_KEY_ID not in text and FAKE_AWS_SECRET_ACCESS_KEY not in text


@pytest.mark.s3
def test_check_writable_passes_and_leaves_no_probe(s3_bucket):
    storage.check_writable(s3_bucket + "/runs/a")
    assert storage.listdir(s3_bucket) == []
    storage.check_writable("relative/local/path")  # local outputs: nothing to check


@pytest.mark.s3
@pytest.mark.timeout(60)
def test_missing_bucket_is_reported_before_any_work():
    ran = False
    with pytest.raises(StorageError, match="'recdist-no-such-bucket' does not exist") as err:
        with storage.staged_output("s3://recdist-no-such-bucket/runs/a"):
            ran = True
    assert not ran
    assert "create the bucket" in str(err.value)
    assert_no_credentials(err)


@pytest.mark.s3
@pytest.mark.timeout(60)
def test_rejected_credentials_are_reported_without_the_keys(s3_server, s3_bucket):
    with s3_server.rejecting_credentials():
        with pytest.raises(StorageError, match="refused access") as err:
            storage.check_writable(s3_bucket + "/runs/a")
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value)  # names the setting to fix ...
    assert_no_credentials(err)  # ... never its value


@pytest.mark.s3
@pytest.mark.timeout(60)
def test_unreachable_endpoint_is_reported(s3_bucket, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(StorageError, match="unreachable") as err:
        storage.check_writable(s3_bucket + "/runs/a")
    assert endpoint in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)
    assert_no_credentials(err)


# --- Ray workers see the same S3 ---------------------------------------------------------------------------------


@pytest.mark.s3
@pytest.mark.ray
def test_ray_workers_reach_the_test_s3_server(ray_cluster, s3_bucket):
    """The session cluster starts after the S3 variables are set, so workers inherit endpoint and keys."""

    @ray_cluster.remote
    def write(uri: str) -> None:
        storage.write_json(uri, {"from": "worker"})

    ray_cluster.get(write.remote(s3_bucket + "/from-worker.json"))
    assert storage.read_json(s3_bucket + "/from-worker.json") == {"from": "worker"}


@pytest.mark.parametrize("given", [None, "system"])
def test_recdist_takes_arrows_buffers_from_jemalloc_unless_a_pool_is_named(given):
    env = {k: v for k, v in os.environ.items() if k != storage.ARROW_POOL_ENV}
    if given:
        env[storage.ARROW_POOL_ENV] = given
    code = (
        "import os, pyarrow as pa; from recdist.storage import prefer_jemalloc; prefer_jemalloc(); "
        "print(pa.default_memory_pool().backend_name, os.environ.get('ARROW_DEFAULT_MEMORY_POOL'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    expected = given or "jemalloc"
    assert out.stdout.split() == [expected, expected]  # and the processes it starts inherit the choice


def test_parquet_schema_reads_the_footer_and_names_a_missing_file(tmp_path) -> None:
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"user_idx": pa.array([1], pa.int32()), "rating": [4.0]}), path)
    schema = storage.parquet_schema(str(path))
    assert schema.names == ["user_idx", "rating"] and schema.field("user_idx").type == pa.int32()
    with pytest.raises(StorageError, match="not found"):
        storage.parquet_schema(str(tmp_path / "gone.parquet"))
