"""Pixel conversion: every mode to 8-bit gray, 16-bit scaled (never clipped), DICOM LUT order and orientation."""
import numpy as np
import pytest
from PIL import Image

from data.image_io import ImageDecodeError, load_gray
from data.synthetic import chest_image, gradient, save_png16, truncate_file, write_dicom


@pytest.fixture
def chest():
    return chest_image(48, 40, seed=3)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P"])
def test_8bit_modes_become_the_same_gray(tmp_path, chest, mode):
    path = tmp_path / f"x_{mode}.png"
    Image.fromarray(chest).convert(mode).save(path)
    out = np.asarray(load_gray(str(path)))
    assert out.dtype == np.uint8 and out.shape == chest.shape
    assert np.abs(out.astype(int) - chest).max() <= 1


@pytest.mark.parametrize("full_range", [False, True])
def test_16bit_png_is_scaled_not_clipped(tmp_path, chest, full_range):
    path = str(tmp_path / "x16.png")
    save_png16(path, chest, full_range)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_gray(path)).astype(float)
    assert (out == 255).mean() < 0.05  # PIL's convert('L') would make ~all pixels white
    assert np.corrcoef(out.ravel(), chest.ravel())[0, 1] > 0.98


def test_truncated_jpeg_and_png_raise_with_path(tmp_path, chest):
    for name in ("t.jpg", "t.png"):
        path = str(tmp_path / name)
        Image.fromarray(chest).save(path)
        truncate_file(path, keep=0.5)
        with pytest.raises(ImageDecodeError, match=f"could not decode .*{name}"):
            load_gray(path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing: .*nope.png"):
        load_gray(str(tmp_path / "nope.png"))


@pytest.mark.parametrize("variant", [
    {"bits_stored": 12, "window": (2048, 4096)},
    {"bits_stored": 12, "photometric": "MONOCHROME1"},
    {"bits_stored": 14},
    {"bits_stored": 8},
    {"bits_stored": 12, "rescale": (2.0, -100.0)},
    {"bits_stored": 12, "file_meta": False},
])
def test_dicom_decodes_dark_left_bright_right(tmp_path, variant):
    pixels = gradient(40, 64, (1 << variant["bits_stored"]) - 1)
    if variant.get("photometric") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # stored inverted; MONOCHROME1 displays low values white
    path = str(tmp_path / "x.dcm")
    write_dicom(path, pixels, **variant)
    out = np.asarray(load_gray(path)).astype(float)
    assert out[:, :4].mean() < 20 and out[:, -4:].mean() > 235


def test_dicom_window_and_rescale_are_applied_before_the_percentile_stretch(tmp_path):
    """A narrow window saturates most of a 12-bit gradient, and a negative rescale slope flips it: results the final
    percentile stretch alone cannot give, so skipping either LUT fails here."""
    pixels = gradient(40, 256, 4095)
    plain, windowed, flipped = (str(tmp_path / f"{n}.dcm") for n in ("plain", "windowed", "flipped"))
    write_dicom(plain, pixels)
    write_dicom(windowed, pixels, window=(1024, 1024))  # 512..1536 of 0..4095 spans the display range
    write_dicom(flipped, pixels, rescale=(-1.0, 4095.0))
    out_plain, out_windowed, out_flipped = (np.asarray(load_gray(p)).astype(float) for p in (plain, windowed, flipped))
    assert (out_plain >= 250).mean() < 0.05 and (out_windowed >= 250).mean() > 0.5
    assert 0.08 < (out_windowed <= 5).mean() < 0.2  # below the window: values under 512, an eighth of the range
    assert out_flipped[:, :4].mean() > 235 and out_flipped[:, -4:].mean() < 20


def test_dicom_detected_by_content_without_extension(tmp_path):
    path = str(tmp_path / "noext")
    write_dicom(path, gradient(16, 16, 4095))
    assert np.asarray(load_gray(path))[:, -1].mean() > 235


def test_dicom_without_pixel_data_is_a_decode_error(tmp_path):
    path = str(tmp_path / "empty.dcm")
    write_dicom(path, gradient(8, 8, 4095), pixel_data=False)
    with pytest.raises(ImageDecodeError, match="empty.dcm: the DICOM has no PixelData"):
        load_gray(path)


def test_reduced_jpeg_decode_keeps_min_side(tmp_path):
    path = str(tmp_path / "big.jpg")
    Image.fromarray(chest_image(800, 640, seed=1)).save(path, quality=95)
    small = load_gray(path, min_side=150)
    assert min(small.size) >= 150 and small.size[0] < 640
