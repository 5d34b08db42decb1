"""Image reading: every PIL mode, PNG 16-bit, DICOM windowing/MONOCHROME1, and clear errors."""
import warnings

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


def set_raw_element(path, keyword, value):
  """Rewrites one element's value bytes as `value`, as a writer that skips validation would."""
  import struct
  import pydicom
  tag = pydicom.datadict.tag_for_keyword(keyword)
  head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + pydicom.datadict.dictionary_VR(tag).encode()
  blob = path.read_bytes()
  i = blob.index(head, 132)
  n = struct.unpack("<H", blob[i + 6:i + 8])[0]
  raw = value.encode() + b" " * (len(value) % 2)
  path.write_bytes(blob[:i] + head + struct.pack("<H", len(raw)) + raw + blob[i + 8 + n:])
  return path


def write_dicom_with(path, pixels, keyword, value):
  """A windowed, rescaled single-frame DICOM whose `keyword` holds the raw text `value`."""
  import pydicom
  write_dicom(path, pixels, window=(2048, 1024))
  ds = pydicom.dcmread(path)
  ds.RescaleSlope, ds.RescaleIntercept, ds.NumberOfFrames = 1, 0, 1
  ds.save_as(path)
  return set_raw_element(path, keyword, value)


GREY = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (40, 1))


def test_cmyk_jpeg_reads_its_grey_from_k(tmp_path):
  zeros, ink = Image.fromarray(np.zeros_like(GREY)), Image.fromarray(255 - GREY)
  for name, bands in (("k.jpg", [zeros] * 3 + [ink]), ("cmy.jpg", [ink] * 3 + [zeros])):
    Image.merge("CMYK", bands).save(tmp_path / name, quality=95)
    assert Image.open(tmp_path / name).mode == "CMYK"
    out = images.read_image(tmp_path / name)
    assert out.shape == GREY.shape and np.abs(out.astype(int) - GREY).max() <= 3, name


def _in_mode(mode):
  """GREY as a PIL image of `mode` ('1': GREY thresholded at 128)."""
  if mode == "1":
    return Image.fromarray(GREY >= 128)
  if mode in ("La", "RGBa"):
    return Image.fromarray(GREY).convert(mode[:-1] + "A").convert(mode)
  return Image.fromarray(GREY).convert(mode)


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pil_mode_gives_its_grey(tmp_path, mode):
  im = _in_mode(mode)
  want = np.where(GREY >= 128, 255, 0) if mode == "1" else GREY
  for fmt in ("PNG", "TIFF"):  # through a file when a format keeps the mode
    path = tmp_path / f"x.{fmt.lower()}"
    try:
      im.save(path, fmt)
    except (OSError, ValueError, KeyError):
      continue
    if Image.open(path).mode == mode:
      out = images.read_image(path)
      break
  else:  # a mode no file opens in (HSV, RGBX, La, ...): the conversion itself
    out = images._to_uint8(images.pil_grey(im, "x"), "x")
  assert out.dtype == np.uint8 and out.shape == GREY.shape
  assert np.abs(out.astype(int) - want).max() <= (1 if mode == "LAB" else 0)


def test_a_mode_without_a_grey_is_an_image_error_naming_file_and_mode():
  class Fake:
    mode = "BGR;24"
  with pytest.raises(images.ImageError, match=r"scan.bmp: unsupported colour mode BGR;24"):
    images.pil_grey(Fake(), "scan.bmp")


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("keyword", ["WindowCenter", "WindowWidth", "RescaleSlope",
                                     "RescaleIntercept", "NumberOfFrames"])
def test_dicom_ds_non_numeric_field_is_an_image_error_naming_file_and_field(tmp_path, ramp, keyword):
  bad = write_dicom_with(tmp_path / "bad.dcm", ramp, keyword, "abc")
  for read in (images.read_image, images.read_radiograph):
    with pytest.raises(images.ImageError, match=rf"bad.dcm: DICOM {keyword} 'abc' is not a finite number"):
      read(bad)
  good = write_dicom_with(tmp_path / "good.dcm", ramp, keyword, "1")
  assert images.read_radiograph(good).shape == ramp.shape  # the next file still reads


@pytest.mark.parametrize("keyword,value,message", [
    ("WindowWidth", "nan", "WindowWidth 'nan' is not a finite number"),
    ("WindowCenter", "inf", "WindowCenter 'inf' is not a finite number"),
    ("RescaleSlope", "0", "RescaleSlope is 0"),
])
def test_dicom_ds_non_finite_or_zero_slope_is_an_image_error(tmp_path, ramp, keyword, value, message):
  with pytest.raises(images.ImageError, match=f"bad.dcm: DICOM {message}"):
    images.read_image(write_dicom_with(tmp_path / "bad.dcm", ramp, keyword, value))


def test_dicom_window_of_width_1_is_a_threshold_without_dividing_by_zero(tmp_path, ramp):
  path = write_dicom(tmp_path / "w1.dcm", ramp, window=(1000.5, 1))
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    out = images.read_image(path)
  np.testing.assert_array_equal(out, np.where(ramp > 1000, 255, 0))  # PS3.3 C.11.2.1.2.1
