"""Downloads from a real HTTP server on loopback: whole, resumed, Range ignored, bad checksum, offline, cached."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import zipfile
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recdist.data.download import fetch, verified_checksum
from recdist.data.registry import get_release
from recdist.errors import DataError


def _zip_bytes() -> bytes:
    """A small but real GroupLens-shaped zip (its CRCs are what verification checks without an md5)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        rows = "".join(f"{u},{i},{(u * i) % 10 / 2 + 0.5},{1000 + u}\n" for u in range(1, 60) for i in range(1, 80))
        z.writestr("ml-latest-small/ratings.csv", "userId,movieId,rating,timestamp\n" + rows)
        z.writestr("ml-latest-small/movies.csv", "movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n")
    return buf.getvalue()


ZIP = _zip_bytes()
MD5 = hashlib.md5(ZIP).hexdigest()


@dataclass
class _State:
    files: dict[str, bytes]
    ranges: bool = True
    cut_once: int | None = None
    """Send only this many bytes of the next response body (then hang up), announcing the full length."""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    sent: int = 0


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        state: _State = self.server.state  # type: ignore[attr-defined]
        asked = self.headers.get("Range")
        state.requests.append((self.path, asked))
        body = state.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404)
            return
        start = int(asked.split("=")[1].split("-")[0]) if asked and state.ranges else 0
        if start >= len(body) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if state.cut_once is not None:
            payload, state.cut_once = payload[: state.cut_once], None
        state.sent += len(payload)  # counted before writing: the client may finish before this thread resumes
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    """A GroupLens mirror on 127.0.0.1 serving ml-latest-small.zip; RECDIST_GROUPLENS_URL points at it."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = _State(files={"ml-latest-small.zip": ZIP})  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    monkeypatch.setenv("RECDIST_GROUPLENS_URL", f"http://127.0.0.1:{httpd.server_port}/datasets/movielens/")
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def offline(monkeypatch):
    """RECDIST_GROUPLENS_URL at a port nobody listens on: every request is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RECDIST_GROUPLENS_URL", f"http://127.0.0.1:{port}/movielens")


RELEASE = replace(get_release("ml-latest-small"), md5=MD5)


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_whole_download_is_verified_and_marked(server, tmp_path):
    path = fetch(RELEASE, cache_dir=tmp_path)
    assert path == tmp_path / "ml-latest-small.zip"
    assert path.read_bytes() == ZIP
    assert _leftovers(tmp_path) == ["ml-latest-small.zip", "ml-latest-small.zip.verified"]
    assert verified_checksum(path) == f"md5:{MD5}"


def test_interrupted_download_keeps_the_part_and_resumes_with_range(server, tmp_path):
    server.cut_once = len(ZIP) // 3
    with pytest.raises(DataError, match="resumes"):
        fetch(RELEASE, cache_dir=tmp_path)
    part = tmp_path / "ml-latest-small.zip.part"
    assert part.read_bytes() == ZIP[: len(ZIP) // 3]
    assert not (tmp_path / "ml-latest-small.zip").exists()

    path = fetch(RELEASE, cache_dir=tmp_path)
    assert path.read_bytes() == ZIP
    assert server.requests[-1][1] == f"bytes={len(ZIP) // 3}-"
    assert server.sent == len(ZIP)  # the second request sent only the rest
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ranges = False
    (tmp_path / "ml-latest-small.zip.part").write_bytes(ZIP[:1000])
    path = fetch(RELEASE, cache_dir=tmp_path)
    assert path.read_bytes() == ZIP
    assert server.requests == [("/datasets/movielens/ml-latest-small.zip", "bytes=1000-")]


def test_corrupt_part_is_discarded_and_downloaded_again(server, tmp_path):
    (tmp_path / "ml-latest-small.zip.part").write_bytes(b"\0" * 1000)
    path = fetch(RELEASE, cache_dir=tmp_path)
    assert path.read_bytes() == ZIP
    assert [r[1] for r in server.requests] == ["bytes=1000-", None]


def test_complete_part_is_verified_without_downloading_again(server, tmp_path):
    (tmp_path / "ml-latest-small.zip.part").write_bytes(ZIP)
    assert fetch(RELEASE, cache_dir=tmp_path).read_bytes() == ZIP
    assert server.sent == 0


def test_checksum_mismatch_fails_and_leaves_nothing_under_the_final_name(server, tmp_path):
    wrong = replace(RELEASE, md5="0" * 32)
    with pytest.raises(DataError) as err:
        fetch(wrong, cache_dir=tmp_path)
    message = str(err.value)
    assert f"expected md5 {'0' * 32}, got {MD5}" in message
    assert "--path FILE" in message
    assert _leftovers(tmp_path) == []


def test_published_md5_is_fetched_when_the_registry_has_none(server, tmp_path):
    release = get_release("ml-latest-small")
    assert release.md5 is None
    server.files["ml-latest-small.zip.md5"] = f"MD5 (ml-latest-small.zip) = {MD5}\n".encode()
    path = fetch(release, cache_dir=tmp_path)
    assert verified_checksum(path) == f"md5:{MD5}"

    server.files["ml-latest-small.zip.md5"] = b"MD5 (ml-latest-small.zip) = " + b"f" * 32
    with pytest.raises(DataError, match=f"expected md5 {'f' * 32}, got {MD5}"):
        fetch(release, cache_dir=tmp_path / "other")


def test_without_any_md5_the_zip_crcs_are_checked(server, tmp_path):
    release = get_release("ml-latest-small")
    path = fetch(release, cache_dir=tmp_path)  # the server has no .md5: 404
    assert verified_checksum(path) == "sha256:" + hashlib.sha256(ZIP).hexdigest()

    server.files["ml-latest-small.zip"] = ZIP[:-200]  # cut short: not a whole zip
    with pytest.raises(DataError, match="not a whole zip"):
        fetch(release, cache_dir=tmp_path / "other")
    assert _leftovers(tmp_path / "other") == []


def test_missing_file_on_the_mirror_is_a_clear_error(server, tmp_path):
    with pytest.raises(DataError, match="404"):
        fetch(replace(RELEASE, name="ml-nothing"), cache_dir=tmp_path)


@pytest.mark.timeout(20)
def test_offline_fails_at_once_naming_where_to_put_the_zip(offline, tmp_path):
    with pytest.raises(DataError) as err:
        fetch(RELEASE, cache_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "ml-latest-small.zip") in message
    assert "--path FILE" in message
    assert not (tmp_path / "ml-latest-small.zip").exists()


def test_cached_zip_is_used_without_network(server, tmp_path, monkeypatch):
    fetch(RELEASE, cache_dir=tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("RECDIST_GROUPLENS_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    assert fetch(RELEASE, cache_dir=tmp_path).read_bytes() == ZIP


def test_zip_put_in_the_cache_by_hand_is_checked_once(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("RECDIST_CACHE", str(tmp_path))
    (tmp_path / "ml-latest-small.zip").write_bytes(ZIP)
    path = fetch(RELEASE)  # cache from $RECDIST_CACHE
    assert path == tmp_path / "ml-latest-small.zip"
    assert verified_checksum(path) == f"md5:{MD5}"

    (tmp_path / "ml-latest-small.zip").write_bytes(ZIP[:-1] + b"x")  # changed after it was verified
    with pytest.raises(DataError, match=f"expected {MD5}"):
        fetch(RELEASE)
