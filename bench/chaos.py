"""Chaos bench: bad inputs through the real `recdist prepare` (a subprocess on real files), corruptions of a finished
run and kills of its driver and workers (real `recdist pipeline` processes), one verdict per case.

    .venv/bin/python bench/chaos.py                    # every section: bad-input, corruption, kill
    .venv/bin/python bench/chaos.py --section kill --jobs 1 --timeout 1800   # the kills, on a loaded machine
    .venv/bin/python bench/chaos.py -k zip -k bom      # the cases whose name holds `zip` or `bom`
    .venv/bin/python bench/chaos.py --list             # the cases and what each one expects
    .venv/bin/python bench/chaos.py --jobs 1 --keep    # one at a time; keep the temp directory

Per case it prints the exit code, whether the message has what/where/fix (`error:` + `where:` + `fix:`), what
was left behind (an --out that a refusal created or changed, `*.staging-*` / `*.tmp-*` / `*.old-*` anywhere
beside or under it), and the verdict; then per section "N of M ... , K tracebacks". A refused case is clean
when it exits 2 with what/where/fix, no traceback and nothing left; a handled case when it exits 0 and its
check of the prepared dataset passes (e.g. millisecond timestamps came out as seconds).

Scenarios live in a small registry (`SECTIONS`, `scenario()`): a kill or corruption section adds its own
Section and registers functions `(case_dir, env) -> Outcome`; `bad_input()` is the helper of this one.
Cases that mount a tmpfs (full disk, read-only --out) need root and are skipped otherwise; s3:// cases run
against a moto S3 server started here on 127.0.0.1 with fake keys (skipped where moto is missing).
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
"""Seconds one `recdist` process may take (--timeout: a loaded machine needs more for the pipeline runs)."""
sys.path.insert(0, str(ROOT))

from recdist.train.watchdog import alive, descendants  # noqa: E402  (this checkout's recdist)

sys.path.insert(0, str(ROOT / "tests"))
from helpers import damage_first_member, set_zip_field, zipped  # noqa: E402  (the tests' zip builders)

# --- the registry ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """A group of scenarios and how its final count reads: 'N of M <noun> <goal>, K tracebacks'."""

    noun: str
    goal: str


@dataclass
class Outcome:
    """What one scenario did: its verdict (ok / FAIL / skipped) and the figures printed for it."""

    verdict: str
    exit: int | None = None
    wwf: bool | None = None
    """The message has what, where and fix."""
    traceback: bool = False
    leftovers: list[str] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class Scenario:
    section: str
    name: str
    expect: str
    """One line: what the input is and what should happen."""
    run: Callable[[Path, dict[str, str]], Outcome]
    needs: tuple[str, ...] = ()
    """'root' (mounts a tmpfs), 's3' (the moto server)."""


SECTIONS: dict[str, Section] = {"bad-input": Section("bad inputs", "refused clearly or handled correctly")}
SCENARIOS: list[Scenario] = []


def scenario(section: str, name: str, expect: str, needs: tuple[str, ...] = ()):
    """Register `fn(case_dir, env) -> Outcome` as a scenario of `section`."""

    def register(fn: Callable[[Path, dict[str, str]], Outcome]) -> Callable[[Path, dict[str, str]], Outcome]:
        assert section in SECTIONS and all(s.name != name for s in SCENARIOS), name
        SCENARIOS.append(Scenario(section, name, expect, fn, needs))
        return fn

    return register


# --- running `recdist` and judging what it did ------------------------------------------------------------------


def recdist(*args: str, env: dict[str, str], max_file_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m recdist ARGS` in a fresh interpreter with this checkout first on the path.

    `max_file_bytes` sets RLIMIT_FSIZE in the child (`ulimit -f`): a write past it fails with EFBIG, as a full
    disk fails with ENOSPC, without root or a tmpfs (Python ignores SIGXFSZ, so the write returns the error)."""
    full = {**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "recdist", *args], capture_output=True, text=True, env=full, timeout=TIMEOUT_S,
        preexec_fn=limit if max_file_bytes else None,
    )  # fmt: skip


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` with its bytes (None when `path` does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def stray(path: Path) -> list[str]:
    """Temporaries of an output: staging / tmp / old siblings of `path` and anything of the kind under it."""
    if not path.parent.is_dir():
        return []
    names = [p for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.")]
    if path.is_dir():
        names += list(path.rglob("*"))
    return sorted(str(p) for p in names if any(t in p.name for t in (".staging-", ".tmp-", ".old-")))


def judge(proc: subprocess.CompletedProcess[str], out: Path, before: Any, check: Callable | None) -> Outcome:
    """The verdict of one prepare run: refused clearly and nothing left, or handled and the check passes."""
    err = proc.stderr
    traceback = "Traceback (most recent call last)" in err
    wwf = "error:" in err and "\n  where: " in err and "\n  fix:   " in err
    left = stray(out)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    note = next((ln for ln in err.splitlines() if ln.startswith("error:")), last)
    if check is None:  # a refusal: out as it was before
        if snapshot(out) != before:
            left.append(f"{out} {'created' if before is None else 'changed'}")
        ok = proc.returncode == 2 and wwf and not traceback and not left
        return Outcome("ok" if ok else "FAIL", proc.returncode, wwf, traceback, left, note)
    if proc.returncode != 0:
        return Outcome("FAIL", proc.returncode, wwf, traceback, left, f"expected success: {note}")
    problem = check(out, json.loads((out / "manifest.json").read_text()))
    ok = not problem and not left
    return Outcome("ok" if ok else "FAIL", 0, None, traceback, left, problem or "handled: " + handled_note(out))


def handled_note(out: Path) -> str:
    m = json.loads((out / "manifest.json").read_text())
    return f"{m['n_ratings']} ratings, splits {m['splits']}"


# --- the bad-input section: helpers that write inputs ---------------------------------------------------------

HEADER = "userId,movieId,rating,timestamp"
T0 = 1_100_000_000
"""Seconds since the epoch of the first rating (2004-11-09)."""


def lines(n_users: int = 5, n_items: int = 8, scale: int = 1, start: int = T0) -> list[str]:
    """Valid rating lines: every user rates every item, a minute apart (timestamps times `scale`)."""
    rows = []
    for u in range(1, n_users + 1):
        for i in range(1, n_items + 1):
            k = (u - 1) * n_items + i
            rows.append(f"{u},{i},{1 + (u * i) % 9 / 2:g},{(start + 60 * k) * scale}")
    return rows


def csv(*extra: str, header: str = HEADER, eol: str = "\n", body: list[str] | None = None) -> bytes:
    """A ratings CSV: the header, valid lines (or `body`), then `extra` lines."""
    return (eol.join([header, *(lines() if body is None else body), *extra]) + eol).encode()


def parquet(**columns: Any) -> bytes:
    """A Parquet file of the given columns (lists or pyarrow arrays); defaults fill userId..timestamp."""
    n = len(next(iter(columns.values()))) if columns else 4
    base = {"userId": [1, 1, 2, 2][:n], "movieId": [1, 2, 1, 2][:n], "rating": [4.0, 3.5, 5.0, 2.0][:n]}
    table = pa.table({**base, **columns})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


Files = dict[str, bytes | Callable[[Path], None]]
Check = Callable[[Path, dict], "str | None"]


def bad_input(
    name: str,
    expect: str,
    files: Files,
    *args: str,
    check: Callable[[Path, dict], str | None] | None = None,
    mount: Callable[[Path], contextlib.AbstractContextManager[Path]] | None = None,
    needs: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    before: Files | None = None,
    max_file_bytes: int | None = None,
) -> None:
    """Register one `recdist prepare` case. `files` are written under the case directory (bytes, or a function
    of the path that writes it); `args` may hold {d} (the case directory) and {s3} (a fresh bucket's URI).
    `check` None: the input must be refused; else it must be handled and check(out, manifest) return None.
    `mount` makes the directory --out lives in; `before` files are put in --out before the run; `max_file_bytes`
    limits the size of any file recdist writes (RLIMIT_FSIZE)."""

    def run(d: Path, shared_env: dict[str, str]) -> Outcome:
        for rel, content in files.items():
            path = d / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            content(path) if callable(content) else path.write_bytes(content)
        with mount(d) if mount else contextlib.nullcontext(d) as home:
            out = home / "out"
            for rel, content in (before or {}).items():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(content)  # type: ignore[arg-type]
            if any("--out" == a for a in args):
                out = Path(args[args.index("--out") + 1].format(d=d))
            before_state = snapshot(out)
            bucket = shared_env.get("S3_BUCKET", "")
            argv = [a.format(d=d, s3=bucket) for a in args]
            if "--out" not in args:
                argv += ["--out", str(out)]
            proc = recdist("prepare", *argv, "-q", env={**shared_env, **(env or {})}, max_file_bytes=max_file_bytes)
            return judge(proc, out, before_state, check)

    scenario("bad-input", name, expect, needs)(run)


@contextlib.contextmanager
def read_only(d: Path) -> Iterator[Path]:
    """A directory recdist may not write: a read-only tmpfs as root (whom permissions do not stop), else d/ro
    with mode 0555 (EACCES); its mode restored at the end so the temp directory can be removed."""
    if os.geteuid() == 0:
        with tmpfs(d, "1m", read_only=True) as where:
            yield where
        return
    where = d / "ro"
    where.mkdir()
    where.chmod(0o555)
    try:
        yield where
    finally:
        where.chmod(0o755)


@contextlib.contextmanager
def tmpfs(d: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` mounted at d/mnt (read-only after mounting when asked); unmounted at the end."""
    where = d / "mnt"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


# --- checks of handled cases ------------------------------------------------------------------------------


def ratings_of(out: Path) -> pa.Table:
    return pq.read_table(out / "ratings")


def n_ratings(n: int) -> Callable[[Path, dict], str | None]:
    return lambda out, m: None if m["n_ratings"] == n else f"expected {n} ratings, got {m['n_ratings']}"


def seconds(out: Path, m: dict) -> str | None:
    """Timestamps came out as the seconds of `lines()`."""
    ts = ratings_of(out)["timestamp"].to_pylist()
    want = (T0 + 60, T0 + 60 * 40)
    return None if (min(ts), max(ts)) == want else f"timestamps {min(ts)}..{max(ts)}, expected {want[0]}..{want[1]}"


def in_seconds(out: Path, m: dict) -> str | None:
    """Every timestamp of parquet() came out as T0 seconds."""
    ts = set(ratings_of(out)["timestamp"].to_pylist())
    return None if ts == {T0} else f"timestamps {sorted(ts)}, expected {T0}"


def all_of(*checks: Callable[[Path, dict], str | None]) -> Callable[[Path, dict], str | None]:
    return lambda out, m: next((p for c in checks if (p := c(out, m))), None)


def carved(share_ok: bool) -> Callable[[Path, dict], str | None]:
    """A given split without a val file: val rows carved out of train (share_ok) or none at all."""

    def check(out: Path, m: dict) -> str | None:
        val = m["splits"]["val"]
        if share_ok and not (val > 0 and m.get("val_carved_from_train")):
            return f"no validation carved out of train: splits {m['splits']}"
        if not share_ok and val:
            return f"val_fraction 0 still carved {val} rows"
        return None

    return check


def user_ids(*want: int) -> Check:
    """users.parquet holds exactly these original ids (dictionary codes or float ids read as their values)."""

    def check(out: Path, m: dict) -> str | None:
        got = sorted(pq.read_table(out / "users.parquet")["user_id"].to_pylist())
        return None if got == sorted(want) else f"user ids {got}, expected {sorted(want)}"

    return check


def null_timestamps(n: int) -> Check:
    def check(out: Path, m: dict) -> str | None:
        got = ratings_of(out)["timestamp"].null_count
        return None if got == n else f"{got} null timestamps, expected {n}"

    return check


def genres(want: str) -> Check:
    def check(out: Path, m: dict) -> str | None:
        got = set(pq.read_table(out / "items.parquet")["genres"].to_pylist())
        return None if want in got else f"genres {sorted(map(str, got))}, expected {want!r} among them"

    return check


def ids_kept(out: Path, m: dict) -> str | None:
    users = pq.read_table(out / "users.parquet")["user_id"].to_pylist()
    return None if max(users) == 2**63 - 1 else f"largest user id {max(users)}, expected 2^63-1"


GOOD = csv()
"""40 valid ratings of 5 users on 8 movies."""
N = 40
MIXED = lines()[:20] + lines(scale=1000)[20:]
ZSTD = pa.compress(GOOD, "zstd", asbytes=True)
MOVIES = b"movieId,title,genres\n" + b"".join(f"{i},Movie {i * 7919 % 10007},Comedy|Drama\n".encode()
                                             for i in range(1, 2000))  # fmt: skip
"""A movies.csv of 1,999 movies, long enough that damage in its middle hits its compressed bytes."""


def table_bytes(**columns: Any) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


MOVIES_PARQUET = table_bytes(movieId=list(range(1, 9)), title=[f"Movie {i}" for i in range(1, 9)],
                             genres=[["Comedy", "Drama"]] * 8)  # fmt: skip
TAGGED = csv(header=HEADER + ",tag", body=[ln + ",caf\xe9" for ln in lines()]).replace(b"caf\xc3\xa9", b"caf\xe9")
P = pa.array

#: One input file through `recdist prepare --path FILE FLAGS`: (name, what should happen, file name, its bytes,
#: extra flags, check). check None: it must be refused; else handled, and check(out, manifest) returns None.
ONE_FILE: list[tuple[str, str, str, bytes, tuple[str, ...], Check | None]] = [
    *[(f"rating-{v}", f"a rating {v}: refused", "r.csv", csv(f"1,9,{v},{T0}"), (), None)
      for v in ("inf", "nan", "-inf", "NaN", "Infinity")],
    ("rating-inf-with-infinite-scale", "the fix the old message gave, an infinite scale: a config error",
     "r.csv", csv(f"1,9,inf,{T0}"), ("--set", "source.rating_scale=[0.5,.inf]"), None),
    ("scale-nan", "rating_scale [nan, 5]: a config error", "r.csv", GOOD, ("--set", "source.rating_scale=[.nan,5]"),
     None),
    ("scale-reversed", "rating_scale [5, 0.5]: a config error", "r.csv", GOOD, ("--set", "source.rating_scale=[5,0.5]"),
     None),
    *[(name, f"a line {line!r}: refused, the line named", "r.csv", csv(line), (), None) for name, line in (
        ("rating-text", "1,9,good,0"), ("rating-empty", "1,9,,0"), ("rating-out-of-scale", "1,9,7,0"),
        ("rating-comma-decimal", '1,9,"3,5",0'), ("user-float", "1.5,9,4,0"), ("user-float-integral", "1.0,9,4,0"),
        ("user-negative", "-3,9,4,0"), ("user-above-int64", "99999999999999999999,9,4,0"), ("user-text", "u1,9,4,0"),
        ("user-missing", ",9,4,0"), ("item-negative", "1,-9,4,0"), ("timestamp-date", "1,9,4,2004-11-09"),
        ("timestamp-float", "1,9,4,1100000000.5"), ("timestamp-above-int64", "1,9,4,99999999999999999999"),
        ("ragged-line", "1,9,4,0,extra"), ("short-line", "1,9"), ("blank-line-inside", "\n1,9,4,0"),
    )],
    ("id-int64-max", "a user id of 2^63-1: handled, kept exactly", "r.csv", csv(f"{2**63 - 1},1,4,{T0}"), (),
     all_of(n_ratings(N + 1), ids_kept)),
    ("timestamps-empty-some", "some empty timestamps: handled (null)", "r.csv", csv("1,9,4,"), (), n_ratings(N + 1)),
    *[(f"timestamps-{unit}", f"timestamps in {unit}: converted to seconds", "r.csv", csv(body=lines(scale=scale)), (),
       seconds) for unit, scale in (("ms", 1000), ("us", 10**6), ("ns", 10**9))],
    ("timestamps-mixed-units", "seconds and milliseconds in one file: refused", "r.csv", csv(body=MIXED), (), None),
    ("timestamps-before-1970", "negative timestamps (1969): handled as seconds", "r.csv",
     csv(body=lines(start=-(10**6))), (), n_ratings(N)),
    ("empty-file", "a 0-byte file: refused", "r.csv", b"", (), None),
    ("header-only", "a header and no data: refused", "r.csv", csv(body=[]), (), None),
    ("blank-lines-only", "only blank lines: refused", "r.csv", b"\n\n\n", (), None),
    ("utf8-bom", "a UTF-8 BOM: handled", "r.csv", b"\xef\xbb\xbf" + GOOD, (), n_ratings(N)),
    ("utf16", "UTF-16 with a BOM (Excel's 'Unicode text'): handled", "r.csv", GOOD.decode().encode("utf-16"), (),
     n_ratings(N)),
    ("cr-only", "old-Mac CR line endings: handled", "r.csv", csv(eol="\r"), (), n_ratings(N)),
    ("crlf", "Windows CRLF line endings: handled", "r.csv", csv(eol="\r\n"), (), n_ratings(N)),
    ("mixed-endings", "CRLF and LF mixed: handled", "r.csv", GOOD.replace(b"\n", b"\r\n", 10), (), n_ratings(N)),
    ("nul-bytes", "NUL bytes inside: refused", "r.csv", GOOD[:60] + b"\0\0\0" + GOOD[60:], (), None),
    ("binary-garbage", "random bytes named .csv: refused", "r.csv", bytes(range(256)) * 8, (), None),
    ("html-page", "an HTML error page saved as ratings.csv: refused", "r.csv",
     b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n", (), None),
    ("gzip-named-gz", "ratings.csv.gz: handled (gunzipped)", "ratings.csv.gz", gzip.compress(GOOD), (), n_ratings(N)),
    ("gzip-named-csv", "gzip bytes named .csv: handled", "r.csv", gzip.compress(GOOD), (), n_ratings(N)),
    ("bzip2-named-csv", "bzip2 bytes named .csv: handled", "r.csv", bz2.compress(GOOD), (), n_ratings(N)),
    ("gzip-truncated", "half a gzip file: refused", "r.csv.gz", gzip.compress(GOOD)[:60], (), None),
    ("semicolons", "a ;-separated file named .csv: refused, naming --separator", "r.csv", GOOD.replace(b",", b";"),
     (), None),
    ("tabs-in-csv", "a tab-separated file named .csv: refused, naming --separator", "r.csv",
     GOOD.replace(b",", b"\t"), (), None),
    ("duplicate-columns", "the header names userId twice: refused", "r.csv",
     csv(header="userId,userId,rating,timestamp"), (), None),
    ("header-case", "userid instead of userId: refused, suggesting the column", "r.csv",
     csv(header="userid,movieid,rating,timestamp"), (), None),
    ("quoted-fields", "every field quoted: handled", "r.csv",
     csv(body=['"' + ln.replace(",", '","') + '"' for ln in lines()]), (), n_ratings(N)),
    ("extra-columns", "an extra tag column: handled", "r.csv",
     csv(header=HEADER + ",tag", body=[ln + ",x" for ln in lines()]), (), n_ratings(N)),
    ("latin1-extra-column", "latin-1 bytes in a column not read: handled", "r.csv", TAGGED, (), n_ratings(N)),
    ("unknown-extension", "ratings.txt: refused, naming source.format", "ratings.txt", GOOD, (), None),
    ("csv-as-parquet", "--set source.format=parquet on a CSV: refused", "r.csv", GOOD,
     ("--set", "source.format=parquet"), None),
    ("user-col-missing", "--user-col uid on a file without it: refused", "r.csv", GOOD, ("--user-col", "uid"), None),
    ("user-col-position", "--user-col 9 on a 4-column file: refused", "r.tsv", b"1\t2\t3\t4\n", ("--user-col", "9"),
     None),
    ("no-header-on-header", "--no-header on a file with a header: refused at line 1", "r.csv", GOOD, ("--no-header",),
     None),
    ("one-rating", "a single rating: handled", "r.csv", csv(body=[f"1,1,4,{T0}"]), (), n_ratings(1)),
    ("filters-remove-all", "--min-user-ratings 1000 leaves no rating: refused", "r.csv", GOOD,
     ("--min-user-ratings", "1000"), None),
    ("time-split-no-timestamps", "--split time with --timestamp-col '': refused", "r.csv", GOOD,
     ("--split", "time", "--timestamp-col", ""), None),
    ("fractions-sum-1", "--val-fraction 0.5 --test-fraction 0.5: refused", "r.csv", GOOD,
     ("--val-fraction", "0.5", "--test-fraction", "0.5"), None),
    ("shards-0", "--shards 0: refused", "r.csv", GOOD, ("--shards", "0"), None),
    ("zip-corrupt-member", "a zip whose ratings.csv is damaged: refused", "z.zip",
     zipped({"ratings.csv": GOOD * 20}, damage_first_member), (), None),
    ("zip-truncated", "the first half of a zip: refused", "z.zip", zipped({"ratings.csv": GOOD})[:200], (), None),
    ("zip-empty", "a zip with no members: refused", "z.zip", zipped({}), (), None),
    ("zip-no-ratings", "a zip without a ratings file: refused", "z.zip", zipped({"README.txt": b"hi"}), (), None),
    ("zip-encrypted", "a zip whose ratings.csv is encrypted: refused", "z.zip",
     zipped({"ratings.csv": GOOD}, lambda b: set_zip_field(b, 6, 8, 1)), (), None),
    ("zip-unsupported-method", "a zip member compressed by an unknown method (AES, 99): refused", "z.zip",
     zipped({"ratings.csv": GOOD}, lambda b: set_zip_field(b, 8, 10, 99)), (), None),
    ("zip-nested-folder", "a zip holding ml-x/ratings.csv: handled", "z.zip", zipped({"ml-x/ratings.csv": GOOD}), (),
     n_ratings(N)),
    ("zip-header-only-member", "a zip whose ratings.csv has only a header: refused", "z.zip",
     zipped({"ratings.csv": csv(body=[])}), (), None),
    ("parquet-list-ids", "a list-typed user id column: refused", "r.parquet", parquet(userId=[[1], [1], [2], [2]]), (),
     None),
    ("parquet-struct-rating", "a struct-typed rating column: refused", "r.parquet", parquet(rating=[{"v": 1.0}] * 4),
     (), None),
    ("parquet-rating-numeric-strings", "the rating as strings '4.5': handled", "r.parquet",
     parquet(rating=["4.5", "3", "5", "2"]), (), n_ratings(4)),
    ("parquet-rating-text", "the rating as strings 'good': refused", "r.parquet",
     parquet(rating=["good", "3", "5", "2"]), (), None),
    ("parquet-rating-nan", "a NaN rating: refused", "r.parquet", parquet(rating=[4.0, float("nan"), 5.0, 2.0]), (),
     None),
    ("parquet-rating-inf", "an inf rating: refused", "r.parquet", parquet(rating=[4.0, float("inf"), 5.0, 2.0]), (),
     None),
    ("parquet-uint64-huge-id", "a uint64 user id above int64: refused", "r.parquet",
     parquet(userId=P([1, 2**64 - 1, 2, 2], pa.uint64())), (), None),
    ("parquet-float-ids", "user ids 1.5: refused", "r.parquet", parquet(userId=[1.5, 1.0, 2.0, 2.0]), (), None),
    ("parquet-null-id", "a null item id: refused", "r.parquet", parquet(movieId=[1, None, 1, 2]), (), None),
    ("parquet-no-rows", "a Parquet file with no rows: refused", "r.parquet",
     parquet(userId=P([], pa.int64()), movieId=P([], pa.int64()), rating=P([], pa.float64())), (), None),
    ("parquet-truncated", "the first half of a Parquet file: refused", "r.parquet", parquet()[:300], (), None),
    ("parquet-datetime-timestamps", "a timestamp[ms] (datetime) column: handled as seconds", "r.parquet",
     parquet(timestamp=P([T0 * 1000] * 4, pa.timestamp("ms"))), (), in_seconds),
    ("parquet-ms-timestamps", "int64 millisecond timestamps: converted to seconds", "r.parquet",
     parquet(timestamp=[T0 * 1000 + k for k in range(4)]), (), in_seconds),
    ("parquet-decimal-rating", "a decimal128 rating: handled", "r.parquet",
     parquet(rating=P([4, 3, 5, 2], pa.decimal128(3, 1))), (), n_ratings(4)),
    # added with issue 18 item 4: typed Parquet columns as pandas and Arrow write them
    ("parquet-dictionary-text-ids", "user ids dictionary-encoded text '10','20' (pandas category): handled, the "
     "values (not the codes)", "r.parquet", parquet(userId=P(["10", "20", "10", "20"]).dictionary_encode()), (),
     user_ids(10, 20)),
    ("parquet-dictionary-word-ids", "user ids dictionary-encoded words 'ann','bob': refused", "r.parquet",
     parquet(userId=P(["ann", "bob", "ann", "bob"]).dictionary_encode()), (), None),
    ("parquet-float-whole-ids", "user ids 1.0, 2.0 in a float64 column (pandas, a NaN elsewhere): handled",
     "r.parquet",
     parquet(userId=[1.0, 1.0, 2.0, 2.0]), (), user_ids(1, 2)),
    ("parquet-float-id-nan", "a NaN user id in a float64 column: refused as missing, its row named", "r.parquet",
     parquet(userId=[1.0, float("nan"), 2.0, 2.0]), (), None),
    ("parquet-float-id-inf", "an inf user id: refused, its row named", "r.parquet",
     parquet(userId=[1.0, float("inf"), 2.0, 2.0]), (), None),
    ("parquet-float-id-2^60", "a float user id 2^60 (beyond a float's exact integers): refused", "r.parquet",
     parquet(userId=[1.0, 2.0**60, 2.0, 2.0]), (), None),
    ("parquet-float-ms-timestamps", "float64 millisecond timestamps: converted to seconds", "r.parquet",
     parquet(timestamp=[T0 * 1000.0] * 4), (), in_seconds),
    ("parquet-float-timestamp-nan", "a NaN timestamp in a float64 column: a missing timestamp (null)", "r.parquet",
     parquet(timestamp=[float(T0), float("nan"), float(T0), float(T0)]), (), null_timestamps(1)),
    ("parquet-float-timestamp-inf", "an inf timestamp: refused, its row named", "r.parquet",
     parquet(timestamp=[float(T0), float("inf"), float(T0), float(T0)]), (), None),
    ("parquet-float-timestamp-fraction", "timestamp 1100000000.5: refused, its row named", "r.parquet",
     parquet(timestamp=[float(T0), T0 + 0.5, float(T0), float(T0)]), (), None),
    ("parquet-bool-ids", "a boolean user id column: refused", "r.parquet", parquet(userId=[True, False, True, False]),
     (), None),
    ("parquet-duration-timestamps", "a duration timestamp column: refused", "r.parquet",
     parquet(timestamp=P([1, 2, 3, 4], pa.duration("s"))), (), None),
    # text oddities beyond the single ones above
    ("utf16-without-bom", "UTF-16 text without a byte-order mark: refused, saying so", "r.csv",
     GOOD.decode().encode("utf-16-le"), (), None),
    ("utf8-bom-cr-only", "a UTF-8 BOM and CR-only line ends together: handled", "r.csv",
     b"\xef\xbb\xbf" + csv(eol="\r"), (), n_ratings(N)),
    ("utf8-bom-quoted-header", 'a BOM before a quoted header "userId",...: handled', "r.csv",
     b"\xef\xbb\xbf" + GOOD.replace(b"userId", b'"userId"', 1), (), n_ratings(N)),
    ("utf8-bom-tsv-no-header", "a BOM on a header-less u.data: handled", "u.data",
     b"\xef\xbb\xbf" + "\n".join(ln.replace(",", "\t") for ln in lines()).encode() + b"\n", (), n_ratings(N)),
    ("utf8-bom-dat", "a BOM on a ::-separated ratings.dat: handled", "ratings.dat",
     b"\xef\xbb\xbf" + "\n".join(ln.replace(",", "::") for ln in lines()).encode() + b"\n", (), n_ratings(N)),
    ("cr-only-no-final-eol", "CR-only line ends, the last line without one: handled", "r.csv", csv(eol="\r")[:-1],
     (), n_ratings(N)),
    ("rating-1e39", "a rating 1e39 (beyond a 32-bit float): refused", "r.csv", csv(f"1,9,1e39,{T0}"), (), None),
    # truncated inputs
    ("csv-truncated-mid-line", "a CSV cut short inside its last line: refused, the line named", "r.csv", GOOD[:-14],
     (), None),
    ("xz-truncated", "half an xz file: refused", "r.csv.xz", lzma.compress(GOOD)[:80], (), None),
    ("bzip2-truncated", "half a bzip2 file: refused", "r.csv.bz2", bz2.compress(GOOD)[:80], (), None),
    ("zstd-truncated", "half a zstd file: refused", "r.csv.zst", ZSTD[: len(ZSTD) // 2], (), None),
    ("parquet-footer-only-damaged", "a Parquet file whose footer is damaged: refused", "r.parquet",
     parquet()[:-12] + b"\0" * 8 + b"PAR1", (), None),
    # zips beyond the single ones above
    ("zip-bom-cr-member", "a zip whose ratings.csv has a BOM and CR-only ends: handled", "z.zip",
     zipped({"ratings.csv": b"\xef\xbb\xbf" + csv(eol="\r")}), (), n_ratings(N)),
    ("zip-corrupt-movies-member", "a zip whose movies.csv is damaged: refused, naming movies.csv", "z.zip",
     zipped({"movies.csv": MOVIES * 40, "ratings.csv": GOOD}, damage_first_member), (), None),
    ("zip-no-central-directory", "a zip cut before its central directory: refused", "z.zip",
     (lambda z: z[: z.find(b"PK\x01\x02")])(zipped({"ratings.csv": GOOD})), (), None),
    ("zip-movies-parquet", "a zip with ratings.csv and a movies.parquet whose genres are lists: handled", "z.zip",
     zipped({"ratings.csv": GOOD, "movies.parquet": MOVIES_PARQUET}), (), genres("Comedy|Drama")),
]  # fmt: skip


def _other_cases() -> None:
    """Directories, split files, outputs, releases and s3://: more than one file or more than --path."""
    r, many = {"r.csv": GOOD}, lines(n_users=20)  # 128 training ratings: 10% of them carves some (32 carved none)
    train, test = csv(body=many[:128]), csv(body=many[128:])
    given = ("--train-path", "{d}/train.csv", "--test-path", "{d}/test.csv")
    no_bucket = "s3://recdist-chaos-no-such-bucket"
    bad_input("dir-no-ratings", "a directory without a ratings file: refused", {"dir/notes.txt": b"x"},
              "--path", "{d}/dir")
    bad_input("dir-empty", "an empty directory: refused", {"dir/.keep": b""}, "--path", "{d}/dir")
    bad_input("dir-bad-movies", "a directory whose movies.csv has a text id: refused",
              {"dir/ratings.csv": GOOD, "dir/movies.csv": b"movieId,title,genres\nx,A,Drama\n"}, "--path", "{d}/dir")
    bad_input("path-missing", "a path that does not exist: refused", {}, "--path", "{d}/nothing.csv")
    bad_input("path-unsupported-scheme", "an http:// path: refused", {}, "--path", "http://example.com/r.csv")
    bad_input("given-no-val", "--train-path/--test-path without a val file: val carved out of train",
              {"train.csv": train, "test.csv": test}, *given, check=carved(True))
    bad_input("given-no-val-fraction-0", "... with --val-fraction 0: no validation rows, handled",
              {"train.csv": train, "test.csv": test}, *given, "--val-fraction", "0", check=carved(False))
    bad_input("given-test-same-as-train", "--test-path the training file again: refused (no training rating left)",
              {"train.csv": train}, "--train-path", "{d}/train.csv", "--test-path", "{d}/train.csv")
    bad_input("given-val-header-only", "a val file with a header and no ratings: refused",
              {"train.csv": train, "test.csv": test, "val.csv": csv(body=[])}, *given, "--val-path", "{d}/val.csv")
    bad_input("items-path-list-ids", "--items-path a Parquet movies file with list-typed ids: refused",
              {**r, "m.parquet": table_bytes(movieId=[[1], [2]], title=["A", "B"])},
              "--path", "{d}/r.csv", "--items-path", "{d}/m.parquet")
    bad_input("items-path-missing", "--items-path to a missing file: refused", r,
              "--path", "{d}/r.csv", "--items-path", "{d}/nothing.csv")
    bad_input("items-path-text-ids", "a movies.csv with a text id: refused, the line named",
              {**r, "m.csv": b"movieId,title,genres\n1,A,B\nx,C,D\n"},
              "--path", "{d}/r.csv", "--items-path", "{d}/m.csv")
    bad_input("given-test-missing", "--test-path to a missing file: refused", {"train.csv": train}, *given)
    bad_input("given-test-other-columns", "a test file without the userId column: refused",
              {"train.csv": train, "test.csv": test.replace(b"userId", b"user")}, *given)
    bad_input("given-val-without-train", "--val-path alone: refused", {"v.csv": train},
              "--path", "{d}/v.csv", "--val-path", "{d}/v.csv")
    bad_input("out-read-only", "--out on a read-only filesystem (root) or in a 0555 directory: refused", r,
              "--path", "{d}/r.csv", mount=read_only)
    bad_input("out-file-size-limit", "a full disk without root: `ulimit -f` 16 KiB (EFBIG): refused, nothing "
              "half-written", {"r.csv": csv(body=lines(n_users=1000, n_items=50))}, "--path", "{d}/r.csv",
              max_file_bytes=16 << 10)
    bad_input("out-disk-full", "--out on a full disk (a 64 KiB tmpfs): refused, nothing half-written",
              {"r.csv": csv(body=lines(n_users=1000, n_items=50))}, "--path", "{d}/r.csv",
              mount=lambda d: tmpfs(d, "64k"), needs=("root",))
    bad_input("out-parent-is-file", "--out under a regular file: refused", {**r, "f": b"x"},
              "--path", "{d}/r.csv", "--out", "{d}/f/out")
    bad_input("out-is-file", "--out naming a regular file: refused, the file kept", {**r, "f": b"keep"},
              "--path", "{d}/r.csv", "--out", "{d}/f")
    bad_input("out-foreign-dir", "--out a directory of other files: refused, kept", r, "--path", "{d}/r.csv",
              before={"thesis.tex": b"keep"})
    bad_input("out-existing-dataset", "--out an existing dataset without --overwrite: refused, kept", r,
              "--path", "{d}/r.csv", before={"manifest.json": b"{}", "users.parquet": b"keep"})
    bad_input("unknown-dataset", "--dataset ml-21m: refused, suggesting ml-20m", {}, "--dataset", "ml-21m")
    bad_input("dataset-offline", "--dataset ml-100k with no network and no cache: refused within seconds", {},
              "--dataset", "ml-100k", "--set", "source.cache_dir={d}/cache",
              env={"RECDIST_GROUPLENS_URL": "http://127.0.0.1:9"})
    bad_input("s3-missing-key", "an s3:// path to a key that does not exist: refused", {},
              "--path", "{s3}/nothing/ratings.csv", needs=("s3",))
    bad_input("s3-missing-bucket", "an s3:// path in a bucket that does not exist: refused", {},
              "--path", f"{no_bucket}/ratings.csv", needs=("s3",))
    bad_input("s3-out-missing-bucket", "--out in an s3 bucket that does not exist: refused", r,
              "--path", "{d}/r.csv", "--out", f"{no_bucket}/out", needs=("s3",))  # fmt: skip


for _name, _expect, _file, _data, _flags, _check in ONE_FILE:
    bad_input(_name, _expect, {_file: _data}, "--path", "{d}/" + _file, *_flags, check=_check)
_other_cases()


# --- the corruption and kill sections: a finished run, damaged or killed ------------------------------------
#
# Both start from one small finished pipeline run (synthetic ratings, few epochs), built once per bench run
# (`base_run`) and copied per case. A corruption case damages the copy one way and asks every reader that must
# notice: a plain re-run (the skip decision), `--from outputs`, `recdist recommend`; each must exit 2 with
# what/where/fix and no traceback. A kill case SIGKILLs the driver (or a Ray Train worker) at a stage, then
# checks what the issue asked: the previous outputs readable, the resumed run exiting 0 with the reference's
# metrics, no leftovers, and no process of the killed driver's Ray cluster alive 10 s after it (counted at 1, 5
# and 10 s).

SECTIONS["corruption"] = Section("corruptions of a finished run", "detected before use")
SECTIONS["kill"] = Section("kills", "survived (resumed to the same metrics, nothing left)")

SMALL_RUN = (
    "--config", str(ROOT / "configs" / "quickstart.yaml"),
    "--set", "synth.n_users=400", "--set", "synth.n_items=200", "--set", "synth.n_ratings=20000",
    "--set", "synth.min_user_ratings=10", "--set", "stages.mf.train.epochs=4",
    "--set", "stages.reliability.train.epochs=2", "--set", "stages.rating.train.epochs=2",
    "--set", "pipeline.outputs.recommend_min_ratings=1", "--set", "pipeline.outputs.similar_min_ratings=1",
    "--set", "pipeline.outputs.map_items=50", "--set", "pipeline.outputs.candidates=50",
)  # fmt: skip
_BASE: dict[str, Path] = {}
_BASE_LOCK = __import__("threading").Lock()


def base_run(env: dict[str, str]) -> Path:
    """The finished reference run, built on first use (one at a time: the cases share it)."""
    with _BASE_LOCK:
        if "run" not in _BASE:
            out = Path(tempfile.mkdtemp(prefix="recdist-chaos-base-")) / "run"
            proc = recdist("pipeline", *SMALL_RUN, "--out", str(out), "-q", env=env)
            if proc.returncode != 0:
                shutil.rmtree(out.parent, ignore_errors=True)
                raise RuntimeError(f"the reference run failed: {proc.stderr[-500:]}")
            _BASE["run"] = out
        return _BASE["run"]


def copy_run(d: Path, env: dict[str, str]) -> Path:
    out = d / "run"
    shutil.copytree(base_run(env), out)
    return out


def any_user(run: Path) -> str:
    return str(pq.read_table(run / "outputs" / "recommendations", columns=["user_id"])["user_id"][0])


def refused(proc: subprocess.CompletedProcess[str]) -> tuple[bool, bool, str]:
    """(exit 2 with what/where/fix and no traceback, a traceback, the error line)."""
    err = proc.stderr
    tb = "Traceback (most recent call last)" in err
    wwf = "error:" in err and "\n  where: " in err and "\n  fix:   " in err
    line = next((ln for ln in err.splitlines() if ln.startswith("error:")), err.strip()[-120:])
    return proc.returncode == 2 and wwf and not tb, tb, line


def _flip(path: Path, at: float = 0.5, n: int = 16) -> None:
    raw = bytearray(path.read_bytes())
    mid = int(len(raw) * at)
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))


def _first(run: Path, glob: str) -> Path:
    return sorted(run.glob(glob))[0]


CORRUPTIONS: list[tuple[str, str, Callable[[Path], None], tuple[str, ...]]] = [
    ("deleted-scored-shard", "a stage-3 scored shard deleted (issue: half the predictions, exit 0)",
     lambda r: _first(r, "rating/scored/ratings/*.parquet").unlink(), ("rerun", "from-outputs")),
    ("flipped-scored-shard", "16 bytes flipped mid-shard of stage 2's scored table (issue: RMSE 1.6e25)",
     lambda r: _flip(_first(r, "reliability/scored/ratings/*.parquet")), ("rerun", "from-outputs")),
    ("truncated-scored-shard", "stage 1's scored shard cut short by 1,000 bytes",
     lambda r: (p := _first(r, "mf/scored/ratings/*.parquet")).write_bytes(p.read_bytes()[:-1000]),
     ("rerun", "from-outputs")),
    ("extra-data-shard", "an extra part-00009.parquet in the dataset (a listing reader double-counts)",
     lambda r: shutil.copy(_first(r, "data/ratings/*.parquet"), r / "data/ratings/part-00009.parquet"),
     ("rerun", "from-outputs", "recommend")),
    ("deleted-data-shard", "a dataset shard deleted (issue: --from mf trains on half the data)",
     lambda r: _first(r, "data/ratings/*.parquet").unlink(), ("rerun", "from-outputs", "recommend")),
    ("flipped-model-weights", "stage 1's model.safetensors with 16 bytes flipped",
     lambda r: _flip(r / "mf/model/model.safetensors"), ("rerun", "from-outputs")),
    ("deleted-model-manifest", "stage 3's model/manifest.json deleted",
     lambda r: (r / "rating/model/manifest.json").unlink(), ("rerun", "from-outputs")),
    ("edited-scored-manifest", "stage 2's scored/manifest.json with n_ratings edited",
     lambda r: (p := r / "reliability/scored/manifest.json").write_text(
         p.read_text().replace('"n_ratings": ', '"n_ratings": 1', 1)), ("rerun", "from-outputs")),
    ("flipped-recommendations", "an outputs/recommendations part with 16 bytes flipped",
     lambda r: _flip(_first(r, "outputs/recommendations/*.parquet")), ("rerun", "recommend")),
    ("deleted-predictions-part", "an outputs/predictions part deleted",
     lambda r: _first(r, "outputs/predictions/**/*.parquet").unlink(), ("rerun", "recommend")),
    ("truncated-users", "the dataset's users.parquet cut short (recommend reads it)",
     lambda r: (p := r / "data/users.parquet").write_bytes(p.read_bytes()[:-50]), ("rerun", "recommend")),
]  # fmt: skip


def corruption(name: str, expect: str, damage: Callable[[Path], None], readers: tuple[str, ...]) -> None:
    """Register one corruption of a finished run: every reader in `readers` must refuse it (exit 2, w/w/f)."""

    def run(d: Path, env: dict[str, str]) -> Outcome:
        out = copy_run(d, env)
        user = any_user(out)
        damage(out)
        asks = {
            "rerun": lambda: recdist("pipeline", *SMALL_RUN, "--out", str(out), "-q", env=env),
            "from-outputs": lambda: recdist(
                "pipeline", *SMALL_RUN, "--out", str(out), "--from", "outputs", "-q", env=env
            ),
            "recommend": lambda: recdist("recommend", str(out), "--user", user, env=env),
        }  # fmt: skip
        missed, tbs, notes = [], False, []
        for reader in readers:
            ok, tb, line = refused(asks[reader]())
            tbs |= tb
            if not ok:
                missed.append(reader)
            notes.append(f"{reader}: {'refused' if ok else 'MISSED'}")
        note = "; ".join(notes) + (f" | {line}" if line else "")
        return Outcome("ok" if not missed else "FAIL", None, not missed, tbs, [], note)

    scenario("corruption", name, expect)(run)


for _c in CORRUPTIONS:
    corruption(*_c)


def _kill_at(
    out: Path, env: dict[str, str], args: tuple[str, ...], line: str, worker: bool = False
) -> tuple[str, int | None]:
    """Start a pipeline, SIGKILL its driver (or with `worker`, one Ray Train worker) once its own log (not an older
    run's in the same directory) holds `line`; wait for it; return a note and how many of the driver's Ray
    processes were alive RAY_GONE_AT_S[-1] s after it (None: nothing was killed).

    A worker is killed while it hangs after its second epoch of stage 1 (RECDIST_INJECT_FAILURE_*, first attempt
    only), in a run that stops after stage 1: the restarted worker group finishes the stage, the resume the rest."""
    import time

    from recdist.pipeline import STOP_AFTER_ENV
    from recdist.train.run import FAIL_AT_EPOCH_ENV, FAIL_KIND_ENV

    full = {**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if worker:  # a Ray Train worker to kill (a one-node cluster trains in the driver's process by default)
        full |= {FAIL_AT_EPOCH_ENV: "1", FAIL_KIND_ENV: "hang", STOP_AFTER_ENV: "mf"}
        args = (*args, "--set", "cluster.in_process=false")
    older = set((out / "logs").glob("*.log")) if (out / "logs").exists() else set()
    proc = subprocess.Popen([sys.executable, "-m", "recdist", "pipeline", *SMALL_RUN, "--out", str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=full)  # fmt: skip
    deadline, victim = time.monotonic() + TIMEOUT_S, None
    while time.monotonic() < deadline and proc.poll() is None and victim is None:
        logs = sorted(set((out / "logs").glob("*.log")) - older) if (out / "logs").exists() else []
        if logs and line in logs[-1].read_text():
            if not worker:
                break
            victim = next((p for p in alive(descendants(proc.pid)) if _is_train_worker(p)), None)
        time.sleep(0.2)
    if proc.poll() is not None or (worker and victim is None):
        proc.kill()
        proc.wait()
        return f"not killed: the run ended (exit {proc.returncode}) or timed out before `{line}`", None
    if worker:
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT_S)
        if not (out / "mf" / "manifest.json").exists():  # the restarted worker group did not finish stage 1
            return f"Ray Train worker {victim} killed: stage 1 not committed (driver exit {proc.returncode})", None
        return f"Ray Train worker {victim} killed, stage 1 committed all the same", 0
    time.sleep(1.0)
    ray = descendants(proc.pid)  # pid -> start time: a reused pid is not counted
    proc.kill()
    proc.wait()
    t0, counts = time.monotonic(), []
    for at in RAY_GONE_AT_S:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        counts.append(len(alive(ray)))
    for pid in alive(ray):  # the run's own processes, past the goal: not left to load the next cases
        os.kill(pid, signal.SIGKILL)
    at = "/".join(map(str, RAY_GONE_AT_S))
    return f"{'/'.join(map(str, counts))} of {len(ray)} Ray processes alive {at} s after the driver", counts[-1]


def _is_train_worker(pid: int) -> bool:
    try:
        return b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


RAY_GONE_AT_S = (1, 5, 10)
"""When the killed driver's processes are counted; the issue's goal: none alive at the last."""


def _metrics(run: Path) -> dict[str, Any]:
    m = json.loads((run / "outputs" / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in ("seconds", "timings")}


def kill(name: str, expect: str, line: str, *, fresh: bool, worker: bool = False, args: tuple[str, ...] = ()) -> None:
    """Register one kill: in a fresh run (fresh) or during `args` on a copy of the finished run."""

    def run(d: Path, env: dict[str, str]) -> Outcome:
        reference = base_run(env)
        out = d / "run" if fresh else copy_run(d, env)
        ray_note, ray_left = _kill_at(out, env, args, line, worker)
        notes = [ray_note]
        readable = ""
        if not fresh:  # the committed outputs must stay readable after a kill mid-rebuild
            asked = recdist("recommend", str(out), "--user", any_user(reference), env=env)
            readable = "" if asked.returncode == 0 else f"outputs unreadable after the kill: {asked.stderr[-150:]}"
        again = recdist("pipeline", *SMALL_RUN, "--out", str(out), "-q", env=env)
        _, tb, line_ = refused(again)
        problems = [readable] if readable else []
        if ray_left is None:
            problems.append("not killed, or the run did not survive it")
        elif ray_left:
            problems.append(f"{ray_left} Ray processes alive {RAY_GONE_AT_S[-1]} s after the driver")
        if again.returncode != 0:
            problems.append(f"resume exit {again.returncode}: {line_}")
        elif _metrics(out) != _metrics(reference):
            problems.append("resumed metrics differ from the reference run")
        left = [str(p) for p in out.rglob("*") if any(t in p.name for t in (".staging-", ".old-", ".tmp-"))]
        left += [str(p) for p in out.glob("*.next")]
        notes.append("; ".join(problems) or "resumed to the reference metrics")
        verdict = "ok" if not problems and not left else "FAIL"
        return Outcome(verdict, again.returncode, None, tb, left, " | ".join(notes))

    scenario("kill", name, expect)(run)


for _stage in ("prepare", "mf", "reliability", "rating", "outputs"):
    kill(f"driver-at-{_stage}", f"driver SIGKILLed while {_stage} runs: resumed to the same metrics",
         f"{_stage}: running", fresh=True)  # fmt: skip
kill("worker-at-mf", "a Ray Train worker SIGKILLed in stage 1: the run survives", "epoch 1/", fresh=True,
     worker=True)
kill("driver-at-from-outputs", "driver killed during --from outputs: the old outputs stay readable",
     "outputs: running", fresh=False, args=("--from", "outputs"))
kill("driver-at-from-mf", "driver killed during --from mf: everything committed stays readable",
     "mf: training", fresh=False, args=("--from", "mf"))


@scenario("kill", "second-run-same-out", "a second run on the same --out: refused at once naming the holder")
def _second_run(d: Path, env: dict[str, str]) -> Outcome:
    import time

    out = d / "run"
    full = {**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    first = subprocess.Popen([sys.executable, "-m", "recdist", "pipeline", *SMALL_RUN, "--out", str(out), "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=full)  # fmt: skip
    try:
        while not (out / ".lock").exists() and first.poll() is None:
            time.sleep(0.1)
        t0 = time.monotonic()
        mark = "pipeline.outputs.top_n=13"  # the second run's config.yaml would say top_n: 13
        second = recdist("pipeline", *SMALL_RUN, "--set", mark, "--out", str(out), "-q", env=env)
        took = time.monotonic() - t0
        ok, tb, line = refused(second)
        named = f"pid {first.pid}" in second.stderr
        config = out / "config.yaml"
        wrote = {"config.yaml"} if config.exists() and "top_n: 13" in config.read_text() else set()
    finally:
        first.kill()
        first.wait()
    good = ok and named and not wrote
    note = f"refused in {took:.1f} s, holder {'named' if named else 'NOT named'}"
    note += f", wrote {wrote}" if wrote else ""
    return Outcome("ok" if good else "FAIL", second.returncode, ok, tb, [], f"{note} | {line}")


# --- main -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with one bucket, and the AWS_* variables that point at it (fake keys)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "CHAOSFAKEKEY",
        "AWS_SECRET_ACCESS_KEY": "chaos-fake-secret", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    try:
        kw = {k.lower(): v for k, v in env.items() if k != "AWS_ENDPOINT_URL" and k != "AWS_DEFAULT_REGION"}
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", **kw).create_bucket(
            Bucket="recdist-chaos"
        )
        yield {**env, "S3_BUCKET": "s3://recdist-chaos"}
    finally:
        server.stop()


def available(needs: tuple[str, ...], env: dict[str, str]) -> str | None:
    """Why a scenario cannot run here (None: it can)."""
    if "root" in needs and os.geteuid() != 0:
        return "needs root (mounts a tmpfs)"
    if "s3" in needs and "S3_BUCKET" not in env:
        return "needs moto (the S3 test server)"
    return None


def run_one(s: Scenario, base: Path, env: dict[str, str]) -> Outcome:
    if why := available(s.needs, env):
        return Outcome("skipped", note=why)
    d = base / s.section / s.name
    d.mkdir(parents=True)
    try:
        return s.run(d, env)
    except subprocess.TimeoutExpired:
        return Outcome("FAIL", note=f"no answer within {TIMEOUT_S} s")
    except Exception as e:  # the harness itself: report it as this case's failure and go on with the others
        return Outcome("FAIL", note=f"bench error: {type(e).__name__}: {e}")


def report(s: Scenario, o: Outcome) -> None:
    wwf = "-" if o.wwf is None else ("yes" if o.wwf else "no")
    left = ", ".join(o.leftovers) or "nothing"
    tb = " TRACEBACK" if o.traceback else ""
    print(f"{o.verdict:7} {s.name:32} exit {o.exit!s:4} wwf {wwf:3} left: {left}{tb}\n        {o.note[:150]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", action="append", choices=list(SECTIONS), help="only these sections")
    ap.add_argument("-k", action="append", default=[], metavar="TEXT", help="only cases whose name holds TEXT")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (each one a recdist process)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory and print it")
    ap.add_argument("--timeout", type=int, default=600, help="seconds one recdist process may take")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args()
    globals()["TIMEOUT_S"] = args.timeout  # read by the helpers as they run
    chosen = [
        s for s in SCENARIOS
        if (not args.section or s.section in args.section) and (not args.k or any(k in s.name for k in args.k))
    ]  # fmt: skip
    if args.list:
        for s in chosen:
            print(f"{s.section:10} {s.name:32} {s.expect}")
        return
    signal.signal(signal.SIGTERM, _interrupted)  # as Ctrl-C: running cases finish, tmpfs unmounted, temp removed
    base = Path(tempfile.mkdtemp(prefix="recdist-chaos-"))
    print(f"{len(chosen)} cases, {args.jobs} at a time, in {base} (each one a fresh `recdist` process)")
    try:
        with s3_server() if _have_moto() else contextlib.nullcontext({}) as env:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                outcomes = []
                for s, o in zip(chosen, pool.map(lambda s: run_one(s, base, env), chosen), strict=True):
                    report(s, o)  # in registry order, as soon as each one is known
                    outcomes.append((s, o))
    finally:
        if args.keep:
            print(f"kept {base}" + "".join(f" and {run}" for run in _BASE.values()))
        else:
            shutil.rmtree(base, ignore_errors=True)
            for run in _BASE.values():  # the reference run of the corruption and kill sections
                shutil.rmtree(run.parent, ignore_errors=True)
    summarize(outcomes)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def summarize(outcomes: list[tuple[Scenario, Outcome]]) -> None:
    for name, section in SECTIONS.items():
        mine = [o for s, o in outcomes if s.section == name]
        ran = [o for o in mine if o.verdict != "skipped"]
        if not mine:
            continue
        ok, tb = sum(o.verdict == "ok" for o in ran), sum(o.traceback for o in ran)
        skipped = f" ({len(mine) - len(ran)} skipped)" if len(ran) < len(mine) else ""
        print(f"{name}: {ok} of {len(ran)} {section.noun} {section.goal}, {tb} tracebacks{skipped}")


def _have_moto() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
