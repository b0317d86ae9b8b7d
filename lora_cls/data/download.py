"""Fetching the real datasets (docs/DESIGN.md §5): resumable download, size and checksum check, safe unzip, and a
layout check of what was unpacked. Used by scripts/download_malaria.py and scripts/download_smoking.py.

lora_cls.data (numpy and PIL) is imported only by the layout check, so a script's --help and its download
instructions come at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from lora_cls.errors import UserError

if TYPE_CHECKING:
    from lora_cls.data.splits import DatasetSplits

CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    url: str
    size: int
    sha256: str


MALARIA_ARCHIVE = RemoteFile(
    url="https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip",
    size=353_452_851,
    sha256="0a949556b2414159b5100192609805376654c4266d8d187be9b1922fad43c668",
)
MALARIA_PER_CLASS = 13_779
SMOKING_KAGGLE_SLUG = "sujaykapadnis/smoking"
SMOKING_PAGE = "https://www.kaggle.com/datasets/sujaykapadnis/smoking"


# ----------------------------------------------------------------------------------------------- verify


def sha256_file(path: str | Path, progress: bool = False) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"sha256 {path.name}", disable=not progress, leave=False) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_file(path: str | Path, size: int | None, sha256: str | None, progress: bool = False) -> None:
    """Raise UserError unless `path` exists with exactly `size` bytes and this sha256 (None: not checked)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise UserError(f"{path} is {actual:,} bytes, expected {size:,}: it is incomplete or not the right file; "
                        "delete it and download it again")
    if sha256 is not None:
        digest = sha256_file(path, progress)
        if digest != sha256.lower():
            raise UserError(f"{path} has sha256 {digest}, expected {sha256.lower()}: the file is corrupt or not the "
                            "right one; delete it and download it again")


# ----------------------------------------------------------------------------------------------- download


def download(url: str, dest: str | Path, size: int | None = None, sha256: str | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` through `<dest>.part`, resuming a partial file with an HTTP Range request.

    A `dest` that already exists is only verified. The finished `.part` is verified (size, then sha256) before
    it is renamed to `dest`. A short file is kept so the next call resumes it; a file with the full size but
    the wrong checksum, or a longer one, is deleted (resuming it cannot repair it). Raises UserError.
    """
    dest = Path(dest)
    if dest.exists():
        verify_file(dest, size, sha256, progress)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is None or have < size:
        _fetch(url, part, have, size, progress, timeout)
    got = part.stat().st_size
    if size is not None and got < size:
        raise UserError(f"download of {url} stopped at {got:,} of {size:,} bytes; run the same command again to "
                        f"resume from {part}")
    try:
        verify_file(part, size, sha256, progress)
    except UserError as exc:
        part.unlink(missing_ok=True)
        raise UserError(f"{exc} (the download {part} was removed; run the command again for a fresh download)") from None
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, have: int, size: int | None, progress: bool, timeout: float) -> None:
    headers = {"User-Agent": "lora-cls"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return  # nothing left to send: the partial file is complete (or too long, which verify catches)
        raise UserError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach {url} ({reason}); check the network, or download the file by hand and "
                        "pass it with --archive PATH") from None
    with response:
        resumed = have > 0 and response.status == 206 and _range_start(response) == have
        if not resumed:
            have = 0  # the server ignored the Range header (or there was none): start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else size
        mode = "ab" if resumed else "wb"
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
                reason = None
            except (OSError, ValueError) as exc:  # connection reset, timeout, IncompleteRead
                reason = str(exc) or type(exc).__name__
            f.flush()
            # http.client ends a read quietly when the server closes early, so compare with Content-Length.
            if reason is None and total is not None and f.tell() < total:
                reason = f"the server closed the connection at {f.tell():,} of {total:,} bytes"
            if reason is not None:
                raise UserError(f"download of {url} was interrupted after {f.tell():,} bytes ({reason}); run the "
                                "same command again to resume")


def _range_start(response) -> int | None:
    """First byte of a 206 response's Content-Range (`bytes START-END/TOTAL`), None if absent or malformed."""
    value = response.headers.get("Content-Range", "")
    unit, _, spec = value.partition(" ")
    start = spec.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


# ----------------------------------------------------------------------------------------------- unzip


def extract_zip(archive: str | Path, dest: str | Path, strip: str = "", progress: bool = True) -> list[str]:
    """Unpack `archive` into `dest`, dropping the leading folder `strip` (e.g. "smoking/") from every name.

    Member names that would land outside `dest`, `__MACOSX/` resource forks and members outside `strip` are
    skipped or refused. Everything is extracted into a temp folder inside `dest` first, CRC-checked while
    reading, then moved into place, so a corrupt archive leaves `dest` as it was. Refuses to overwrite: a
    top-level entry that already exists in `dest` is an error. Returns the top-level names created.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise UserError(f"archive {archive} does not exist")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{archive} is not a readable zip archive ({exc}); download it again") from None
    with zf:
        members = []
        for info in zf.infolist():
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if info.is_dir() or not name.parts or name.parts[0] == "__MACOSX":
                continue
            if strip and not str(name).startswith(strip):
                continue
            relative = PurePosixPath(str(name)[len(strip):])
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise UserError(f"{archive} holds an unsafe member name {info.filename!r}; refusing to unpack it")
            members.append((info, relative))
        if not members:
            raise UserError(f"{archive} holds no files" + (f" under {strip}" if strip else ""))
        tops = sorted({relative.parts[0] for _, relative in members})
        existing = [top for top in tops if (dest / top).exists()]
        if existing:
            raise UserError(f"{', '.join(str(dest / t) for t in existing)} already exist(s); remove them to unpack "
                            f"{archive} again, or use the data that is there")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".unpacking."))
        try:
            total = sum(info.file_size for info, _ in members)
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"unpacking {archive.name}",
                      disable=not progress) as bar:
                for info, relative in members:
                    target = tmp.joinpath(*relative.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        with zf.open(info) as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out, CHUNK)
                    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
                        raise UserError(f"{archive} is corrupt at {info.filename} ({exc}); download it again") from None
                    bar.update(info.file_size)
            for top in tops:
                os.replace(tmp / top, dest / top)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tops


def zip_prefix(archive: str | Path, folder: str) -> str | None:
    """The leading path under which a folder named `folder` sits in the zip ("" at the top level), None if absent.

    Archives re-packed by hand often gain a wrapping folder (`smoking/Training/...`); this finds it.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{archive} is not a readable zip archive ({exc}); download it again") from None
    prefixes = set()
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if parts and parts[0] != "__MACOSX" and folder in parts[:-1]:
            i = parts.index(folder)
            prefixes.add("/".join(parts[:i]) + "/" if i else "")
    return min(prefixes, key=len) if prefixes else None


# ----------------------------------------------------------------------------------------------- layout check


def check_layout(name: str, cfg: Any) -> tuple[DatasetSplits, list[str]]:
    """Read an unpacked dataset exactly as training will (`cfg`: its dataset config, e.g.
    `conf.schema.dataset_config(name, root)`); returns the splits and a list of warnings.

    Warns (in the returned list) when counts differ from the published set. Decodability is the data check's
    job (`lora-data check`), not this one's: here only the layout, names and counts are checked.
    """
    from lora_cls.data.layouts import MALARIA_CLASSES, collected_warnings, prepare_splits
    from lora_cls.data.splits import SPLIT_NAMES

    with collected_warnings() as notes:
        splits = prepare_splits(cfg)
    root = cfg.root
    if name == "malaria":
        for label, cls in enumerate(MALARIA_CLASSES):
            n = sum(1 for split in SPLIT_NAMES for _, y in splits.split(split) if y == label)
            if n != MALARIA_PER_CLASS:
                notes.append(f"malaria dataset at {root} has {n:,} {cls} images, the published set has "
                             f"{MALARIA_PER_CLASS:,}; results are not comparable with published numbers")
    return splits, notes


def describe_splits(name: str, splits: DatasetSplits) -> list[str]:
    """Human-readable lines: images per split and class, non-image files ignored, patients for malaria."""
    from lora_cls.data.layouts import malaria_patient
    from lora_cls.data.splits import SPLIT_NAMES

    lines = [f"{name} at {splits.root}: classes {splits.classes}, positive class {splits.positive_class}"]
    for split in SPLIT_NAMES:
        samples = splits.split(split)
        per_class = ", ".join(f"{sum(1 for _, y in samples if y == i):,} {c}" for i, c in enumerate(splits.classes))
        extra = ""
        if name == "malaria":
            extra = f", {len({malaria_patient(p) for p, _ in samples})} patients"
        lines.append(f"  {split:5s} {len(samples):6,} images ({per_class}{extra})")
    if splits.ignored:
        lines.append(f"  {splits.ignored} non-image file(s) ignored (Thumbs.db and the like)")
    return lines


# ----------------------------------------------------------------------------------------------- kaggle


def report_layout(name: str, dest: Path, cfg: Any) -> None:
    """Read the unpacked data in `dest` as lora-train will (`cfg`: its dataset config); print its splits, any
    warnings and the next step."""
    splits, notes = check_layout(name, cfg)
    print("\n".join(describe_splits(name, splits)))
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"done. Check every image with: lora-data check dataset={name} dataset.root={dest}")


def script_entry(main: Callable[[], None]) -> None:
    """Run a download script under the `error:` / exit 2 contract of lora_cls.cli.common.fail, without
    importing the CLI stack (which pulls in torch: --help would take seconds)."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def kaggle_credentials() -> str | None:
    """Where a Kaggle API token is configured (a description), or None.

    The Kaggle client reads KAGGLE_USERNAME + KAGGLE_KEY, else kaggle.json in KAGGLE_CONFIG_DIR,
    ~/.kaggle or ~/.config/kaggle.
    """
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    folders = [os.environ.get("KAGGLE_CONFIG_DIR"), "~/.kaggle", "~/.config/kaggle"]
    for folder in folders:
        if folder and (Path(folder).expanduser() / "kaggle.json").is_file():
            return str(Path(folder).expanduser() / "kaggle.json")
    return None


def kaggle_download(slug: str, folder: str | Path) -> Path:
    """Download the Kaggle dataset `slug` as a zip into `folder` with the official client; the zip's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.glob("*.zip"))
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(slug, path=str(folder), unzip=False, quiet=False)
    except ImportError:
        raise UserError("the kaggle package is not installed; pip install kaggle, or download the archive by hand "
                        "and pass --archive PATH") from None
    except Exception as exc:  # the client raises its own HTTP and auth error types, whose names vary by version
        raise UserError(f"Kaggle download of {slug} failed ({type(exc).__name__}: {exc}); check the slug (--slug) "
                        "and your token, or download the archive by hand and pass --archive PATH") from None
    new = sorted(set(folder.glob("*.zip")) - before) or sorted(folder.glob("*.zip"))
    if not new:
        raise UserError(f"the Kaggle client wrote no zip into {folder}")
    return new[0]
