"""Image pp ops (numpy in, numpy out), matching big_vision's semantics.

- decode: encoded bytes (PNG/JPEG/DICOM) or a uint8 array [H, W] / [H, W, 1] /
  [H, W, 3] -> uint8 [H, W, 3]; grey is replicated to 3 channels (big_vision's
  `decode` uses channels=3) as a zero-copy broadcast view, which `resize`
  recognises and resizes as one channel (same result, 3x less work).
- resize(size, antialias=False, method='bilinear'): `tf.image.resize` (one eager
  call per image; the input pipeline caches the result), then rounded, clipped
  and cast back to the input dtype like big_vision.
- value_range(vmin=-1, vmax=1, in_min=0, in_max=255): linear map to float32.
"""
import io
import tempfile

import numpy as np

from big_vision_cxr.data import images
from big_vision_cxr.registry import PP_OPS


def to_rgb(image, name="image"):
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:  # a read-only view: channel stride 0, no copy
    return np.broadcast_to(image[..., None], (*image.shape, 3))
  if image.ndim == 3 and image.shape[-1] == 3:
    return image
  raise images.ImageError(f"{name}: expected [H, W], [H, W, 1] or [H, W, 3], got {image.shape}")


def decode_bytes(blob, name="<bytes>"):
  """Encoded PNG/JPEG/DICOM bytes -> uint8 [H, W] grey."""
  if blob[128:132] == b"DICM":
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
      f.write(blob)
      f.flush()
      return images.read_image(f.name)
  return images.read_pil(io.BytesIO(blob), name)


@PP_OPS.register("decode")
def get_decode(key="image"):
  def _decode(data):
    value = data[key]
    if isinstance(value, (bytes, bytearray)):
      value = decode_bytes(bytes(value), key)
    if np.asarray(value).dtype != np.uint8:
      raise images.ImageError(f"decode: {key} must be uint8 or encoded bytes, got {np.asarray(value).dtype}")
    return {**data, key: to_rgb(value, key)}
  return _decode


def resize(image, size, antialias=False, method="bilinear"):
  """[H, W, C] -> [h, w, C] with tf.image.resize, cast back to the input dtype."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if isinstance(size, int):
    size = (size, size)
  image = np.asarray(image)
  grey = image.ndim == 3 and image.strides[-1] == 0  # replicated grey: resize one channel
  src = image[..., :1] if grey else image
  out = tf.image.resize(src, size, method=method, antialias=antialias).numpy()
  if image.dtype == np.uint8:
    out = np.clip(np.round(out), 0, 255)
  out = out.astype(image.dtype)
  return np.broadcast_to(out, (*out.shape[:2], image.shape[-1])) if grey else out


@PP_OPS.register("resize")
def get_resize(size, antialias=False, method="bilinear", key="image"):
  return lambda data: {**data, key: resize(data[key], size, antialias, method)}


def _value_range(x, vmin, vmax, in_min, in_max):
  x = (np.asarray(x, np.float32) - np.float32(in_min)) / np.float32(in_max - in_min)
  return (np.float32(vmin) + x * np.float32(vmax - vmin)).astype(np.float32)


def value_range(image, vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0):
  """Linear map to float32; uint8 goes through a 256-entry table (same values, one pass),
  and replicated grey channels (stride 0) are computed once and then repeated."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    return _value_range(image, vmin, vmax, in_min, in_max)
  lut = _value_range(np.arange(256), vmin, vmax, in_min, in_max)
  if image.ndim >= 3 and image.strides[-1] == 0:
    return np.repeat(lut[image[..., :1]], image.shape[-1], axis=-1)
  return lut[image]


@PP_OPS.register("value_range")
def get_value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0, key="image"):
  return lambda data: {**data, key: value_range(data[key], vmin, vmax, in_min, in_max)}
