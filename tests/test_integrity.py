"""Verified shards, stale directories, one run per directory, leftovers: the checks every reader of a run makes.

Real Parquet files and real processes; no Ray. Issue 18: a damaged shard gave wrong outputs with exit 0, a second
run on one --out trained inside the first, a refused run still wrote manifest.json and config.yaml, and killed
runs left `*.staging-*` forever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import planted_frame, write_dataset

from recdist import integrity, runlock, storage
from recdist.errors import IntegrityError, StorageError
from recdist.manifest import DatasetManifest, file_entries


def committed_dataset(root: Path, *, sample: bool = False) -> str:
    """A dataset directory whose manifest lists its files (with checksums), as prepare writes it; with `sample`,
    a sub-directory committed on its own (as a scored table's sample/)."""
    data = write_dataset(root, planted_frame(), shards=2)
    storage.write_parquet(pa.table({"user_idx": list(range(30))}), storage.join(data, "users.parquet"))
    if sample:
        storage.write_parquet(pa.table({"x": list(range(50))}), storage.join(data, "sample", "part-00000.parquet"))
        sub = DatasetManifest.read(data)
        sub.files = file_entries(storage.join(data, "sample"))
        sub.write(storage.join(data, "sample"))
    manifest = DatasetManifest.read(data)
    manifest.files = file_entries(data)
    manifest.write(data)
    return data


def flip(path: Path, at: float = 0.5, n: int = 16) -> None:
    raw = bytearray(path.read_bytes())
    mid = int(len(raw) * at)
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))


SHARD = "ratings/part-00001.parquet"
CORRUPTIONS = {
    "deleted shard": lambda d: (d / SHARD).unlink(),
    "flipped bytes mid-shard": lambda d: flip(d / SHARD),
    "flipped bytes in the footer": lambda d: flip(d / SHARD, at=0.99, n=4),
    "truncated shard": lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes()[:-100]),
    "shard replaced by another of the same size": lambda d: (d / SHARD).write_bytes(
        (d / "ratings/part-00000.parquet")
        .read_bytes()[: (d / SHARD).stat().st_size]
        .ljust((d / SHARD).stat().st_size, b"\0")
    ),
    "extra shard": lambda d: (d / "ratings/part-00002.parquet").write_bytes((d / SHARD).read_bytes()),
    "extra file at the top": lambda d: (d / "users-old.parquet").write_bytes(b"x"),
    "manifest deleted": lambda d: (d / "manifest.json").unlink(),
    "manifest truncated": lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:40]),
    "sub-directory's shard flipped": lambda d: flip(d / "sample" / "part-00000.parquet"),
    "sub-directory's manifest deleted": lambda d: (d / "sample" / "manifest.json").unlink(),
}


def test_an_intact_directory_verifies_and_lists_checksums_and_its_sub_directories(tmp_path):
    data = committed_dataset(tmp_path / "data", sample=True)
    manifest = DatasetManifest.read(data)
    paths = [e.path for e in manifest.files]
    assert SHARD in paths and "sample/manifest.json" in paths and "sample/part-00000.parquet" not in paths
    assert all(e.sha256 and len(e.sha256) == 64 for e in manifest.files)
    assert integrity.check(data) == []
    integrity.verify(data, fix="unused")


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_of_a_committed_directory_is_found_and_named(tmp_path, name):
    data = Path(committed_dataset(tmp_path / "data", sample=True))
    CORRUPTIONS[name](data)
    with pytest.raises(IntegrityError) as caught:
        integrity.verify(str(data), fix="re-run with --from mf")
    message = str(caught.value)
    assert "where:" in message and "fix:   re-run with --from mf" in message
    if "shard" in name and "sub-directory" not in name:
        assert str(data / "ratings") in message


def test_parquet_is_written_with_page_checksums_that_catch_a_flipped_page(tmp_path):
    uri = str(tmp_path / "t.parquet")
    storage.write_parquet(pa.table({"x": pa.array(range(100_000), pa.int64())}), uri, compression="none")
    flip(Path(uri), at=0.5, n=8)
    with pytest.raises(OSError, match="(?i)checksum|CRC"):
        pq.read_table(uri, page_checksum_verification=True)


def test_old_manifests_are_checked_as_far_as_they_go(tmp_path):
    data = write_dataset(tmp_path / "data", planted_frame(), shards=2)  # no files: nothing to check
    assert integrity.check(data) == []
    manifest = DatasetManifest.read(data)
    manifest.files = [e.model_copy(update={"sha256": None}) for e in file_entries(data)]
    manifest.write(data)
    flip(Path(data) / SHARD)  # same size, no checksum: not detectable
    assert integrity.check(data) == []
    (Path(data) / SHARD).unlink()
    assert "missing" in integrity.check(data)[0].what


def test_a_directory_made_from_an_input_redone_since_is_stale(tmp_path):
    data = committed_dataset(tmp_path / "run" / "data")
    stage = tmp_path / "run" / "mf"
    storage.write_json(str(stage / "x.json"), {"a": 1})
    DatasetManifest.read(data).model_copy(
        update={"files": file_entries(str(stage)), "inputs": integrity.pins({"prepare": data}, str(stage))}
    ).write(str(stage))
    assert json.loads((stage / "manifest.json").read_text())["inputs"] == {"../data": integrity.manifest_digest(data)}
    assert not integrity.is_stale(str(stage))
    DatasetManifest.read(data).model_copy(update={"created_at": "later"}).write(data)  # prepared again
    assert integrity.is_stale(str(stage))
    with pytest.raises(IntegrityError, match="stale: it was made from") as caught:
        integrity.verify(str(stage), fix="damaged", stale_fix="redo the stale stages")
    assert "redo the stale stages" in str(caught.value)


def committed_model(folder: Path, stage_of: Path | None = None) -> str:
    """A model directory committed as `recdist train` commits one (manifest kind model, its files with checksums);
    with `stage_of`, inside a pipeline stage directory (RUN/<stage>/model, the stage's manifest beside it)."""
    (folder / "model.safetensors").parent.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "model.json").write_text('{"name": "biased_mf"}')
    entries = [e.model_dump() for e in file_entries(str(folder))]
    storage.write_json(str(folder / "manifest.json"), {"kind": "model", "files": entries})
    if stage_of is not None:
        storage.write_json(str(stage_of / "manifest.json"), {"kind": "stage", "files": []})
    return str(folder)


def test_train_tune_and_infer_verify_what_they_are_given_before_reading_it(tmp_path, capsys, monkeypatch):
    """Issue 18: `recdist pipeline` verified its inputs, `recdist train`/`tune`/`infer` read a damaged dataset or
    model as it was. Now each stops at once (exit 2, nothing run) naming the file and how to rebuild it."""
    from test_cli import cli

    def never(*args, **kwargs):
        raise AssertionError("ran on damaged input")

    monkeypatch.setattr("recdist.train.run.train_stage", never)
    monkeypatch.setattr("recdist.tune.search.tune_stage", never)
    monkeypatch.setattr("recdist.infer.ray_data.score", never)
    data = Path(committed_dataset(tmp_path / "data"))
    model = Path(committed_model(tmp_path / "model"))
    flip(data / SHARD)
    for args in (("train", "--data", str(data), "--out", str(tmp_path / "out")),
                 ("tune", "--data", str(data), "--out", str(tmp_path / "out")),
                 ("infer", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"))):  # fmt: skip
        code, _, err = cli(capsys, *args, "-q")
        assert code == 2 and str(data / SHARD) in err and "sha256 differs" in err, (args, err)
        assert f"recdist prepare ... --out {data} --overwrite" in err
    (data / SHARD).unlink()
    committed_dataset(tmp_path / "data2")
    (model / "model.safetensors").write_bytes(b"short")
    code, _, err = cli(capsys, "infer", "--model", str(model), "--data", str(tmp_path / "data2"), "--out", "o", "-q")
    assert code == 2 and "truncated" in err and f"recdist train --data DATA --out {model} --overwrite" in err
    code, _, err = cli(capsys, "train", "--data", str(tmp_path / "data2"), "--stage", "reliability",
                       "--upstream", str(model), "--out", str(tmp_path / "out"), "-q")  # fmt: skip
    assert code == 2 and str(model / "model.safetensors") in err
    assert not (tmp_path / "out").exists()


def test_the_fix_for_a_damaged_input_of_a_pipeline_run_redoes_its_stage(tmp_path):
    run = tmp_path / "run"
    model = committed_model(run / "mf" / "model", stage_of=run / "mf")
    redo = f"redo that stage of its run: recdist pipeline --config CONFIG --out {run} --from mf"
    assert integrity.redo(model) == redo
    data = committed_dataset(run / "data")
    storage.write_json(str(run / "manifest.json"), {"kind": "run"})
    assert integrity.redo(data).endswith(f"--out {run} --from prepare")
    assert integrity.redo(str(tmp_path / "elsewhere")).startswith("rebuild it with the command that wrote it")


def test_a_rebuilt_directory_is_swapped_in_whole(tmp_path):
    old, new = tmp_path / "mf", tmp_path / "mf.next"
    for where, text in ((old, "old"), (new, "new")):
        storage.write_bytes(str(where / "model" / "w.bin"), text.encode())
        storage.write_json(str(where / "manifest.json"), {"v": text})
    storage.replace_dir(str(new), str(old))
    assert (old / "model" / "w.bin").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mf"]  # the old one renamed aside, then removed


def test_leftovers_of_killed_runs_are_found_anywhere_under_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "outputs.staging-1a2b3c4d" / "x").mkdir(parents=True)
    (run / "mf" / "scored.staging-deadbeef").mkdir(parents=True)
    (run / "mf" / "manifest.json.tmp-0badc0de").write_text("{")
    (run / "mf" / "model").mkdir()
    removed = storage.remove_leftovers(str(run))
    assert len(removed) == 3
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == ["mf", "mf/model"]


# --- one run per directory ---------------------------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys, time
    from recdist import runlock
    with runlock.locked(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
    """
)


def holder_process(run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_holds_across_two_real_processes_and_a_dead_holders_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    proc = holder_process(run)
    try:
        with pytest.raises(StorageError, match=f"another run is using .*pid {proc.pid}") as caught:
            with runlock.locked(str(run)):
                pass
        assert "fix:" in str(caught.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((run / runlock.LOCK).read_text())["pid"] == proc.pid  # a killed holder leaves its lock
    with caplog.at_level("WARNING"), runlock.locked(str(run)) as me:
        assert json.loads((run / runlock.LOCK).read_text()) == me
    assert "taking over the lock" in caplog.text and not (run / runlock.LOCK).exists()


def test_a_run_refused_by_the_lock_writes_nothing(tmp_path):
    from recdist.config import load_config
    from recdist.pipeline import run_pipeline

    run = tmp_path / "run"
    proc = holder_process(run)
    try:
        with pytest.raises(StorageError, match="another run is using"):
            run_pipeline(load_config(None, {}), str(run))
        assert [p.name for p in run.iterdir()] == [runlock.LOCK]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.s3
def test_an_s3_lease_refuses_a_second_run_and_an_expired_one_is_taken_over(s3_bucket, caplog):
    run = f"{s3_bucket}/runs/r1"
    with runlock.locked(run) as me:
        lease = storage.read_json(f"{run}/{runlock.LOCK}")
        assert lease["pid"] == me["pid"] and lease["expires_at"] > time.time()
        with pytest.raises(StorageError, match="its lease is valid for"):
            with runlock.locked(run):
                pass
    assert not storage.exists(f"{run}/{runlock.LOCK}")  # released
    dead = {"pid": 1, "host": "gone", "started_at": "yesterday", "expires_at": time.time() - 5}
    storage.write_json(f"{run}/{runlock.LOCK}", dead)
    with caplog.at_level("WARNING"), runlock.locked(run) as me:
        assert storage.read_json(f"{run}/{runlock.LOCK}")["pid"] == me["pid"]
    assert "taking over the lease" in caplog.text


@pytest.mark.s3
def test_a_run_whose_lease_is_taken_over_stops_naming_the_new_holder(s3_bucket, caplog):
    """Issue 18: a lost s3:// lease only logged, and the run went on committing beside the run that took it over.
    Now the holder's main thread is interrupted at once, and `check` (between stages) refuses as well."""
    run = f"{s3_bucket}/runs/lost"
    other = {"pid": 4242, "host": "elsewhere", "started_at": "now", "expires_at": time.time() + 600}
    # Python's own SIGINT handler, as in a run started from a terminal (a process started in the background by
    # a shell ignores SIGINT, and interrupt_main then does nothing: that case is check()'s, below)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(StorageError, match=r"lost its lease .* \(pid 4242 on elsewhere") as caught:
            with runlock.locked(run, lease_s=0.6):
                storage.write_json(f"{run}/{runlock.LOCK}", other)  # taken over while this run could not renew
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # a stage at work: interrupted at the next renewal (0.2 s)
                    time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, before)
    assert "fix:" in str(caught.value)
    assert storage.read_json(f"{run}/{runlock.LOCK}")["pid"] == 4242  # the new holder's lease is left alone
    with runlock.locked(f"{s3_bucket}/runs/kept", lease_s=0.6):
        runlock._lost[f"{s3_bucket}/runs/kept"] = other  # as the renewer records it where no interrupt arrives
        with pytest.raises(StorageError, match="lost its lease"):
            runlock.check(f"{s3_bucket}/runs/kept")
