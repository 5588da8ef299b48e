"""The GroupLens MovieLens releases recdist knows: where each zip lives, its checksum and its file layout."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from recdist.errors import ConfigError

BASE_URL = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class Release:
    """One GroupLens zip and how to read the ratings and movies files inside it."""

    name: str
    """Release name, also the zip's stem: ml-20m -> ml-20m.zip."""
    md5: str | None
    """MD5 GroupLens publishes in <zip>.md5; None where the release changes over time (fetched from the server)."""
    ratings_member: str
    """Path of the ratings file inside the zip."""
    movies_member: str
    """Path of the movies file (id, title, genres) inside the zip."""
    format: str
    """Text format of both files: csv (header, `,`), tsv (no header, tab), dat (no header, `::`)."""
    rating_scale: tuple[float, float]
    """(min, max) of valid ratings."""
    rating_step: float
    """1.0 for whole stars (ml-100k, ml-1m), 0.5 for half stars (ml-10m and later)."""
    movies_encoding: str
    """Encoding of the movies file: the older releases write titles in latin-1."""
    size_mb: int
    """Approximate size of the zip, for the user's information."""
    n_ratings: int | None
    """Number of ratings GroupLens documents; None for ml-latest, which grows."""

    @property
    def url(self) -> str:
        return f"{BASE_URL}/{self.filename}"

    @property
    def filename(self) -> str:
        return f"{self.name}.zip"

    @property
    def separator(self) -> str:
        return {"csv": ",", "tsv": "\t", "dat": "::"}[self.format]

    @property
    def header(self) -> bool:
        return self.format == "csv"


_RELEASES = (
    Release(
        "ml-100k",
        "0e33842e24a9c977be4e0107933c0723",
        "ml-100k/u.data",
        "ml-100k/u.item",
        "tsv",
        (1.0, 5.0),
        1.0,
        "latin-1",
        5,
        100_000,
    ),
    Release(
        "ml-1m",
        "c4d9eecfca2ab87c1945afe126590906",
        "ml-1m/ratings.dat",
        "ml-1m/movies.dat",
        "dat",
        (1.0, 5.0),
        1.0,
        "latin-1",
        6,
        1_000_209,
    ),
    Release(
        "ml-10m",
        "ce571fd55effeba0271552578f2648bd",
        "ml-10M100K/ratings.dat",
        "ml-10M100K/movies.dat",
        "dat",
        (0.5, 5.0),
        0.5,
        "latin-1",
        63,
        10_000_054,
    ),
    Release(
        "ml-20m",
        "cd245b17a1ae2cc31bb14903e1204af3",
        "ml-20m/ratings.csv",
        "ml-20m/movies.csv",
        "csv",
        (0.5, 5.0),
        0.5,
        "utf-8",
        190,
        20_000_263,
    ),
    Release(
        "ml-25m",
        "6b51fb2759a8657d3bfcbfc42b592ada",
        "ml-25m/ratings.csv",
        "ml-25m/movies.csv",
        "csv",
        (0.5, 5.0),
        0.5,
        "utf-8",
        250,
        25_000_095,
    ),
    Release(
        "ml-latest-small",
        None,
        "ml-latest-small/ratings.csv",
        "ml-latest-small/movies.csv",
        "csv",
        (0.5, 5.0),
        0.5,
        "utf-8",
        1,
        100_836,
    ),
    Release(
        "ml-latest",
        None,
        "ml-latest/ratings.csv",
        "ml-latest/movies.csv",
        "csv",
        (0.5, 5.0),
        0.5,
        "utf-8",
        335,
        None,
    ),
)
_BY_NAME = {r.name: r for r in _RELEASES}


def releases() -> tuple[Release, ...]:
    """Every known release, smallest first within each generation (what `recdist datasets` lists)."""
    return _RELEASES


def get_release(name: str) -> Release:
    """The release called `name`; a ConfigError with the closest valid name otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_BY_NAME), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown GroupLens dataset {name!r}",
            where="source.dataset (--dataset)",
            fix=f"{hint}known: {', '.join(_BY_NAME)}, or `synthetic` (see `recdist datasets`)",
        ) from None


def match_release(filename: str) -> Release | None:
    """The release a zip or directory is named after (ml-1m.zip, .../ml-1m), if any: gives its rating scale."""
    stem = filename.rstrip("/").rsplit("/", 1)[-1]
    stem = stem[: -len(".zip")] if stem.endswith(".zip") else stem
    if stem == "ml-10M100K":
        stem = "ml-10m"
    return _BY_NAME.get(stem)
