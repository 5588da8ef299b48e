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
    shipped = [p for p in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
               if p.name != "kustomization.yaml"]  # kustomize's ConfigMap generator, not a recdist config
    assert {p.name for p in shipped} >= {"quickstart.yaml", "ml20m-gpu.yaml", "ml20m-cpu.yaml"}
    for path in shipped:
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


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`recdist ARGS` in this process (no interpreter start-up): exit code, stdout, stderr."""
    from recdist.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    captured = capsys.readouterr()
    return exit_.value.code or 0, captured.out, captured.err


HEADER = "userId,movieId,rating,timestamp\n"


@pytest.mark.parametrize(
    "body, flags, needles",
    [
        (HEADER + "1,2,3.5,10\n1,3,4,11,12\n", [], ["line 3", "5 fields, expected 4", "1,3,4,11,12"]),
        (HEADER + "1,2,3.5,10\n1,3,abc,11\n", [], ["line 3", "rating 'abc' is not a number"]),
        (HEADER + "1,2,3.5,10\n1,3,9.0,11\n", [], ["line 3", "rating 9 is outside the rating scale [0.5, 5]"]),
        ("", [], ["empty file"]),
        (HEADER, [], ["no ratings"]),
        ("userId,movieId,timestamp\n1,2,10\n", [], ["no rating column 'rating'", "--rating-col"]),
        (HEADER + "1,2,3.5,10\n1,3,4,11\n1,2,4,12\n", ["--duplicates", "error"],
         ["user 1 rated item 2 more than once", "line 2 and", "line 4"]),
    ],
    ids=["malformed-line", "non-numeric", "out-of-scale", "empty", "header-only", "missing-column", "duplicates"],
)
def test_bad_input_exits_2_naming_file_line_value_and_writes_nothing(capsys, tmp_path, body, flags, needles):
    csv = tmp_path / "ratings.csv"
    csv.write_text(body)
    code, stdout, stderr = cli(capsys, "prepare", "--path", str(csv), "--out", str(tmp_path / "ds"), "-q", *flags)
    assert code == 2 and stdout == ""
    assert str(csv) in stderr and all(needle in stderr for needle in needles), stderr
    assert "Traceback" not in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["ratings.csv"]  # no dataset, no staging directory


@pytest.mark.timeout(60)
def test_offline_release_fails_in_seconds_saying_where_to_put_the_zip(capsys, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a mirror nobody answers on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("RECDIST_GROUPLENS_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.setenv("RECDIST_CACHE", str(tmp_path / "cache"))
    code, _, stderr = cli(capsys, "prepare", "--dataset", "ml-20m", "--out", str(tmp_path / "ds"), "-q")
    assert code == 2
    assert f"put it at {tmp_path / 'cache' / 'ml-20m.zip'}" in stderr and "--path FILE" in stderr
    assert not (tmp_path / "ds").exists()


def test_a_users_own_file_with_its_columns_mapped_by_flags(capsys, tmp_path):
    mine = tmp_path / "mine.txt"
    lines = [f"{1 + (u + i) % 5};{i};{u}" for u in range(1, 21) for i in range(30)]
    mine.write_text("stars;iid;uid\n" + "\n".join(lines) + "\n")
    code, stdout, stderr = cli(
        capsys, "prepare", "--path", str(mine), "--out", str(tmp_path / "ds"), "-q", "--set", "source.format=csv",
        "--separator", ";", "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars", "--timestamp-col", "",
        "--split", "user", "--test-fraction", "0.2", "--val-fraction", "0", "--shards", "3",
    )
    assert code == 0, stderr
    manifest = json.loads(stdout)
    assert (manifest["n_users"], manifest["n_items"], manifest["n_ratings"]) == (20, 30, 600)
    assert manifest["splits"] == {"train": 480, "val": 0, "test": 120} and manifest["shards"] == 3
    assert manifest == json.loads((tmp_path / "ds" / "manifest.json").read_text())


def test_synth_then_prepare_with_own_split_files(capsys, tmp_path):
    code, stdout, _ = cli(capsys, "synth", "--out", str(tmp_path / "s"), "--users", "60", "--items", "80",
                          "--ratings", "3000", "--seed", "3", "-q")
    assert code == 0 and json.loads(stdout)["n_ratings"] == 3000
    code, stdout, _ = cli(capsys, "prepare", "--path", str(tmp_path / "s"), "--out", str(tmp_path / "ds"), "-q",
                          "--min-user-ratings", "25", "--duplicates", "error")
    manifest = json.loads(stdout)
    assert code == 0 and manifest["filtered"]["min_user_ratings"] > 0 and manifest["duplicates_resolved"] == 0

    lines = (tmp_path / "s" / "ratings.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join(lines[:2001]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join([lines[0], *lines[2001:]]) + "\n")
    code, stdout, stderr = cli(capsys, "prepare", "--train-path", str(tmp_path / "train.csv"), "--test-path",
                               str(tmp_path / "test.csv"), "--out", str(tmp_path / "given"), "-q")
    assert code == 0, stderr  # --train-path implies --split given
    manifest = json.loads(stdout)  # no val file: 10% of the training file carved out for validation
    assert manifest["splits"]["train"] + manifest["splits"]["val"] == 2000 and manifest["splits"]["test"] == 1000
    assert 150 <= manifest["splits"]["val"] <= 250 and manifest["val_carved_from_train"] == 0.1


def test_datasets_lists_every_release_on_one_line_with_its_checksum(capsys, monkeypatch, tmp_path):
    from recdist.data.registry import releases

    monkeypatch.setenv("RECDIST_CACHE", str(tmp_path))
    code, stdout, _ = cli(capsys, "datasets")
    assert code == 0
    lines = stdout.splitlines()
    for release in releases():
        line = next(line for line in lines if line.split() and line.split()[0] == release.name)
        assert release.ratings_member in line and (release.md5 or "fetched from") in line
    assert f"into {tmp_path} ($RECDIST_CACHE)" in stdout


def test_version(capsys):
    from recdist import __version__

    code, stdout, _ = cli(capsys, "--version")
    assert code == 0 and stdout.strip() == f"recdist {__version__}"


QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def test_set_with_no_value_clears_a_key_and_a_source_set_replaces_the_files(capsys):
    code, stdout, stderr = cli(capsys, "config", "-c", QUICKSTART, "--set", "source.dataset=")
    assert code == 0, stderr
    assert "dataset: null" in stdout
    code, stdout, stderr = cli(capsys, "config", "-c", QUICKSTART, "--set", "source.path=other.csv")
    assert code == 0, stderr
    assert "dataset: null" in stdout and "path: other.csv" in stdout


@pytest.fixture
def ran(monkeypatch):
    """What `recdist pipeline` / `infer` would run with: their config and options, without running anything."""
    seen: dict = {}

    def pipeline(cfg, out, **kwargs):
        seen.update(cfg=cfg, out=out, **kwargs)
        return {"status": "done", "seconds": 0, "stages": {}, "report": None, "log": None}

    def score(model_dir, data, out, options):
        seen.update(options=options)
        return {"rows": 0}

    monkeypatch.setattr("recdist.pipeline.run_pipeline", pipeline)
    monkeypatch.setattr("recdist.infer.ray_data.score", score)
    monkeypatch.setattr("recdist.models.io.model_class", lambda model_dir: object)
    monkeypatch.setattr("recdist.infer.scoring.role_of", lambda cls: "rating")
    return seen


def test_a_source_flag_replaces_the_configs_source(capsys, ran, tmp_path):
    code, _, stderr = cli(capsys, "pipeline", "-c", QUICKSTART, "--path", "OTHER.csv", "--out", str(tmp_path), "-q")
    assert code == 0, stderr
    source = ran["cfg"].source
    assert source.path == "OTHER.csv" and source.dataset is None
    assert ran["cfg"].synth.n_users == 3000  # the rest of the file stays

    code, _, stderr = cli(capsys, "pipeline", "-c", QUICKSTART, "--train-path", "a.csv", "--test-path", "b.csv",
                          "--out", str(tmp_path), "-q")
    assert code == 0, stderr
    cfg = ran["cfg"]
    assert (cfg.source.dataset, cfg.source.train_path, cfg.source.test_path) == (None, "a.csv", "b.csv")
    assert cfg.prepare.split == "given"


def test_pipeline_without_a_source_flag_keeps_the_configs(capsys, ran, tmp_path):
    code, _, stderr = cli(capsys, "pipeline", "-c", QUICKSTART, "--out", str(tmp_path), "--workers", "2", "--cpu",
                          "-q")
    assert code == 0, stderr
    assert ran["cfg"].source.dataset == "synthetic" and ran["cfg"].cluster.workers == 2


def test_infer_takes_the_common_flags(capsys, ran, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("pipeline:\n  inference:\n    batch_size: 1000\n")
    code, stdout, stderr = cli(
        capsys, "infer", "--model", "m", "--data", "d", "--out", "o", "--config", str(config),
        "--set", "pipeline.inference.actors=3", "--workers", "2", "--gpu", "--quiet",
    )
    assert code == 0, stderr
    options = ran["options"]
    assert (options.batch_size, options.actors, options.gpu) == (1000, 2, True)
    code, _, stderr = cli(capsys, "infer", "--model", "m", "--data", "d", "--out", "o", "-q")
    assert code == 0, stderr
    assert ran["options"].actors is None and ran["options"].gpu is None  # the cluster decides


def test_help_shows_boolean_flags_as_switches(capsys):
    for command in ("train", "pipeline", "infer", "prepare", "synth"):
        code, stdout, _ = cli(capsys, command, "--help")
        assert code == 0 and "--help" in stdout and "--quiet" in stdout
        assert "<bool>" not in stdout


def test_similar_names_movies_to_try_when_a_movie_is_unknown_or_rarely_rated(capsys, tmp_path):
    import polars as pl

    outputs = tmp_path / "run" / "outputs"
    outputs.mkdir(parents=True)
    (outputs / "manifest.json").write_text(json.dumps({"similar_min_ratings": 20}))
    (outputs / "_SUCCESS").write_text("")
    for table in ("item_factors", "similar_items"):
        (outputs / table).mkdir()
    factors = pl.DataFrame({
        "movie_id": [2, 4, 9, 16], "title": ["Two", "Four", "Nine", "Sixteen"], "n_train": [32, 5, 400, 90],
        "factors": [[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.5, 0.5]],
    })
    factors.write_parquet(outputs / "item_factors" / "part-00000.parquet")
    stored = {"movie_id": pl.Int64, "rank": pl.Int16, "similar_movie_id": pl.Int64, "similar_title": pl.String,
              "cosine": pl.Float32}  # nothing stored: every answer computed from the factors
    pl.DataFrame(schema=stored).write_parquet(outputs / "similar_items" / "part-00000.parquet")
    code, _, stderr = cli(capsys, "similar", str(tmp_path / "run"), "--movie", "1")
    assert code == 2 and "movie 1 is not in this run" in stderr
    assert "9 (Nine, 400 ratings), 16 (Sixteen, 90 ratings)" in stderr  # the most-rated first
    code, _, stderr = cli(capsys, "similar", str(tmp_path / "run"), "--movie", "4")
    assert code == 2 and "movie 4 has 5 training rating(s), fewer than the run's similar_min_ratings (20)" in stderr
    code, stdout, stderr = cli(capsys, "similar", str(tmp_path / "run"), "--movie", "2", "-k", "2")
    assert code == 0, stderr
    assert stdout.index("Nine") < stdout.index("Sixteen") and "Four" not in stdout
