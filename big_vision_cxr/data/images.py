"""Reading radiographs: PNG/JPEG/TIFF (PIL) and DICOM (pydicom) -> uint8 [H, W].

- Every PIL mode (`pil_grey`): colour images whose channels are equal keep that
  grey, others are converted to luma (ITU-R 601, PIL 'L'): YCbCr keeps its Y,
  CMYK/HSV/LAB/palette go through RGB; alpha is ignored; '1' is 0/255.
- More than 8 bits (16-bit PNG/TIFF, 32-bit int/float TIFF, DICOM): DICOM
  applies the rescale (or modality LUT), then the VOI LUT or the first window
  (center/width, DICOM linear formula); with neither, and for PIL, the image's
  own min..max is stretched to 0..255. MONOCHROME1 is inverted after that, so
  bright always means dense.
- Errors name the file: `ImageError` for unreadable/unsupported content (no
  pixel data, compressed DICOM without a decoder, multi-frame, corrupt PNG, a
  colour mode or a numeric DICOM field that cannot give a grey, over
  MAX_PIXELS; any other failure decoding one image), `DataPathError` for a path
  escaping the dataset root, missing, or too big.
- `read_radiograph` (inference) also refuses, from the header before decoding,
  images under MIN_SIDE pixels a side.
"""
import collections.abc
import concurrent.futures
import logging
import math
import os
import pathlib

import numpy as np
from PIL import Image

from big_vision_cxr import errors

MAX_BYTES = 256 << 20  # refuse files larger than this
MAX_PIXELS = 64_000_000  # ~8000 x 8000, well above any radiograph; refused before decoding
MIN_SIDE = 32  # pixels; a smaller image holds no usable radiograph (read_radiograph)
DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageError(errors.Error):
  """An image file cannot be read as a radiograph; the message names the file."""


class DataPathError(errors.Error):
  """A path read from a data file is unsafe, missing or too large."""


class Skips:
  """Counts and logs what a reader skipped (never a silent loss)."""

  def __init__(self, source):
    self.source = source
    self.items = []  # (path, reason)
    self.absent = []  # listed by the source but not present (partial copies)

  def add(self, path, reason):
    self.items.append((str(path), str(reason)))
    logging.warning("%s: skipped %s: %s", self.source, path, reason)

  def __len__(self):
    return len(self.items)

  def collect(self, names, results, skippable, on_error):
    """Results of `map_ordered` -> the good ones; a `skippable` error is skipped
    under `names[i]` (or raised with on_error='raise'), any other error is raised."""
    out = []
    for name, result in zip(names, results):
      if isinstance(result, skippable):
        if on_error == "raise":
          raise result
        self.add(name, result)
      elif isinstance(result, Exception):
        raise result
      else:
        out.append(result)
    return out

  def summary(self):
    return {"count": len(self.items), "items": [dict(path=p, reason=r) for p, r in self.items],
            "absent_count": len(self.absent), "absent_examples": self.absent[:5]}


def map_ordered(fn, items, workers=None):
  """[fn(item), or the exception it raised] in order, on `workers` threads
  (default: the CPU count, at most 8); PIL and zlib release the GIL."""
  def safe(item):
    try:
      return fn(item)
    except Exception as e:  # returned, so the caller skips or raises per item
      return e
  workers = workers or min(8, os.cpu_count() or 1)
  if workers <= 1 or len(items) <= 1:
    return [safe(item) for item in items]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(safe, items))


def safe_path(root, relative, *, max_bytes=MAX_BYTES, must_exist=True):
  """`root / relative`, which must stay inside root (lexically: `..` and absolute paths are
  refused, symlinks placed inside the root are trusted), exist and be at most max_bytes."""
  root = pathlib.Path(os.path.abspath(root))
  rel = str(relative)
  if not rel or "\x00" in rel:
    raise DataPathError(f"empty or invalid path {relative!r} (dataset root {root})")
  path = pathlib.Path(os.path.normpath(root / rel))
  if path != root and root not in path.parents:
    raise DataPathError(f"path {relative!r} escapes the dataset root {root}")
  if must_exist:
    if not path.is_file():
      raise DataPathError(f"file not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
      raise DataPathError(f"file {path} is {size} bytes, over the limit of {max_bytes}")
  return path


def _to_uint8(arr, path):
  arr = np.asarray(arr)
  if arr.dtype == np.uint8:
    return arr
  arr = arr.astype(np.float64)
  lo, hi = float(arr.min()), float(arr.max())
  if not np.isfinite([lo, hi]).all():
    raise ImageError(f"{path}: non-finite pixel values")
  if hi <= lo:
    return np.zeros(arr.shape, np.uint8)
  return np.round((arr - lo) / (hi - lo) * 255).astype(np.uint8)


def _grey(arr, path):
  """[H, W] or RGB [H, W, 3] -> [H, W]."""
  if arr.ndim == 2:
    return arr
  if arr.ndim == 3 and arr.shape[-1] == 3:
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
      return arr[..., 0]
    w = np.array([0.299, 0.587, 0.114])
    return np.round(arr.astype(np.float64) @ w).astype(arr.dtype)
  raise ImageError(f"{path}: unsupported pixel layout {arr.shape}")


_FIRST_BAND = ("L", "LA", "La", "YCbCr")  # the grey is band 0 (YCbCr: Y, the ITU-R 601 luma)
_NUMERIC = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # one band, stretched by _to_uint8
_VIA_RGB = ("P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "HSV", "LAB")


def pil_grey(im, path):
  """A PIL image of any mode -> [H, W] grey (uint8, or wider for _NUMERIC modes)."""
  mode = im.mode
  try:
    if mode == "1":
      return np.asarray(im, np.uint8) * 255
    if mode in _NUMERIC:
      return np.asarray(im)
    if mode in _FIRST_BAND:  # La: alpha premultiplied, undone by LA
      return np.asarray((im.convert("LA") if mode == "La" else im).getchannel(0))
    if mode in _VIA_RGB:
      return _grey(np.asarray(im if mode == "RGB" else im.convert("RGB")), path)
  except ValueError as e:  # a conversion this Pillow lacks
    raise ImageError(f"{path}: colour mode {mode} cannot be converted to grey: {e}") from e
  raise ImageError(f"{path}: unsupported colour mode {mode}")


def check_size(path, height, width, min_side=0):
  """Refuses an image of more than MAX_PIXELS or under `min_side` pixels a side."""
  if height * width > MAX_PIXELS:
    raise ImageError(f"{path}: {width}x{height} is over the limit of {MAX_PIXELS} pixels "
                     f"(images.MAX_PIXELS); downscale it first")
  if min(height, width) < min_side:
    raise ImageError(f"{path}: {width}x{height} is smaller than {min_side} pixels on a side: "
                     f"not a radiograph")


def read_pil(source, name=None):
  """PIL-readable file or file object -> uint8 [H, W]; errors name `name` or the file."""
  path = name or source
  try:
    with Image.open(source) as im:
      check_size(path, im.height, im.width)
      if getattr(im, "n_frames", 1) > 1:
        raise ImageError(f"{path}: multi-frame images are not supported")
      im.load()
      arr = pil_grey(im, path)
  except ImageError:
    raise
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
    raise ImageError(f"{path}: cannot decode image: {type(e).__name__}: {e}") from e
  return _to_uint8(arr, path)


def _dicom_number(ds, keyword, path, default=None):
  """The (first) value of a numeric DICOM element as a finite float; `default` when absent."""
  try:
    value = ds[keyword].value if keyword in ds else None
  except Exception as e:  # pydicom raises on a bad value in its strict reading mode
    raise ImageError(f"{path}: DICOM {keyword}: {type(e).__name__}: {e}") from e
  if isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes)):
    value = value[0] if len(value) else None  # multi-valued: the first
  if value is None or str(value).strip() == "":
    return default
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if not math.isfinite(number):
    raise ImageError(f"{path}: DICOM {keyword} {value!r} is not a finite number")
  return number


def _dicom_lut(apply, arr, ds, path, keyword):
  try:
    return np.asarray(apply(arr, ds))
  except Exception as e:  # a malformed LUT descriptor or data
    raise ImageError(f"{path}: DICOM {keyword} cannot be applied: {type(e).__name__}: {e}") from e


def _window(arr, center, width):
  """A VOI window (DICOM PS3.3 C.11.2.1.2.1 linear; width >= 1) of `arr`, to [0, 1]."""
  if width == 1:  # the formula's limit: a threshold
    return (arr > center - 0.5).astype(np.float64)
  return np.clip((arr - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def _read_dicom(path):
  import pydicom  # pylint: disable=import-outside-toplevel
  from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pylint: disable=import-outside-toplevel
  try:
    ds = pydicom.dcmread(path)
  except Exception as e:
    raise ImageError(f"{path}: not a readable DICOM file: {type(e).__name__}: {e}") from e
  if "PixelData" not in ds:
    raise ImageError(f"{path}: DICOM has no pixel data (PixelData element missing)")
  frames = _dicom_number(ds, "NumberOfFrames", path, default=1)
  if frames > 1:
    raise ImageError(f"{path}: multi-frame DICOM ({frames:g} frames) is not supported")
  check_size(path, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  colour = photometric.startswith("RGB") or photometric.startswith("YBR")
  if photometric not in ("MONOCHROME1", "MONOCHROME2") and not colour:
    raise ImageError(f"{path}: unsupported PhotometricInterpretation {photometric}")
  if not colour:  # the numbers of the grey pipeline, checked before decoding
    slope = _dicom_number(ds, "RescaleSlope", path, default=1.0)
    intercept = _dicom_number(ds, "RescaleIntercept", path, default=0.0)
    if slope == 0:
      raise ImageError(f"{path}: DICOM RescaleSlope is 0: every pixel would be {intercept:g}")
    center = _dicom_number(ds, "WindowCenter", path)
    width = _dicom_number(ds, "WindowWidth", path)
  try:
    arr = np.asarray(ds.pixel_array)
  except Exception as e:  # missing decoder for a compressed transfer syntax, truncated data...
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
    raise ImageError(f"{path}: cannot decode DICOM pixel data (transfer syntax {syntax}; "
                     f"a compressed syntax needs e.g. pylibjpeg or gdcm): {type(e).__name__}: {e}") from e
  if colour:  # pydicom gives YBR as RGB
    return _to_uint8(_grey(arr, path), path)
  if arr.ndim != 2:
    raise ImageError(f"{path}: expected a 2-D greyscale frame, got shape {arr.shape}")
  if "ModalityLUTSequence" in ds:
    modality = _dicom_lut(apply_modality_lut, arr, ds, path, "ModalityLUTSequence")
  elif (slope, intercept) != (1, 0):
    modality = arr.astype(np.float64) * slope + intercept
  else:
    modality = arr
  if center is not None and width is not None and width >= 1:  # else: no (valid) window
    out = np.round(_window(modality.astype(np.float64), center, width) * 255).astype(np.uint8)
  elif "VOILUTSequence" in ds:  # LUT lookup needs integer input
    lut_in = modality if modality.dtype.kind in "iu" else np.round(modality).astype(np.int64)
    out = _to_uint8(_dicom_lut(apply_voi_lut, lut_in, ds, path, "VOILUTSequence"), path)
  else:
    out = _to_uint8(modality, path)
  if photometric == "MONOCHROME1":
    out = 255 - out
  return out


def is_dicom(path):
  path = pathlib.Path(path)
  if path.suffix.lower() in DICOM_SUFFIXES:
    return True
  try:
    with open(path, "rb") as f:
      f.seek(128)
      return f.read(4) == b"DICM"
  except OSError:
    return False


def image_shape(path, *, root=None):
  """(H, W) from the file header only (no pixel decoding)."""
  path = safe_path(root, path) if root is not None else pathlib.Path(path)
  try:
    if is_dicom(path):
      import pydicom  # pylint: disable=import-outside-toplevel
      ds = pydicom.dcmread(path, stop_before_pixels=True)
      shape = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
      if not all(shape):
        raise ImageError(f"{path}: the DICOM header has no Rows/Columns: no image in it")
      return shape
    with Image.open(path) as im:
      return im.height, im.width
  except ImageError:
    raise
  except Exception as e:  # unreadable header: same error type as read_image
    raise ImageError(f"{path}: not a readable image (header): {type(e).__name__}: {e}") from e


def read_image(path, *, root=None, max_bytes=MAX_BYTES):
  """A radiograph as uint8 [H, W]; `root` given: `path` is relative and validated."""
  path = safe_path(root, path, max_bytes=max_bytes) if root is not None else pathlib.Path(path)
  if root is None:
    if not path.is_file():
      raise DataPathError(f"file not found: {path}")
    if os.path.getsize(path) > max_bytes:
      raise DataPathError(f"file {path} is over the limit of {max_bytes} bytes")
  try:
    image = _read_dicom(path) if is_dicom(path) else read_pil(path)
  except errors.Error:
    raise
  except Exception as e:  # one bad image is that image's error, never the whole read's
    raise ImageError(f"{path}: cannot read the image: {type(e).__name__}: {e}") from e
  if image.ndim != 2 or min(image.shape) < 1:
    raise ImageError(f"{path}: empty image {image.shape}")
  return np.ascontiguousarray(image)


def read_radiograph(path):
  """An image to run a model on, uint8 [H, W]. Its size (MIN_SIDE a side .. MAX_PIXELS)
  is checked from the header before decoding; errors name the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataPathError(f"file not found: {path}")
  check_size(path, *image_shape(path), min_side=MIN_SIDE)
  image = read_image(path)
  check_size(path, *image.shape, min_side=MIN_SIDE)
  return image
