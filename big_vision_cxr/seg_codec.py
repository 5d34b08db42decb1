"""Instance masks <-> 4 `<loc>` + 16 `<seg>` tokens through the VQ-VAE.

Encoding (big_vision's `get_refcoco_mask2str`): the box in pixels is
`round(H*y_min), round(W*x_min), round(H*y_max), round(W*x_max)`; the binary mask
(any value > 0 is foreground) is cropped to it, resized to 64x64 bilinear with
antialias, and the VQ-VAE encoder gives 16 codebook indices (4x4, row-major).

Decoding (big_vision's segmentation evaluator): the box in pixels is truncated
(`int(H*y_min)`, ...); the decoder's 64x64 output is resized to the box size
bilinear (antialiased when shrinking, like PIL), thresholded at > 0 and pasted
into an HxW canvas.
"""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_cxr import errors
from big_vision_cxr import loc_codec
from big_vision_cxr.models import vqvae

DEMO_VQVAE = pathlib.Path(__file__).parent / "assets" / "vqvae_cxr_demo.npz"
SIZE = vqvae.MASK_SIZE


class SegCodecError(errors.Error):
  """Masks, boxes or seg ids given to the codec have the wrong shape or range."""


def _check_boxes(boxes, n):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
  if len(boxes) != n:
    raise SegCodecError(f"{n} masks/seg rows but {len(boxes)} boxes.")
  if not np.all(np.isfinite(boxes)) or boxes.min(initial=0) < 0 or boxes.max(initial=0) > 1:
    raise SegCodecError(f"boxes must be normalised to [0, 1] (y_min, x_min, y_max, x_max), got {boxes}.")
  return boxes


def encode_box_px(box, height, width):
  """Normalised box -> integer pixel box (rounded, at least one pixel) for cropping."""
  y1, x1, y2, x2 = np.round(np.asarray(box, np.float64) * [height, width, height, width]).astype(int)
  y1, x1 = min(y1, height - 1), min(x1, width - 1)
  return y1, x1, max(y2, y1 + 1), max(x2, x1 + 1)


@functools.lru_cache(maxsize=4096)
def _resize_weights(in_size, out_size):
  """[out, in] weights of a bilinear (triangle kernel) resize with antialias.

  The same weights as `jax.image.resize(..., "linear", antialias=True)` and TF's
  `tf.image.resize(..., antialias=True)`: half-pixel centres, the kernel widened
  by in/out when shrinking, rows normalised to sum to one.
  """
  inv_scale = in_size / out_size
  kernel_scale = max(inv_scale, 1.0)
  centres = (np.arange(out_size) + 0.5) * inv_scale - 0.5  # [out]
  dist = np.abs(centres[:, None] - np.arange(in_size)[None, :]) / kernel_scale  # [out, in]
  weights = np.maximum(0.0, 1.0 - dist)
  return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def crop_resize(mask, box):
  """Binary mask [H, W] and normalised box -> the box crop at 64x64 in [0, 1] float32."""
  mask = np.asarray(mask)
  y1, x1, y2, x2 = encode_box_px(box, *mask.shape)
  crop = (mask[y1:y2, x1:x2] > 0).astype(np.float32)  # [h, w]
  wy, wx = _resize_weights(y2 - y1, SIZE), _resize_weights(x2 - x1, SIZE)
  return wy @ crop @ wx.T  # [64, h] [h, w] [w, 64] -> [64, 64]


@functools.partial(jax.jit, static_argnames=("height", "width"))
def _paste(logits, boxes_px, height, width):
  """Logits [n, 64, 64] and int boxes [n, 4] -> masks [n, H, W] bool."""
  def one(logit, box):
    y1, x1, y2, x2 = box.astype(jnp.float32)
    scale = jnp.stack([(y2 - y1) / SIZE, (x2 - x1) / SIZE])
    canvas = jax.image.scale_and_translate(logit, (height, width), (0, 1), scale, jnp.stack([y1, x1]),
                                           method="linear", antialias=True)
    yy = jnp.arange(height)[:, None]
    xx = jnp.arange(width)[None, :]
    inside = (yy >= y1) & (yy < y2) & (xx >= x1) & (xx < x2)
    return (canvas > 0) & inside
  return jax.vmap(one)(logits, boxes_px)


def _bucket(n):
  return max(8, 1 << (n - 1).bit_length())


class SegCodec:
  """Batched, jitted VQ-VAE mask codec (`SegCodec.from_npz(path)`)."""

  def __init__(self, model, params):
    self.model, self.params = model, params
    self._encode = jax.jit(lambda p, m: model.apply({"params": p}, m, method=model.encode))
    self._decode = jax.jit(lambda p, i: model.apply({"params": p}, i, method=model.decode))

  @classmethod
  def from_npz(cls, path=DEMO_VQVAE):
    return cls(*vqvae.load_npz(path))

  def _padded(self, fn, x):
    n = len(x)
    pad = np.zeros((_bucket(n) - n,) + x.shape[1:], x.dtype)
    return np.asarray(fn(self.params, np.concatenate([x, pad])))[:n]

  def encode_crops(self, crops):
    """[n, 64, 64] in [0, 1] -> seg ids [n, 16] int32."""
    crops = np.asarray(crops, np.float32)
    if crops.ndim != 3 or crops.shape[1:] != (SIZE, SIZE):
      raise SegCodecError(f"crops must be [n, {SIZE}, {SIZE}], got {crops.shape}.")
    return self._padded(self._encode, crops) if len(crops) else np.zeros((0, 16), np.int32)

  def encode(self, masks, boxes_norm):
    """Masks [n, H, W] (> 0 is foreground) and their normalised boxes [n, 4] -> [n, 16]."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
      raise SegCodecError(f"masks must be [n, H, W], got shape {masks.shape}.")
    boxes = _check_boxes(boxes_norm, len(masks))
    crops = np.stack([crop_resize(m, b) for m, b in zip(masks, boxes)]) if len(masks) else np.zeros((0, SIZE, SIZE))
    return self.encode_crops(crops)

  def decode_logits(self, seg_ids):
    """[n, 16] seg ids -> decoder output [n, 64, 64] (mask where > 0)."""
    seg_ids = np.asarray(seg_ids, np.int32).reshape(-1, 16)
    if seg_ids.size and (seg_ids.min() < 0 or seg_ids.max() >= self.model.cfg.codebook_size):
      raise SegCodecError(f"seg ids must lie in [0, {self.model.cfg.codebook_size}), got {seg_ids.min()}..{seg_ids.max()}.")
    return self._padded(self._decode, seg_ids) if len(seg_ids) else np.zeros((0, SIZE, SIZE), np.float32)

  def decode(self, seg_ids, boxes_norm, height, width):
    """Seg ids [n, 16] and normalised boxes [n, 4] -> masks [n, H, W] bool."""
    logits = self.decode_logits(seg_ids)
    boxes = _check_boxes(boxes_norm, len(logits))
    if not len(logits):
      return np.zeros((0, height, width), bool)
    px = np.floor(boxes * [height, width, height, width]).astype(np.int32)  # big_vision's int()
    px[:, 2] = np.maximum(px[:, 2], px[:, 0] + 1)
    px[:, 3] = np.maximum(px[:, 3], px[:, 1] + 1)
    n = len(logits)
    pad = _bucket(n) - n
    logits = np.concatenate([logits, np.zeros((pad, SIZE, SIZE), np.float32)])
    px = np.concatenate([px, np.tile([[0, 0, 1, 1]], (pad, 1)).astype(np.int32)])
    return np.asarray(_paste(logits, px, height=int(height), width=int(width)))[:n]

  def mask_to_tokens(self, masks, boxes_norm):
    """Masks [n, H, W] and boxes [n, 4] -> per object '<loc>x4<seg>x16' strings."""
    seg = self.encode(masks, boxes_norm)
    return [loc_codec.loc_tokens(b) + loc_codec.seg_tokens(s) for b, s in zip(np.asarray(boxes_norm), seg)]


def npz_path(cfg=None):
  """The VQ-VAE file a config value names: a path, a dict with 'npz' (or 'path'), or None (the demo)."""
  if cfg is None:
    return DEMO_VQVAE
  if isinstance(cfg, (str, pathlib.Path)):
    return pathlib.Path(cfg)
  path = cfg.get("npz") or cfg.get("path")
  if not path:
    raise SegCodecError(f"seg_codec config needs 'npz' (path to a VQ-VAE .npz), got {dict(cfg)}.")
  return pathlib.Path(path)


def from_config(cfg=None):
  """A SegCodec from a config value (see `npz_path`)."""
  return SegCodec.from_npz(npz_path(cfg))
