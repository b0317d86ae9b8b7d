"""Download scripts without a network: size/checksum verification, resumable download against a loopback HTTP
server, safe unzip, and both scripts unpacking and checking small archives laid out like the real ones."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from lora_cls.data.download import RemoteFile, download, extract_zip, verify_file, zip_prefix
from lora_cls.errors import UserError

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PAYLOAD = bytes(range(256)) * 1000  # 256,000 bytes
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (12, 12), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


# ------------------------------------------------------------------------------------------- verification


def test_verify_file_rejects_wrong_size_and_wrong_checksum(tmp_path):
    path = tmp_path / "cell_images.zip"
    path.write_bytes(PAYLOAD)
    verify_file(path, len(PAYLOAD), PAYLOAD_SHA)  # the right file passes
    with pytest.raises(UserError, match=r"256,000 bytes, expected 256,001"):
        verify_file(path, len(PAYLOAD) + 1, PAYLOAD_SHA)
    with pytest.raises(UserError, match=f"has sha256 {PAYLOAD_SHA}, expected {'0' * 64}"):
        verify_file(path, len(PAYLOAD), "0" * 64)
    with pytest.raises(UserError, match="does not exist"):
        verify_file(tmp_path / "missing.zip", 1, None)


def test_malaria_script_refuses_an_archive_that_is_not_the_published_file(tmp_path):
    script = load_script("download_malaria")
    wrong = write_zip(tmp_path / "cell_images.zip", {"cell_images/Parasitized/a_IMG_1.png": png_bytes((1, 2, 3))})
    with pytest.raises(UserError, match=r"expected 353,452,851"):
        script.main(["--archive", str(wrong), "--dest", str(tmp_path / "malaria"), "--no-progress"])
    assert not (tmp_path / "malaria" / "cell_images").exists()  # nothing unpacked


# ------------------------------------------------------------------------------------------- HTTP download


class Server:
    """A loopback HTTP server for one payload: honours `Range: bytes=N-` (206) unless told not to, and can cut
    a response short after `cut` bytes. Records the Range header of every request."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.ranges: list[str | None] = []
        self.honour_range = True
        self.cut: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                header = self.headers.get("Range")
                server.ranges.append(header)
                start = 0
                if header and server.honour_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(server.payload):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(server.payload)}")
                        self.end_headers()
                        return
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut is not None:
                    body = body[:server.cut]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cell_images.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(PAYLOAD) as s:
        yield s


def test_download_fetches_verifies_and_leaves_no_part_file(server, tmp_path):
    dest = tmp_path / "data" / "cell_images.zip"
    assert download(server.url, dest, len(PAYLOAD), PAYLOAD_SHA, progress=False, timeout=5) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("cell_images.zip.part").exists()
    assert server.ranges == [None]
    download(server.url, dest, len(PAYLOAD), PAYLOAD_SHA, progress=False, timeout=5)  # present: only verified
    assert server.ranges == [None]


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    dest = tmp_path / "cell_images.zip"
    part = tmp_path / "cell_images.zip.part"
    server.cut = 100_000
    with pytest.raises(UserError, match="interrupted after 100,000 bytes.*run the same command again"):
        download(server.url, dest, len(PAYLOAD), PAYLOAD_SHA, progress=False, timeout=5)
    assert part.read_bytes() == PAYLOAD[:100_000] and not dest.exists()
    server.cut = None
    download(server.url, dest, len(PAYLOAD), PAYLOAD_SHA, progress=False, timeout=5)
    assert server.ranges == [None, "bytes=100000-"]
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_download_starts_over_when_the_server_ignores_range(server, tmp_path):
    dest = tmp_path / "cell_images.zip"
    (tmp_path / "cell_images.zip.part").write_bytes(b"x" * 5000)  # not even the right prefix
    server.honour_range = False
    download(server.url, dest, len(PAYLOAD), PAYLOAD_SHA, progress=False, timeout=5)
    assert server.ranges == ["bytes=5000-"]
    assert dest.read_bytes() == PAYLOAD


def test_download_with_the_wrong_checksum_is_removed(server, tmp_path):
    dest = tmp_path / "cell_images.zip"
    with pytest.raises(UserError, match="sha256 .* expected .*removed"):
        download(server.url, dest, len(PAYLOAD), "f" * 64, progress=False, timeout=5)
    assert not dest.exists() and not (tmp_path / "cell_images.zip.part").exists()


def test_complete_part_file_is_verified_without_a_request(server, tmp_path):
    dest = tmp_path / "cell_images.zip"
    (tmp_path / "cell_images.zip.part").write_bytes(PAYLOAD)
    download(server.url, dest, len(PAYLOAD), PAYLOAD_SHA, progress=False, timeout=5)
    assert server.ranges == []
    assert dest.read_bytes() == PAYLOAD


def test_unreachable_server_is_a_user_error(tmp_path):
    with Server(PAYLOAD) as s:
        url = s.url
    with pytest.raises(UserError, match="cannot reach .*--archive"):
        download(url, tmp_path / "f.zip", len(PAYLOAD), PAYLOAD_SHA, progress=False, timeout=5)


# ------------------------------------------------------------------------------------------- unzip


def test_extract_zip_refuses_unsafe_names_and_existing_targets(tmp_path):
    evil = write_zip(tmp_path / "evil.zip", {"ok/a.txt": b"a", "../outside.txt": b"b"})
    with pytest.raises(UserError, match="unsafe member name"):
        extract_zip(evil, tmp_path / "out", progress=False)
    assert not (tmp_path / "outside.txt").exists()
    good = write_zip(tmp_path / "good.zip", {"top/a.txt": b"a", "__MACOSX/top/._a.txt": b"junk"})
    assert extract_zip(good, tmp_path / "out", progress=False) == ["top"]
    assert (tmp_path / "out" / "top" / "a.txt").read_bytes() == b"a"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["top"]  # no __MACOSX, no temp folder
    with pytest.raises(UserError, match="already exist"):
        extract_zip(good, tmp_path / "out", progress=False)


def test_extract_zip_corrupt_member_leaves_the_destination_untouched(tmp_path):
    archive = write_zip(tmp_path / "bad.zip", {"top/a.bin": b"A" * 1000, "top/b.bin": b"B" * 1000},
                        compression=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    raw[raw.index(b"B" * 1000) + 10] ^= 0xFF  # damage b.bin's stored bytes: its CRC no longer matches
    archive.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupt at top/b.bin"):
        extract_zip(archive, tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []
    (tmp_path / "notzip.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable zip"):
        extract_zip(tmp_path / "notzip.zip", tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------- the scripts


def smoking_members(prefix: str = "", per_class: tuple[int, int, int] = (3, 2, 2)) -> dict[str, bytes]:
    members = {}
    for split, n in zip(("Training", "Validation", "Testing"), per_class):
        for cls, colour in (("smoking", (200, 40, 40)), ("notsmoking", (40, 40, 200))):
            for i in range(1, n + 1):
                members[f"{prefix}{split}/{split}/{cls}_{i:04d}.jpg"] = png_bytes(colour, (25, 25), "JPEG")
    return members


def malaria_members() -> dict[str, bytes]:
    """20 patients with 2 cells of each class, a Thumbs.db in each class folder, as in cell_images.zip."""
    members = {}
    for p in range(20):
        for cls in ("Parasitized", "Uninfected"):
            for c in range(2):
                name = f"cell_images/{cls}/C{40 + p}P{p}thinF_IMG_20150622_10{p}{c}a_cell_{c}.png"
                members[name] = png_bytes((p * 40, c * 60, 90 if cls == "Parasitized" else 20))
    members["cell_images/Parasitized/Thumbs.db"] = b"\xd0\xcf\x11\xe0"
    members["cell_images/Uninfected/Thumbs.db"] = b"\xd0\xcf\x11\xe0"
    return members


def test_smoking_archive_is_unpacked_into_the_kaggle_layout_and_checked(tmp_path, capsys):
    script = load_script("download_smoking")
    archive = write_zip(tmp_path / "archive.zip", smoking_members(prefix="smoking/"))
    assert zip_prefix(archive, "Training") == "smoking/"
    dest = tmp_path / "smoking"
    script.main(["--archive", str(archive), "--dest", str(dest), "--no-progress"])
    assert (dest / "Training" / "Training" / "smoking_0001.jpg").is_file()
    assert (dest / "Testing" / "Testing" / "notsmoking_0002.jpg").is_file()
    out, err = capsys.readouterr()
    assert re.search(r"train +6 images \(3 notsmoking, 3 smoking\)", out)
    assert re.search(r"test +4 images \(2 notsmoking, 2 smoking\)", out)
    assert "warning: " in err and "716" in err  # counts differ from the published 716/180/224
    script.main(["--dest", str(dest)])  # already there: checked again, not unpacked again
    assert "already exists" in capsys.readouterr().out


def test_smoking_archive_without_the_layout_is_refused(tmp_path):
    script = load_script("download_smoking")
    archive = write_zip(tmp_path / "archive.zip", {"images/smoking_0001.jpg": png_bytes((1, 1, 1))})
    with pytest.raises(UserError, match="no Training/ folder"):
        script.main(["--archive", str(archive), "--dest", str(tmp_path / "smoking")])


def test_smoking_without_kaggle_token_prints_instructions(tmp_path, monkeypatch, capsys):
    script = load_script("download_smoking")
    for key in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nokaggle"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match="--archive PATH"):
        script.main(["--dest", str(tmp_path / "smoking")])
    err = capsys.readouterr().err
    assert "kaggle.json" in err and "--archive ~/Downloads/archive.zip" in err


@pytest.fixture
def small_malaria(tmp_path, monkeypatch) -> tuple[ModuleType, Path, RemoteFile]:
    """The malaria script with its published size/checksum swapped for those of a small archive."""
    script = load_script("download_malaria")
    archive = write_zip(tmp_path / "cell_images.zip", malaria_members())
    data = archive.read_bytes()
    remote = RemoteFile(url="unused", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(script, "MALARIA_ARCHIVE", remote)
    return script, archive, remote


def test_malaria_script_unpacks_a_verified_archive_and_checks_it(small_malaria, tmp_path, capsys):
    script, archive, _ = small_malaria
    dest = tmp_path / "malaria"
    script.main(["--archive", str(archive), "--dest", str(dest), "--no-progress"])
    assert len(list((dest / "cell_images" / "Parasitized").glob("*.png"))) == 40
    assert (dest / "cell_images" / "Uninfected" / "Thumbs.db").is_file()
    assert archive.is_file()  # an archive the user passed is never deleted
    out = capsys.readouterr().out
    assert "2 non-image file(s) ignored" in out
    assert "patients" in out


def test_malaria_script_rejects_a_wrong_checksum(small_malaria, tmp_path, monkeypatch):
    script, archive, remote = small_malaria
    monkeypatch.setattr(script, "MALARIA_ARCHIVE", RemoteFile(remote.url, remote.size, "0" * 64))
    with pytest.raises(UserError, match="sha256"):
        script.main(["--archive", str(archive), "--dest", str(tmp_path / "malaria")])
    assert not (tmp_path / "malaria").exists()


def test_malaria_script_downloads_from_the_url_and_removes_the_archive(small_malaria, tmp_path):
    script, archive, _ = small_malaria
    dest = tmp_path / "malaria"
    with Server(archive.read_bytes()) as s:
        script.main(["--url", s.url, "--dest", str(dest), "--no-progress"])
    assert (dest / "cell_images" / "Uninfected").is_dir()
    assert sorted(p.name for p in dest.iterdir()) == ["cell_images"]  # the zip and its .part are gone
