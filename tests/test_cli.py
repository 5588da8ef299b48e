"""The `recdist` command as a user meets it: help, config errors, exit codes, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recdist.config import load_config


def recdist(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recdist", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_lists_every_command():
    result = recdist("--help")
    assert result.returncode == 0
    for command in ("synth", "datasets", "download", "prepare", "train", "pipeline", "infer", "recommend",
                    "similar", "models", "config"):
        assert command in result.stdout


def test_unknown_config_key_names_the_path_and_suggests():
    result = recdist("config", "--set", "prepare.shrds=4")
    assert result.returncode == 2
    assert "prepare.shrds" in result.stderr and "shards" in result.stderr


def test_flags_and_set_reach_the_same_config_tree():
    result = recdist("config", "--set", "prepare.shards=3", "--set", "stages.mf.train.epochs=7")
    assert result.returncode == 0, result.stderr
    cfg = load_config(None, {"prepare.shards": 3, "stages.mf.train.epochs": 7})
    assert "shards: 3" in result.stdout and cfg.stages.mf.train.epochs == 7


def test_shipped_configs_are_valid():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        load_config(str(path))


def test_unknown_model_fails_before_any_work(tmp_path):
    result = recdist("train", "--data", str(tmp_path / "nothing"), "--model", "biased_fm", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "unknown model 'biased_fm'" in result.stderr and "biased_mf" in result.stderr
    assert not (tmp_path / "r").exists()


def test_models_lists_the_registry():
    result = recdist("models")
    assert result.returncode == 0
    for name in ("mf", "biased_mf", "sigmoid_mf", "mf_residual_mlp", "ncf_mlp", "autoencoder",
                 "reliability_mlp", "rating_mlp"):
        assert name in result.stdout


def test_prepare_from_the_command_line(tmp_path):
    csv = tmp_path / "ratings.csv"
    rows = [f"{u},{i},{1 + (u * i) % 9 / 2},{1000 + u + i}" for u in range(1, 31) for i in range(1, 21)]
    csv.write_text("userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n")
    result = recdist("prepare", "--path", str(csv), "--out", str(tmp_path / "ds"), "--shards", "2", "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["n_ratings"] == 600 and manifest["n_users"] == 30 and manifest["n_items"] == 20
    assert sum(manifest["splits"].values()) == 600

    again = recdist("prepare", "--path", str(csv), "--out", str(tmp_path / "ds"), "-q")
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize(
    "body, needle",
    [
        ("userId,movieId,rating,timestamp\n1,2,3.5,10\n1,3,abc,11\n", "line 3"),
        ("userId,movieId,rating,timestamp\n1,2,3.5,10\n1,3,9.0,11\n", "line 3"),
        ("userId,movieId,timestamp\n1,2,10\n", "rating"),
        ("", "empty"),
    ],
    ids=["non-numeric", "out-of-scale", "missing-column", "empty"],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, body, needle):
    csv = tmp_path / "ratings.csv"
    csv.write_text(body)
    result = recdist("prepare", "--path", str(csv), "--out", str(tmp_path / "ds"), "-q")
    assert result.returncode == 2
    assert needle in result.stderr and "ratings.csv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ds" / "manifest.json").exists()
