"""Decoding: any image mode to uint8 RGB, 16-bit greys, transparency, EXIF orientation, undecodable files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_cls.data.decode import UnreadableImage, decode_image
from lora_cls.errors import UserError


def palette_image(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("P", (20, 20), 1)
    image.putpalette([0, 0, 0, *colour] + [0] * 762)
    return image


def test_decode_image_converts_any_mode_to_rgb(tmp_path):
    cases = {
        "grey.png": Image.new("L", (30, 20), 77),
        "rgba.png": Image.new("RGBA", (20, 20), (10, 200, 30, 255)),
        "la.png": Image.new("LA", (20, 20), (77, 255)),
        "palette.gif": palette_image((10, 200, 30)),
        "cmyk.jpg": Image.new("CMYK", (20, 20), (0, 0, 0, 0)),
        "wide.bmp": Image.new("RGB", (40, 10), (10, 200, 30)),
    }
    expected = {"grey.png": (77, 77, 77), "rgba.png": (10, 200, 30), "la.png": (77, 77, 77),
                "palette.gif": (10, 200, 30), "cmyk.jpg": (255, 255, 255), "wide.bmp": (10, 200, 30)}
    for name, image in cases.items():
        image.save(tmp_path / name)
        out = decode_image(tmp_path / name, 16)
        assert out.dtype == torch.uint8 and out.shape == (3, 16, 16), name
        assert torch.allclose(out[:, 8, 8].int(), torch.tensor(expected[name], dtype=torch.int), atol=2), name


def test_decode_image_scales_16_bit_instead_of_clipping(tmp_path):
    for value, expected in ((32768, 128), (65535, 255), (1000, 4)):
        Image.fromarray(np.full((10, 10), value, np.uint16)).save(tmp_path / "g16.png")
        assert Image.open(tmp_path / "g16.png").mode == "I;16"
        out = decode_image(tmp_path / "g16.png", 16)
        assert out.shape == (3, 16, 16)
        assert (out.int() - expected).abs().max() <= 1, value


def test_decode_image_composites_transparency_over_white(tmp_path):
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 5, 10))
    image.save(tmp_path / "half.png")
    out = decode_image(tmp_path / "half.png", 10)
    assert out[:, 5, 1].tolist() == [255, 0, 0]
    assert out[:, 5, 8].tolist() == [255, 255, 255]


def test_decode_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": left edge becomes the top
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "rotated.jpg", 16).int()
    assert out[0, 1, 8] > 200 and out[2, 1, 8] < 60  # top is red
    assert out[2, 14, 8] > 200 and out[0, 14, 8] < 60  # bottom is blue


def test_decode_image_undecodable_raises_naming_the_path(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for path in (garbage, truncated, tmp_path / "missing.png"):
        with pytest.raises(UnreadableImage, match=str(path)) as info:
            decode_image(path, 16)
        assert isinstance(info.value, UserError)
        assert info.value.path == str(path)


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray((np.arange(24 * 24 * 3) % 251).astype(np.uint8).reshape(24, 24, 3)).save(buf, "PNG")
    return buf.getvalue()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_image_bytes_never_crash_the_loader(png_bytes, tmp_path, data):
    raw = bytearray(png_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    path = tmp_path / "img.png"
    path.write_bytes(bytes(raw[:cut]))
    try:
        image = decode_image(path, 16)
    except UnreadableImage as exc:
        assert str(path) in str(exc)
    else:
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8


def test_an_image_over_max_image_pixels_is_refused_in_one_line_naming_the_setting(tmp_path, recwarn):
    from lora_cls.data.decode import verify_image

    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    with pytest.raises(UnreadableImage) as info:
        decode_image(path, 16, max_pixels=1000)
    assert "40x30 = 1,200 pixels" in info.value.reason and "dataset.max_image_pixels=null" in info.value.reason
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert verify_image(path, max_pixels=1000) == info.value.reason
    assert decode_image(path, 16, max_pixels=None).shape == (3, 16, 16)  # null: no limit
    assert decode_image(path, 16, max_pixels=1200).shape == (3, 16, 16)  # the limit itself is allowed
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]  # PIL's own guard is off
