"""One logging setup for recdist: its own lines through `logging`, Ray quiet unless asked, the run's log kept.

recdist's modules log to `logging.getLogger(__name__)` (children of the "recdist" logger); nothing else in the
package prints. `setup` is called once per process by the CLI (and so by jobs/, which call the CLI): one line
per record on stderr, with a UTC timestamp, level and logger name, never wrapped, or one JSON object per line
(`fmt="json"`) for log collectors. Ray logs at WARNING through its own settings (`ray_init_options` for
ray.init, `train_log_level` for Ray Train's RunConfig, RAY_DATA_LOG_LEVEL for Ray Data) unless `verbose`.
`Progress` draws a bar where a person watches a terminal and writes log lines everywhere else; `run_log` keeps
a copy of the lines in a run directory (local or s3://).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

ROOT = "recdist"
FORMATS = ("text", "json")
QUICK_S = 1.0
"""Steps (`timed`) shorter than this are logged at DEBUG: only what takes a while is worth a line."""

log = logging.getLogger(ROOT)


@dataclass(frozen=True)
class Settings:
    """How this process logs: set by `setup`; the defaults hold for library use (no setup called)."""

    quiet: bool = False
    """Console: warnings and errors only (no progress lines or bars)."""
    verbose: bool = False
    """Ray's own INFO logs too: Ray Train and Ray Data internals, the workers' output."""
    fmt: str = "text"
    """text, or json: one JSON object per line."""
    configured: bool = False
    """Whether `setup` ran (a console handler exists)."""


_settings = Settings()
_RAY_ENV: dict[str, str] = {}
"""Ray environment variables `setup` set (and so may take back)."""

RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Where Ray (2.5x+) announces, as a WARNING at every local cluster's start, that it turned token authentication
on by default: news, not a problem, so not shown unless verbose. Its warning that authentication is *off* is."""


def _not_rays_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


# ------------------------------------------------------------------------------------------- formatting


def _utc(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """`2026-01-31T12:00:00.000Z INFO recdist.pipeline: mf: running` (a traceback, when any, below it)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, the record's `extra` fields, exc (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def formatter(fmt: str | None = None) -> logging.Formatter:
    """The formatter of `fmt` (default: the one `setup` chose)."""
    return JsonFormatter() if (fmt or _settings.fmt) == "json" else TextFormatter()


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record: a progress bar's redirect, or a test's capture."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------- set-up


def setup(*, quiet: bool = False, verbose: bool = False, fmt: str = "text") -> None:
    """Configure this process's logging (again, replacing a previous setup): the console handler and Ray's levels."""
    global _settings
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {FORMATS}")
    reset()
    _settings = Settings(quiet=quiet, verbose=verbose, fmt=fmt, configured=True)
    handler = _Stderr()
    handler.setFormatter(formatter(fmt))
    handler.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False  # Ray's LoggingConfig puts its own handler on the root logger
    _quiet_ray_data(quiet, verbose)
    if not verbose:
        logging.getLogger(RAY_AUTH_LOGGER).addFilter(_not_rays_auth_notice)


def reset() -> None:
    """Undo `setup` (tests): no recdist handler, the Ray variables it set removed, the default settings."""
    global _settings
    for handler in [h for h in log.handlers if isinstance(h, _Stderr)]:
        log.removeHandler(handler)
    log.setLevel(logging.NOTSET)
    log.propagate = True
    logging.getLogger(RAY_AUTH_LOGGER).removeFilter(_not_rays_auth_notice)
    for key, value in _RAY_ENV.items():
        if os.environ.get(key) == value:
            del os.environ[key]
    _RAY_ENV.clear()
    _settings = Settings()


def settings() -> Settings:
    return _settings


def _quiet_ray_data(quiet: bool, verbose: bool) -> None:
    """Ray Data's own knobs: its logger at WARNING (its plans and progress lines, where no terminal shows its bar,
    are INFO), and no bar on a terminal when quiet (Ray Data then warns once that bars are off).

    Environment variables (a user's own values win), read when ray.data is imported and by Ray workers started
    from here; a ray.data imported already gets the level directly.
    """
    wanted = {} if verbose else {"RAY_DATA_LOG_LEVEL": "WARNING"}
    if quiet and sys.stdout.isatty():  # where Ray Data would draw its bar
        wanted["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = _RAY_ENV[key] = value
    if "ray.data" in sys.modules:
        logging.getLogger("ray.data").setLevel(os.environ.get("RAY_DATA_LOG_LEVEL", "DEBUG"))


def ray_init_options() -> dict[str, Any]:
    """ray.init arguments: Ray's loggers (driver and every worker of the job) at WARNING and the workers' output
    kept in Ray's log files; with verbose, Ray's defaults (INFO, the workers' output streamed here)."""
    import ray

    encoding = "JSON" if _settings.fmt == "json" else "TEXT"
    if _settings.verbose:
        options: dict[str, Any] = {"log_to_driver": True}
        if encoding == "JSON":
            options["logging_config"] = ray.LoggingConfig(encoding=encoding, log_level="INFO")
        return options
    return {"log_to_driver": False, "logging_config": ray.LoggingConfig(encoding=encoding, log_level="WARNING")}


def train_log_level() -> str:
    """Ray Train's log level (RunConfig.logging_config): its per-run and per-report INFO lines only when verbose."""
    return "INFO" if _settings.verbose else "WARNING"


def bars() -> bool:
    """Whether to draw progress bars: a person watches stderr (a terminal) and the text console shows INFO."""
    s = _settings
    return s.configured and not s.quiet and s.fmt == "text" and sys.stderr.isatty()


# -------------------------------------------------------------------------------------------- progress


@contextmanager
def timed(logger: logging.Logger, what: str) -> Iterator[None]:
    """Log `<what> in <seconds> s` when the block ends: at INFO when it took a while (QUICK_S), else DEBUG."""
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    logger.log(logging.INFO if seconds >= QUICK_S else logging.DEBUG, "%s in %.2f s", what, seconds)


class Progress:
    """Progress of one long step: a bar where a person watches a terminal (`bars`), log lines everywhere else.

    `update(done, message)` logs `<label>: <message>` when a message is given (one line per epoch), otherwise at
    most one `<label>: <done> of <total>` line per `every` seconds when there is no bar. unit="bytes" shows
    sizes in MB.
    """

    def __init__(self, logger: logging.Logger, label: str, total: float | None, *, unit: str = "", every: float = 10.0):
        self.logger, self.label, self.total, self.unit, self.every = logger, label, total, unit, every
        self._bar: Any = None
        self._task: Any = None
        self._last = time.monotonic()

    def __enter__(self) -> Progress:
        if bars() and self.logger.isEnabledFor(logging.INFO):
            from rich import progress as rp
            from rich.console import Console

            count = rp.DownloadColumn() if self.unit == "bytes" else rp.MofNCompleteColumn()
            self._bar = rp.Progress(
                rp.TextColumn("{task.description}"), rp.BarColumn(), count, rp.TimeElapsedColumn(),
                console=Console(stderr=True), transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, done: float, message: str | None = None, **fields: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
        now = time.monotonic()
        if message is None and (self._bar is not None or now - self._last < self.every):
            return
        self._last = now
        self.logger.info("%s: %s", self.label, self.describe(done) if message is None else message, extra=fields)

    def describe(self, done: float) -> str:
        if self.unit == "bytes":
            total = f" of {self.total / 1e6:,.1f}" if self.total else ""
            return f"{done / 1e6:,.1f}{total} MB"
        return f"{done:,.0f} of {self.total:,.0f}" if self.total else f"{done:,.0f}"


# ----------------------------------------------------------------------------------------------- run log


class RunLog:
    """recdist's log lines, at INFO whatever the console shows, also in a file of a run directory (local or s3://).

    Local files grow line by line; an S3 object cannot be appended to, so the lines go to a local file that
    `sync` uploads whole (the pipeline syncs at every stage end, and `run_log` at exit).
    """

    def __init__(self, uri: str):
        from recdist import storage

        self.uri, self.remote = uri, storage.is_s3(uri)
        if self.remote:
            fd, self.path = tempfile.mkstemp(prefix="recdist-", suffix=".log")
            os.close(fd)
        else:
            self.path = storage.absolute(uri)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(formatter())
        self.handler.setLevel(logging.INFO)

    def sync(self) -> None:
        """Upload the lines so far (S3; a local file is always up to date). A failed upload is a warning: the run's
        outputs matter more than its log, and the next sync tries again."""
        if not self.remote:
            return
        from recdist import storage
        from recdist.errors import StorageError

        self.handler.flush()
        try:
            with open(self.path, "rb") as f:
                storage.write_bytes(self.uri, f.read())
        except (OSError, StorageError) as e:
            log.warning("could not save the run log to %s: %s", self.uri, e)

    def record_error(self, error: BaseException) -> None:
        """The error that stopped the run, in this file only (the CLI reports it on the console)."""
        from recdist.errors import RecdistError

        trace = None if isinstance(error, RecdistError) else (type(error), error, error.__traceback__)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "stopped: %s", (error,), trace)
        self.handler.handle(record)


def _new_log(directory: str, command: str) -> str:
    """DIRECTORY/<command>-<UTC time to the millisecond>.log, a name no earlier run used (two runs within one second
    each get a file; the names sort in time order)."""
    from recdist import storage

    at = datetime.now(timezone.utc)
    while True:
        uri = storage.join(directory, f"{command}-{at:%Y%m%dT%H%M%S}.{at.microsecond // 1000:03d}Z.log")
        if not storage.exists(uri):
            return uri
        at += timedelta(milliseconds=1)


@contextmanager
def run_log(directory: str, command: str) -> Iterator[RunLog]:
    """Within the block, recdist's log lines also go to DIRECTORY/<command>-<UTC time>.log (a new file per run)."""
    run = RunLog(_new_log(directory, command))
    level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(run.handler)
    try:
        yield run
    except BaseException as e:
        run.record_error(e)
        raise
    finally:
        log.removeHandler(run.handler)
        log.setLevel(level)
        run.handler.close()
        run.sync()
        if run.remote:
            os.unlink(run.path)
