"""Writing files whole or not at all: `atomic_open` (temp file, fsync, rename, the umask's normal permissions), the one writer of everything lora-cls writes, and JSON/text on top of it."""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open `path` for writing ("w" text, UTF-8, or "wb") so that it appears complete or not at all.

    Writes go to a hidden temp file next to `path`; on a clean exit it is fsynced and renamed over `path`,
    on an exception it is removed and `path` keeps its previous content. Parent directories are created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # 0o666 filtered by the umask, like open(); mkstemp's 0o600 would make outputs unreadable to others.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            f = os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": newline}))
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, str(tmp)):
            # A full disk or a read-only folder shows up in a write, fsync or rename that names no file (or
            # only the hidden temp file): name the file that could not be written.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def to_jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars/arrays, tuples and paths turned into JSON types, NaN/inf into None.

    Strict JSON (no NaN tokens) keeps metrics.json readable by every JSON parser, not only Python's.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays and scalars, without importing numpy
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write `obj` as indented JSON atomically (see `to_jsonable` for the conversions)."""
    with atomic_open(path, "w") as f:
        json.dump(to_jsonable(obj), f, indent=indent, allow_nan=False)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)
