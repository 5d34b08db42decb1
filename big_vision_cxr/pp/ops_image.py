"""Image pp ops (numpy in, numpy out), matching big_vision's semantics.

- decode: encoded bytes (PNG/JPEG/DICOM) or a uint8 array [H, W] / [H, W, 1] /
  [H, W, 3] -> uint8 [H, W, 3]; grey is replicated to 3 channels (big_vision's
  `decode` uses channels=3) as a zero-copy broadcast view, which `resize`
  recognises and resizes as one channel (same result, 3x less work).
- resize(size, antialias=False, method='bilinear'): `tf.image.resize`, then
  rounded, clipped and cast back to the input dtype like big_vision. The default
  (bilinear, no antialias) on uint8/float32 is numpy, bit-identical to TF's kernel
  and faster than an eager call, so the training path never imports TensorFlow.
- value_range(vmin=-1, vmax=1, in_min=0, in_max=255): linear map to float32.

`model_input_fn(pp_image, image_size)` is the one way a radiograph becomes the
model's input, in training, evaluation and inference alike.
"""
import functools
import io
import tempfile

import numpy as np

from big_vision_cxr.data import images
from big_vision_cxr.pp import builder
from big_vision_cxr.registry import PP_OPS

DEFAULT_IMAGE_SIZE = 224  # the default pp's size when no image_size is given


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


@functools.lru_cache(maxsize=64)
def _taps(in_size, out_size, channels):
  """One axis of TF's ResizeBilinear with half-pixel centres, float32 as TF computes it:
  lower, upper [out * channels] (flat indices into a row of in_size * channels) and
  lerp [out * channels] float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(x)
  lower = np.maximum(floor, 0).astype(np.intp)
  upper = np.minimum(np.ceil(x), in_size - 1).astype(np.intp)
  c = np.arange(channels)
  flat = lambda i: (i[:, None] * channels + c).ravel()
  return flat(lower), flat(upper), np.repeat(x - floor, channels)


def _bilinear(image, size):
  """uint8/float32 [H, W, C] -> float32 [h, w, C]: tf.image.resize's default (bilinear,
  half-pixel centres) with TF's float32 ops in TF's order, so bit-identical: lerp along
  x within the two source rows, then between them along y."""
  (h, w), (height, width, c) = size, image.shape
  if (h, w) == (height, width):
    return image.astype(np.float32)
  y0, y1, ly = _taps(height, h, 1)
  x0, x1, lx = _taps(width, w, c)
  rows = image.reshape(height, width * c).take(np.concatenate([y0, y1]), axis=0)
  rows = rows.astype(np.float32)  # [2h, W * C]: the top rows, then the bottom ones
  left, right = rows.take(x0, axis=1), rows.take(x1, axis=1)  # [2h, w * C]
  right -= left
  right *= lx
  right += left
  top, bottom = right[:h], right[h:]
  bottom -= top
  bottom *= ly[:, None]
  bottom += top
  return bottom.reshape(h, w, c)


def resize(image, size, antialias=False, method="bilinear"):
  """[H, W, C] -> [h, w, C] as tf.image.resize (numpy for the default on uint8/float32),
  cast back to the input dtype."""
  size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
  image = np.asarray(image)
  grey = image.ndim == 3 and image.strides[-1] == 0  # replicated grey: resize one channel
  src = image[..., :1] if grey else image
  if (method == "bilinear" and not antialias and src.ndim == 3 and min(*size, src.size) > 0
      and src.dtype in (np.uint8, np.float32)):
    out = _bilinear(src, size)
  else:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
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
  """Linear map to float32; uint8 goes through a 256-entry table (same values, one pass);
  replicated grey channels (stride 0) are looked up once in a table of C-wide rows."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    return _value_range(image, vmin, vmax, in_min, in_max)
  lut = _value_range(np.arange(256), vmin, vmax, in_min, in_max)
  if image.ndim >= 3 and image.strides[-1] == 0:
    rows = np.ascontiguousarray(np.broadcast_to(lut[:, None], (256, image.shape[-1])))
    return rows.take(image[..., 0], axis=0)  # [..., C]
  return lut[image]


@PP_OPS.register("value_range")
def get_value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0, key="image"):
  return lambda data: {**data, key: value_range(data[key], vmin, vmax, in_min, in_max)}


def default_pp_image(image_size=None):
  return f"decode|resize({image_size or DEFAULT_IMAGE_SIZE})|value_range(-1, 1)"


class ModelInput:
  """uint8 [H, W] radiograph -> float32 [size, size, 3] through a pp string, in two
  stages so that a pipeline can cache the first:

  - `stored(image)`: every op but a trailing `value_range`; replicated grey is kept
    as one channel -> [size, size, 1 or 3] (uint8 for the default pp);
  - `finish(batch)`: [B, size, size, 1 or 3] -> float32 [B, size, size, 3]: grey
    broadcast to 3 channels, then that `value_range`.
  Calling it does both on one image. PPError when the output is not [size, size, 3]
  (`image_size` None: any [h, w, 3]).
  """

  def __init__(self, pp_image=None, image_size=None):
    self.pp_image = pp_image or default_pp_image(image_size)
    self.image_size = image_size
    ops = builder.parse(self.pp_image)
    final = ops.pop() if ops and ops[-1][0] == "value_range" else None
    self._stored = builder.get_preprocess_fn(ops)
    self._final = builder.get_preprocess_fn([final]) if final else None

  def stored(self, image):
    out = np.asarray(self._stored({"image": image})["image"])
    if out.ndim == 3 and out.strides[-1] == 0:
      out = np.ascontiguousarray(out[..., :1])  # grey: keep one channel
    size = self.image_size
    if out.ndim != 3 or out.shape[-1] not in (1, 3) or (size and out.shape[:2] != (size, size)):
      want = f"({size}, {size}, 3)" if size else "(height, width, 3)"
      raise builder.PPError(f"pp_image {self.pp_image!r} gives images of shape {out.shape} "
                            f"(grey as 1 channel); the model takes {want}")
    return out

  def finish(self, batch):
    batch = np.asarray(batch)
    if batch.shape[-1] == 1:
      batch = np.broadcast_to(batch, (*batch.shape[:-1], 3))
    if self._final is not None:
      batch = self._final({"image": batch})["image"]
    return np.asarray(batch, np.float32)

  def __call__(self, image):
    return self.finish(self.stored(image)[None])[0]


def model_input_fn(pp_image=None, image_size=None):
  """fn(uint8 [H, W]) -> float32 [image_size, image_size, 3] in [-1, 1] (a ModelInput).

  pp_image None or "": the default `decode|resize(image_size)|value_range(-1, 1)`
  (image_size None: 224), what training uses when config.input.pp_image is unset.
  """
  return ModelInput(pp_image, image_size)
