"""Image reading: PNG grey/RGB/16-bit, DICOM windowing/MONOCHROME1, and clear errors."""
import numpy as np
import pytest
from PIL import Image

from big_vision_cxr.data import images


def write_dicom(path, pixels, *, photometric="MONOCHROME2", window=None, bits=12, pixel_data=True,
                syntax=None):
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid, SecondaryCaptureImageStorage
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = SecondaryCaptureImageStorage
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
  ds.PixelRepresentation = 0
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  if pixel_data:
    if syntax is None:
      ds.PixelData = pixels.astype(np.uint16).tobytes()
    else:
      from pydicom.encaps import encapsulate
      ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
      ds["PixelData"].VR = "OB"
  ds.save_as(path, enforce_file_format=True)
  return path


@pytest.fixture
def ramp():
  return (np.arange(64 * 32).reshape(64, 32) % 4096).astype(np.uint16)


def test_png_grey_and_rgb(tmp_path):
  grey = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
  Image.fromarray(grey).save(tmp_path / "g.png")
  Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
  np.testing.assert_array_equal(images.read_image(tmp_path / "g.png"), grey)
  np.testing.assert_array_equal(images.read_image(tmp_path / "rgb.png"), grey)


def test_png_16bit_is_stretched(tmp_path):
  arr = np.array([[1000, 2000], [3000, 5000]], np.uint16)
  Image.fromarray(arr).save(tmp_path / "h.png")
  np.testing.assert_array_equal(images.read_image(tmp_path / "h.png"), [[0, 64], [128, 255]])


def test_dicom_window_and_monochrome1(tmp_path, ramp):
  p2 = write_dicom(tmp_path / "m2.dcm", ramp, window=(2048, 1024))
  p1 = write_dicom(tmp_path / "m1.dcm", ramp, window=(2048, 1024), photometric="MONOCHROME1")
  a, b = images.read_image(p2), images.read_image(p1)
  expected = np.round(np.clip((ramp - 2047.5) / 1023 + 0.5, 0, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(a, expected)
  np.testing.assert_array_equal(b, 255 - expected)  # MONOCHROME1 inverted


def test_dicom_12bit_without_window_uses_full_range(tmp_path, ramp):
  out = images.read_image(write_dicom(tmp_path / "n.dcm", ramp))
  assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
  np.testing.assert_array_equal(out, np.round(ramp / 2047 * 255).astype(np.uint8))


def test_dicom_without_pixels_is_a_clear_error(tmp_path, ramp):
  path = write_dicom(tmp_path / "nopix.dcm", ramp, pixel_data=False)
  with pytest.raises(images.ImageError, match="nopix.dcm.*no pixel data"):
    images.read_image(path)


def test_compressed_dicom_without_decoder_is_a_clear_error(tmp_path, ramp):
  from pydicom.uid import JPEG2000Lossless
  path = write_dicom(tmp_path / "j2k.dcm", ramp, syntax=JPEG2000Lossless)
  with pytest.raises(images.ImageError, match="j2k.dcm.*cannot decode DICOM pixel data"):
    images.read_image(path)


def test_corrupt_png_and_paths(tmp_path):
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
  with pytest.raises(images.ImageError, match="bad.png"):
    images.read_image(tmp_path / "bad.png")
  with pytest.raises(images.DataPathError, match="escapes the dataset root"):
    images.read_image("../outside.png", root=tmp_path)
  with pytest.raises(images.DataPathError, match="not found"):
    images.read_image("missing.png", root=tmp_path)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok.png")
  with pytest.raises(images.DataPathError, match="over the limit"):
    images.read_image("ok.png", root=tmp_path, max_bytes=10)


def test_dicom_voi_lut_sequence_is_applied(tmp_path, ramp):
  from pydicom.dataset import Dataset
  from pydicom.sequence import Sequence
  path = write_dicom(tmp_path / "lut.dcm", ramp)
  import pydicom
  ds = pydicom.dcmread(path)
  item = Dataset()
  item.LUTDescriptor = [4096, 0, 16]
  item.LUTData = [4095 - i for i in range(4096)]  # an inverting LUT
  item["LUTData"].VR = "US"
  ds.VOILUTSequence = Sequence([item])
  ds.save_as(path)
  out = images.read_image(path)
  plain = images.read_image(write_dicom(tmp_path / "plain.dcm", ramp))
  np.testing.assert_array_equal(out, 255 - plain)


def test_paths_stay_inside_the_root(tmp_path):
  root = tmp_path / "data"
  (root / "sub").mkdir(parents=True)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "sub" / "a.png")
  outside = tmp_path / "elsewhere.png"
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside)
  assert images.safe_path(root, "sub/../sub/a.png") == root / "sub" / "a.png"
  for bad in ("../elsewhere.png", str(outside), "sub/../../elsewhere.png"):
    with pytest.raises(images.DataPathError, match="escapes the dataset root"):
      images.safe_path(root, bad)
  (root / "link.png").symlink_to(outside)  # placed by the dataset's owner: trusted
  assert images.read_image("link.png", root=root).shape == (4, 4)


def test_read_radiograph_checks_the_size_from_the_header_first(tmp_path, ramp, monkeypatch):
  Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "ok.png")
  write_dicom(tmp_path / "ok.dcm", ramp)
  np.testing.assert_array_equal(images.read_radiograph(tmp_path / "ok.png"), images.read_image(tmp_path / "ok.png"))
  np.testing.assert_array_equal(images.read_radiograph(tmp_path / "ok.dcm"), images.read_image(tmp_path / "ok.dcm"))
  Image.fromarray(np.zeros((20, 300), np.uint8)).save(tmp_path / "thin.png")
  with pytest.raises(images.ImageError, match=r"thin.png: 300x20 is smaller than 32 pixels on a side"):
    images.read_radiograph(tmp_path / "thin.png")
  assert images.read_image(tmp_path / "thin.png").shape == (20, 300)  # data readers take any size
  monkeypatch.setattr(images, "MAX_PIXELS", 1000)
  monkeypatch.setattr(images, "read_image", lambda path: pytest.fail(f"decoded {path}"))
  with pytest.raises(images.ImageError, match=r"ok.png: 50x40 is over the limit of 1000 pixels"):
    images.read_radiograph(tmp_path / "ok.png")
  with pytest.raises(images.ImageError, match=r"ok.dcm: 32x64 is over the limit of 1000 pixels"):
    images.read_radiograph(tmp_path / "ok.dcm")


def test_read_radiograph_errors_name_the_file(tmp_path):
  (tmp_path / "text.png").write_text("not an image")
  with pytest.raises(images.ImageError, match="text.png: not a readable image"):
    images.read_radiograph(tmp_path / "text.png")
  with pytest.raises(images.DataPathError, match="gone.png"):
    images.read_radiograph(tmp_path / "gone.png")
  assert images.MAX_PIXELS == 64_000_000 and images.MIN_SIDE == 32
