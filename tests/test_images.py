import numpy as np
import pytest
from PIL import Image

from conftest import write_dicom
from medfm.data.images import ImageReadError, read_radiograph, to_rgb_tensor

GRADIENT = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))


def test_8bit_png(tmp_path):
    Image.fromarray(np.round(GRADIENT * 255).astype(np.uint8), mode="L").save(tmp_path / "a.png")
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.png"), GRADIENT, atol=1 / 255)


def test_16bit_png_keeps_its_bit_depth(tmp_path):
    values = np.round(GRADIENT * 65535).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    array = read_radiograph(tmp_path / "a.png")
    np.testing.assert_allclose(array, GRADIENT, atol=1e-4)
    assert len(np.unique(array)) > 60  # not squashed to 8 bits first


def test_rgb_jpeg_becomes_grayscale(tmp_path):
    rgb = np.repeat((GRADIENT * 255).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    array = read_radiograph(tmp_path / "a.jpg")
    assert array.shape == (48, 64)
    np.testing.assert_allclose(array, GRADIENT, atol=0.03)


def test_dicom_monochrome1_is_inverted_to_the_monochrome2_look(tmp_path):
    stored = np.round(GRADIENT * 4095)
    m2 = read_radiograph(write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2"))
    m1 = read_radiograph(write_dicom(tmp_path / "m1.dcm", 4095 - stored, "MONOCHROME1"))
    np.testing.assert_allclose(m2, GRADIENT, atol=1e-3)
    np.testing.assert_allclose(m1, m2, atol=1e-3)


def test_dicom_window_is_applied(tmp_path):
    stored = np.round(GRADIENT * 4000)
    array = read_radiograph(write_dicom(tmp_path / "w.dcm", stored, window=(1000, 400)))
    assert array[:, stored[0] < 800].max() == 0  # below the window: black
    assert array[:, stored[0] > 1200].min() == 1  # above the window: white
    inside = (stored[0] > 850) & (stored[0] < 1150)
    assert 0 < array[0, inside].min() < array[0, inside].max() < 1


def test_dicom_rescale_slope_and_intercept(tmp_path):
    stored = np.round(GRADIENT * 1000)
    plain = read_radiograph(write_dicom(tmp_path / "a.dcm", stored))
    rescaled = read_radiograph(write_dicom(tmp_path / "b.dcm", stored, slope=-1, intercept=1000))
    np.testing.assert_allclose(rescaled, 1 - plain, atol=1e-6)  # negative slope flips the values


def test_dicom_without_pixel_data_is_a_clear_error(tmp_path):
    path = write_dicom(tmp_path / "sr.dcm", np.zeros((4, 4)), with_pixels=False)
    with pytest.raises(ImageReadError, match="sr.dcm: DICOM has no pixel data"):
        read_radiograph(path)


def test_truncated_and_missing_files_are_clear_errors(tmp_path):
    Image.fromarray(np.round(GRADIENT * 255).astype(np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png: cannot decode image"):
        read_radiograph(tmp_path / "cut.png")
    with pytest.raises(ImageReadError, match="nope.png: file not found"):
        read_radiograph(tmp_path / "nope.png")


def test_model_input_is_3_channel_square_in_minus_one_to_one():
    tensor = to_rgb_tensor(GRADIENT, 32)
    assert tensor.shape == (3, 32, 32)
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert (tensor[0] == tensor[2]).all()
    assert tensor[0, 0, 0] < tensor[0, 0, -1]  # left stays left: no flip


def test_radiograph_files_lists_supported_suffixes_and_says_when_there_are_none(tmp_path):
    from medfm.data.images import radiograph_files

    (tmp_path / "sub").mkdir()
    for name in ("b.PNG", "a.dcm", "notes.txt", "sub/c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in radiograph_files(tmp_path)] == ["a.dcm", "b.PNG"]
    assert [p.name for p in radiograph_files(tmp_path, recursive=True)] == ["a.dcm", "b.PNG", "c.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no radiographs"):
        radiograph_files(tmp_path / "empty")
