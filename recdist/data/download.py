"""Download a GroupLens zip into the cache: resumable, checksum-verified, moved into place only when whole.

The cache holds `<name>.zip` (only ever whole and verified), `<name>.zip.part` (an interrupted download,
resumed with an HTTP Range request) and `<name>.zip.verified` (the checksums of the zip, with its size and
mtime, so a cached zip is used without network or re-hashing). $RECDIST_GROUPLENS_URL points at a mirror.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from recdist import logs
from recdist.data.registry import BASE_URL, Release
from recdist.errors import DataError

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
"""Connect and per-read timeout: offline fails at once (refused) or within this many seconds (dropped)."""
CHUNK = 1 << 20


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The download cache: the argument, else $RECDIST_CACHE, else ~/.cache/recdist."""
    return Path(override or os.environ.get("RECDIST_CACHE") or Path.home() / ".cache" / "recdist").expanduser()


def release_url(release: Release) -> str:
    """The release's URL on GroupLens, or on the mirror named by $RECDIST_GROUPLENS_URL."""
    base = os.environ.get("RECDIST_GROUPLENS_URL") or BASE_URL
    return f"{base.rstrip('/')}/{release.filename}"


def fetch(release: Release, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The verified zip of `release` in the cache, downloaded (or resumed) first when it is not there."""
    target = cache_root(cache_dir) / release.filename
    if target.exists():
        if _marker(target) is None:
            _verify_placed(release, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = release_url(release)
    expected = release.md5 or _published_md5(url, target)
    part = target.with_name(target.name + ".part")
    log.info("downloading %s into %s", url, target.parent)
    sums = _download(url, part, target)
    if sums["resumed"] and _problem(part, sums, expected):
        part.unlink()  # the kept prefix may hold the bad bytes: one clean download from zero
        sums = _download(url, part, target)
    problem = _problem(part, sums, expected)
    if problem:
        part.unlink(missing_ok=True)
        raise DataError(
            f"{release.filename} failed verification: {problem}",
            where=url,
            fix="run the command again to re-download; if it persists the server sends a different file "
            "(check $RECDIST_GROUPLENS_URL), or download it by hand and pass --path FILE",
        )
    os.replace(part, target)
    _write_marker(target, {"md5": sums["md5"], "sha256": sums["sha256"], "published_md5": expected})
    return target


def verified_checksum(zip_path: str | os.PathLike[str]) -> str | None:
    """The checksum recorded when the cached zip was verified ('md5:...' where GroupLens publishes one)."""
    marker = _marker(Path(zip_path))
    if marker is None:
        return None
    return f"md5:{marker['md5']}" if marker.get("published_md5") else f"sha256:{marker['sha256']}"


# --- the network ---------------------------------------------------------------------------------------


def _download(url: str, part: Path, target: Path) -> dict[str, Any]:
    """Stream `url` into `part`, resuming what is there; returns md5/sha256 of the whole part file."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    md5, sha = hashlib.md5(), hashlib.sha256()
    try:
        with _open(request, target) as response:
            status = response.status
            total = _total_size(response, have)
            if status == 206 and _range_start(response) != have:
                part.unlink()  # a range we did not ask for: start over without one
                return _download(url, part, target)
            if status == 206:
                _hash_file(part, md5, sha)  # resume: the prefix we keep counts towards the checksum
                mode, done = "ab", have
            else:
                mode, done = "wb", 0  # the server ignored Range (200): start over cleanly
            with open(part, mode) as out, logs.Progress(log, target.name, total, unit="bytes") as progress:
                while chunk := _read(response, url, target):
                    out.write(chunk)
                    md5.update(chunk)
                    sha.update(chunk)
                    done += len(chunk)
                    progress.update(done)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # Range past the end: the part holds the whole file already
            _hash_file(part, md5, sha)
            return {"md5": md5.hexdigest(), "sha256": sha.hexdigest(), "resumed": True}
        raise _http_error(e, url, target) from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(
            f"download of {url} stopped at {size:,} of {total:,} bytes",
            where=str(part),
            fix="run the command again: it resumes from where it stopped",
        )
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest(), "resumed": mode == "ab"}


@contextmanager
def _open(request: urllib.request.Request, target: Path) -> Iterator[Any]:
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as e:
        raise _offline(request.full_url, target, e) from None
    with response:
        yield response


def _read(response: BinaryIO, url: str, target: Path) -> bytes:
    try:
        return response.read(CHUNK)
    except OSError as e:  # timeout or reset mid-way: the .part stays for the next run to resume
        raise DataError(
            f"download of {url} interrupted: {e}",
            where=str(target.with_name(target.name + ".part")),
            fix="run the command again: it resumes from where it stopped",
        ) from None


def _published_md5(url: str, target: Path) -> str | None:
    """The md5 in `<url>.md5` ('MD5 (x.zip) = <hex>' or '<hex>  x.zip'); None where the server has none."""
    try:
        with _open(urllib.request.Request(url + ".md5"), target) as response:
            text = response.read(4096).decode("ascii", "replace")
    except urllib.error.HTTPError:
        return None
    found = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    return found.group(0).lower() if found else None


def _offline(url: str, target: Path, error: BaseException) -> DataError:
    reason = getattr(error, "reason", error)
    return DataError(
        f"cannot download {url}: {reason}",
        where=str(target),
        fix=f"check the network (or $RECDIST_GROUPLENS_URL); or download {target.name} by hand and put it "
        f"at {target}; or pass --path FILE with the zip or ratings file",
    )


def _http_error(error: urllib.error.HTTPError, url: str, target: Path) -> DataError:
    return DataError(
        f"the server answered {error.code} {error.reason} for {url}",
        where=str(target),
        fix=f"check $RECDIST_GROUPLENS_URL and the release name; or put the zip at {target} by hand, "
        "or pass --path FILE",
    )


def _total_size(response: Any, have: int) -> int | None:
    if response.status == 206:
        match = re.search(r"/(\d+)\s*$", response.headers.get("Content-Range", ""))
        if match:
            return int(match.group(1))
    length = response.headers.get("Content-Length")
    return int(length) if length and response.status == 200 else None


def _range_start(response: Any) -> int | None:
    match = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


# --- verification ---------------------------------------------------------------------------------------


def _hash_file(path: Path, *hashes: Any) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashes:
                h.update(chunk)


def _problem(part: Path, sums: dict[str, Any], expected: str | None) -> str | None:
    """Why the downloaded file is not the release (None when it is)."""
    if expected:
        return None if sums["md5"] == expected else f"expected md5 {expected}, got {sums['md5']}"
    return _zip_problem(part)


def _zip_problem(path: Path) -> str | None:
    """Without a published checksum, the zip's own CRCs are the integrity check."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a whole zip ({e})"
    return f"member {bad} fails its CRC" if bad else None


def _verify_placed(release: Release, target: Path) -> None:
    """A zip in the cache without a marker (put there by hand, or by an older run): check it once."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    _hash_file(target, md5, sha)
    if release.md5 and md5.hexdigest() != release.md5:
        raise DataError(
            f"the cached {release.filename} has md5 {md5.hexdigest()}, expected {release.md5}",
            where=str(target),
            fix=f"delete {target} and run again to download it, or pass --path FILE to use it anyway",
        )
    problem = None if release.md5 else _zip_problem(target)
    if problem:
        raise DataError(
            f"the cached {release.filename} is damaged: {problem}",
            where=str(target),
            fix=f"delete {target} and run again to download it",
        )
    _write_marker(target, {"md5": md5.hexdigest(), "sha256": sha.hexdigest(), "published_md5": release.md5})


def _marker_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _write_marker(target: Path, sums: dict[str, Any]) -> None:
    stat = target.stat()
    record = {**sums, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    tmp = _marker_path(target).with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, _marker_path(target))


def _marker(target: Path) -> dict[str, Any] | None:
    """The verification record of `target`, if it still describes the file (same size and mtime)."""
    try:
        record = json.loads(_marker_path(target).read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return None
    if record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return record
