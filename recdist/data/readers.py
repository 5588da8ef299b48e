"""Parse ratings and movies files into RAW_RATINGS / RAW_ITEMS frames, fast, naming the line of any bad input.

Inputs: CSV (header), TSV (ml-100k u.data), GroupLens `::` .dat, Parquet; a single file, a directory or zip
holding a GroupLens layout; local paths or s3:// URIs; any of them gzip/bzip2/xz/zstd-compressed (`unpack`), text
with a byte-order mark or old-Mac line ends (`as_text`). Text is parsed by Polars with an explicit schema in one
pass; only when that fails (or leaves nulls) does a slower diagnostic pass look for the first bad line.
"""

from __future__ import annotations

import bz2
import codecs
import difflib
import gzip
import hashlib
import io
import lzma
import math
import posixpath
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import polars as pl
import pyarrow as pa

from recdist import storage
from recdist.errors import DataError

#: Column names of header-less GroupLens files, in order: ratings (u.data, ratings.dat) and movies.dat.
RATINGS_ORDER = ("userId", "movieId", "rating", "timestamp")
MOVIES_ORDER = ("movieId", "title", "genres")
#: ml-100k u.item: id | title | release date | video release date | IMDb URL | 19 genre flags.
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
#: File names a GroupLens directory or zip holds, in the order they are looked for.
RATINGS_NAMES = ("ratings.csv", "ratings.dat", "u.data", "ratings.parquet")
MOVIES_NAMES = ("movies.csv", "movies.dat", "u.item", "movies.parquet")

_SEP = "\x1f"  # stands in for multi-character separators (`::`): Polars splits on one byte
_ROLES = {
    "user": ("user id", "--user-col", pl.Int64),
    "item": ("item id", "--item-col", pl.Int64),
    "rating": ("rating", "--rating-col", pl.Float32),
    "timestamp": ("timestamp", "--timestamp-col", pl.Int64),
}


@dataclass(frozen=True)
class Layout:
    """How a file is written: its format, field separator, header line and text encoding."""

    format: str
    separator: str = ","
    has_header: bool = True
    encoding: str | None = None
    """Encoding of a movies file that is not valid UTF-8 (None: latin-1, as the old GroupLens releases)."""


@dataclass(frozen=True)
class Columns:
    """Which column holds what: names, or 0-based positions written as text."""

    user: str = "userId"
    item: str = "movieId"
    rating: str = "rating"
    timestamp: str | None = "timestamp"
    timestamp_required: bool = False
    """False: a missing timestamp column gives null timestamps; True (the user named one): it is an error."""


@dataclass
class Parsed:
    """One parsed file: its frame in file order, the label messages use, and a content hash."""

    frame: pl.DataFrame
    where: str
    first_line: int | None
    """The file line (1-based) of row 0; None for Parquet, whose rows are named by position."""
    checksum: str

    def locate(self, row: int) -> str:
        """'FILE, line N' (or 'FILE, row N' for Parquet) for a 0-based row of `frame`."""
        if self.first_line is None:
            return f"{self.where}, row {row + 1}"
        return f"{self.where}, line {row + self.first_line}"


def layout_for(name: str, format: str = "auto", separator: str | None = None, has_header: bool | None = None) -> Layout:
    """The layout of a file from its name (u.data, .csv, .dat, ...) unless `format` etc. say otherwise."""
    base = posixpath.basename(name.rstrip("/")).lower()
    stem, _, suffix = base.rpartition(".")
    base = stem if suffix in COMPRESSED_SUFFIXES and stem else base  # ratings.csv.gz reads as ratings.csv
    if format == "auto":
        ext = base.rsplit(".", 1)[-1] if "." in base else ""
        format = {
            "csv": "csv",
            "tsv": "tsv",
            "tab": "tsv",
            "data": "tsv",
            "dat": "dat",
            "parquet": "parquet",
            "pq": "parquet",
            "item": "item",
        }.get(ext, "")
        if not format:
            raise DataError(
                f"cannot tell the format of {name} from its name",
                where=name,
                fix="set it: --set source.format=csv (or tsv, dat, parquet)",
            )
    if format == "item":  # ml-100k u.item: `|`-separated, latin-1, genre flags
        return Layout("item", separator or "|", bool(has_header), "latin-1")
    default_sep = {"csv": ",", "tsv": "\t", "dat": "::", "parquet": ""}[format]
    header = format == "csv" if has_header is None else has_header
    return Layout(format, separator or default_sep, header)


# --- whole inputs: a file, a directory, a zip -------------------------------------------------------------


def read_ratings(
    uri: str, layout: Layout | None = None, columns: Columns = Columns(), *, checksum: str | None = None
) -> tuple[Parsed, Parsed | None]:
    """Ratings from a file, a GroupLens directory or a GroupLens zip; plus the movies beside them, if any.

    `layout` applies to a single file (None: from its name). `checksum` replaces the computed content hash
    (a registry zip passes its verified md5 instead of hashing it again).
    """
    uri = str(uri)
    if uri.lower().endswith(".zip"):
        return read_zip(uri, columns=columns, checksum=checksum)
    fs, path = storage.filesystem(uri)
    if fs.isdir(path):
        return _read_directory(uri, columns)
    if not fs.exists(path):
        raise DataError(
            f"ratings file not found: {uri}", where=uri, fix="check --path (a file, directory, .zip or s3:// URI)"
        )
    layout = layout or layout_for(uri)
    raw = storage.read_bytes(uri)
    with ThreadPoolExecutor(1) as pool:  # the content hash beside the parse (hashlib releases the GIL): 20M ratings'
        digest = pool.submit(_sha256, raw) if checksum is None else None  # 0.65 s of sha256 no longer before it
        data = unpack(raw, uri)
        if layout.format == "parquet":
            parsed = parse_parquet_ratings(_parquet_frame(data, uri), uri, columns, checksum=checksum or _PENDING)
        else:
            parsed = parse_ratings(data, layout, columns, uri, checksum=checksum or _PENDING)
        return (replace(parsed, checksum=digest.result()) if digest is not None else parsed), None


def read_items(uri: str, layout: Layout | None = None, item_col: str = "movieId") -> Parsed:
    """A movies file (id, title, genres; or ml-100k's u.item) as RAW_ITEMS."""
    uri = str(uri)
    layout = layout or layout_for(uri)
    raw = storage.read_bytes(uri)
    data = unpack(raw, uri)
    if layout.format == "parquet":
        return Parsed(parquet_items(_parquet_frame(data, uri), item_col, uri), uri, None, _sha256(raw))
    return parse_items(data, layout, uri, item_col)


def read_zip(
    uri: str,
    ratings_member: str | None = None,
    movies_member: str | None = None,
    *,
    columns: Columns = Columns(),
    ratings_layout: Layout | None = None,
    movies_layout: Layout | None = None,
    checksum: str | None = None,
) -> tuple[Parsed, Parsed | None]:
    """Ratings (and movies) from a GroupLens zip: the members named, else the first known names found."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise DataError(f"zip file not found: {uri}", where=uri, fix="check --path")
    checksum = checksum or _file_sha256(uri)
    with fs.open(path, "rb") as f, _open_zip(f, uri) as archive:
        names = archive.namelist()
        ratings_member = ratings_member or _find(names, RATINGS_NAMES)
        if ratings_member is None or ratings_member not in names:
            raise DataError(
                f"no ratings file in {uri}",
                where=f"{uri}, which holds: {', '.join(names[:12]) or 'nothing'}{' ...' if len(names) > 12 else ''}",
                fix=f"a GroupLens zip holds one of {', '.join(RATINGS_NAMES)}; or pass the ratings file itself",
            )
        movies_member = movies_member or _find(names, MOVIES_NAMES)
        ratings = _parse_member(archive, ratings_member, uri, ratings_layout, columns, checksum)
        items = None
        if movies_member and movies_member in names:
            where = f"{movies_member} in {uri}"
            data = _member_bytes(archive, movies_member, uri)
            movies_layout = movies_layout or layout_for(movies_member)
            if movies_layout.format == "parquet":
                items = Parsed(parquet_items(_parquet_frame(data, where), "movieId", where), where, None, _sha256(data))
            else:
                items = parse_items(data, movies_layout, where)
    return ratings, items


def _parse_member(
    archive: zipfile.ZipFile, member: str, uri: str, layout: Layout | None, columns: Columns, checksum: str
) -> Parsed:
    where = f"{member} in {uri}"
    layout = layout or layout_for(member)
    data = _member_bytes(archive, member, uri)
    if layout.format == "parquet":
        return parse_parquet_ratings(_parquet_frame(data, where), where, columns, checksum=checksum)
    return parse_ratings(data, layout, columns, where, checksum=checksum)


def _read_directory(uri: str, columns: Columns) -> tuple[Parsed, Parsed | None]:
    present = storage.listdir(uri)
    found = _find(present, RATINGS_NAMES)
    if found is None:
        raise DataError(
            f"no ratings file in directory {uri}",
            where=f"{uri}, which holds: {', '.join(present[:12]) or 'nothing'}{' ...' if len(present) > 12 else ''}",
            fix=f"a GroupLens directory holds one of {', '.join(RATINGS_NAMES)}; or pass the file itself with --path",
        )
    ratings, _ = read_ratings(storage.join(uri, found), None, columns)
    movies = _find(present, MOVIES_NAMES)
    items = read_items(storage.join(uri, movies)) if movies else None
    return ratings, items


def _find(names: list[str], wanted: tuple[str, ...]) -> str | None:
    by_base = {posixpath.basename(n): n for n in names if not n.endswith("/")}
    return next((by_base[w] for w in wanted if w in by_base), None)


def _open_zip(f: io.IOBase, uri: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(
            f"not a readable zip file: {uri} ({e})", where=uri, fix="check the file, or download it again"
        ) from None


def _member_bytes(archive: zipfile.ZipFile, member: str, uri: str) -> bytes:
    """A zip member's bytes, unpacked; DataError for a damaged, encrypted or oddly compressed member."""
    try:
        return unpack(archive.read(member), f"{member} in {uri}")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as e:
        raise DataError(
            f"cannot read {member} from {uri}: {e}",
            where=f"{member} in {uri}",
            fix="the zip is damaged (a bad CRC or cut short), encrypted, or compressed in a way Python cannot "
            "read: download or copy it again, or extract it with another tool and pass the file with --path",
        ) from None


def _parquet_frame(data: bytes, where: str) -> pl.DataFrame:
    try:
        return pl.read_parquet(io.BytesIO(data))
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DataError(
            f"not a readable Parquet file: {where} ({e})", where=where, fix="check the file and source.format"
        ) from None


#: Signatures of compressed files, whatever their names: each is unpacked before it is parsed.
_COMPRESSED = (
    (b"\x1f\x8b", "gzip", gzip.decompress),
    (b"BZh", "bzip2", bz2.decompress),
    (b"\xfd7zXZ\x00", "xz", lzma.decompress),
    (b"\x28\xb5\x2f\xfd", "zstd", lambda data: pa.input_stream(pa.py_buffer(data), compression="zstd").read()),
)
COMPRESSED_SUFFIXES = frozenset({"gz", "gzip", "bz2", "xz", "zst"})
"""Name suffixes of compressed files: ratings.csv.gz has the format of ratings.csv."""


def unpack(data: bytes, where: str) -> bytes:
    """The bytes of a gzip, bzip2, xz or zstd file decompressed (told by its first bytes); others as they are."""
    for magic, codec, decompress in _COMPRESSED:
        if data.startswith(magic):
            try:
                return decompress(data)
            except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:
                raise DataError(
                    f"{where} is {codec}-compressed but cannot be decompressed ({e})",
                    where=where,
                    fix="the file is damaged or cut short: copy or download it again",
                ) from None
    return data


def as_text(data: bytes, where: str) -> bytes:
    """Text as the parser takes it: UTF-8 without a byte-order mark, lines ended by LF or CRLF.

    A UTF-8 BOM (Excel's "CSV UTF-8") is dropped; UTF-16/32 with a BOM (Excel's "Unicode text") transcoded;
    old-Mac CR-only line ends (told by the first line's) become LF, line numbers unchanged. Looks at the first
    line only, so LF and CRLF files (ml-20m: 500 MB) cost no scan.
    """
    try:
        for boms, encoding in _BOMS:
            if data.startswith(boms):
                data = data[len(codecs.BOM_UTF8) :] if encoding == "utf-8" else data.decode(encoding).encode()
                break
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} starts with a {encoding} byte-order mark but is not valid {encoding} ({e.reason})",
            where=where,
            fix="save the file as UTF-8 text",
        ) from None
    cr = data.find(b"\r")
    if cr >= 0 and data[cr + 1 : cr + 2] != b"\n" and not 0 <= data.find(b"\n") < cr:  # the first line ends in CR
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data


_BOMS = (
    ((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE), "utf-32"),  # before UTF-16: FF FE 00 00 starts with FF FE
    ((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE), "utf-16"),
    ((codecs.BOM_UTF8,), "utf-8"),
)


_PENDING = "sha256:pending"
"""The checksum a parse is given while the real one is computed beside it (read_ratings)."""


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _file_sha256(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# --- ratings ------------------------------------------------------------------------------------------------


def parse_ratings(data: bytes, layout: Layout, columns: Columns, where: str, *, checksum: str | None = None) -> Parsed:
    """Text ratings -> RAW_RATINGS columns in file order; DataError naming the line of the first bad one."""
    checksum = checksum or _sha256(data)
    text = _Text(as_text(data, where), layout, where, RATINGS_ORDER)
    picked = text.pick(columns)
    dtypes = {picked[role]: _ROLES[role][2] for role in picked}
    frame = text.read(dtypes, picked)
    if frame.height == 0:
        raise DataError(f"no ratings in {where}", where=where, fix="the file has a header but no data lines")
    frame = frame.select(
        pl.col(picked["user"]).alias("user_id"),
        pl.col(picked["item"]).alias("item_id"),
        pl.col(picked["rating"]).cast(pl.Float32).alias("rating"),
        (pl.col(picked["timestamp"]) if "timestamp" in picked else pl.lit(None, pl.Int64)).alias("timestamp"),
    )
    return Parsed(frame, where, text.first_line, checksum)


def parse_parquet_ratings(frame: pl.DataFrame, where: str, columns: Columns, *, checksum: str) -> Parsed:
    """A Parquet table of ratings -> RAW_RATINGS columns; DataError naming the row of the first bad value."""
    if frame.height == 0:
        raise DataError(f"no ratings in {where}", where=where, fix="the Parquet file has no rows")
    names = frame.columns
    picked = {
        role: _resolve(names, wanted, role, where, required=role != "timestamp" or columns.timestamp_required)
        for role, wanted in _wanted(columns)
    }
    picked = {role: name for role, name in picked.items() if name is not None}
    frame = _plain_columns(frame, picked, where)
    problems = [(*found, role, name) for role, name in picked.items() if (found := _column_problem(frame, name, role))]
    _raise_first(problems, lambda row: f"{where}, row {row + 1}")
    out = frame.select(
        _as_id(frame, picked["user"]).alias("user_id"),
        _as_id(frame, picked["item"]).alias("item_id"),
        pl.col(picked["rating"]).cast(pl.Float32).alias("rating"),
        (_as_id(frame, picked["timestamp"]) if "timestamp" in picked else pl.lit(None, pl.Int64)).alias("timestamp"),
    )
    return Parsed(out, where, None, checksum)


_EXACT_FLOAT = 2**53
"""Integers a float64 column holds exactly: beyond this an id read from a float may be another id."""


def _column_problem(frame: pl.DataFrame, name: str, role: str) -> tuple[int, str] | None:
    """(row, what) of the first bad value of a typed (Parquet) column, or None.

    Integer roles (ids, timestamp) in a float column, as pandas writes an integer column with a missing value:
    whole numbers are taken; NaN is a missing value; a fraction, an infinity or a number beyond 2^53 is refused.
    """
    values = frame.get_column(name)
    label, _, dtype = _ROLES[role]
    if (values.dtype.is_integer() and values.dtype != pl.UInt64) or (values.dtype.is_float() and dtype == pl.Float32):
        # A typed number the role's type holds: only a missing value can be wrong (no text to parse; casting 20M
        # values to strings to check them took a quarter of `prepare --previous` on a Parquet file).
        if role == "timestamp" or not values.has_nulls():
            return None
        return int(values.is_null().arg_true()[0]), f"{label} is missing"
    if not (values.dtype.is_float() and dtype == pl.Int64):
        return _first_problem(values.cast(pl.String), role)
    missing = values.is_null() | values.is_nan()
    fine = missing | ((values.abs() < _EXACT_FLOAT) & (values == values.floor()))
    problem = ~fine if role == "timestamp" else missing | ~fine  # timestamps may be missing
    if not problem.any():
        return None
    row = int(problem.fill_null(True).arg_true()[0])
    if missing[row]:
        return row, f"{label} is missing"
    value = values[row]
    why = (
        "not a finite number" if not math.isfinite(value)
        else "not a whole number" if abs(value) < _EXACT_FLOAT
        else "beyond 2^53, where a float column loses integers"
    )  # fmt: skip
    return row, f"{label} {value!r} is {why} (in a {values.dtype} column)"


def _as_id(frame: pl.DataFrame, name: str) -> pl.Expr:
    """An id or timestamp column as Int64 (a checked float column's NaN as null)."""
    if frame.schema[name].is_float():
        return pl.col(name).fill_nan(None).cast(pl.Int64)
    return pl.col(name).cast(pl.Int64)


def _plain_columns(frame: pl.DataFrame, picked: dict[str, str], where: str) -> pl.DataFrame:
    """The picked Parquet columns as scalars: date/time timestamps as epoch seconds; DataError for nested or
    binary columns (a list of ids, a struct rating), which no cast makes a rating."""
    for role, name in picked.items():
        dtype = frame.schema[name]
        if role == "timestamp" and dtype.is_temporal() and dtype != pl.Time and not isinstance(dtype, pl.Duration):
            frame = frame.with_columns(pl.col(name).dt.epoch("s"))
        elif isinstance(dtype, (pl.Categorical, pl.Enum)):  # dictionary-encoded text: its values, not its codes
            frame = frame.with_columns(pl.col(name).cast(pl.String))
        elif not (dtype.is_numeric() or dtype in (pl.String, pl.Null) or isinstance(dtype, (pl.Categorical, pl.Enum))):
            label, flag, want = _ROLES[role]
            kind = "integer" if want == pl.Int64 else "number"
            raise DataError(
                f"the {label} column {name!r} of {where} holds {dtype}, not one {kind} per row",
                where=f"{where}, column {name}",
                fix=f"write it as a plain {kind} column, or map another column with {flag}",
            )
    return frame


def _wanted(columns: Columns) -> list[tuple[str, str | None]]:
    return [
        ("user", columns.user),
        ("item", columns.item),
        ("rating", columns.rating),
        ("timestamp", columns.timestamp or None),
    ]


def _first_problem(values: pl.Series, role: str) -> tuple[int, str] | None:
    """(position, what) of the first missing or non-numeric value of one column given as strings."""
    label, _, dtype = _ROLES[role]
    stripped = values.str.strip_chars()
    missing = stripped.is_null() | (stripped == "")
    bad = ~missing & stripped.cast(dtype, strict=False).is_null()
    problem = bad if role == "timestamp" else missing | bad  # timestamps may be empty
    if not problem.any():
        return None
    row = int(problem.arg_true()[0])
    if not bad[row]:
        return row, f"{label} is missing"
    kind = "an integer" if dtype == pl.Int64 else "a number"
    if dtype == pl.Int64 and stripped[row].lstrip("+-").isdigit():
        kind = "an integer within int64 (|x| < 2^63)"
    return row, f"{label} {stripped[row]!r} is not {kind}"


def _raise_first(problems: list[tuple[int, str, str, str]], locate: Callable[[int], str]) -> None:
    """Raise DataError for the earliest of (position, what, (role, column)) problems, if any."""
    if not problems:
        return
    row, what, role, column = min(problems)
    label, flag = _ROLES[role][:2]
    ids = "; ids must be integers: map text ids to integers first" if role in ("user", "item") else ""
    raise DataError(
        f"bad input: {what} (column {column})",
        where=locate(row),
        fix=f"fix or delete that line; if {column!r} is not the {label}, map the right column with {flag}{ids}",
    )


# --- movies -------------------------------------------------------------------------------------------------


def parse_items(data: bytes, layout: Layout, where: str, item_col: str = "movieId") -> Parsed:
    """A movies file -> RAW_ITEMS (item_id, title, genres); ml-100k's genre flags become 'A|B|C'."""
    checksum = _sha256(data)
    data = _as_utf8(as_text(data, where), layout.encoding)
    text = _Text(data, layout, where, MOVIES_ORDER)
    if layout.format == "item":
        names = text.names
        if len(names) < 5 + len(ML100K_GENRES):
            raise DataError(
                f"{where} has {len(names)} fields per line; ml-100k's u.item has {5 + len(ML100K_GENRES)}",
                where=where,
                fix="pass the u.item of the ml-100k release, or a movies.csv (movieId,title,genres)",
            )
        frame = text.read({names[0]: pl.Int64}, {"item": names[0]}, strings=True)
        flags = names[5 : 5 + len(ML100K_GENRES)]
        genres = pl.concat_str(
            [pl.when(pl.col(f) == "1").then(pl.lit(g)) for f, g in zip(flags, ML100K_GENRES, strict=True)],
            separator="|",
            ignore_nulls=True,
        )
        out = frame.select(pl.col(names[0]).alias("item_id"), pl.col(names[1]).alias("title"), genres.alias("genres"))
        return Parsed(out, where, text.first_line, checksum)
    item = _pick_item(text.names, item_col)
    frame = text.read({item: pl.Int64}, {"item": item}, strings=True)
    return Parsed(_items_from_frame(frame, item), where, text.first_line, checksum)


def _pick_item(names: list[str], item_col: str) -> str:
    if item_col in names:
        return item_col
    if item_col.isdigit() and int(item_col) < len(names):
        return names[int(item_col)]
    return names[0]  # a movies file's id comes first (movieId, MovieID::, u.item)


def parquet_items(frame: pl.DataFrame, item_col: str, where: str) -> pl.DataFrame:
    """A Parquet movies table -> RAW_ITEMS: the id checked as the ratings' ids are (a list or text id refused,
    naming the column or row); genres written as a list of names joined with '|'; other columns as text."""
    item = _pick_item(frame.columns, item_col)
    frame = _plain_columns(frame, {"item": item}, where)
    _raise_first(
        [(*found, "item", item)] if (found := _column_problem(frame, item, "item")) else [],
        lambda row: f"{where}, row {row + 1}",
    )
    frame = frame.with_columns(_as_id(frame, item))
    for name, dtype in frame.schema.items():
        if name == item:
            continue
        if isinstance(dtype, pl.List) and dtype.inner in (pl.String, pl.Categorical):
            frame = frame.with_columns(pl.col(name).cast(pl.List(pl.String)).list.join("|"))
        elif isinstance(dtype, (pl.List, pl.Array, pl.Struct, pl.Object)):
            frame = frame.drop(name)  # nested columns are not titles or genres: as if absent
    return _items_from_frame(frame, item)


def _items_from_frame(frame: pl.DataFrame, item: str) -> pl.DataFrame:
    names = frame.columns
    item = _pick_item(names, item)
    rest = [n for n in names if n != item]
    title = "title" if "title" in names else (rest[0] if rest else None)
    genres = "genres" if "genres" in names else (rest[1] if len(rest) > 1 else None)
    return frame.select(
        pl.col(item).cast(pl.Int64).alias("item_id"),
        (pl.col(title).cast(pl.String) if title else pl.lit(None, pl.String)).alias("title"),
        (pl.col(genres).cast(pl.String) if genres else pl.lit(None, pl.String)).alias("genres"),
    )


def _as_utf8(data: bytes, encoding: str | None) -> bytes:
    """UTF-8 as it is; anything else (old GroupLens titles are latin-1) transcoded: movies files are small."""
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode(encoding or "latin-1", "replace").encode("utf-8")


# --- the text reader ----------------------------------------------------------------------------------------


class _Text:
    """One delimited text file: its column names, a fast Polars read, and a diagnostic pass for errors."""

    def __init__(self, data: bytes, layout: Layout, where: str, order: tuple[str, ...]):
        if not data.strip():
            raise DataError(f"empty file: {where}", where=where, fix="check the path; the file has no lines")
        self.data, self.layout, self.where = data, layout, where
        self.separator = layout.separator
        first = data[: data.find(b"\n")] if b"\n" in data else data
        if b"\0" in first:  # UTF-16/32 without a byte-order mark reads as NUL-separated garbage
            raise DataError(
                f"the first line of {where} holds NUL bytes: it is UTF-16 or UTF-32 text without a byte-order mark, "
                "or not text at all",
                where=f"{where}, line 1",
                fix="save it as UTF-8 text (or as UTF-16 with a byte-order mark, which is read too); "
                "if it is not a ratings file, check --path",
            )
        fields = first.decode("utf-8", "replace").rstrip("\r").split(self.separator)
        if layout.has_header:
            self.names = [f.strip().strip('"') for f in fields]
            _check_header(self.names, first.decode("utf-8", "replace"), self.separator, where)
        else:
            self.names = [*order[: len(fields)], *(f"column_{i}" for i in range(len(order), len(fields)))]
        self.first_line = 2 if layout.has_header else 1

    def pick(self, columns: Columns) -> dict[str, str]:
        """Role -> column name, for the roles this file has (timestamp may be absent)."""
        if self.layout.has_header and all(n.lstrip("-").replace(".", "", 1).isdigit() for n in self.names):
            raise DataError(  # taking it for a header would drop a rating without a word
                f"the first line of {self.where} looks like data, not a header: {self.separator.join(self.names)!r}",
                where=f"{self.where}, line 1",
                fix="if the file has no header line, pass --no-header (--set source.has_header=false) and name "
                "columns by 0-based position (--user-col 0 ...)",
            )
        picked = {}
        for role, wanted in _wanted(columns):
            name = _resolve(
                self.names,
                wanted,
                role,
                self.where,
                required=role != "timestamp" or columns.timestamp_required,
            )
            if name is not None:
                picked[role] = name
        return picked

    def read(self, dtypes: dict[str, pl.DataType], picked: dict[str, str], strings: bool = False) -> pl.DataFrame:
        """Parse with an explicit schema; on failure or unexpected nulls, find and report the first bad line."""
        last = self.names[-1]
        wanted = self.names if strings else list(dict.fromkeys([*picked.values(), last]))
        try:
            frame = self._polars(dtypes, wanted)
        except (pl.exceptions.PolarsError, OSError) as e:
            self.diagnose(dtypes, picked)
            raise DataError(f"cannot parse {self.where}: {e}", where=self.where) from None
        frame = _drop_trailing_blank(frame)
        key = [picked[r] for r in ("user", "item", "rating") if r in picked]
        if any(frame.get_column(n).null_count() for n in [*key, last]):
            self.diagnose(dtypes, picked)  # a short line, a missing value; empty timestamps pass
        return frame

    def _polars(self, dtypes: dict[str, pl.DataType], wanted: list[str], lenient: bool = False) -> pl.DataFrame:
        data, sep = self.data, self.separator
        if len(sep) > 1:
            data, sep = data.replace(sep.encode(), _SEP.encode()), _SEP
        return pl.read_csv(
            data,
            has_header=self.layout.has_header,
            separator=sep,
            schema={n: dtypes.get(n, pl.String) for n in self.names},
            columns=[self.names.index(n) for n in wanted],
            quote_char='"' if self.layout.format == "csv" else None,
            raise_if_empty=False,
            encoding="utf8-lossy",  # stray latin-1 in a text column must not stop a numeric read
            ignore_errors=lenient,
            truncate_ragged_lines=lenient,
        )

    def diagnose(self, dtypes: dict[str, pl.DataType], picked: dict[str, str]) -> None:
        """The slow pass after a failure: raise for the first line with a wrong field count or a bad value."""
        lines = _lines(self.data)
        nonblank = lines.filter(pl.col("text").str.strip_chars() != "")
        if nonblank.height:  # blank lines at the end are harmless; blank lines between data lines are errors
            lines = lines.filter(pl.col("line") <= nonblank["line"].max())
        if self.layout.has_header:
            lines = lines.filter(pl.col("line") > 1)
        counts = lines["text"].str.count_matches(self.separator, literal=True) + 1
        expected = len(self.names) if self.layout.has_header else int(counts.mode().sort()[-1])
        blank = lines["text"].str.strip_chars() == ""
        wrong = blank | (counts != expected)
        if wrong.any():
            i = int(wrong.arg_true()[0])
            what = "the line is empty" if blank[i] else f"{counts[i]} fields, expected {expected}"
            raise DataError(
                f"malformed line in {self.where}: {what}: {lines['text'][i][:200]!r}",
                where=f"{self.where}, line {lines['line'][i]}",
                fix="fix or delete that line; if the whole file uses another separator or has no header, say so "
                "with --set source.separator=... / --set source.has_header=false",
            )
        # Every line has its fields: re-read leniently (bad values turn null), then split only those lines.
        typed = self._polars(dtypes, list(picked.values()), lenient=True).head(lines.height)
        rows = typed.with_row_index("row").filter(pl.any_horizontal(pl.col(picked.values()).is_null()))["row"]
        suspects = lines[rows]
        fields = suspects["text"].str.split(self.separator)
        problems = []
        for role, name in picked.items():
            values = fields.list.get(self.names.index(name), null_on_oob=True).str.strip_chars().str.strip_chars('"')
            if found := _first_problem(values, role):
                problems.append((*found, role, name))
        _raise_first(problems, lambda i: f"{self.where}, line {suspects['line'][i]}")
        key = [picked[r] for r in ("user", "item", "rating") if r in picked]
        missing = typed.select(pl.any_horizontal(pl.col(key).is_null()))[:, 0]
        if missing.any():  # what splitting on the separator cannot see (quoted fields): the row names the line
            row = int(missing.arg_true()[0])
            raise DataError(
                f"bad input: a value of {', '.join(key)} is missing or not a number",
                where=f"{self.where}, line {row + self.first_line}",
                fix="fix or delete that line",
            )


def _check_header(names: list[str], line: str, separator: str, where: str) -> None:
    """DataError for a header that names a column twice, or holds one field where another separator splits it."""
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise DataError(
            f"the header of {where} names column {twice!r} twice: {line.strip()[:200]!r}",
            where=f"{where}, line 1",
            fix="give every column its own name in the header line",
        )
    other = next((sep for sep in (",", ";", "\t", "|", "::") if sep != separator and sep in line), None)
    if len(names) == 1 and other:
        raise DataError(
            f"the header of {where} is one field when split on {separator!r}, but holds {other!r}: "
            f"{line.strip()[:200]!r}",
            where=f"{where}, line 1",
            fix=f"pass the file's separator: --separator {other!r} (--set source.separator=...)",
        )


def _lines(data: bytes) -> pl.DataFrame:
    """Every line of a file as text (blank lines as ""), numbered from 1, read by Polars as one column."""
    try:
        text = pl.read_csv(
            data,
            has_header=False,
            separator="\0",
            quote_char=None,
            schema={"text": pl.String},
            encoding="utf8-lossy",
        )["text"]
    except pl.exceptions.PolarsError:  # NUL bytes in the file: split in Python (error path only)
        text = pl.Series("text", data.decode("utf-8", "replace").split("\n")).str.strip_suffix("\r")
    return pl.DataFrame({"text": text.fill_null("")}).with_row_index("line", offset=1)


def _resolve(
    names: list[str], wanted: str | None, role: str, where: str, required: bool = True
) -> str | None:
    """The column of `names` that `wanted` (a name, or a 0-based position as text) means."""
    if wanted is None or wanted == "":
        return None
    if wanted in names:
        return wanted
    if wanted.isdigit() and int(wanted) < len(names):
        return names[int(wanted)]
    if not required:
        return None
    label, flag, _ = _ROLES[role]
    close = [n for n in names if n.lower() == wanted.lower()] or difflib.get_close_matches(wanted, names, n=1)
    hint = f" (did you mean {close[0]!r}? {flag} {close[0]})" if close else ""
    raise DataError(
        f"no {label} column {wanted!r} in {where}",
        where=f"columns found: {', '.join(names)}",
        fix=f"map it with {flag} NAME (or a 0-based position){hint}",
    )


def _drop_trailing_blank(frame: pl.DataFrame) -> pl.DataFrame:
    """Blank lines at the end of a file read as all-null rows: drop them (earlier ones stay, to be reported)."""
    if frame.height == 0 or any(v is not None for v in frame.row(-1)):
        return frame
    filled = frame.select(pl.any_horizontal(pl.all().is_not_null()).alias("x"))["x"]
    keep = int(filled.arg_true()[-1]) + 1 if filled.any() else 0
    return frame.head(keep)
