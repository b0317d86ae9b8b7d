"""The decoded-image cache (docs/DESIGN.md §5): each list of image files decoded once, kept on disk, memory-mapped.

An entry holds the uint8 images (N, 3, S, S) of one file list at one size, in a raw file `images.u8`, and
`meta.json` (the files, the shape, the undecodable files with their reasons). Its name is a hash of everything
that decides its bytes: the resolved path, size and mtime_ns of every file, the image size, `max_pixels` and
`DECODER_VERSION`. So a changed, added or removed file gives another entry and a stale one is never read.

An entry is decoded into a hidden temp folder and renamed into place, with fsyncs, so a half-written entry is
never seen; a killed writer's temp is removed by the next writer. Processes building the same entry at once
(DDP ranks, sweep workers) take `<key>.lock` with flock: one decodes, the others wait and map its result. Above
the size cap, writers evict the least recently used entries (their meta.json's mtime, touched on every use). A
mapped entry stays readable after another process evicts it (POSIX keeps an unlinked file's pages).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lora_cls.data.decode import (
    DECODER_VERSION,
    FILE_NOT_FOUND,
    Geometry,
    UnreadableImage,
    decode_array,
    io_threads,
)
from lora_cls.errors import UserError

log = logging.getLogger("lora_cls.data")

ENV_DIR = "LORA_CLS_CACHE_DIR"  # overrides the default location (dataset.cache.dir=null); the tests set it
FORMAT = 1  # the layout of an entry folder; part of the key
DATA, META = "images.u8", "meta.json"
TEMP, TRASH = ".tmp-", ".trash-"
PROCESS_MIN_IMAGES = 512  # below this a process pool costs more to start than it saves

# Entries this process has mapped, by key: its own writes never evict them while they are in use.
_in_use: weakref.WeakValueDictionary[str, np.ndarray] = weakref.WeakValueDictionary()


def cache_dir(setting: str | os.PathLike | None = None) -> Path:
    """The cache folder: `dataset.cache.dir` when set, else $LORA_CLS_CACHE_DIR, else the user cache folder
    ($XDG_CACHE_HOME or ~/.cache)/lora_cls/images."""
    if setting:
        return Path(setting).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora_cls" / "images"


@dataclass
class CachedImages:
    """One file list's decoded images. `images`: uint8 (N_good, 3, S, S), memory-mapped copy-on-write (writable
    without touching the file), the decodable files in list order; `bad`: (path, reason) of the others;
    `hit`: read from an existing entry; `path`: the entry folder (None when it was over the cap: not kept)."""

    images: np.ndarray
    bad: list[tuple[str, str]]
    hit: bool
    path: Path | None
    key: str


def entry_key(root: Path, paths: Sequence[str], size: int | Geometry, max_pixels: int | None) -> str:
    """The hash of everything that decides an entry's bytes (a missing file counts with size and mtime -1)."""
    geometry = size if isinstance(size, Geometry) else Geometry(int(size))
    digest = hashlib.sha256(json.dumps([FORMAT, DECODER_VERSION, *geometry.key(), max_pixels]).encode())
    for path in paths:
        full = os.path.join(root, path)
        try:
            st = os.stat(full)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "-1:-1"
        digest.update(f"\0{full}\0{stamp}".encode())
    return digest.hexdigest()[:32]


def load_or_decode(root: str | Path, paths: Sequence[str], size: int | Geometry, max_pixels: int | None,
                   folder: str | os.PathLike | None = None, max_bytes: int = 10 * 2**30,
                   pool: str = "auto") -> CachedImages:
    """The decoded images of `root/paths` at `size`: from the cache entry when there is one, else decoded once
    (by every core) into a new entry. `max_bytes` caps the cache folder (an entry larger than it is decoded
    into a temp file that is removed at once and lives only as this process's mapping)."""
    root = Path(root).resolve()
    folder = cache_dir(folder)
    key = entry_key(root, paths, size, max_pixels)
    found = _open(folder / key, key)
    if found is not None:
        return found
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / f"{key}.lock"):
            found = _open(folder / key, key)  # another process may have built it while this one waited
            if found is not None:
                return found
            geometry = size if isinstance(size, Geometry) else Geometry(int(size))
            return _build(folder, key, root, list(paths), geometry, max_pixels, max_bytes, pool)
    except OSError as e:
        raise UserError(f"cannot write the decoded-image cache in {folder} ({e.strerror or e}); set "
                        "dataset.cache.dir to a writable folder with space, or dataset.cache.enabled=false "
                        "to decode images every epoch instead") from e


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that decodes the same images into %s", path.parent)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _open(entry: Path, key: str) -> CachedImages | None:
    """The entry at `entry` mapped, or None when there is none (or it was evicted while being opened)."""
    try:
        meta = json.loads((entry / META).read_text())
        shape = tuple(meta["shape"])
        images = _map(entry / DATA, shape, "c")
        os.utime(entry / META)  # last used, for LRU eviction
    except (OSError, ValueError, KeyError):
        return None
    _in_use[key] = images
    return CachedImages(images, [tuple(b) for b in meta["bad"]], True, entry, key)


def _map(path: Path, shape: tuple[int, ...], mode: str) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=np.uint8)  # a zero-byte file cannot be mapped
    if os.path.getsize(path) != int(np.prod(shape)):
        raise ValueError(f"{path} does not hold {shape} bytes")
    return np.memmap(path, dtype=np.uint8, mode=mode, shape=shape)


def _build(folder: Path, key: str, root: Path, paths: list[str], geometry: Geometry, max_pixels: int | None,
           max_bytes: int, pool: str) -> CachedImages:
    for stale in folder.glob(f"{TEMP}{key}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed writer's (this process holds the key's lock)
    if (folder / key).exists():
        _remove(folder / key)  # there, but unreadable (damaged after it was written): decoded again
    temp = folder / f"{TEMP}{key}-{os.getpid()}"
    temp.mkdir()
    try:
        start = time.perf_counter()
        size = geometry.size
        shape = (len(paths), 3, size, size)
        bad = _decode_into(temp / DATA, shape, root, paths, geometry, max_pixels, pool)
        shape = _drop_bad(temp / DATA, shape, sorted(i for i, _ in bad))
        meta = {"format": FORMAT, "root": str(root), "image_size": size, "geometry": geometry.key(),
                "max_pixels": max_pixels,
                "decoder_version": DECODER_VERSION, "shape": list(shape), "paths": paths,
                "bad": [[paths[i], reason] for i, reason in sorted(bad)],
                "decode_seconds": round(time.perf_counter() - start, 3)}
        _write_synced(temp / META, json.dumps(meta).encode())
        nbytes = int(np.prod(shape))
        if nbytes > max_bytes:
            log.warning("the decoded images (%.1f GiB) are larger than dataset.cache.max_gb (%.1f GiB): kept in a "
                        "temporary file for this run only", nbytes / 2**30, max_bytes / 2**30)
            images = _map(temp / DATA, shape, "c")
            return CachedImages(images, [tuple(b) for b in meta["bad"]], False, None, key)
        _fsync_dir(temp)
        entry = folder / key
        try:
            os.rename(temp, entry)
            _fsync_dir(folder)
        except OSError:
            pass  # written meanwhile by a process that missed this one's lock (a removed lock file): use that
        found = _open(entry, key)
        if found is None:
            raise OSError(f"the new entry {entry} cannot be read")
        evict(folder, max_bytes)
        return CachedImages(found.images, found.bad, False, entry, key)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # the mapping of an unkept entry outlives its file


def _decode_into(data: Path, shape: tuple[int, int, int, int], root: Path, paths: list[str], size: Geometry,
                 max_pixels: int | None, pool: str) -> list[tuple[int, str]]:
    """Decode every file into the raw file `data` (rows in list order; a bad file's row is left zero) by a pool
    of processes or threads, each writing its own rows; returns (index, reason) of the undecodable files."""
    n = len(paths)
    with open(data, "wb") as handle:
        handle.truncate(int(np.prod(shape)))
    if n == 0:
        return []
    executor, workers = _executor(pool, n)
    chunk = max(8, min(256, n // (workers * 8) or 1))
    bad: list[tuple[int, str]] = []
    with executor, tqdm(total=n, desc=f"decoding {n} images into the cache", unit="img", leave=False,
                        disable=None) as bar:
        futures = {executor.submit(decode_rows, str(data), shape, str(root), paths[lo:lo + chunk], lo, size,
                                   max_pixels): min(chunk, n - lo) for lo in range(0, n, chunk)}
        for future in as_completed(futures):
            bad += future.result()
            bar.update(futures[future])
    with open(data, "rb+") as handle:
        os.fsync(handle.fileno())
    return bad


def _executor(pool: str, n: int) -> tuple[Executor, int]:
    """Processes where threads do not scale (PIL holds the GIL for part of every decode: docs/DESIGN.md §5),
    threads for small sets, inside daemonic launcher processes (which may not have children), or when asked."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    use_processes = pool == "processes" or (pool == "auto" and n >= PROCESS_MIN_IMAGES and cores > 2)
    if use_processes and not multiprocessing.current_process().daemon:
        # fork, as DataLoader workers are started: the workers run only PIL and numpy, never torch.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        return ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context(method)), cores
    return ThreadPoolExecutor(io_threads()), io_threads()


def decode_rows(data: str, shape: tuple[int, int, int, int], root: str, paths: Sequence[str], first: int,
                size: int | Geometry, max_pixels: int | None) -> list[tuple[int, str]]:
    """Decode `paths` into rows first, first+1, ... of the raw file `data` (run by a pool worker)."""
    out = np.memmap(data, dtype=np.uint8, mode="r+", shape=shape)
    bad = []
    for i, path in enumerate(paths, first):
        try:
            out[i] = decode_array(os.path.join(root, path), size, max_pixels).transpose(2, 0, 1)
        except UnreadableImage as e:
            bad.append((i, e.reason or FILE_NOT_FOUND))
    out.flush()
    del out
    return bad


def _drop_bad(data: Path, shape: tuple[int, int, int, int], bad: list[int]) -> tuple[int, int, int, int]:
    """Move the decodable rows to the front of the file, in order, and cut it to them: the entry's shape."""
    if not bad:
        return shape
    n, row = shape[0], int(np.prod(shape[1:]))
    skip = set(bad)
    good = [i for i in range(n) if i not in skip]
    array = np.memmap(data, dtype=np.uint8, mode="r+", shape=(n, row))
    for j, i in enumerate(good):
        if i != j:
            array[j] = array[i]
    array.flush()
    del array
    os.truncate(data, len(good) * row)
    return (len(good), *shape[1:])


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- listing, eviction, clearing ---------------------------------------------------------------------------------

@dataclass
class EntryInfo:
    key: str
    path: Path
    root: str
    images: int
    bad: int
    image_size: int
    nbytes: int
    last_used: float  # seconds since the epoch


def entries(folder: str | os.PathLike | None = None) -> list[EntryInfo]:
    """The complete entries of the cache folder, least recently used first."""
    folder = cache_dir(folder)
    found = []
    for meta_path in folder.glob(f"*/{META}"):
        entry = meta_path.parent
        if entry.name.startswith("."):
            continue
        try:
            meta = json.loads(meta_path.read_text())
            nbytes = sum(f.stat().st_size for f in entry.iterdir())
            found.append(EntryInfo(entry.name, entry, meta["root"], int(meta["shape"][0]), len(meta["bad"]),
                                   int(meta["image_size"]), nbytes, meta_path.stat().st_mtime))
        except (OSError, ValueError, KeyError):
            continue  # removed meanwhile, or not an entry
    return sorted(found, key=lambda e: e.last_used)


def evict(folder: Path, max_bytes: int) -> list[EntryInfo]:
    """Remove least recently used entries (never one this process is using) until the folder's entries total
    at most `max_bytes`; also remove what killed processes left behind. Returns the removed entries."""
    _remove_orphans(folder)
    listed = entries(folder)
    total = sum(e.nbytes for e in listed)
    removed = []
    for entry in listed:
        if total <= max_bytes:
            break
        if entry.key in _in_use:
            continue
        _remove(entry.path)
        total -= entry.nbytes
        removed.append(entry)
    if removed:
        log.info("decoded-image cache: removed %d least recently used entr%s (%.1f MiB) to stay under %.1f GiB",
                 len(removed), "y" if len(removed) == 1 else "ies", sum(e.nbytes for e in removed) / 2**20,
                 max_bytes / 2**30)
    return removed


def clear(folder: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> list[EntryInfo]:
    """Remove every entry (or only those of dataset root `root`) and any leftovers; returns the removed entries."""
    folder = cache_dir(folder)
    wanted = str(Path(root).resolve()) if root is not None else None
    removed = [e for e in entries(folder) if wanted is None or e.root == wanted]
    for entry in removed:
        _remove(entry.path)
    if folder.is_dir():
        _remove_orphans(folder)
    return removed


def _remove(entry: Path) -> None:
    # Renamed first, so a reader never finds a half-removed entry; mapped readers keep their pages.
    trash = entry.with_name(f"{TRASH}{entry.name}-{os.getpid()}")
    try:
        os.rename(entry, trash)
    except OSError:
        return  # removed by another process
    shutil.rmtree(trash, ignore_errors=True)


def _remove_orphans(folder: Path) -> None:
    """Temp folders of writers that died (their key's lock is free), trash, and lock files nobody holds."""
    for path in folder.glob(f"{TRASH}*"):
        shutil.rmtree(path, ignore_errors=True)
    for lock in folder.glob("*.lock"):
        key = lock.name[:-len(".lock")]
        try:
            with open(lock, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                for temp in folder.glob(f"{TEMP}{key}-*"):
                    shutil.rmtree(temp, ignore_errors=True)
                if not (folder / key).exists():
                    lock.unlink(missing_ok=True)
        except OSError:
            continue  # held: a writer is at work
