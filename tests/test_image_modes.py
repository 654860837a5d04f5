"""Every image mode Pillow opens is read as its 8-bit RGB picture, or refused with the file and the mode named."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pyro_ibdr.experiments.data.preprocess import ImagePreprocess
from pyro_ibdr.experiments.data.vtab import SIXTEEN_BIT_MODES, VTABDataset, load_image, to_rgb8

# Pillow warns when a conversion loses information (a palette transparency table read as RGB): an error here.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

RED, GREEN, GREY = (255, 0, 0), (0, 255, 0), (77, 77, 77)


def _png16(samples: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes none in colour): ``samples`` (H, W, channels) in [0, 65535].

    colour_type: 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA.
    """
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[r].astype(">u2").tobytes() for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _palette(transparency: int | bytes | None = None) -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *GREEN])
    image.putpixel((1, 0), 1)
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def _two_pixels(mode: str, first: object, second: object) -> Image.Image:
    image = Image.new(mode, (2, 1), first)
    image.putpixel((1, 0), second)
    return image


# (case, image built in memory, the formats that write that mode, the expected RGB of the two pixels, tolerance)
WRITABLE = [
    ("1", lambda: _two_pixels("1", 0, 1), ("PNG", "TIFF", "BMP", "PPM"), [(0, 0, 0), (255, 255, 255)], 0),
    ("L", lambda: _two_pixels("L", 77, 200), ("PNG", "TIFF", "BMP", "PPM"), [GREY, (200, 200, 200)], 0),
    ("L-jpeg", lambda: Image.new("L", (8, 8), 77), ("JPEG",), [GREY, GREY], 2),
    ("LA", lambda: _two_pixels("LA", (77, 0), (200, 255)), ("PNG", "TIFF"), [GREY, (200, 200, 200)], 0),
    ("P", _palette, ("PNG", "TIFF", "GIF", "BMP"), [RED, GREEN], 0),
    ("P-transparent-index", lambda: _palette(0), ("PNG", "GIF"), [RED, GREEN], 0),
    ("P-transparency-table", lambda: _palette(bytes([0, 128])), ("PNG",), [RED, GREEN], 0),
    ("PA", lambda: _palette().convert("PA"), ("TIFF",), [RED, GREEN], 0),
    ("RGB", lambda: _two_pixels("RGB", RED, (10, 20, 30)), ("PNG", "TIFF", "BMP", "PPM"), [RED, (10, 20, 30)], 0),
    ("RGB-jpeg", lambda: Image.new("RGB", (8, 8), (200, 40, 90)), ("JPEG",), [(200, 40, 90)] * 2, 3),
    ("RGBA", lambda: _two_pixels("RGBA", (*RED, 0), (10, 20, 30, 128)), ("PNG", "TIFF"), [RED, (10, 20, 30)], 0),
    ("RGBX", lambda: _two_pixels("RGBX", (*RED, 0), (10, 20, 30, 0)), ("TIFF",), [RED, (10, 20, 30)], 0),
    ("CMYK", lambda: _two_pixels("CMYK", (0, 255, 255, 0), (0, 0, 0, 128)), ("TIFF",), [RED, (127, 127, 127)], 0),
    ("CMYK-jpeg", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), ("JPEG",), [RED, RED], 3),
    # ITU-R BT.601 full range: Y 76, Cb 85, Cr 255 is red; Y 128, Cb = Cr = 128 is mid grey.
    ("YCbCr", lambda: _two_pixels("YCbCr", (76, 85, 255), (128, 128, 128)), ("TIFF",), [RED, (128, 128, 128)], 1),
    # CIELAB bytes: L* = 255 -> 100 (white); L* = 128 -> 50.2, a* = b* = 0 -> sRGB grey 119.
    ("LAB", lambda: _two_pixels("LAB", (255, 128, 128), (128, 128, 128)), ("TIFF",),
     [(255, 255, 255), (119, 119, 119)], 2),
    # 16-bit grey: v -> round(v / 257); 30000 -> 117, 65535 -> 255.
    ("I;16", lambda: _two_pixels("I;16", 30000, 65535), ("PNG", "TIFF", "PPM"), [(117,) * 3, (255,) * 3], 0),
    ("I;16B", lambda: _two_pixels("I;16B", 30000, 257), ("PNG", "TIFF"), [(117,) * 3, (1,) * 3], 0),
    ("I;16L", lambda: _two_pixels("I;16L", 0, 12850), ("TIFF",), [(0,) * 3, (50,) * 3], 0),
    ("I", lambda: _two_pixels("I", 30000, 65535), ("TIFF",), [(117,) * 3, (255,) * 3], 0),
]


def _pixels(image: Image.Image) -> list[tuple[int, ...]]:
    return [image.getpixel((0, 0)), image.getpixel((1, 0))]


def _assert_rgb(image: Image.Image, expected: list[tuple[int, ...]], tolerance: int) -> None:
    assert image.mode == "RGB"
    got = np.array(_pixels(image), dtype=int)
    assert np.abs(got - np.array(expected)).max() <= tolerance, (_pixels(image), expected)


@pytest.mark.parametrize(("case", "build", "formats", "expected", "tolerance"), WRITABLE, ids=[c[0] for c in WRITABLE])
def test_every_writable_mode_reads_as_its_rgb_picture(tmp_path, case, build, formats, expected, tolerance):
    for fmt in formats:
        path = tmp_path / f"image.{fmt.lower()}"
        build().save(path, format=fmt)
        _assert_rgb(load_image(path), expected, tolerance)


@pytest.mark.parametrize(("colour_type", "samples", "expected"), [
    (2, [[[65535, 0, 0], [10 * 257, 20 * 257, 30 * 257]]], [RED, (10, 20, 30)]),
    (6, [[[65535, 0, 0, 0], [10 * 257, 20 * 257, 30 * 257, 65535]]], [RED, (10, 20, 30)]),
    (4, [[[77 * 257, 0], [200 * 257, 65535]]], [GREY, (200, 200, 200)]),
    (0, [[[30000], [65535]]], [(117,) * 3, (255,) * 3]),
], ids=["rgb16", "rgba16", "grey-alpha16", "grey16"])
def test_sixteen_bit_pngs(tmp_path, colour_type, samples, expected):
    path = tmp_path / "deep.png"
    path.write_bytes(_png16(np.array(samples), colour_type))
    _assert_rgb(load_image(path), expected, 0)


def test_sixteen_bit_grey_photo_is_not_read_as_white(tmp_path):
    """The issue's instance: a 16-bit grey PNG read by Pillow's own conversion is 97 % pure white."""
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "photo16.png"
    Image.fromarray(levels).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    picture = np.asarray(load_image(path))
    reference = np.rint(levels / 257)
    assert np.abs(picture[..., 0] - reference).max() == 0
    assert (picture == 255).mean() < 0.01 and abs(picture.mean() - 127.5) < 1


def test_memory_only_modes_and_every_pillow_mode():
    """Modes no format writes (HSV, La, RGBa, I;16N) by their known values; then every mode Pillow defines is
    read as a 2x2 8-bit RGB picture or refused with the mode named."""
    _assert_rgb(to_rgb8(_two_pixels("HSV", (0, 255, 255), (85, 255, 255)), "x"), [RED, GREEN], 0)
    _assert_rgb(to_rgb8(_two_pixels("La", (100, 128), (77, 255)), "x"), [(199,) * 3, GREY], 1)
    _assert_rgb(to_rgb8(_two_pixels("RGBa", (100, 50, 20, 128), (*RED, 255)), "x"), [(199, 99, 39), RED], 1)
    _assert_rgb(to_rgb8(_two_pixels("I;16N", 30000, 65535), "x"), [(117,) * 3, (255,) * 3], 0)
    refused = set()
    for mode in Image.MODES:
        try:
            picture = to_rgb8(Image.new(mode, (2, 2)), "x.img")
        except ValueError as err:
            assert f"'{mode}'" in str(err) and "x.img" in str(err)
            refused.add(mode)
            continue
        assert picture.mode == "RGB" and picture.size == (2, 2)
    assert refused == {"F"}
    assert set(SIXTEEN_BIT_MODES) <= set(Image.MODES)


@pytest.mark.parametrize(("mode", "value", "fmt", "fragment"), [
    ("F", 0.5, "TIFF", "'F'"),
    ("F", 0.5, "PPM", "'F'"),  # PFM
    ("I", 70000, "TIFF", "outside the 16-bit range"),
    ("I", -5, "TIFF", "outside the 16-bit range"),
])
def test_modes_without_a_fixed_range_are_refused_naming_file_and_mode(tmp_path, mode, value, fmt, fragment):
    path = tmp_path / f"odd.{fmt.lower()}"
    Image.new(mode, (2, 2), value).save(path, format=fmt)
    with pytest.raises(ValueError, match=fragment) as info:
        load_image(path)
    assert "odd." in str(info.value) and f"'{mode}'" in str(info.value)


def test_dataset_reads_sixteen_bit_images(tmp_path):
    folder = tmp_path / "eurosat"
    folder.mkdir()
    Image.new("I;16", (4, 4), 128 * 257).save(folder / "a.png")
    (folder / "test.txt").write_text("a.png 1\n")
    image, label = VTABDataset(tmp_path, "eurosat", "test", preprocess=ImagePreprocess(input_size=(3, 4, 4)))[0]
    assert label == 1
    assert float(image.abs().max()) < 0.01  # level 128 of 255 normalised by mean = std = 0.5
