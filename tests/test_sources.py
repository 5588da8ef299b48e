"""Every source format parsed into RAW_RATINGS / RAW_ITEMS, every bad input named by file and line, load_source."""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import socket
import zipfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import damage_first_member, set_zip_field, zipped

from recdist.config import SourceConfig, SynthConfig
from recdist.data.readers import Columns, layout_for, read_items, read_ratings, read_zip
from recdist.data.registry import get_release, match_release, releases
from recdist.data.sources import load_source
from recdist.errors import ConfigError, DataError
from recdist.schema import RAW_ITEMS, RAW_RATINGS

EXPECTED = pl.DataFrame(
    {"user_id": [1, 1, 2], "item_id": [10, 20, 10], "rating": [4.0, 3.5, 5.0], "timestamp": [100, 200, 300]},
    schema=pl.Schema(RAW_RATINGS),
)
RAW_SCHEMA = pl.Schema(RAW_RATINGS)
# ml-100k's u.item: id|title|release|video release|IMDb URL|19 genre flags (unknown, Action, Adventure, ...)
U_ITEM = (
    "10|Café Society (1995)|01-Jan-1995||http://x|0|1|0|0|0|1|" + "0|" * 12 + "1\n"
    "20|Toy Story (1995)|01-Jan-1995||http://y|0|0|0|1|1|1|" + "0|" * 12 + "0\n"
).encode("latin-1")


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _ratings(path: Path, columns: Columns | None = None) -> pl.DataFrame:
    parsed, _ = read_ratings(str(path), columns=columns or Columns())
    assert parsed.frame.schema == RAW_SCHEMA
    return parsed.frame


# --- formats ------------------------------------------------------------------------------------------------


def test_csv_with_header(tmp_path):
    path = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,100\n1,20,3.5,200\n2,10,5,300\n")
    parsed, items = read_ratings(str(path))
    assert parsed.frame.equals(EXPECTED)
    assert items is None
    assert parsed.locate(2) == f"{path}, line 4"
    assert parsed.checksum.startswith("sha256:")


def test_udata_tsv_without_header(tmp_path):
    path = _write(tmp_path / "u.data", "1\t10\t4\t100\n1\t20\t3.5\t200\n2\t10\t5\t300\n")
    assert _ratings(path).equals(EXPECTED)
    assert read_ratings(str(path))[0].locate(0) == f"{path}, line 1"


def test_dat_with_double_colon_separator(tmp_path):
    path = _write(tmp_path / "ratings.dat", "1::10::4::100\n1::20::3.5::200\n2::10::5::300\n")
    assert _ratings(path).equals(EXPECTED)


def test_parquet_with_other_names_and_types(tmp_path):
    table = pa.table({"u": pa.array([1, 1, 2], pa.int32()), "i": ["10", "20", "10"], "r": [4.0, 3.5, 5.0]})
    pq.write_table(table, tmp_path / "r.parquet")
    frame = _ratings(tmp_path / "r.parquet", Columns(user="u", item="i", rating="r", timestamp=None))
    assert frame.drop("timestamp").equals(EXPECTED.drop("timestamp"))
    assert frame["timestamp"].null_count() == 3


def test_directory_with_ratings_and_movies(tmp_path):
    _write(tmp_path / "ml" / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4,100\n1,20,3.5,200\n2,10,5,300\n")
    _write(tmp_path / "ml" / "movies.csv", 'movieId,title,genres\n10,"American President, The (1995)",Comedy|Drama\n')
    ratings, items = read_ratings(str(tmp_path / "ml"))
    assert ratings.frame.equals(EXPECTED)
    assert items.frame.schema == pl.Schema(RAW_ITEMS)
    assert items.frame.row(0) == (10, "American President, The (1995)", "Comedy|Drama")


def test_zip_with_ml100k_layout_latin1_titles_and_genre_flags(tmp_path):
    members = {"ml-100k/u.data": b"1\t10\t4\t100\n1\t20\t3.5\t200\n2\t10\t5\t300\n", "ml-100k/README": b"x"}
    path = _write(tmp_path / "ml-100k.zip", zipped({**members, "ml-100k/u.item": U_ITEM}))
    ratings, items = read_ratings(str(path))
    assert ratings.frame.equals(EXPECTED)
    assert ratings.locate(1) == f"ml-100k/u.data in {path}, line 2"
    assert items.frame.rows() == [
        (10, "Café Society (1995)", "Action|Comedy|Western"),
        (20, "Toy Story (1995)", "Animation|Children's|Comedy"),
    ]
    assert match_release(str(path)).rating_scale == (1.0, 5.0)


def test_zip_with_ml1m_layout_and_latin1_movies_dat(tmp_path):
    movies = "10::Héroes: \"Quoted\" (1999)::Action|Drama\n".encode("latin-1")
    members = {"ml-1m/ratings.dat": b"1::10::4::100\n1::20::3.5::200\n2::10::5::300\n", "ml-1m/movies.dat": movies}
    path = _write(tmp_path / "ml-1m.zip", zipped(members))
    ratings, items = read_zip(str(path), "ml-1m/ratings.dat", "ml-1m/movies.dat")
    assert ratings.frame.equals(EXPECTED)
    assert items.frame.row(0) == (10, 'Héroes: "Quoted" (1999)', "Action|Drama")


def test_movies_files_on_their_own(tmp_path):
    utf8 = _write(tmp_path / "movies.csv", "movieId,title,genres\n1,Amélie (2001),Comedy|Romance\n")
    assert read_items(str(utf8)).frame.row(0) == (1, "Amélie (2001)", "Comedy|Romance")
    item = _write(tmp_path / "u.item", U_ITEM)
    assert read_items(str(item)).frame["genres"].to_list() == ["Action|Comedy|Western", "Animation|Children's|Comedy"]


def test_header_less_columns_by_position_and_no_timestamp(tmp_path):
    path = _write(tmp_path / "r.tsv", "10\t1\t4\n20\t1\t3.5\n10\t2\t5\n")
    frame = _ratings(path, Columns(user="1", item="0", rating="2", timestamp=None))
    assert frame.drop("timestamp").equals(EXPECTED.drop("timestamp"))


def test_empty_timestamps_and_trailing_blank_lines_are_fine(tmp_path):
    path = _write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n1,10,4,\n1,20,3.5,200\n\n\n")
    frame = _ratings(path)
    assert frame["timestamp"].to_list() == [None, 200]


def test_column_mapping_from_the_config_flags(tmp_path):
    path = _write(tmp_path / "mine.csv", "ts;stars;iid;uid\n100;4;10;1\n200;3.5;20;1\n300;5;10;2\n")
    source = SourceConfig(path=str(path), separator=";", user_col="uid", item_col="iid", rating_col="stars",
                          timestamp_col="ts")
    raw = load_source(source, SynthConfig())
    assert raw.ratings.collect().equals(EXPECTED)
    assert raw.items is None
    assert raw.rating_scale == (0.5, 5.0)
    assert raw.locate(0) == f"{path}, line 2"


def test_real_ml_latest_small(ml_latest_small):
    raw = load_source(SourceConfig(path=str(ml_latest_small)), SynthConfig())
    ratings = raw.ratings.collect()
    assert ratings.height == 100_836
    assert ratings.schema == RAW_SCHEMA
    assert ratings["user_id"].n_unique() == 610
    assert ratings["rating"].min() == 0.5 and ratings["rating"].max() == 5.0
    items = raw.items.collect()
    assert items.schema == pl.Schema(RAW_ITEMS)
    assert items.height == 9_742
    assert raw.name == "ml-latest-small"


# --- bad input: file and line named -------------------------------------------------------------------------

HEADER = "userId,movieId,rating,timestamp\n"


@pytest.mark.parametrize(
    ("name", "content", "line", "words"),
    [
        ("r.csv", HEADER + "1,10,4,100\n1,20,3,200,9\n", 3, "5 fields, expected 4"),
        ("r.csv", HEADER + "1,10,4,100\n1,20\n", 3, "2 fields, expected 4"),
        ("r.csv", HEADER + "1,10,4,100\n1,20,abc,200\n", 3, "rating 'abc' is not a number"),
        ("r.csv", HEADER + "1,10,4,100\n2,10,4,100\nx7,20,4,200\n", 4, "user id 'x7' is not an integer"),
        ("r.csv", HEADER + "1,10,4,100\n1,,4,200\n", 3, "item id is missing"),
        ("r.csv", HEADER + "1,10,4,100\n1,20,4,later\n", 3, "timestamp 'later' is not an integer"),
        ("r.csv", HEADER + "1,10,4,100\n\n1,20,4,200\n", 3, "the line is empty"),
        ("u.data", "1\t10\t4\t100\n1\t20\t4\n2\t10\t4\t100\n", 2, "3 fields, expected 4"),
        ("ratings.dat", "1::10::4::100\n1::20::4.x::200\n", 2, "rating '4.x' is not a number"),
        ("ratings.dat", "1::10::4::100\n1:20::4::200\n", 2, "3 fields, expected 4"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, name, content, line, words):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        read_ratings(str(path))
    message = str(err.value)
    assert words in message
    assert f"{path}, line {line}" in message


def test_empty_file_and_header_only(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_ratings(str(_write(tmp_path / "empty.csv", "")))
    with pytest.raises(DataError, match="no ratings"):
        read_ratings(str(_write(tmp_path / "header.csv", HEADER)))


def test_missing_column_lists_the_columns_and_the_flag(tmp_path):
    path = _write(tmp_path / "r.csv", "user,movieId,rating\n1,10,4\n")
    with pytest.raises(DataError) as err:
        read_ratings(str(path))
    message = str(err.value)
    assert "no user id column 'userId'" in message
    assert "columns found: user, movieId, rating" in message
    assert "--user-col" in message


def test_a_named_timestamp_column_must_exist(tmp_path):
    path = _write(tmp_path / "r.csv", "userId,movieId,rating\n1,10,4\n")
    assert _ratings(path)["timestamp"].null_count() == 1  # the default name may be absent
    with pytest.raises(DataError, match="--timestamp-col"):
        read_ratings(str(path), columns=Columns(timestamp="time", timestamp_required=True))


def test_header_less_csv_is_not_taken_for_a_header(tmp_path):
    path = _write(tmp_path / "r.csv", "1,10,4,100\n1,20,3,200\n")
    with pytest.raises(DataError, match="has_header=false"):
        read_ratings(str(path))
    by_position = Columns(user="0", item="1", rating="2", timestamp="3")  # would silently drop line 1 as a header
    with pytest.raises(DataError, match="looks like data, not a header: .1,10,4,100."):
        read_ratings(str(path), columns=by_position)
    parsed, _ = read_ratings(str(path), layout_for(str(path), has_header=False), by_position)
    assert parsed.frame["rating"].to_list() == [4.0, 3.0]


def test_bad_parquet_value_is_named_by_row(tmp_path):
    pq.write_table(pa.table({"userId": [1, None], "movieId": [10, 20], "rating": [4.0, 3.0]}), tmp_path / "r.parquet")
    with pytest.raises(DataError) as err:
        read_ratings(str(tmp_path / "r.parquet"))
    assert "user id is missing" in str(err.value) and "r.parquet, row 2" in str(err.value)


# --- what real files look like: byte-order marks, line ends, compression, damaged containers ------------------

CSV = HEADER + "1,10,4.0,100\n1,20,3.5,200\n2,10,5,300\n"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("bom.csv", codecs.BOM_UTF8 + CSV.encode()),  # Excel's "CSV UTF-8"
        ("utf16.csv", CSV.encode("utf-16")),  # Excel's "Unicode text"
        ("cr.csv", CSV.replace("\n", "\r").encode()),  # old Mac line ends
        ("mixed.csv", CSV.replace("\n", "\r\n", 2).encode()),
        ("ratings.csv.gz", gzip.compress(CSV.encode())),
        ("gzipped.csv", gzip.compress(CSV.encode())),  # told by its bytes, not its name
        ("bzipped.csv", bz2.compress(CSV.encode())),
        ("tagged.csv", CSV.replace("timestamp\n", "timestamp,tag\n").replace("00\n", "00,café\n").encode("latin-1")),
    ],
    ids=["utf8-bom", "utf16", "cr-only", "crlf-and-lf", "gz-name", "gzip-bytes", "bzip2-bytes", "latin1-unread-column"],
)
def test_boms_line_ends_and_compression_read_as_the_plain_file(tmp_path, name, data):
    path = _write(tmp_path / name, data)
    assert _ratings(path).equals(EXPECTED)


def test_a_bad_line_of_a_cr_only_file_is_named_by_its_line(tmp_path):
    path = _write(tmp_path / "r.csv", (HEADER + "1,10,4,100\n1,20,x,200\n").replace("\n", "\r"))
    with pytest.raises(DataError, match="rating 'x' is not a number") as err:
        read_ratings(str(path))
    assert err.value.where == f"{path}, line 3"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (zipped({"ratings.csv": CSV.encode() * 50}, damage_first_member), "cannot read ratings.csv from"),
        (zipped({"ratings.csv": CSV.encode()}, lambda b: set_zip_field(b, 6, 8, 1)), "encrypted"),
        (zipped({"ratings.csv": CSV.encode()}, lambda b: set_zip_field(b, 8, 10, 99)), "compression method"),
        (zipped({}), "no ratings file"),
        (zipped({"ratings.csv": CSV.encode()})[:100], "not a readable zip file"),
    ],
    ids=["bad-crc", "encrypted", "aes-method", "empty", "truncated"],
)
def test_unreadable_zips_are_data_errors_naming_the_member(tmp_path, data, words):
    path = _write(tmp_path / "ml.zip", data)
    with pytest.raises(DataError, match=words) as err:
        read_ratings(str(path))
    assert str(path) in err.value.where and err.value.fix


@pytest.mark.parametrize(
    ("column", "values"),
    [("userId", [[1], [1], [2]]), ("rating", [{"v": 4.0}] * 3), ("movieId", [b"10", b"20", b"10"])],
    ids=["list-ids", "struct-rating", "binary-ids"],
)
def test_nested_or_binary_parquet_columns_are_refused_naming_the_column(tmp_path, column, values):
    table = {"userId": [1, 1, 2], "movieId": [10, 20, 10], "rating": [4.0, 3.5, 5.0], column: values}
    pq.write_table(pa.table(table), tmp_path / "r.parquet")
    with pytest.raises(DataError, match=f"column '{column}' of .* holds") as err:
        read_ratings(str(tmp_path / "r.parquet"))
    assert err.value.where.endswith(f"column {column}") and "--" in err.value.fix


def test_parquet_datetime_timestamps_become_epoch_seconds(tmp_path):
    stamps = pa.array([100_000, 200_000, 300_000], pa.timestamp("ms", tz="UTC"))
    table = pa.table({"userId": [1, 1, 2], "movieId": [10, 20, 10], "rating": [4.0, 3.5, 5.0], "timestamp": stamps})
    pq.write_table(table, tmp_path / "r.parquet")
    assert _ratings(tmp_path / "r.parquet").equals(EXPECTED)


@pytest.mark.parametrize(
    ("content", "words", "fix"),
    [
        ("userId,userId,rating,timestamp\n1,10,4,100\n", "names column 'userId' twice", "its own name"),
        ("userId;movieId;rating\n1;10;4\n", "holds ';'", "--separator ';'"),
        ("userid,movieId,rating\n1,10,4\n", "no user id column 'userId'", "--user-col userid"),
    ],
)
def test_headers_that_cannot_be_right_name_the_fix(tmp_path, content, words, fix):
    with pytest.raises(DataError, match=words) as err:
        read_ratings(str(_write(tmp_path / "r.csv", content)))
    assert fix in err.value.fix


def test_an_id_beyond_int64_says_so(tmp_path):
    path = _write(tmp_path / "r.csv", HEADER + "1,10,4,100\n99999999999999999999,10,4,100\n")
    with pytest.raises(DataError, match="not an integer within int64") as err:
        read_ratings(str(path))
    assert err.value.where == f"{path}, line 3"


def test_unknown_extension_asks_for_the_format(tmp_path):
    with pytest.raises(DataError, match="source.format"):
        layout_for("ratings.txt")
    assert layout_for("ratings.txt", "tsv").separator == "\t"


# --- the registry -------------------------------------------------------------------------------------------


def test_registry_releases_and_their_layout():
    names = [r.name for r in releases()]
    assert names == ["ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest-small", "ml-latest"]
    ml20 = get_release("ml-20m")
    assert ml20.md5 == "cd245b17a1ae2cc31bb14903e1204af3"
    assert ml20.url == "https://files.grouplens.org/datasets/movielens/ml-20m.zip"
    assert (ml20.ratings_member, ml20.format, ml20.separator, ml20.header) == ("ml-20m/ratings.csv", "csv", ",", True)
    assert get_release("ml-100k").rating_scale == (1.0, 5.0) and get_release("ml-10m").rating_step == 0.5
    assert get_release("ml-1m").separator == "::" and not get_release("ml-1m").header
    assert get_release("ml-10m").ratings_member == "ml-10M100K/ratings.dat"


def test_unknown_release_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'ml-20m'"):
        get_release("ml20m")


# --- load_source ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{}, {"dataset": "ml-20m", "path": "x.csv"}, {"path": "x.csv", "train_path": "t.csv", "test_path": "u.csv"},
     {"test_path": "u.csv"}],
)
def test_exactly_one_source(fields):
    with pytest.raises(ConfigError, match="source"):
        load_source(SourceConfig(**fields), SynthConfig())


def test_given_split_concatenates_with_a_split_column(tmp_path):
    train = _write(tmp_path / "train.csv", HEADER + "1,10,4,100\n1,20,3.5,200\n")
    test = _write(tmp_path / "test.csv", HEADER + "2,10,5,300\n")
    raw = load_source(SourceConfig(train_path=str(train), test_path=str(test)), SynthConfig())
    frame = raw.ratings.collect()
    assert frame.drop("split").equals(EXPECTED)
    assert frame["split"].to_list() == ["train", "train", "test"]
    assert raw.locate(1) == f"{train}, line 3"
    assert raw.locate(2) == f"{test}, line 2"


def test_given_split_without_test_file(tmp_path):
    train = _write(tmp_path / "train.csv", HEADER + "1,10,4,100\n")
    with pytest.raises(ConfigError, match="test_path"):
        load_source(SourceConfig(train_path=str(train)), SynthConfig())


def test_synthetic_columns_are_mapped():
    synth = SynthConfig(n_users=30, n_items=20, n_ratings=300, min_user_ratings=5, seed=3)
    raw = load_source(SourceConfig(dataset="synthetic"), synth)
    frame = raw.ratings.collect()
    assert frame.schema == RAW_SCHEMA
    assert frame.height == 300
    assert raw.items.collect().schema == pl.Schema(RAW_ITEMS)
    assert raw.checksum == load_source(SourceConfig(dataset="synthetic"), synth).checksum


def test_release_from_the_cache_without_network(tmp_path, monkeypatch):
    with socket.socket() as s:  # a mirror nobody answers on: the cached zip must be enough
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("RECDIST_GROUPLENS_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    with zipfile.ZipFile(tmp_path / "ml-latest-small.zip", "w") as z:
        z.writestr("ml-latest-small/ratings.csv", HEADER + "1,10,4,100\n1,20,3.5,200\n2,10,5,300\n")
        z.writestr("ml-latest-small/movies.csv", "movieId,title,genres\n10,A,Drama\n20,B,Comedy\n")
    raw = load_source(SourceConfig(dataset="ml-latest-small", cache_dir=str(tmp_path)), SynthConfig())
    assert raw.ratings.collect().equals(EXPECTED)
    assert raw.items.collect().height == 2
    assert raw.name == "ml-latest-small" and raw.rating_scale == (0.5, 5.0)
    assert raw.checksum.startswith("sha256:")
    assert raw.locate(0) == f"ml-latest-small/ratings.csv in {tmp_path / 'ml-latest-small.zip'}, line 2"


# --- typed Parquet columns as pandas and Arrow write them (issue 18 item 4) -----------------------------------


def _parquet(path: Path, **columns: object) -> Path:
    table = {"userId": [1, 1, 2], "movieId": [10, 20, 10], "rating": [4.0, 3.5, 5.0], "timestamp": [100, 200, 300]}
    pq.write_table(pa.table({**table, **columns}), path)
    return path


def test_dictionary_encoded_text_ids_read_as_their_values_not_their_codes(tmp_path):
    ids = pa.array(["1", "1", "2"]).dictionary_encode()  # a pandas `category` column; was a ComputeError traceback
    assert _ratings(_parquet(tmp_path / "r.parquet", userId=ids)).equals(EXPECTED)
    words = pa.array(["ann", "ann", "bob"]).dictionary_encode()
    with pytest.raises(DataError, match="user id 'ann' is not an integer") as err:
        read_ratings(str(_parquet(tmp_path / "w.parquet", userId=words)))
    assert err.value.where.endswith("row 1")


def test_float_id_and_timestamp_columns_take_whole_numbers_and_name_the_row_of_a_bad_one(tmp_path):
    # pandas writes an integer column holding a missing value as float64; whole numbers are the ids they say
    floats = _parquet(tmp_path / "f.parquet", userId=[1.0, 1.0, 2.0], timestamp=[100_000.0, 200_000.0, 300_000.0])
    assert _ratings(floats).equals(EXPECTED.with_columns(pl.col("timestamp") * 1000))  # ms: prepare converts
    nan_stamp = _ratings(_parquet(tmp_path / "t.parquet", timestamp=[100.0, float("nan"), 300.0]))
    assert nan_stamp["timestamp"].to_list() == [100, None, 300]  # a missing timestamp, as an empty CSV field
    for column, values, words in [
        ("userId", [1.0, float("nan"), 2.0], "user id is missing"),  # was: "user id '1.0' is not an integer", row 1
        ("userId", [1.0, float("inf"), 2.0], "user id inf is not a finite number"),
        ("userId", [1.0, 2.0**60, 2.0], "beyond 2\\^53"),
        ("movieId", [10.0, 20.5, 10.0], "item id 20.5 is not a whole number"),
        ("timestamp", [100.0, float("-inf"), 300.0], "timestamp -inf is not a finite number"),
    ]:
        path = _parquet(tmp_path / "bad.parquet", **{column: values})
        with pytest.raises(DataError, match=words) as err:
            read_ratings(str(path))
        assert err.value.where == f"{path}, row 2", (column, values)


def test_typed_integer_and_float_columns_are_checked_for_missing_values_only(tmp_path):
    ints = {"userId": pa.array([1, 1, 2], pa.int32()), "rating": pa.array([4, 3, 5], pa.int8())}
    small = _parquet(tmp_path / "i.parquet", **ints)
    assert _ratings(small).equals(EXPECTED.with_columns(rating=pl.Series([4.0, 3.0, 5.0], dtype=pl.Float32)))
    stamps = _ratings(_parquet(tmp_path / "t.parquet", timestamp=pa.array([100, None, 300], pa.int64())))
    assert stamps["timestamp"].to_list() == [100, None, 300]  # a missing timestamp is allowed
    for column, values, words in [
        ("rating", pa.array([4.0, None, 5.0], pa.float64()), "rating is missing"),
        ("movieId", pa.array([10, None, 10], pa.int16()), "item id is missing"),
        ("userId", pa.array([1, 2**63 + 5, 2], pa.uint64()), "user id '9223372036854775813' is not an integer"),
    ]:
        path = _parquet(tmp_path / "bad.parquet", **{column: values})
        with pytest.raises(DataError, match=words) as err:
            read_ratings(str(path))
        assert err.value.where == f"{path}, row 2", (column, values)


def test_parquet_movies_files_are_checked_like_ratings_and_take_list_genres(tmp_path):
    movies = {"movieId": [10, 20], "title": ["Ten", "Twenty"], "genres": [["Drama"], ["Comedy", "Drama"]]}
    pq.write_table(pa.table(movies), tmp_path / "movies.parquet")
    items = read_items(str(tmp_path / "movies.parquet"))
    assert items.frame.rows() == [(10, "Ten", "Drama"), (20, "Twenty", "Comedy|Drama")]
    pq.write_table(pa.table({**movies, "movieId": [[10], [20]]}), tmp_path / "nested.parquet")
    with pytest.raises(DataError, match="column 'movieId' of .* holds List") as err:  # was an InvalidOperationError
        read_items(str(tmp_path / "nested.parquet"))
    assert err.value.where.endswith("column movieId")
    sink = io.BytesIO()
    pq.write_table(pa.table(movies), sink)
    path = _write(tmp_path / "ml.zip", zipped({"ratings.csv": CSV.encode(), "movies.parquet": sink.getvalue()}))
    _, items = read_ratings(str(path))  # was parsed as text
    assert items is not None and items.frame["genres"].to_list() == ["Drama", "Comedy|Drama"]


def test_utf16_without_a_byte_order_mark_is_refused_saying_so(tmp_path):
    path = _write(tmp_path / "r.csv", CSV.encode("utf-16-le"))  # was: "no user id column 'userId'" and NUL garbage
    with pytest.raises(DataError, match="NUL bytes: it is UTF-16 or UTF-32 text without a byte-order mark") as err:
        read_ratings(str(path))
    assert err.value.where == f"{path}, line 1" and "UTF-8" in err.value.fix
