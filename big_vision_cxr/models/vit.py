"""SigLIP ViT image encoder as PaliGemma uses it (big_vision `vit.py` layout).

`pool_type='none'`: every patch token is kept, normalised by `encoder_norm` and
projected by the linear `head` to the LLM width. Blocks are scanned, so the
params are stacked on a leading depth axis exactly like the official .npz:
`Transformer/encoderblock/...` with shapes `[depth, ...]`. `stack_unscanned`
converts a checkpoint saved unscanned (`Transformer/encoderblock_{i}/...`).
"""
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_vision_cxr.errors import CheckpointError
from big_vision_cxr.models import common


class MlpBlock(nn.Module):
  """Dense -> tanh-GELU -> Dense."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):  # [B, N, C]
    width = x.shape[-1]
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6))
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, **init)(x)  # [B, N, F]
    x = nn.gelu(x, approximate=True)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(width, dtype=self.dtype, **init)(x)  # [B, N, C]


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic):  # [B, N, C]
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        deterministic=True)(y, y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype)(y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return x + y, None


class Encoder(nn.Module):
  """Scanned stack of `encoderblock`s followed by `encoder_norm`."""
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  remat: Any = False
  scan_unroll: Any = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    blocks = common.scan_blocks(Encoder1DBlock, self.depth, self.remat, num_broadcast_args=1,
                                static_argnums=(2,), unroll=self.scan_unroll)
    x, _ = blocks(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                  dtype=self.dtype, name="encoderblock")(x, deterministic)
    return nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x)


class Model(nn.Module):
  """ViT with `pool_type='none'`: image [B,H,W,3] in [-1,1] -> tokens [B,N,num_classes]."""
  num_classes: int  # the LLM width (PaliGemma sets it from llm.width)
  image_size: int = 224
  patch_size: int = 14
  width: int = 1152
  depth: int = 27
  mlp_dim: int = 4304
  num_heads: int = 16
  dropout: float = 0.0
  head_zeroinit: bool = True
  remat: Any = False
  scan_unroll: Any = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image, *, train=False):
    if image.ndim != 4 or image.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"ViT expects images [B, {self.image_size}, {self.image_size}, 3], "
                       f"got shape {tuple(image.shape)}.")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
    out = {}
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", name="embedding", dtype=self.dtype)(image)  # [B, h, w, C]
    b, h, w, c = x.shape
    x = jnp.reshape(x, (b, h * w, c))  # [B, N, C]
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)),
                        (1, h * w, c))
    x = x + posemb.astype(x.dtype)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x = Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                dropout=self.dropout, remat=self.remat, scan_unroll=self.scan_unroll,
                dtype=self.dtype, name="Transformer")(x, deterministic=not train)
    out["encoded"] = x
    kernel_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    x = nn.Dense(self.num_classes, kernel_init=kernel_init, name="head", dtype=self.dtype)(x)
    return x, out  # [B, N, D]


def resample_posemb(posemb, num_tokens):
  """Resamples a learned posemb [1, g*g, C] to [1, num_tokens, C] on a square grid with
  linear interpolation (scipy.ndimage.zoom, order=1), as big_vision does."""
  import scipy.ndimage  # Only needed when a checkpoint's grid differs.
  _, n, c = posemb.shape
  old, new = int(round(np.sqrt(n))), int(round(np.sqrt(num_tokens)))
  if old * old != n or new * new != num_tokens:
    raise ValueError(f"posemb resampling needs square grids, got {n} -> {num_tokens} tokens.")
  if old == new:
    return posemb
  grid = np.asarray(posemb, np.float32).reshape(old, old, c)
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return grid.reshape(1, new * new, c).astype(posemb.dtype)


def stack_unscanned(flat, prefix):
  """A ViT saved unscanned (`{prefix}Transformer/encoderblock_{i}/...`) -> the scanned
  layout `{prefix}Transformer/encoderblock/...` [depth, ...]. flat: {'/'-joined name:
  array}; returns a new dict, unchanged when there are no unscanned blocks."""
  pattern = re.compile(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/(.+)")
  out, blocks = {}, {}  # blocks: {name in the block: {layer: array}}
  for name, value in flat.items():
    match = pattern.fullmatch(name)
    if match:
      blocks.setdefault(match.group(2), {})[int(match.group(1))] = value
    else:
      out[name] = value
  depth = 1 + max((i for layers in blocks.values() for i in layers), default=-1)
  for name, layers in sorted(blocks.items()):
    scanned = f"{prefix}Transformer/encoderblock/{name}"
    if scanned in out:
      raise CheckpointError(f"ViT param {scanned!r} is stored both scanned and per block.")
    missing = [i for i in range(depth) if i not in layers]
    if missing:
      raise CheckpointError(f"unscanned ViT of {depth} blocks lacks "
                            f"{prefix}Transformer/encoderblock_{missing[0]}/{name}.")
    out[scanned] = np.stack([layers[i] for i in range(depth)])  # [depth, ...]
  return out
