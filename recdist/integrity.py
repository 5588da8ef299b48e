"""Whether a committed directory still holds what its manifest promises: the one check every reader makes.

A manifest's `files` list each file with its bytes, its rows (Parquet) and its sha256; an entry naming another
directory's manifest.json (`model/manifest.json`, `sample/manifest.json`) makes that directory part of this one,
verified the same way (a chain of checksums: a stage's manifest pins its model's and its scored table's). A
manifest's `inputs` pin the manifests of the directories it was made from (their sha256): when one of them was
redone since, this directory is *stale* (made from something that no longer exists) and is refused as well.

`verify(folder, fix=...)` raises IntegrityError naming the file, the damage and the given fix (which stage to
redo); it reads every listed byte once (sha256 runs at ~0.8 GB/s on one core). A folder the manifest lists files
in may hold only those (an extra Parquet part there would be read by a reader that lists the folder); files in
other folders (checkpoints, intent.json) are not the manifest's concern. Manifests written before checksums
(no `files`, or entries without `sha256`) are checked as far as they go: the file set and sizes, or nothing.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

from recdist import storage
from recdist.errors import IntegrityError, StorageError
from recdist.tables import SUCCESS

CHUNK = 8 << 20
IGNORED = frozenset({storage.MANIFEST, SUCCESS})
"""Names never counted as extra files: the manifest itself, and the outputs' `_SUCCESS` written after it."""


def sha256(uri: str) -> str:
    """The sha256 of a file's bytes, read in chunks (local or s3://)."""
    fs, path = storage.filesystem(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(folder: str) -> str | None:
    """The sha256 of FOLDER/manifest.json (what identifies one commit of it), or None when not committed."""
    uri = storage.join(folder, storage.MANIFEST)
    return sha256(uri) if storage.exists(uri) else None


def pins(folders: dict[str, str], base: str) -> dict[str, str]:
    """The `inputs` of a manifest in `base` made from `folders` (name -> URI): each one's path relative to `base`
    and the digest of its manifest now."""
    from recdist.manifest import relative

    found = {name: (relative(uri, base), manifest_digest(uri)) for name, uri in folders.items()}
    return {rel: digest for rel, digest in found.values() if digest is not None}


@dataclass(frozen=True)
class Damage:
    """One thing wrong with a committed directory."""

    where: str
    what: str


def check(folder: str) -> list[Damage]:
    """Everything wrong with the committed directory `folder` (and the directories its manifest includes), or []."""
    manifest_uri = storage.join(folder, storage.MANIFEST)
    if not storage.exists(manifest_uri):
        return [Damage(manifest_uri, "its manifest.json is missing (the directory is not committed)")]
    try:
        manifest = storage.read_json(manifest_uri)
    except (ValueError, UnicodeDecodeError):
        return [Damage(manifest_uri, "its manifest.json is not valid JSON")]
    damages = _files(folder, manifest.get("files") or [])
    return damages + (stale(folder, manifest) if not damages else [])


def stale(folder: str, manifest: dict[str, Any]) -> list[Damage]:
    """The inputs of `folder` redone since it was made (its `inputs` pins no longer match)."""
    from recdist.manifest import resolve

    out = []
    for rel, digest in (manifest.get("inputs") or {}).items():
        uri = resolve(rel, folder)
        now = manifest_digest(uri)
        if now != digest:
            what = "was redone" if now else "is gone (or being redone)"
            out.append(Damage(folder, f"stale: it was made from {uri}, which {what} since"))
    return out


def verify(folder: str, *, fix: str, stale_fix: str | None = None) -> None:
    """Raise IntegrityError when `folder` is damaged or stale: the first problem, how many there are, and `fix`
    (`stale_fix` when it is only stale)."""
    damages = check(folder)
    if damages:
        first = damages[0]
        more = f" (and {len(damages) - 1} more problem(s) in {folder})" if len(damages) > 1 else ""
        advice = stale_fix if stale_fix and first.what.startswith("stale") else fix
        raise IntegrityError(f"{first.what}{more}; nothing was read from it", where=first.where, fix=advice)


def is_stale(folder: str) -> bool:
    """True when `folder` is committed but made from an input redone since (cheap: manifests only)."""
    uri = storage.join(folder, storage.MANIFEST)
    return storage.exists(uri) and bool(stale(folder, storage.read_json(uri)))


def _files(folder: str, entries: list[dict[str, Any]]) -> list[Damage]:
    """The damages of the listed files, in their listed order (hashed a few at a time, in threads: hashlib and the
    reads release the GIL), then the files not listed."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(storage.shard_threads(len(entries))) as pool:
        damages = [d for found in pool.map(lambda entry: _entry(folder, entry), entries) for d in found]
    listed = {e["path"] for e in entries}
    for sub in sorted({posixpath.dirname(p) for p in listed}):
        damages += _extra(folder, sub, listed)
    return damages


def _entry(folder: str, entry: dict[str, Any]) -> list[Damage]:
    uri = storage.join(folder, entry["path"])
    fs, path = storage.filesystem(uri)
    if not fs.exists(path) or fs.isdir(path):
        rows = f", {entry['rows']:,} rows" if entry.get("rows") is not None else ""
        return [Damage(uri, f"a file of a committed directory is missing ({entry['bytes']:,} bytes{rows} listed)")]
    size = int(fs.size(path))
    if size != entry["bytes"]:
        cut = "truncated" if size < entry["bytes"] else "grown"
        return [Damage(uri, f"a file of a committed directory was {cut}: {size:,} bytes, {entry['bytes']:,} listed")]
    if entry.get("sha256") and sha256(uri) != entry["sha256"]:
        return [Damage(uri, "a file of a committed directory was changed: its sha256 differs from the listed one")]
    if posixpath.basename(entry["path"]) == storage.MANIFEST and "/" in entry["path"]:
        return check(storage.join(folder, posixpath.dirname(entry["path"])))
    return []


def _extra(folder: str, sub: str, listed: set[str]) -> list[Damage]:
    """Files in the listed folder `sub` that the manifest does not list (a sub-directory there is not checked)."""
    where = storage.join(folder, sub) if sub else folder
    if any(p == posixpath.join(sub, storage.MANIFEST) for p in listed) and sub:
        return []  # `sub` is a directory committed on its own: its manifest speaks for it
    fs, _ = storage.filesystem(where)
    damages = []
    for name in storage.listdir(where):
        rel = posixpath.join(sub, name) if sub else name
        if rel in listed or name in IGNORED:
            continue
        if fs.isdir(storage.filesystem(storage.join(folder, rel))[1]):
            continue
        damages.append(Damage(storage.join(folder, rel), "a file not listed in the manifest is in a committed folder"))
    return damages


def verify_given(folder: str) -> None:
    """verify() for a directory a command was given (`recdist train --data/--upstream`, `recdist infer
    --model/--data`), with the fix that rebuilds it (`redo`). A path that does not exist is left to the command's
    own checks (which name what is missing)."""
    if storage.exists(folder):
        verify(folder, fix=redo(folder))


REBUILD = {
    "dataset": "prepare it again: recdist prepare ... --out {folder} --overwrite",
    "scored": "score it again: recdist infer --model MODEL --data DATA --out {folder} --overwrite",
    "model": "train it again: recdist train --data DATA --out {folder} --overwrite",
}


def redo(folder: str) -> str:
    """How to rebuild a damaged committed directory: the pipeline stage it belongs to (RUN/<stage>/model, RUN/data),
    else the command that makes its kind of directory."""
    folder = storage.absolute(folder)
    parent = posixpath.dirname(folder.rstrip("/"))
    parent_kind, kind = _kind(parent), _kind(folder)
    if parent_kind == "stage":
        run, stage = posixpath.dirname(parent), posixpath.basename(parent)
        return f"redo that stage of its run: recdist pipeline --config CONFIG --out {run} --from {stage}"
    if parent_kind == "run" and kind == "dataset":
        return f"redo its run's dataset: recdist pipeline --config CONFIG --out {parent} --from prepare"
    return REBUILD.get(kind or "", "rebuild it with the command that wrote it (--overwrite)").format(folder=folder)


def _kind(folder: str) -> str | None:
    """The `kind` of FOLDER/manifest.json (dataset, scored, model, stage, run), None when unreadable."""
    try:
        return storage.read_json(storage.join(folder, storage.MANIFEST)).get("kind")
    except (StorageError, OSError, ValueError, AttributeError):  # missing, damaged, not JSON, not an object
        return None
