"""Synthetic MovieLens-20M-shaped ratings from a planted low-rank model, written in ml-20m's CSV format.

Users have heavy-tailed activity (at least `min_user_ratings` each), movies long-tailed popularity, and
every movie at least one rating. Each user's movies are a popularity-weighted sample without replacement
(successive sampling: what a user meets first, they rate first), and each rating is
round_half(mu + b_u + b_i + p_u.q_i + noise) clipped to [0.5, 5]. Everything is whole-array numpy from
independent seeded streams, so the same config gives the same bytes.

The knobs that make a family of data sets (SynthConfig): sizes, planted `rank`, `noise`, `popularity_skew`
(how long-tailed the movies are), `activity_skew` (how heavy-tailed the users are) and `exposure` (missing not
at random: users meet the movies their taste group likes). At their defaults the knobs added after the first
release draw nothing and change nothing: the same seed and sizes still give the same bytes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from numba import njit

from recdist import storage
from recdist.config import SynthConfig
from recdist.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

MARKER = "synth.json"
RATINGS_FILE = "ratings.csv"
MOVIES_FILE = "movies.csv"

# Shape of ml-20m that the defaults imitate (GroupLens' README and the files themselves).
ID_SPREAD = 131_262 / 26_744
"""ml-20m's movieIds run 1..131,262 for 26,744 rated movies: ids are drawn from a range this much wider."""
FIRST_TIME, LAST_TIME = 789_652_009, 1_427_784_002
"""ml-20m's first and last rating times (1995-01-09 and 2015-03-31), seconds since the epoch."""
MAX_USER_SHARE = 0.35
"""The busiest ml-20m user rated 9,254 of 26,744 movies: user activity is capped at this share of the catalog."""
ACTIVITY_SIGMA = 1.38
"""Log-normal spread of activity above the minimum: ml-20m's mean/median of (n - 20) is 124/48 = e^(s^2/2).
(SynthConfig.activity_skew's default.)"""
POPULARITY_CURVE = (
    (0.0, 11.1), (0.004, 10.1), (0.037, 8.7), (0.11, 7.3), (0.19, 6.4),
    (0.37, 4.4), (0.5, 2.9), (0.75, 1.4), (1.0, 0.0),
)  # fmt: skip
"""Log popularity weight by popularity rank (as a share of the catalog): ml-20m's log ratings per movie
(top ~67k, 1,000th ~6k, median ~18, last 1), interpolated between these points."""

# The planted model: r = mu + b_u + b_i + p_u.q_i + noise; scales give ml-20m's mean 3.53 and std 1.05.
RATING_MEAN = 3.53
USER_BIAS_SD = 0.40
ITEM_BIAS_SD = 0.40
POPULARITY_BIAS = 0.35
"""Correlation of an item's bias with its log popularity (popular movies rate higher, as in ml-20m)."""
INTERACTION_SD = 0.55
"""Standard deviation of p_u.q_i over random pairs."""
MIN_RATING, MAX_RATING = 0.5, 5.0

GUMBEL_SHARE = 0.25
"""Users whose with-replacement sampling would need more draws than this share of the catalog are sampled
by Gumbel top-k over the whole catalog instead (cheaper for them, exact for everyone)."""
GUMBEL_CELLS = 1 << 22
"""Users x items cells per Gumbel top-k chunk (32 MiB of float64 keys)."""
TASTE_GROUPS = 16
"""Users fall into this many taste groups, each seeing its own jitter of the popularity weights (so even the
top movie is skipped by many busy users, as in ml-20m where it has 67k ratings from 138k users)."""
TASTE_SD = 1.0
"""Standard deviation of a taste group's jitter of the log popularity weights."""
TASTE_SHARE = 0.5
"""With exposure > 0: the share of a user's planted factor variance that is their taste group's centre."""
ADDED_KNOBS = {"popularity_skew": 1.0, "activity_skew": ACTIVITY_SIGMA, "exposure": 0.0}
"""Knobs added after the first release, with the defaults that leave its output unchanged: synth.json lists
them only when set otherwise (so a default run still writes the same bytes)."""
LIGHT_BUFFER = 1 << 23
"""Uniforms per buffer of the with-replacement sampler (64 MiB)."""

# ml-20m's genres with their share of movies.csv (27,278 movies); a movie has each independently.
GENRES = {
    "Action": 0.129, "Adventure": 0.085, "Animation": 0.038, "Children": 0.042, "Comedy": 0.307,
    "Crime": 0.108, "Documentary": 0.091, "Drama": 0.489, "Fantasy": 0.052, "Film-Noir": 0.012,
    "Horror": 0.096, "IMAX": 0.007, "Musical": 0.038, "Mystery": 0.056, "Romance": 0.151,
    "Sci-Fi": 0.064, "Thriller": 0.153, "War": 0.044, "Western": 0.025,
}  # fmt: skip


@dataclass(frozen=True)
class Planted:
    """The model the ratings were drawn from, indexed by user index (userId - 1) and item index."""

    movie_ids: np.ndarray
    """movieId of each item index (ascending)."""
    mu: float
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    """(n_users, rank)."""
    item_factors: np.ndarray
    """(n_items, rank)."""

    def score(self, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """Noise-free planted score mu + b_u + b_i + p_u.q_i (not clipped)."""
        out = self.mu + self.user_bias[user_idx] + self.item_bias[item_idx]
        for k in range(self.user_factors.shape[1]):  # one factor at a time: no (rows x rank) temporary
            out += self.user_factors[user_idx, k] * self.item_factors[item_idx, k]
        return out

    def expected(self, user_ids: np.ndarray, movie_ids: np.ndarray) -> np.ndarray:
        """The planted score clipped to the rating scale, from original ids (userId, movieId)."""
        user_idx = np.asarray(user_ids, dtype=np.int64) - 1
        item_idx = np.searchsorted(self.movie_ids, np.asarray(movie_ids, dtype=np.int64))
        return np.clip(self.score(user_idx, item_idx), MIN_RATING, MAX_RATING)


@dataclass
class Synthetic:
    """Generated ratings and movies (ml-20m's columns), the planted model, and summary figures."""

    ratings: pl.DataFrame
    movies: pl.DataFrame
    planted: Planted
    summary: dict[str, Any] = field(default_factory=dict)


def generate(cfg: SynthConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Ratings (userId, movieId, rating, timestamp; sorted by userId, movieId) and movies (movieId, title, genres)."""
    synth = simulate(cfg)
    return synth.ratings, synth.movies


def simulate(cfg: SynthConfig) -> Synthetic:
    """Draw the whole synthetic release: catalog, who rates what, planted model, ratings and timestamps."""
    _check(cfg)
    # a 7th stream (exposure) leaves the first six as they were: spawn(7)[:6] == spawn(6)
    streams = np.random.SeedSequence(cfg.seed).spawn(7)
    act, cat, sample, model, noise, times, expose = (np.random.Generator(np.random.PCG64(s)) for s in streams)

    counts = user_counts(cfg, act)
    movie_ids, log_weight, movies = _catalog(cfg.n_items, cat, cfg.popularity_skew)
    taste = _taste(cfg, expose) if cfg.exposure > 0 else None
    item, rank, group = _sample_pairs(counts, log_weight, sample, None if taste is None else taste.affinity)
    user = np.repeat(np.arange(cfg.n_users, dtype=np.int64), counts)
    log.info("sampled %s (user, movie) pairs", f"{user.size:,}")

    planted = _plant(cfg, movie_ids, log_weight, counts, item, model, taste, group)
    score = planted.score(user, item)
    expected = np.clip(score, MIN_RATING, MAX_RATING)
    score += noise.normal(0.0, cfg.noise, size=score.size)
    rating = np.clip(np.round(score * 2.0) / 2.0, MIN_RATING, MAX_RATING)
    del score
    rmse = float(np.sqrt(np.mean((rating - expected) ** 2)))
    del expected
    timestamp = _timestamps(counts, user, rank, times)
    log.info("planted ratings and timestamps (planted RMSE %.4f)", rmse)

    ratings = pl.DataFrame(
        {"userId": user + 1, "movieId": movie_ids[item], "rating": rating, "timestamp": timestamp},
        schema={"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64},
    )
    summary = _summary(cfg, counts, item, rating, timestamp, rmse)
    return Synthetic(ratings=ratings, movies=movies, planted=planted, summary=summary)


def planted_rmse(planted: Planted, ratings: pl.DataFrame) -> float:
    """RMSE of the planted model's clipped score against ratings (userId, movieId, rating columns)."""
    expected = planted.expected(ratings["userId"].to_numpy(), ratings["movieId"].to_numpy())
    return float(np.sqrt(np.mean((ratings["rating"].to_numpy() - expected) ** 2)))


def write_synthetic(cfg: SynthConfig, out: str, *, overwrite: bool = False) -> dict:
    """Write OUT/ratings.csv and OUT/movies.csv in ml-20m's format, then OUT/synth.json; return the summary.

    OUT (local or s3://) appears only when whole; an existing non-empty OUT is refused without `overwrite`.
    """
    if not overwrite and storage.exists(out) and storage.listdir(out):
        raise StorageError(
            f"output already exists: {out}",
            fix="pass --overwrite to replace it, or choose another output path",
        )
    with storage.staged_output(out, overwrite=overwrite, marker=MARKER) as stage:
        synth = simulate(cfg)
        _write_csv(synth.ratings, storage.join(stage, RATINGS_FILE))
        _write_csv(synth.movies, storage.join(stage, MOVIES_FILE))
        storage.write_json(storage.join(stage, MARKER), synth.summary)
    log.info("wrote %s ratings to %s", f"{synth.summary['n_ratings']:,}", out)
    return synth.summary


def user_counts(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Ratings per user: min_user_ratings plus a log-normal share of the rest, capped, summing to n_ratings."""
    n_users, total, low = cfg.n_users, cfg.n_ratings, cfg.min_user_ratings
    cap = max(low, int(np.ceil(MAX_USER_SHARE * cfg.n_items)))
    if n_users * cap < total:  # small catalogs: let users rate more of it
        cap = cfg.n_items
    weight = rng.lognormal(0.0, cfg.activity_skew, n_users)
    counts = low + rng.multinomial(total - n_users * low, weight / weight.sum())
    while (over := counts > cap).any():  # hand the excess of capped users to the others, in proportion
        excess = int((counts[over] - cap).sum())
        counts[over] = cap
        room = counts < cap
        counts[room] += rng.multinomial(excess, weight[room] / weight[room].sum())
    return counts.astype(np.int64)


def _check(cfg: SynthConfig) -> None:
    where = "synth"
    if cfg.min_user_ratings > cfg.n_items:
        raise ConfigError(
            f"min_user_ratings={cfg.min_user_ratings} exceeds n_items={cfg.n_items}",
            where=where,
            fix="lower synth.min_user_ratings or raise synth.n_items",
        )
    if not cfg.n_users * cfg.min_user_ratings <= cfg.n_ratings <= cfg.n_users * cfg.n_items:
        raise ConfigError(
            f"n_ratings={cfg.n_ratings:,} cannot be split over {cfg.n_users:,} users with "
            f"{cfg.min_user_ratings}..{cfg.n_items} distinct movies each",
            where=where,
            fix="choose n_ratings between n_users * min_user_ratings and n_users * n_items",
        )
    if cfg.n_ratings < cfg.n_items:
        raise ConfigError(
            f"n_ratings={cfg.n_ratings:,} is below n_items={cfg.n_items:,}: some movie would have no rating",
            where=where,
            fix="raise synth.n_ratings or lower synth.n_items",
        )


def _catalog(
    n_items: int, rng: np.random.Generator, skew: float = 1.0
) -> tuple[np.ndarray, np.ndarray, pl.DataFrame]:
    """movieIds with gaps, log popularity weights (older ids a little more popular; ml-20m's curve times `skew`),
    and the movies frame."""
    span = max(n_items, int(round(n_items * ID_SPREAD)))
    movie_ids = np.sort(rng.choice(span, size=n_items, replace=False)) + 1
    share, level = np.array(POPULARITY_CURVE).T
    popularity = np.interp((np.arange(n_items) + 0.5) / n_items, share, level) * skew
    order = np.argsort(np.arange(n_items) / n_items + 0.7 * rng.random(n_items), kind="stable")
    log_weight = np.empty(n_items)
    log_weight[order] = popularity

    year = np.clip(2015 - np.floor(rng.exponential(18.0, n_items)), 1902, 2015).astype(np.int64)
    has = rng.random((n_items, len(GENRES))) < np.array(list(GENRES.values()))
    none = ~has.any(axis=1)
    has[none, rng.choice(len(GENRES), int(none.sum()), p=_normalise(np.array(list(GENRES.values()))))] = True
    genre_cols = [pl.when(pl.col(f"g{j}")).then(pl.lit(name)) for j, name in enumerate(GENRES)]
    movies = pl.DataFrame(
        {"movieId": movie_ids, "year": year, **{f"g{j}": has[:, j] for j in range(len(GENRES))}}
    ).select(
        "movieId",
        pl.format("Synthetic Movie {} ({})", "movieId", "year").alias("title"),
        pl.concat_str(genre_cols, separator="|", ignore_nulls=True).alias("genres"),
    )
    return movie_ids, log_weight, movies


def _sample_pairs(
    counts: np.ndarray, log_weight: np.ndarray, rng: np.random.Generator, affinity: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's counts[u] distinct items by successive popularity sampling; every item rated at least once.

    Returns (item, rank, group): item and rank for the rows of np.repeat(users, counts), each user's items
    ascending, rank being the order the user met the item in; group, each user's taste group. Users fall into
    taste groups, each with its own jitter of the popularity weights (plus `affinity`, (groups, items), when
    exposure is not at random). Every item is first dealt to one rating slot chosen uniformly (so to users in
    proportion to their activity); a user meets those items first.
    """
    n_users, n_items = counts.size, log_weight.size
    starts = np.concatenate([[0], np.cumsum(counts)])
    slot_user = np.searchsorted(starts[1:], rng.choice(int(starts[-1]), size=n_items, replace=False), side="right")
    forced = (
        np.concatenate([[0], np.cumsum(np.bincount(slot_user, minlength=n_users))]),
        np.argsort(slot_user, kind="stable"),
    )
    group = rng.integers(TASTE_GROUPS, size=n_users)
    log_p = log_weight + TASTE_SD * rng.normal(size=(TASTE_GROUPS, n_items))
    if affinity is not None:
        log_p += affinity
    log_p -= np.log(np.exp(log_p - log_p.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)) + log_p.max(
        axis=1, keepdims=True
    )
    draws = np.empty(n_users)
    for g in range(TASTE_GROUPS):
        draws[group == g] = _draws_needed(counts[group == g], np.exp(log_p[g]))
    heavy = draws > GUMBEL_SHARE * n_items
    item = np.empty(int(starts[-1]), dtype=np.int64)
    rank = np.empty_like(item)
    _sample_light(np.flatnonzero(~heavy), group, draws, starts, forced, np.exp(log_p), rng, item, rank)
    _sample_gumbel(np.flatnonzero(heavy), group, starts, forced, log_p, rng, item, rank)
    return item, rank, group


def _draws_needed(counts: np.ndarray, p: np.ndarray) -> np.ndarray:
    """With-replacement draws expected to give each user its count of distinct items (inf: near impossible)."""
    grid = np.geomspace(1.0, 64.0 * p.size, 256)
    distinct = (-np.expm1(-np.outer(grid, p))).sum(axis=1)  # expected distinct items after `grid` draws
    return np.interp(counts + 3.0 * np.sqrt(counts), distinct, grid, right=np.inf)


def _sample_light(users, group, draws, starts, forced, p, rng, item, rank) -> None:
    """Successive sampling by with-replacement draws (alias method) keeping first occurrences, for most users.

    Uniforms come in seeded buffers; a user whose draws run past a buffer's end restarts on the next one.
    """
    prob, alias = _alias_tables(p)
    stamp = np.zeros(p.shape[1], dtype=np.int64)
    done, least = 0, 1024
    while done < users.size:
        rest = draws[users[done:]]
        size = int(max(min(rest.sum(), LIGHT_BUFFER), 4 * rest.max(), least))
        uniforms = rng.random(size)
        reached = _successive(users, done, group, starts, *forced, prob, alias, uniforms, stamp, item, rank)
        least = 2 * size if reached == done else 1024
        done = reached


@njit(cache=True, nogil=True)
def _successive(
    users, first, group, starts, forced_start, forced_item, prob, alias, uniforms, stamp, item, rank
):  # pragma: no cover
    """Fill users[first:]'s rows: their dealt items, then alias draws, skipping repeats (stamp[i] == user + 1).

    Each user's items are then sorted ascending with their draw order as rank. Returns the index of the first
    user not done (its partial stamps undone) when the uniforms run out.
    """
    n_items = prob.shape[1]
    c = 0
    for j in range(first, users.shape[0]):
        u = users[j]
        g = group[u]
        lo = starts[u]
        n = starts[u + 1] - lo
        k = 0
        for f in range(forced_start[u], forced_start[u + 1]):
            stamp[forced_item[f]] = u + 1
            item[lo + k] = forced_item[f]
            k += 1
        while k < n:
            if c == uniforms.shape[0]:
                for m in range(k):
                    stamp[item[lo + m]] = 0
                return j
            x = uniforms[c] * n_items
            c += 1
            i = min(np.int64(x), n_items - 1)
            if x - i >= prob[g, i]:
                i = alias[g, i]
            if stamp[i] != u + 1:
                stamp[i] = u + 1
                item[lo + k] = i
                k += 1
        order = np.argsort(item[lo : lo + n])
        item[lo : lo + n] = item[lo : lo + n][order]
        rank[lo : lo + n] = order
    return users.shape[0]


def _sample_gumbel(users, group, starts, forced, log_p, rng, item, rank) -> None:
    """Successive sampling for the busiest users: top-k of log p + Gumbel noise over the whole catalog."""
    n_items = log_p.shape[1]
    forced_start, forced_item = forced
    counts = np.diff(starts)
    users = users[np.argsort(counts[users], kind="stable")]  # similar k per chunk
    rows = max(1, GUMBEL_CELLS // n_items)
    for begin in range(0, users.size, rows):
        chunk = users[begin : begin + rows]
        n, k = counts[chunk], int(counts[chunk].max())
        keys = log_p[group[chunk]] + rng.gumbel(size=(chunk.size, n_items))
        dealt = forced_start[chunk + 1] - forced_start[chunk]
        keys[np.repeat(np.arange(chunk.size), dealt), forced_item[_ranges(forced_start[chunk], dealt)]] = np.inf
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1), axis=1)
        col = np.arange(k)
        taken = col < n[:, None]
        top = np.where(taken, top, n_items)  # ranks past the user's count sort last
        order = np.argsort(top, axis=1)
        at = (starts[chunk][:, None] + col)[taken]
        item[at] = np.take_along_axis(top, order, axis=1)[taken]
        rank[at] = order[taken]


@njit(cache=True, nogil=True)
def _alias_tables(p):  # pragma: no cover
    """Walker's alias tables (Vose), one per row of p: item j stays with probability prob[g, j], else alias[g, j]."""
    rows, n = p.shape
    prob = np.ones((rows, n))
    alias = np.empty((rows, n), np.int64)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    for g in range(rows):
        scaled = p[g] * (n / p[g].sum())
        ns = nl = 0
        for j in range(n):
            alias[g, j] = j
            if scaled[j] < 1.0:
                small[ns] = j
                ns += 1
            else:
                large[nl] = j
                nl += 1
        while ns > 0 and nl > 0:  # pop a small column; the large one on top fills it and stays unless now small
            ns -= 1
            s, b = small[ns], large[nl - 1]
            prob[g, s], alias[g, s] = scaled[s], b
            scaled[b] -= 1.0 - scaled[s]
            if scaled[b] < 1.0:
                nl -= 1
                small[ns] = b
                ns += 1
    return prob, alias


@dataclass(frozen=True)
class Taste:
    """Exposure not at random: each taste group's centre in factor space, the items' planted factors (drawn
    before anyone rates, since they decide what is met) and each group's log-weight bonus per item."""

    centres: np.ndarray
    """(TASTE_GROUPS, rank)."""
    item_factors: np.ndarray
    """(n_items, rank)."""
    affinity: np.ndarray
    """(TASTE_GROUPS, n_items): exposure x the group's standardised affinity centre . q_i."""


def _factor_scale(rank: int) -> float:
    return float(np.sqrt(INTERACTION_SD / np.sqrt(rank)))  # var(p.q) = rank * scale^4


def _taste(cfg: SynthConfig, rng: np.random.Generator) -> Taste:
    scale = _factor_scale(cfg.rank)
    centres = rng.normal(0.0, scale, (TASTE_GROUPS, cfg.rank))
    item_factors = rng.normal(0.0, scale, (cfg.n_items, cfg.rank))
    like = centres @ item_factors.T
    like = (like - like.mean(axis=1, keepdims=True)) / (like.std(axis=1, keepdims=True) + 1e-12)
    return Taste(centres, item_factors, cfg.exposure * like)


def _plant(cfg: SynthConfig, movie_ids, log_weight, counts, item, rng, taste=None, group=None) -> Planted:
    """Biases and rank-`cfg.rank` factors; mu puts the mean planted score over the sampled pairs at RATING_MEAN.

    With `taste` (exposure not at random), the items' factors are the taste's and each user's factors are
    TASTE_SHARE of their group's centre and the rest their own (the same variance either way)."""
    n_users, n_items = cfg.n_users, log_weight.size
    user_bias = rng.normal(0.0, USER_BIAS_SD, n_users)
    pop = (log_weight - log_weight.mean()) / (log_weight.std() or 1.0)
    item_bias = ITEM_BIAS_SD * (POPULARITY_BIAS * pop + np.sqrt(1 - POPULARITY_BIAS**2) * rng.normal(size=n_items))
    scale = _factor_scale(cfg.rank)
    user_factors = rng.normal(0.0, scale, (n_users, cfg.rank))
    item_factors = rng.normal(0.0, scale, (n_items, cfg.rank))
    if taste is not None:
        own, shared = np.sqrt(1 - TASTE_SHARE), np.sqrt(TASTE_SHARE)
        user_factors = own * user_factors + shared * taste.centres[group]
        item_factors = taste.item_factors
    item_counts = np.bincount(item, minlength=n_items)
    mean_bias = (counts @ user_bias + item_counts @ item_bias) / counts.sum()
    return Planted(movie_ids, RATING_MEAN - float(mean_bias), user_bias, item_bias, user_factors, item_factors)


def _timestamps(counts: np.ndarray, user: np.ndarray, rank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seconds in [1995-01-09, 2015-03-31], strictly increasing in each user's rank order.

    A user arrives at a uniform time and rates over a log-normal span (median two days: many rate in one
    sitting, some over years), with exponential gaps between ratings.
    """
    n_users = counts.size
    span = np.clip(rng.lognormal(np.log(2 * 86_400), 2.5, n_users), 5 * counts, 10 * 365 * 86_400).astype(np.int64)
    arrive = FIRST_TIME + (rng.random(n_users) * (LAST_TIME - FIRST_TIME - span - counts)).astype(np.int64)
    # Cumulative exponential gaps, one block of counts[u] + 1 per user (the spare gap ends the span).
    elapsed = np.cumsum(rng.exponential(size=int(counts.sum()) + n_users))
    end = np.cumsum(counts + 1) - 1
    base = np.concatenate([[0.0], elapsed[end[:-1]]])
    at = (elapsed[end[user] - counts[user] + rank] - base[user]) / (elapsed[end] - base)[user]
    return arrive[user] + (at * span[user]).astype(np.int64) + rank


def _summary(cfg: SynthConfig, counts, item, rating, timestamp, rmse: float) -> dict[str, Any]:
    item_counts = np.bincount(item, minlength=cfg.n_items)
    q = np.quantile(counts, [0.5, 0.9, 0.99])
    return {
        "kind": "synthetic",
        "config": _config_summary(cfg),
        "files": {"ratings": RATINGS_FILE, "movies": MOVIES_FILE},
        "n_users": cfg.n_users,
        "n_items": cfg.n_items,
        "n_ratings": int(rating.size),
        "rating_scale": [MIN_RATING, MAX_RATING],
        "rating_mean": round(float(rating.mean()), 4),
        "rating_std": round(float(rating.std()), 4),
        "planted_rmse": round(rmse, 4),
        "user_ratings": {
            "min": int(counts.min()),
            "median": float(q[0]),
            "mean": round(float(counts.mean()), 2),
            "p90": float(q[1]),
            "p99": round(float(q[2]), 1),
            "max": int(counts.max()),
        },
        "item_ratings": {
            "min": int(item_counts.min()),
            "median": float(np.median(item_counts)),
            "max": int(item_counts.max()),
            "under_10": int((item_counts < 10).sum()),
        },
        "timestamps": [int(timestamp.min()), int(timestamp.max())],
    }


def _config_summary(cfg: SynthConfig) -> dict[str, Any]:
    """The config as synth.json lists it: the later knobs only where they differ from what the first release did."""
    out = cfg.model_dump(mode="json")
    for key, default in ADDED_KNOBS.items():
        if out[key] == default:
            del out[key]
    return out


def _write_csv(frame: pl.DataFrame, uri: str) -> None:
    """One CSV file inside a staged output (the staging directory, not this file, is what commits)."""
    fs, path = storage.filesystem(uri)
    if not storage.is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        frame.write_csv(path)
        return
    with fs.open(path, "wb") as f:
        frame.write_csv(f)


def _ranges(begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Concatenated aranges begin[j] .. begin[j] + length[j] - 1, without a Python loop."""
    offset = np.repeat(begin - (np.cumsum(length) - length), length)
    return offset + np.arange(int(length.sum()))


def _normalise(w: np.ndarray) -> np.ndarray:
    return w / w.sum()
