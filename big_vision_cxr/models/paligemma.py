"""PaliGemma = SigLIP ViT (`img/`) + Gemma (`llm/`), prefix-LM attention.

Image tokens come first and are not scaled; text tokens are embedded times sqrt(D).
`make_attn_mask` builds the prefix-LM mask from `mask_ar` (0: bidirectional block with
everything before, 1: causal). See docs/ARCHITECTURE.md ("Model") for the contract.
"""
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_vision_cxr import npz
from big_vision_cxr.models import gemma
from big_vision_cxr.models import vit

PG_VOCAB = 256000 + 1024 + 128  # Gemma base vocabulary + <loc> + <seg> tokens.
SO400M = dict(patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16)


def make_attn_mask(input_mask, mask_ar):
  """Prefix-LM mask [B, N, N]: i sees j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]
  and both are valid inputs."""
  cumsum = jnp.cumsum(mask_ar, axis=1)  # [B, N]
  attn_mask = cumsum[:, None, :] <= cumsum[:, :, None]
  valid = input_mask[:, None, :] * input_mask[:, :, None]
  return jnp.logical_and(attn_mask, valid.astype(bool))


def _pg_config(res, llm_variant, **llm_overrides):
  llm = dict(vocab_size=PG_VOCAB, **gemma.get_config(llm_variant))
  llm.update(llm_overrides)
  return dict(img=dict(image_size=res, **SO400M), llm=llm)


def _variants():
  variants = {}
  for res in (224, 448, 896):
    variants[f"pg1_3b_{res}"] = _pg_config(res, "gemma_2b")
    for size, llm in (("3b", "gemma2_2b"), ("10b", "gemma2_9b"), ("28b", "gemma2_27b")):
      variants[f"pg2_{size}_{res}"] = _pg_config(res, llm)
  small_vit = dict(image_size=32, patch_size=8, width=24, depth=2, mlp_dim=40, num_heads=3)
  variants["tiny"] = dict(  # PG1-like: MQA, num_heads * head_dim (4*12) != width (32).
      img=small_vit,
      llm=dict(vocab_size=2304, width=32, depth=2, mlp_dim=48, num_heads=4, num_kv_heads=1,
               head_dim=12))
  variants["tiny_pg2"] = dict(  # PG2-like: GQA, softcaps, post-norms.
      img=small_vit,
      llm=dict(vocab_size=2304, width=32, depth=2, mlp_dim=48, num_heads=4, num_kv_heads=2,
               head_dim=12, post_norms=True, attn_logits_softcap=50.0,
               final_logits_softcap=30.0, query_pre_attn_norm="rsqrt_head_dim"))
  variants["demo"] = dict(  # What `:demo` trains on CPU; vocab = 1000 base + 1024 loc + 128 seg.
      img=dict(image_size=64, patch_size=8, width=96, depth=2, mlp_dim=384, num_heads=4),
      llm=dict(vocab_size=1000 + 1024 + 128, width=128, depth=3, mlp_dim=512, num_heads=4,
               num_kv_heads=1, head_dim=32))
  variants["bench_100m"] = dict(  # >= 100M params, full PaliGemma vocabulary.
      img=dict(image_size=224, patch_size=16, width=384, depth=6, mlp_dim=1536, num_heads=6),
      llm=dict(vocab_size=PG_VOCAB, width=384, depth=6, mlp_dim=1536, num_heads=6,
               num_kv_heads=1, head_dim=64))
  return variants


VARIANTS = _variants()


def get_config(variant):
  """ConfigDict(img=..., llm=...) for `Model(**config)`. Variants: see VARIANTS."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown PaliGemma variant {variant!r}; known: {', '.join(VARIANTS)}.")
  return ml_collections.ConfigDict(VARIANTS[variant])


class Model(nn.Module):
  """PaliGemma. `img` and `llm` are the kwargs of vit.Model and gemma.Model."""
  img: Mapping[str, Any]
  llm: Mapping[str, Any]

  def __post_init__(self):
    # Frozen (hashable) copies, so that a Model can be a static argument of jax.jit.
    object.__setattr__(self, "img", flax.core.FrozenDict(dict(self.img)))
    object.__setattr__(self, "llm", flax.core.FrozenDict(dict(self.llm)))
    super().__post_init__()

  def setup(self):
    llm = dict(self.llm)
    self._llm = gemma.Model(**llm, name="llm")
    self._img = vit.Model(**{"num_classes": self._llm.width, **dict(self.img)}, name="img")

  def embed_image(self, image, train=False):
    """image [B, H, W, 3] in [-1, 1] -> (zimg [B, N, D], out)."""
    zimg, out = self._img(image, train=train)
    out["zimg"] = zimg
    return zimg, out

  def embed_image_and_text(self, image, text, *, input_mask=None, mask_ar=None, train=False):
    """-> (x [B, N+T, D], input_mask [B, N+T], mask_ar [B, N+T]); image tokens first."""
    zimg, _ = self.embed_image(image, train=train)
    ztxt = self._llm.embed_tokens(text)
    x = jnp.concatenate([zimg.astype(ztxt.dtype), ztxt], axis=1)
    b, n = zimg.shape[:2]
    if input_mask is None:
      input_mask = jnp.ones(text.shape, bool)
    if mask_ar is None:
      mask_ar = jnp.ones(text.shape, jnp.int32)
    input_mask = jnp.concatenate([jnp.ones((b, n), bool), input_mask.astype(bool)], axis=1)
    mask_ar = jnp.concatenate([jnp.zeros((b, n), jnp.int32), mask_ar.astype(jnp.int32)], axis=1)
    return x, input_mask, mask_ar

  def llm_forward(self, x_or_tokens, positions, attn_mask, *, decode=False, train=False):
    """Runs the LLM on embeddings [B,T,D] (or int tokens [B,T], embedded here).
    attn_mask [B, T, S]; S = T without cache, the cache size with decode=True."""
    x = x_or_tokens
    if jnp.issubdtype(x.dtype, jnp.integer):
      x = self._llm.embed_tokens(x)
    pre_logits = self._llm(x, positions, attn_mask, decode=decode, deterministic=not train)
    return self._llm.logits(pre_logits), {"pre_logits": pre_logits}

  def logits(self, pre_logits):
    """Final-normed hidden states [B, T, D] (`out["pre_logits"]`) -> logits [B, T, V] f32.
    Lets decoding apply the 257k-vocab head to the last prompt position only."""
    return self._llm.logits(pre_logits)

  def text_hidden(self, image, text, mask_ar, *, train=False):
    """-> final-normed hidden states [B, T, D] of the text positions (no vocab head), for
    losses that apply the head to a few positions only."""
    x, input_mask, full_mask_ar = self.embed_image_and_text(image, text, mask_ar=mask_ar,
                                                            train=train)
    attn_mask = make_attn_mask(input_mask, full_mask_ar)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    pre_logits = self._llm(x, positions, attn_mask, deterministic=not train)
    return pre_logits[:, x.shape[1] - text.shape[1]:]

  def __call__(self, image, text, mask_ar, *, train=False):
    """-> (logits [B, T, V] float32 for the text positions, out)."""
    text_pre_logits = self.text_hidden(image, text, mask_ar, train=train)
    return self._llm.logits(text_pre_logits), {"pre_logits": text_pre_logits}

  def init_cache(self, batch_size, cache_size, dtype=None):
    """Empty "cache" collection for `llm_forward(..., decode=True)`; dtype defaults to the
    LLM compute dtype. Works on an unbound Model (no params needed)."""
    llm = gemma.Model(**dict(self.llm), parent=None)
    return {"llm": llm.init_cache(batch_size, cache_size, dtype)}


def load(init_params, init_file, model_cfg=None, dont_load=()):
  """Loads a big_vision .npz into a params tree shaped like `init_params`.

  init_params: the model's params (arrays, or jax.ShapeDtypeStruct from eval_shape).
  init_file: 'file.npz' (keys with or without 'params/'), or 'file.npz:img' /
    'file.npz:llm' to load only that sub-tree of the file into the same sub-tree.
  dont_load: regexes (full match on '/'-joined names) of params to keep from
    init_params, e.g. ['img/head/.*'].
  model_cfg: accepted for big_vision signature compatibility; shapes come from init_params.
  Returns the merged tree: loaded leaves as numpy arrays in the init dtype, other leaves
  as they were in init_params. `img/pos_embedding` is resampled if the grid differs.
  big_vision's other layouts are converted: an unscanned ViT (`encoderblock_{i}`) and a
  Gemma's fused `qkv_einsum` (num_kv_heads == num_heads).
  Raises npz.CheckpointError naming missing/unexpected keys or mismatched shapes.
  """
  del model_cfg
  path, subtree = npz.split_spec(init_file)
  loaded = npz.load_tree(init_file)
  if subtree:
    for part in reversed(subtree.split("/")):
      loaded = {part: loaded}
  flat_init = npz.flatten(init_params)
  try:
    flat_loaded = gemma.split_qkv(vit.stack_unscanned(npz.flatten(loaded), "img/"), "llm/")
  except npz.CheckpointError as e:
    raise npz.CheckpointError(f"{path}: {e}") from None
  skip = [re.compile(p) for p in dont_load]
  in_scope = lambda name: not subtree or name.startswith(subtree + "/")
  wanted = {k for k in flat_init if in_scope(k) and not any(p.fullmatch(k) for p in skip)}
  missing = sorted(wanted - set(flat_loaded))
  unexpected = sorted(k for k in set(flat_loaded) - set(flat_init)
                      if not any(p.fullmatch(k) for p in skip))
  if missing or unexpected:
    raise npz.CheckpointError(
        f"{init_file}: params do not match the model. Missing in the file: {missing}. "
        f"Unexpected in the file: {unexpected}.")
  merged = dict(flat_init)
  for name in sorted(wanted):
    value, target = flat_loaded[name], flat_init[name]
    if name == "img/pos_embedding" and value.shape != target.shape:
      value = vit.resample_posemb(value, target.shape[1])
    if value.shape != tuple(target.shape):
      raise npz.CheckpointError(f"{path}: param {name!r} has shape {value.shape} in the file "
                                f"but {tuple(target.shape)} in the model.")
    merged[name] = np.asarray(value).astype(target.dtype)
  return npz.unflatten(merged)


def param_shapes(model_cfg, batch_size=1, text_len=8):
  """jax.ShapeDtypeStruct tree of the params, computed without allocating them."""
  model = Model(**model_cfg)
  res = model_cfg["img"].get("image_size", 224)
  image = jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((batch_size, text_len), jnp.int32)
  init = lambda image, text: model.init(jax.random.PRNGKey(0), image, text, text)["params"]
  return jax.eval_shape(init, image, text)
