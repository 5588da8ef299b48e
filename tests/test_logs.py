"""Logs: recdist's lines (one per record, timestamped, never wrapped; or JSON), Ray quiet unless --verbose, progress
as lines where nobody watches a terminal, the run's own log in RUN/logs/, and a quickstart console within budget."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from recdist import logs
from recdist.cli import main

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) recdist[.\w]*: ")
SYNTH = ("--set", "synth.n_users=120", "--set", "synth.n_items=90", "--set", "synth.n_ratings=4000")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`recdist ARGS` in this process: exit code, stdout, stderr."""
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_lines_carry_time_level_and_logger_and_are_never_wrapped(capsys, tmp_path):
    code, stdout, stderr = cli(capsys, "prepare", "--dataset", "synthetic", *SYNTH, "--out", str(tmp_path / ("a" * 60)))
    assert code == 0 and json.loads(stdout)["n_ratings"] == 4000
    lines = stderr.splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), stderr
    committed = [line for line in lines if "recdist.data.prepare: committed" in line]
    assert len(committed) == 1 and len(committed[0]) > 120  # a long path stays on its line (no 80-column wrap)
    assert any("recdist.data.synth: sampled 4,000 (user, movie) pairs" in line for line in lines)


def test_json_lines_parse_one_object_per_line_errors_included(capsys, tmp_path):
    out = str(tmp_path / "ds")
    code, _, stderr = cli(capsys, "prepare", "--dataset", "synthetic", *SYNTH, "--out", out, "--log-format", "json")
    assert code == 0
    entries = [json.loads(line) for line in stderr.splitlines()]
    assert {e["logger"] for e in entries} == {"recdist.data.synth", "recdist.data.prepare"}
    assert all(set(e) >= {"ts", "level", "logger", "message"} for e in entries)
    assert entries[-1]["message"].startswith(f"committed {out}: 4,000 ratings")
    code, stdout, stderr = cli(capsys, "prepare", "--dataset", "synthetic", "--out", out, "--log-format", "json")
    error = json.loads(stderr)  # the error too: exactly one JSON object
    assert code == 2 and stdout == "" and error["level"] == "ERROR" and "output already exists" in error["message"]


def test_quiet_shows_warnings_only(capsys, tmp_path):
    code, stdout, stderr = cli(capsys, "prepare", "--dataset", "synthetic", *SYNTH, "--out", str(tmp_path / "q"), "-q")
    assert code == 0 and stdout and stderr == ""


def test_verbose_brings_back_rays_internals_and_default_keeps_ray_at_warning(monkeypatch):
    """The settings Ray reads: ray.init's logging config and log_to_driver, Ray Train's level, Ray Data's level."""
    for key in ("RAY_DATA_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(key, raising=False)
    logs.setup()
    options = logs.ray_init_options()
    assert options["log_to_driver"] is False and options["logging_config"].log_level == "WARNING"
    assert logs.train_log_level() == "WARNING" and os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"

    logs.setup(verbose=True)
    assert logs.ray_init_options() == {"log_to_driver": True}  # Ray's own defaults: INFO, workers' output streamed
    assert logs.train_log_level() == "INFO" and "RAY_DATA_LOG_LEVEL" not in os.environ
    assert logs.log.getEffectiveLevel() == logging.DEBUG

    logs.setup(verbose=True, fmt="json")
    config = logs.ray_init_options()["logging_config"]
    assert config.encoding == "JSON" and config.log_level == "INFO"
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "ERROR")  # a user's own value wins
    logs.setup()
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "ERROR"


def test_rays_token_auth_notice_is_not_shown_but_its_auth_off_warning_is():
    """Ray's own functions, so a change of Ray's wording fails here: the default-on notice dropped unless verbose,
    the warning that authentication is off always shown."""
    from ray._private.authentication import authentication_token_setup as ray_auth

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    ray_logger = logging.getLogger(logs.RAY_AUTH_LOGGER)
    assert ray_auth.logger is ray_logger
    ray_logger.addHandler(handler)
    try:
        for verbose in (False, True):
            logs.setup(verbose=verbose)
            ray_auth._warn_token_auth_enabled()
            ray_auth._warn_token_auth_disabled()
        logs.reset()
        ray_auth._warn_token_auth_enabled()
    finally:
        ray_logger.removeHandler(handler)
    enabled = [m for m in seen if m.startswith("Token authentication is enabled")]
    disabled = [m for m in seen if m.startswith("Token authentication is disabled")]
    assert len(enabled) == 2 and len(disabled) == 2  # verbose, and after reset; the off warning both times


def test_progress_without_a_terminal_is_lines_one_per_message_and_throttled_otherwise(capsys):
    logs.setup()
    log = logging.getLogger("recdist.test")
    with logs.Progress(log, "mf", 20, every=3600) as progress:
        for epoch in range(1, 4):
            progress.update(epoch, f"epoch {epoch}/20", epoch=epoch)
            progress.update(epoch)  # no message: throttled (one line per `every` seconds at most)
    with logs.timed(log, "quick step"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["mf: epoch 1/20", "mf: epoch 2/20", "mf: epoch 3/20"]


def test_run_log_keeps_info_lines_whatever_the_console_and_the_error_that_stopped_it(tmp_path, capsys):
    logs.setup(quiet=True)
    log = logging.getLogger("recdist.test")
    with pytest.raises(RuntimeError):
        with logs.run_log(str(tmp_path / "logs"), "pipeline") as run:
            log.info("mf: running")
            raise RuntimeError("boom")
    (path,) = (tmp_path / "logs").iterdir()
    assert run.uri == str(path) and re.fullmatch(r"pipeline-\d{8}T\d{6}\.\d{3}Z\.log", path.name)
    text = path.read_text()
    assert "INFO recdist.test: mf: running" in text and "ERROR recdist: stopped: boom" in text
    assert "Traceback" in text and capsys.readouterr().err == ""  # quiet console: neither line there


def test_runs_within_one_millisecond_each_get_their_own_log_in_time_order(tmp_path, monkeypatch) -> None:
    """Two runs started in the same second (a fast resume) kept one file between them; the names now have
    milliseconds, and a name already taken moves on by one."""
    from datetime import datetime, timezone

    at = datetime(2026, 12, 3, 21, 15, 16, 123456, tzinfo=timezone.utc)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return at

    monkeypatch.setattr(logs, "datetime", Frozen)
    log = logging.getLogger("recdist.test")
    for n in range(3):
        with logs.run_log(str(tmp_path / "logs"), "pipeline"):
            log.info("run %d", n)
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == [f"pipeline-20261203T211516.{ms}Z.log" for ms in (123, 124, 125)]
    assert [(tmp_path / "logs" / n).read_text().strip().endswith(f"run {k}") for k, n in enumerate(names)] == [True] * 3


@pytest.mark.s3
def test_run_log_on_s3_is_uploaded_at_each_sync_and_at_exit(s3_bucket):
    from recdist import storage

    log = logging.getLogger("recdist.test")
    with logs.run_log(f"{s3_bucket}/run/logs", "pipeline") as run:
        log.info("mf: committed in 1.0 s")
        run.sync()
        assert storage.read_bytes(run.uri).decode().endswith("mf: committed in 1.0 s\n")
        log.info("outputs: committed in 1.0 s")
    lines = storage.read_bytes(run.uri).decode().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["mf: committed in 1.0 s", "outputs: committed in 1.0 s"]
    assert not os.path.exists(run.path)  # the local copy is gone


RAY_INTERNALS = (
    "Checkpoint successfully created",
    "Reporting training result",
    "TrainController",
    "RayTrainWorker",
    "logging_progress",
    "Starting execution of Dataset",
)


@pytest.mark.slow
@pytest.mark.ray
def test_quickstart_console_fits_the_budget_with_no_ray_train_internals(ray_cluster, tmp_path):
    """The quickstart (smaller data, the same stages and epochs) as a command of its own, a driver on the session's
    real local Ray cluster: at most 80 console lines, one per stage step and epoch, none of Ray's per-epoch lines;
    the driver's log kept in RUN/logs/."""
    out = tmp_path / "qs"
    shrink = ("synth.n_users=600", "synth.n_items=300", "synth.n_ratings=24000", "pipeline.outputs.map_items=50")
    address = ray_cluster.get_runtime_context().gcs_address
    args = ["--config", "configs/quickstart.yaml", "--out", str(out), "--address", address]
    args += [a for s in shrink for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RAY_ADDRESS", "RAY_DATA_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-m", "recdist", "pipeline", *args], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=1500,
    )
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    lines = console.splitlines()
    assert len(lines) <= 80, console
    assert not [line for line in lines if any(s in line for s in RAY_INTERNALS)], console
    epochs = [line for line in lines if re.search(r": epoch \d+/\d+ train loss", line)]
    assert len(epochs) == len(set(epochs)) >= 3 and all(TEXT_LINE.match(line) for line in epochs)
    (run_log,) = (out / "logs").iterdir()
    kept = run_log.read_text()
    for stage in ("prepare", "mf", "reliability", "rating", "outputs"):
        assert f"recdist.pipeline: {stage}: committed in" in kept
    assert all(line in kept for line in epochs)
    assert json.loads(result.stdout)["log"] == str(run_log)
    readme_quick_path_commands_run_on(out, env)


def readme_quick_path_commands_run_on(run: Path, env: dict[str, str]) -> None:
    """README's "Recommending and finding similar movies" commands, verbatim but for the run directory (and the
    movie, when the smaller data has no training rating of README's): exit 0 with an answer."""
    import polars as pl

    movies = pl.read_parquet(run / "outputs" / "item_factors").sort("n_train", descending=True)["movie_id"]
    text = (ROOT / "README.md").read_text()
    block = text.split("### Recommending and finding similar movies", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.startswith(".venv/bin/recdist")]
    assert len(commands) == 3, block
    (run.parent / "me.csv").write_text("movieId,rating\n1,5\n2,4\n3,1\n")
    for command in commands:
        args = [str(run) if a == "runs/quickstart" else a for a in command[1:]]
        if "--movie" in args and int(args[args.index("--movie") + 1]) not in movies:
            args[args.index("--movie") + 1] = str(movies[0])
        done = subprocess.run(
            [sys.executable, "-m", "recdist", *args], capture_output=True, text=True, cwd=run.parent, env=env
        )
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        assert done.stdout.strip(), command
