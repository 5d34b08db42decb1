"""Gemma 1 / Gemma 2 decoder in the big_vision layout, with scanned layers and a KV cache.

Params (below `llm/` in a PaliGemma checkpoint), depth stacked on axis 0:
  embedder/input_embedding [V, D]          tied input embedding / output projection
  layers/pre_attention_norm/scale [L, D]   RMSNorm, applied as (1 + scale)
  layers/attn/q_einsum/w [L, N, D, H]
  layers/attn/kv_einsum/w [L, 2, K, D, H]
  layers/attn/attn_vec_einsum/w [L, N, H, D]
  layers/pre_ffw_norm/scale [L, D]
  layers/mlp/gating_einsum [L, 2, D, F]    [0] is the GELU gate, [1] the up projection
  layers/mlp/linear [L, F, D]
  layers/post_{attention,ffw}_norm/scale   Gemma 2 only (`post_norms=True`)
  final_norm/scale [D]
big_vision stores a Gemma with num_kv_heads == num_heads as one
`layers/attn/qkv_einsum/w` [L, 3, N, D, H] instead; `split_qkv` converts it.
Gemma 2's sliding-window attention is not implemented (as in big_vision): it only
matters for sequences longer than 4096 tokens.

KV cache (flax collection "cache", built by `init_cache`): `layers/attn/k_cache`,
`v_cache` [L, B, S, K, H] and `layers/attn/cache_index` [L] int32 (one copy per layer,
all equal). A `decode=True` call writes its T new keys/values at
[cache_index, cache_index + T), advances the index and attends over all S slots
with the caller's mask [B, T, S]. The caller keeps cache_index + T <= S: under jit an
out-of-range write cannot raise, and XLA would clamp it onto the last slots.

Dot layout (`dot_layout=True`, for decoding): the layers are separate modules
`layers_{i}` (their own buffers and caches [B, S, K, H], not one scan, whose per-layer
slices XLA copies on every step); each layer weight has its contracted axes last
([out, in], what XLA:CPU's dot kernels read without a transpose), the query and output
projections as 2-D matrices (XLA:CPU transposes a 3-D [N, H, D] weight on every step),
and the tied table is [D, V] (its matrix-vector product streams it in order):
`input_embedding` [D, V], `layers_{i}/attn/q_einsum/w` [N*H, D], `kv_einsum/w`
[2, K, H, D], `attn_vec_einsum/w` [D, N*H], `mlp/gating_einsum` [2, F, D],
`mlp/linear` [D, F]. `to_dot_layout` converts a checkpoint's tree once, outside any
loop (XLA would otherwise transpose each weight on every decode step). Its
initialisers only serve shapes: never train it.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_cxr.errors import CheckpointError
from big_vision_cxr.models import common

MASKED_LOGIT = -2.3819763e38


def get_config(variant):
  """Gemma architectures used by PaliGemma 1 and 2 (vocab set by PaliGemma)."""
  # final_logits_softcap 30 is what the pretrained Gemma 2 / PaliGemma 2 models use (and
  # HF's released configs); big_vision fine-tunes PaliGemma 2 with 0.0 (no final softcap).
  gemma2 = dict(post_norms=True, attn_logits_softcap=50.0, final_logits_softcap=30.0,
                query_pre_attn_norm="rsqrt_head_dim")
  configs = {
      "gemma_2b": dict(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1,
                       head_dim=256),
      "gemma2_2b": dict(width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4,
                        head_dim=256, **gemma2),
      "gemma2_9b": dict(width=3584, depth=42, mlp_dim=14336, num_heads=16, num_kv_heads=8,
                        head_dim=256, **gemma2),
      "gemma2_27b": dict(width=4608, depth=46, mlp_dim=36864, num_heads=32, num_kv_heads=16,
                         head_dim=128, **{**gemma2, "query_pre_attn_norm": "rsqrt_emb_per_head"}),
  }
  if variant not in configs:
    raise ValueError(f"Unknown Gemma variant {variant!r}; known: {', '.join(configs)}.")
  return dict(configs[variant])


def split_qkv(flat, prefix):
  """big_vision's `{prefix}layers/attn/qkv_einsum/w` [L, 3, N, D, H] -> our `q_einsum/w`
  [L, N, D, H] and `kv_einsum/w` [L, 2, N, D, H]. flat: {'/'-joined name: array};
  returns a new dict, unchanged when there is no qkv_einsum."""
  attn = f"{prefix}layers/attn/"
  if attn + "qkv_einsum/w" not in flat:
    return flat
  out = dict(flat)
  qkv = out.pop(attn + "qkv_einsum/w")
  if qkv.ndim != 5 or qkv.shape[1] != 3:
    raise CheckpointError(f"{attn}qkv_einsum/w has shape {qkv.shape}, expected [L, 3, N, D, H].")
  for name in ("q_einsum/w", "kv_einsum/w"):
    if attn + name in out:
      raise CheckpointError(f"{attn}qkv_einsum/w and {attn}{name} are both stored.")
  out[attn + "q_einsum/w"] = qkv[:, 0]
  out[attn + "kv_einsum/w"] = qkv[:, 1:]
  return out


def softcap(x, cap):
  return x if not cap else jnp.tanh(x / cap) * cap


def apply_rope(x, positions, max_wavelength=10_000):
  """Rotary embedding, split-half convention. x [B, T, N, H], positions [B, T]."""
  half = x.shape[-1] // 2
  timescale = max_wavelength ** (2 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  angle = positions[..., None].astype(jnp.float32) / timescale  # [B, T, H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + 1e-6) * (1 + scale), computed in float32."""
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
    return (normed * (1 + scale)).astype(x.dtype)


class Einsum(nn.Module):
  """A weight `w` of a given shape used in one einsum; `in_axis` are its contracted axes
  (lecun-normal fan-in), the last axis is the output and the others are batch axes."""
  shape: tuple
  in_axis: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, eqn, x):
    in_axis = (self.in_axis,) if isinstance(self.in_axis, int) else tuple(self.in_axis)
    batch = tuple(i for i in range(len(self.shape) - 1) if i not in in_axis)
    init = nn.initializers.lecun_normal(in_axis=in_axis, out_axis=-1, batch_axis=batch)
    w = self.param("w", init, self.shape)
    return jnp.einsum(eqn, x, w.astype(self.dtype))


class Embedder(nn.Module):
  """Tied token embedding: encode multiplies by sqrt(D), decode is x @ table.T.
  The table is [V, D], or [D, V] with `dot_layout`."""
  vocab_size: int
  width: int
  dtype: Any = jnp.float32
  dot_layout: bool = False

  def setup(self):
    shape = (self.width, self.vocab_size) if self.dot_layout else (self.vocab_size, self.width)
    self.input_embedding = self.param("input_embedding", nn.initializers.normal(), shape)

  def encode(self, tokens):  # [B, T] -> [B, T, D]
    table = self.input_embedding.astype(self.dtype)
    x = jnp.moveaxis(table[:, tokens], 0, -1) if self.dot_layout else table[(tokens,)]
    return x * jnp.sqrt(float(self.width)).astype(self.dtype)

  def decode(self, x):  # [B, T, D] -> [B, T, V]
    table = self.input_embedding.astype(self.dtype)
    return jnp.dot(x, table if self.dot_layout else table.T, preferred_element_type=jnp.float32)


class Attention(nn.Module):
  """Multi-query / grouped-query attention with RoPE, float32 logits and a KV cache."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_scale: float
  attn_logits_softcap: Any = None
  dtype: Any = jnp.float32
  dot_layout: bool = False

  @nn.compact
  def __call__(self, x, positions, attn_mask, decode):
    width = x.shape[-1]
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    if n % k:
      raise ValueError(f"num_heads {n} is not a multiple of num_kv_heads {k}.")
    if self.dot_layout:
      q = Einsum((n * h, width), 1, self.dtype, name="q_einsum")("BTD,ED->BTE", x)
      q = q.reshape(q.shape[:2] + (n, h))
      kv = Einsum((2, k, h, width), 3, self.dtype, name="kv_einsum")("BSD,CKHD->CBSKH", x)
    else:
      q = Einsum((n, width, h), 1, self.dtype, name="q_einsum")("BTD,NDH->BTNH", x)
      kv = Einsum((2, k, width, h), 2, self.dtype, name="kv_einsum")("BSD,CKDH->CBSKH", x)
    keys, values = kv[0], kv[1]  # [B, T, K, H]
    q = apply_rope(q, positions) * jnp.asarray(self.query_scale, q.dtype)
    keys = apply_rope(keys, positions)

    if decode:
      if not (self.has_variable("cache", "k_cache") and self.is_mutable_collection("cache")):
        raise ValueError("decode=True needs a mutable 'cache' collection from Model.init_cache "
                         "(apply(..., {'params': p, 'cache': c}, mutable=['cache'])).")
      k_cache = self.variable("cache", "k_cache", None)
      v_cache = self.variable("cache", "v_cache", None)
      index = self.variable("cache", "cache_index", None)
      start = (0, index.value, 0, 0)
      k_cache.value = jax.lax.dynamic_update_slice(
          k_cache.value, keys.astype(k_cache.value.dtype), start)
      v_cache.value = jax.lax.dynamic_update_slice(
          v_cache.value, values.astype(v_cache.value.dtype), start)
      index.value = index.value + x.shape[1]
      keys, values = k_cache.value.astype(self.dtype), v_cache.value.astype(self.dtype)

    b, t = q.shape[:2]
    if attn_mask.shape != (b, t, keys.shape[1]):
      raise ValueError(f"attn_mask must be [B, T, S] = {(b, t, keys.shape[1])}, "
                       f"got {tuple(attn_mask.shape)}.")
    q = q.reshape(b, t, k, n // k, h)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys, preferred_element_type=jnp.float32)
    logits = softcap(logits, self.attn_logits_softcap)
    logits = jnp.where(attn_mask[:, None, None, :, :], logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values).reshape(b, t, n, h)
    if self.dot_layout:
      return Einsum((width, n * h), 1, self.dtype, name="attn_vec_einsum")(
          "BTE,DE->BTD", encoded.reshape(b, t, n * h))
    return Einsum((n, h, width), (0, 1), self.dtype, name="attn_vec_einsum")("BTNH,NHD->BTD", encoded)


class FeedForward(nn.Module):
  """Gated tanh-GELU MLP: linear(gelu(x G0) * (x G1))."""
  mlp_dim: int
  dtype: Any = jnp.float32
  dot_layout: bool = False

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if self.dot_layout:
      w_gating = self.param("gating_einsum", nn.initializers.lecun_normal(batch_axis=(0,)),
                            (2, self.mlp_dim, width)).astype(self.dtype)
      h = jnp.einsum("BTD,CFD->CBTF", x, w_gating)  # [2, B, T, F]
    else:
      w_gating = self.param("gating_einsum", nn.initializers.lecun_normal(batch_axis=(0,)),
                            (2, width, self.mlp_dim)).astype(self.dtype)
      h = jnp.einsum("BTD,CDF->CBTF", x, w_gating)  # [2, B, T, F]
    h = nn.gelu(h[0], approximate=True) * h[1]
    if self.dot_layout:
      w_linear = self.param("linear", nn.initializers.lecun_normal(),
                            (width, self.mlp_dim)).astype(self.dtype)
      return jnp.einsum("BTF,DF->BTD", h, w_linear)
    w_linear = self.param("linear", nn.initializers.lecun_normal(),
                          (self.mlp_dim, width)).astype(self.dtype)
    return jnp.einsum("BTF,FD->BTD", h, w_linear)


class Block(nn.Module):
  """One decoder layer; Gemma 2 adds post-attention / post-FFW norms."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  query_scale: float
  post_norms: bool = False
  attn_logits_softcap: Any = None
  dropout: float = 0.0
  dtype: Any = jnp.float32
  dot_layout: bool = False

  @nn.compact
  def __call__(self, x, positions, attn_mask, decode, deterministic):
    y = RMSNorm(name="pre_attention_norm")(x)
    y = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.query_scale,
                  self.attn_logits_softcap, self.dtype, self.dot_layout,
                  name="attn")(y, positions, attn_mask, decode)
    if self.post_norms:
      y = RMSNorm(name="post_attention_norm")(y)
    x = x + nn.Dropout(rate=self.dropout)(y, deterministic)
    y = RMSNorm(name="pre_ffw_norm")(x)
    y = FeedForward(self.mlp_dim, self.dtype, self.dot_layout, name="mlp")(y)
    if self.post_norms:
      y = RMSNorm(name="post_ffw_norm")(y)
    return x + nn.Dropout(rate=self.dropout)(y, deterministic), None


class Model(nn.Module):
  """Gemma decoder. `embed_tokens`, `__call__` (hidden states) and `logits` are separate
  so that PaliGemma can put image tokens first and take logits of text positions only."""
  vocab_size: int = 257152
  width: int = 2048
  depth: int = 18
  mlp_dim: int = 16384
  num_heads: int = 8
  num_kv_heads: int = 1
  head_dim: int = 256
  post_norms: bool = False
  attn_logits_softcap: Any = None
  final_logits_softcap: Any = None
  query_pre_attn_norm: str = "rsqrt_head_dim"
  dropout: float = 0.0
  remat: Any = False
  scan_unroll: Any = False
  dtype: Any = jnp.float32
  dot_layout: bool = False

  def setup(self):
    if self.query_pre_attn_norm == "rsqrt_head_dim":
      query_scale = self.head_dim ** -0.5
    elif self.query_pre_attn_norm == "rsqrt_emb_per_head":
      query_scale = (self.width // self.num_heads) ** -0.5
    else:
      raise ValueError(f"Unknown query_pre_attn_norm {self.query_pre_attn_norm!r}.")
    self.embedder = Embedder(self.vocab_size, self.width, self.dtype, self.dot_layout)
    kw = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
              mlp_dim=self.mlp_dim, query_scale=query_scale, post_norms=self.post_norms,
              attn_logits_softcap=self.attn_logits_softcap, dropout=self.dropout,
              dtype=self.dtype, dot_layout=self.dot_layout)
    if self.dot_layout:  # One module (own buffers) per layer: a scan copies each layer's slice.
      self.layers = [Block(**kw) for _ in range(self.depth)]
    else:
      blocks = common.scan_blocks(Block, self.depth, self.remat, num_broadcast_args=4,
                                  static_argnums=(4, 5), variable_axes=("params", "cache"),
                                  unroll=self.scan_unroll)
      self.layers = blocks(**kw)
    self.final_norm = RMSNorm()

  def embed_tokens(self, tokens):  # [B, T] int -> [B, T, D]
    return self.embedder.encode(tokens)

  def __call__(self, x, positions, attn_mask, *, decode=False, deterministic=True):
    """x [B, T, D] embedded inputs -> final-normed hidden states [B, T, D]."""
    x = x.astype(self.dtype)
    for layer in self.layers if self.dot_layout else [self.layers]:
      x, _ = layer(x, positions, attn_mask, decode, deterministic)
    return self.final_norm(x)

  def logits(self, pre_logits):  # [B, T, D] -> [B, T, V] float32
    logits = self.embedder.decode(pre_logits).astype(jnp.float32)
    return softcap(logits, self.final_logits_softcap)

  def init_cache(self, batch_size, cache_size, dtype=None):
    """The empty "cache" collection of this module (no params needed)."""
    shape = (batch_size, cache_size, self.num_kv_heads, self.head_dim)
    dtype = dtype or self.dtype
    if self.dot_layout:
      return {f"layers_{i}": {"attn": {"k_cache": jnp.zeros(shape, dtype),
                                       "v_cache": jnp.zeros(shape, dtype),
                                       "cache_index": jnp.zeros((), jnp.int32)}}
              for i in range(self.depth)}
    shape = (self.depth,) + shape
    return {"layers": {"attn": {"k_cache": jnp.zeros(shape, dtype),
                                "v_cache": jnp.zeros(shape, dtype),
                                "cache_index": jnp.zeros((self.depth,), jnp.int32)}}}


# Stored layout -> dot layout of each moved weight: (name, axes of the stored array, the
# range [i, j) of moved axes merged into one, if any: q's [L, N, H, D] -> [L, N*H, D]).
DOT_LAYOUT = (("embedder/input_embedding", (1, 0), None),
              ("layers/attn/q_einsum/w", (0, 1, 3, 2), (1, 3)),
              ("layers/attn/kv_einsum/w", (0, 1, 2, 4, 3), None),
              ("layers/attn/attn_vec_einsum/w", (0, 3, 1, 2), (2, 4)),
              ("layers/mlp/gating_einsum", (0, 1, 3, 2), None),
              ("layers/mlp/linear", (0, 2, 1), None))


def to_dot_layout(params, dtype=None):
  """A Gemma params tree (stored layout) -> the tree of `Model(dot_layout=True)`, with the
  weights cast to `dtype` (None: unchanged; norms stay float32). Jittable; one copy."""
  params = dict(params)
  for name, axes, merged in DOT_LAYOUT:
    *path, leaf = name.split("/")
    node = params
    for part in path:
      node[part] = node = dict(node[part])
    moved = jnp.transpose(node[leaf], axes)
    if merged:
      i, j = merged
      moved = moved.reshape(moved.shape[:i] + (-1,) + moved.shape[j:])
    node[leaf] = moved
  layers = params.pop("layers")
  for i in range(jax.tree.leaves(layers)[0].shape[0]):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
  if dtype is None:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x if "norm" in jax.tree_util.keystr(p) else x.astype(dtype), params)
