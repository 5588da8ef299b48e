"""Session context of each rating: stage 1's residuals on the same user's training ratings rated around it.

MovieLens users rate in bursts (on ml-latest-small 79% of test ratings have a training rating of the same user
in the minute before them), and the ratings of one burst share a deviation from what the MF predicts (a run of
similar movies, the mood of the sitting). An MF cannot see it; stages 2 and 3 read it as row features. Per window w
(short and long), over the user's training ratings j rated in [t - w, t] (with `future`, [t - w, t + w]),
the row itself left out: the sum of stage-1 residuals r_j - mf_pred_j, the sum of their squares, and how many.

Only training ratings are neighbours (never validation or test ratings), with the residuals of the scored
table (cross-fitted on training rows when the pipeline cross-fits), so a test row's context holds nothing the
training split does not. Rows without a timestamp have no context and are no one's neighbour. Candidate pairs
(recommendations) have no rating time: their context is empty (zeros), like a rating that starts a session.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
from numba import njit

from recdist import storage
from recdist.config import SessionConfig
from recdist.schema import SCORED_PARQUET, SESSION_COLUMNS  # what stages 2 and 3 read
from recdist.sorting import counting_sort
from recdist.train.sampling import SAMPLE, TrainShare


@dataclass(frozen=True)
class SessionSpec:
    """How stage 1's inference describes each rating's session (pipeline.session_windows / session_future)."""

    windows: tuple[int, int]
    """(short, long) window in seconds."""
    future: bool = False
    """False: only ratings made at or before the row's time (causal: a live system has them too); True: also
    the ones up to w seconds after it."""

    @staticmethod
    def of(cfg: SessionConfig) -> SessionSpec:
        return SessionSpec(tuple(cfg.windows), cfg.future)  # type: ignore[arg-type]


DEFAULT_SESSION = SessionSpec.of(SessionConfig())
"""The pipeline's default (pipeline.session), for stage-1 passes outside it."""


@dataclass(frozen=True)
class SessionStep:
    """The session context as a feature step of a stage-1 scoring pass (scored.FeatureStep): the pipeline asks
    for it; the scoring code knows nothing of sessions."""

    spec: SessionSpec = DEFAULT_SESSION
    name: str = "session"
    columns: tuple[str, ...] = SESSION_COLUMNS

    def add(self, tables: list[pa.Table]) -> list[pa.Table]:
        """The shards of a scored table in memory (in shard order) with SESSION_COLUMNS added: what
        score_local writes once, where the written table's pass (__call__) reads it back and rewrites it."""
        parts = self._context([pl.from_arrow(t.select(list(_NEEDED))) for t in tables])
        return [_with_session(table, part) for table, part in zip(tables, parts, strict=True)]

    def __call__(self, folder: str, share: TrainShare | None) -> None:
        """Add SESSION_COLUMNS to every shard of a written scored table (and to its sample/): one read of the
        columns they need over all shards (a user's ratings sit in every shard), then the shards rewritten in
        threads (Arrow's reader and writer release the GIL; memory: a shard per thread)."""
        from concurrent.futures import ThreadPoolExecutor

        ratings = storage.join(folder, "ratings")
        names = [p for p in storage.listdir(ratings) if p.endswith(".parquet")]
        parts = self._context(
            [pl.from_arrow(storage.read_parquet(storage.join(ratings, n), columns=list(_NEEDED))) for n in names]
        )

        def rewrite(n: int) -> None:
            name = names[n]
            table = _with_session(storage.read_parquet(storage.join(ratings, name)), parts[n])
            storage.write_parquet(table, storage.join(ratings, name), **SCORED_PARQUET)
            if share is not None:
                sample = storage.join(folder, SAMPLE, "ratings", name)
                storage.write_parquet(table.filter(share.keep(table)), sample, **SCORED_PARQUET)

        with ThreadPoolExecutor(storage.shard_threads(len(names))) as pool:
            list(pool.map(rewrite, range(len(names))))

    def _context(self, frames: list[pl.DataFrame]) -> list[pl.DataFrame]:
        """Every shard's session columns, from the _NEEDED columns of all shards (one user's ratings sit in
        every shard)."""
        context = session_columns(pl.concat(frames), self.spec)
        starts = np.cumsum([0, *(f.height for f in frames)])
        return [context.slice(int(lo), int(hi - lo)) for lo, hi in zip(starts[:-1], starts[1:], strict=True)]


_NEEDED = ("user_idx", "timestamp", "split", "rating", "mf_pred")
"""The scored columns the session context is computed from."""


def _with_session(table: pa.Table, part: pl.DataFrame) -> pa.Table:
    """The table with the session columns of `part` (float32) replaced or appended."""
    for column in SESSION_COLUMNS:
        values = pa.array(part[column].to_numpy(), pa.float32())
        if column in table.column_names:
            table = table.set_column(table.column_names.index(column), column, values)
        else:
            table = table.append_column(column, values)
    return table


def empty_session(n: int) -> dict[str, np.ndarray]:
    """The session columns of `n` rows without context (zeros)."""
    return {name: np.zeros(n, dtype=np.float32) for name in SESSION_COLUMNS}


def session_columns(frame: pl.DataFrame, spec: SessionSpec) -> pl.DataFrame:
    """SESSION_COLUMNS for every row of `frame` (user_idx, timestamp, split, rating, mf_pred), in its order.

    One counting sort groups the rows by user (stable: O(n), no comparison sort of all rows), then a compiled
    pass sorts each user's rows by time and sweeps both windows with running sums over the training rows inside
    them (two pointers): no per-row Python. Users are split into ranges of equal rows, one thread each (the
    kernel releases the GIL; numba's own parallel loops cost seconds of compiling in every fresh container).
    """
    from concurrent.futures import ThreadPoolExecutor

    columns = frame.select(
        time=pl.col("timestamp").fill_null(0).cast(pl.Int64),
        timed=pl.col("timestamp").is_not_null(),
        train=(pl.col("split") == "train") & pl.col("timestamp").is_not_null(),
        resid=pl.col("rating").cast(pl.Float64) - pl.col("mf_pred").cast(pl.Float64),
    )
    out = np.zeros((len(SESSION_COLUMNS), frame.height), dtype=np.float32)
    train = columns["train"].to_numpy()
    if train.any():
        user = frame["user_idx"].to_numpy()
        n_users = int(user.max()) + 1
        order = counting_sort(user, n_users, np.arange(frame.height, dtype=np.int64))
        starts = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(user, minlength=n_users), out=starts[1:])
        timed, time, resid = (columns[c].to_numpy() for c in ("timed", "time", "resid"))
        windows = np.array(spec.windows, dtype=np.int64)
        threads = storage.shard_threads(8)
        bounds = np.searchsorted(starts, np.linspace(0, frame.height, threads + 1)).clip(0, n_users)
        bounds[-1] = n_users

        def users(k: int) -> None:
            _user_windows(order, starts, bounds[k], bounds[k + 1], time, train, timed, resid, windows, spec.future, out)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(users, range(threads)))
    return pl.DataFrame({name: out[k] for k, name in enumerate(SESSION_COLUMNS)})


@njit(cache=True, nogil=True)
def _user_windows(order, starts, first, last, time, train, timed, resid, windows, future, out):  # pragma: no cover
    """For each timed row r of users first..last-1 (rows order[starts[u]:starts[u + 1]]) and window w: the training
    rows j != r with time[r] - windows[w] <= time[j] <= time[r] (+ windows[w] with `future`): their sum of resid,
    sum of squares and count, written at out[3w:3w + 3, r] (left zero when there are none)."""
    for u in range(first, last):
        rows = order[starts[u] : starts[u + 1]]
        rows = rows[np.argsort(time[rows], kind="mergesort")]  # stable: ties keep the frame's order
        n = rows.shape[0]
        for w in range(windows.shape[0]):
            before = windows[w]
            after = windows[w] if future else 0
            lo = 0
            hi = 0
            total = 0.0
            squares = 0.0
            count = 0
            for r in range(n):
                at = rows[r]
                while hi < n and time[rows[hi]] <= time[at] + after:
                    j = rows[hi]
                    if train[j]:
                        total += resid[j]
                        squares += resid[j] * resid[j]
                        count += 1
                    hi += 1
                while time[rows[lo]] < time[at] - before:
                    j = rows[lo]
                    if train[j]:
                        total -= resid[j]
                        squares -= resid[j] * resid[j]
                        count -= 1
                    lo += 1
                own = 1 if train[at] else 0
                k = count - own
                if timed[at] and k > 0:
                    out[3 * w, at] = total - own * resid[at]
                    out[3 * w + 1, at] = max(squares - own * resid[at] * resid[at], 0.0)
                    out[3 * w + 2, at] = k
