"""PaliGemma model: param layout, prefix-LM mask, KV-cache decoding, dtypes, remat, sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_cxr import npz
from big_vision_cxr.models import paligemma as pg

B, PREFIX, SUFFIX = 2, 4, 3


def _random_params(model_cfg, seed=0):
  """Random params of the model's shapes (norm scales and heads non-zero too)."""
  rng = np.random.default_rng(seed)
  shapes = pg.param_shapes(model_cfg)
  return pg.Model(**model_cfg), jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32), shapes)


def _inputs(vocab, res, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, (B, res, res, 3)).astype(np.float32)
  text = rng.integers(3, vocab, (B, PREFIX + SUFFIX)).astype(np.int32)
  mask_ar = np.array([[0] * PREFIX + [1] * SUFFIX] * B, np.int32)
  return image, text, mask_ar


@pytest.fixture(scope="module", params=["tiny", "tiny_pg2"])
def tiny(request):
  cfg = pg.get_config(request.param).to_dict()
  model, params = _random_params(cfg)
  forward = jax.jit(lambda p, *args: model.apply({"params": p}, *args)[0])
  return cfg, model, params, _inputs(cfg["llm"]["vocab_size"], cfg["img"]["image_size"]), forward


def test_variants():
  cfg = pg.get_config("tiny")
  assert hash(pg.Model(**cfg)) == hash(pg.Model(**cfg.to_dict()))  # Usable as a jit static arg.
  with pytest.raises(ValueError, match="pg1_3b_224"):
    pg.get_config("pg3_nope")


def test_param_names_and_scanned_shapes(tiny):
  cfg, _, params, _, _ = tiny
  flat = {k: v.shape for k, v in npz.flatten(params).items()}
  img, llm = cfg["img"], cfg["llm"]
  c, f, h, dv = img["width"], img["mlp_dim"], img["num_heads"], img["depth"]
  n, k, hd, d, dl = llm["num_heads"], llm["num_kv_heads"], llm["head_dim"], llm["width"], llm["depth"]
  p, grid = img["patch_size"], (img["image_size"] // img["patch_size"]) ** 2
  mha = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0"
  expected = {
      "img/embedding/kernel": (p, p, 3, c), "img/embedding/bias": (c,),
      "img/pos_embedding": (1, grid, c),
      "img/Transformer/encoderblock/LayerNorm_0/scale": (dv, c),
      "img/Transformer/encoderblock/LayerNorm_0/bias": (dv, c),
      "img/Transformer/encoderblock/LayerNorm_1/scale": (dv, c),
      "img/Transformer/encoderblock/LayerNorm_1/bias": (dv, c),
      **{f"{mha}/{q}/kernel": (dv, c, h, c // h) for q in ("query", "key", "value")},
      **{f"{mha}/{q}/bias": (dv, h, c // h) for q in ("query", "key", "value")},
      f"{mha}/out/kernel": (dv, h, c // h, c), f"{mha}/out/bias": (dv, c),
      "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": (dv, c, f),
      "img/Transformer/encoderblock/MlpBlock_0/Dense_0/bias": (dv, f),
      "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel": (dv, f, c),
      "img/Transformer/encoderblock/MlpBlock_0/Dense_1/bias": (dv, c),
      "img/Transformer/encoder_norm/scale": (c,), "img/Transformer/encoder_norm/bias": (c,),
      "img/head/kernel": (c, d), "img/head/bias": (d,),
      "llm/embedder/input_embedding": (llm["vocab_size"], d),
      "llm/layers/pre_attention_norm/scale": (dl, d),
      "llm/layers/attn/q_einsum/w": (dl, n, d, hd),
      "llm/layers/attn/kv_einsum/w": (dl, 2, k, d, hd),
      "llm/layers/attn/attn_vec_einsum/w": (dl, n, hd, d),
      "llm/layers/pre_ffw_norm/scale": (dl, d),
      "llm/layers/mlp/gating_einsum": (dl, 2, d, llm["mlp_dim"]),
      "llm/layers/mlp/linear": (dl, llm["mlp_dim"], d),
      "llm/final_norm/scale": (d,),
  }
  if llm.get("post_norms"):
    expected["llm/layers/post_attention_norm/scale"] = (dl, d)
    expected["llm/layers/post_ffw_norm/scale"] = (dl, d)
  assert flat == expected


def test_make_attn_mask_prefix_lm():
  mask = pg.make_attn_mask(jnp.array([[1, 1, 1, 1, 1, 0]]), jnp.array([[0, 0, 0, 1, 1, 1]]))
  expected = np.array([[1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(np.asarray(mask[0]), expected)
  causal = pg.make_attn_mask(jnp.ones((1, 3)), jnp.ones((1, 3), jnp.int32))
  np.testing.assert_array_equal(np.asarray(causal[0]), np.tril(np.ones((3, 3), bool)))


def test_prefix_is_bidirectional_and_suffix_causal(tiny):
  cfg, _, params, (image, text, mask_ar), forward = tiny
  logits = forward(params, image, text, mask_ar)
  assert logits.shape == (B, PREFIX + SUFFIX, cfg["llm"]["vocab_size"])
  assert logits.dtype == jnp.float32
  changed_suffix = text.copy()
  changed_suffix[:, -1] = (text[:, -1] + 1) % cfg["llm"]["vocab_size"]
  logits2 = forward(params, image, changed_suffix, mask_ar)
  np.testing.assert_array_equal(np.asarray(logits2[:, :-1]), np.asarray(logits[:, :-1]))
  changed_prefix = text.copy()
  changed_prefix[:, PREFIX - 1] = (text[:, PREFIX - 1] + 1) % cfg["llm"]["vocab_size"]
  logits3 = forward(params, image, changed_prefix, mask_ar)
  assert np.abs(np.asarray(logits3[:, 0] - logits[:, 0])).max() > 1e-4  # Earlier prefix sees it.


def test_image_tokens_unscaled_text_tokens_scaled(tiny):
  cfg, model, params, (image, text, mask_ar), _ = tiny
  x, input_mask, full_ar = model.apply({"params": params}, image, text, mask_ar=mask_ar,
                                       method=pg.Model.embed_image_and_text)
  zimg, _ = model.apply({"params": params}, image, method=pg.Model.embed_image)
  n = zimg.shape[1]
  np.testing.assert_array_equal(np.asarray(x[:, :n]), np.asarray(zimg))
  table = np.asarray(params["llm"]["embedder"]["input_embedding"])
  np.testing.assert_allclose(np.asarray(x[:, n:]), table[text] * np.sqrt(cfg["llm"]["width"]),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(full_ar), np.concatenate([np.zeros((B, n)), mask_ar], 1))
  assert np.asarray(input_mask).all()


def test_cached_decoding_matches_full_forward(tiny):
  _, model, params, (image, text, mask_ar), forward = tiny
  x, input_mask, full_ar = model.apply({"params": params}, image, text, mask_ar=mask_ar,
                                       method=pg.Model.embed_image_and_text)
  length = x.shape[1]
  mask = pg.make_attn_mask(input_mask, full_ar)
  positions = jnp.broadcast_to(jnp.arange(length), (B, length))
  full, out = model.apply({"params": params}, x, positions, mask, method=pg.Model.llm_forward)
  np.testing.assert_array_equal(  # The public vocab head on pre_logits gives the same logits.
      model.apply({"params": params}, out["pre_logits"], method=pg.Model.logits), full)
  ref = forward(params, image, text, mask_ar)
  np.testing.assert_allclose(np.asarray(full[:, -text.shape[1]:]), np.asarray(ref), atol=1e-5)

  cache_size = length + 5
  pad = lambda m: jnp.pad(m, ((0, 0), (0, 0), (0, cache_size - m.shape[2])))
  step = jax.jit(lambda cache, x, pos, m: model.apply(
      {"params": params, "cache": cache}, x, pos, m, decode=True,
      method=pg.Model.llm_forward, mutable=["cache"]))
  cache = model.init_cache(B, cache_size, jnp.float32)
  prefill = length - SUFFIX
  (logits, _), state = step(cache, x[:, :prefill], positions[:, :prefill],
                            pad(mask[:, :prefill, :prefill]))
  outputs = [logits]
  for t in range(prefill, length):  # Suffix tokens one at a time, as ids (embedded inside).
    (logits, _), state = step(state["cache"], text[:, t - length + text.shape[1]][:, None],
                              positions[:, t:t + 1], pad(mask[:, t:t + 1, :t + 1]))
    outputs.append(logits)
  incremental = np.concatenate([np.asarray(o) for o in outputs], axis=1)
  np.testing.assert_allclose(incremental, np.asarray(full), atol=1e-5, rtol=0)
  attn_cache = state["cache"]["llm"]["layers"]["attn"]
  np.testing.assert_array_equal(np.asarray(attn_cache["cache_index"]), length)
  assert not np.asarray(attn_cache["k_cache"][:, :, length:]).any()  # Unwritten slots stay empty.


def test_dot_layout_is_the_same_model(tiny):
  """gemma's dot layout (decoding's: D-first weights, [D, V] head) on `to_dot_layout`
  params gives the stored layout's logits, and its init has exactly those shapes."""
  from big_vision_cxr.models import gemma  # pylint: disable=import-outside-toplevel
  cfg, model, params, (image, text, mask_ar), forward = tiny
  dot_model = pg.Model(img=cfg["img"], llm=dict(cfg["llm"], dot_layout=True))
  dot_params = dict(params, llm=gemma.to_dot_layout(params["llm"]))
  shapes = jax.eval_shape(dot_model.init, jax.random.PRNGKey(0), image, text, mask_ar)["params"]
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, dot_params)
  logits = dot_model.apply({"params": dot_params}, image, text, mask_ar)[0]
  np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(params, image, text, mask_ar)),
                             atol=1e-5, rtol=1e-6)
  emb = params["llm"]["embedder"]["input_embedding"]
  np.testing.assert_array_equal(dot_params["llm"]["embedder"]["input_embedding"], emb.T)


def test_init_cache_layout_and_dtype():
  cfg = pg.get_config("tiny_pg2").to_dict()
  cache = pg.Model(**cfg).init_cache(3, 17)
  attn = cache["llm"]["layers"]["attn"]
  llm = cfg["llm"]
  assert attn["k_cache"].shape == (llm["depth"], 3, 17, llm["num_kv_heads"], llm["head_dim"])
  assert attn["v_cache"].dtype == jnp.float32 and attn["cache_index"].shape == (llm["depth"],)
  cfg["llm"]["dtype"] = "bfloat16"
  assert pg.Model(**cfg).init_cache(1, 4)["llm"]["layers"]["attn"]["k_cache"].dtype == jnp.bfloat16
  assert pg.Model(**cfg).init_cache(1, 4, jnp.float32)["llm"]["layers"]["attn"]["k_cache"].dtype == jnp.float32


def test_decode_without_cache_is_a_clear_error(tiny):
  _, model, params, _, _ = tiny
  d = model.llm["width"]
  with pytest.raises(ValueError, match="init_cache"):
    model.apply({"params": params}, jnp.zeros((1, 2, d)), jnp.zeros((1, 2), jnp.int32),
                jnp.ones((1, 2, 2), bool), decode=True, method=pg.Model.llm_forward)
  with pytest.raises(ValueError, match=r"attn_mask must be \[B, T, S\] = \(1, 2, 2\), got \(1, 2, 3\)"):
    model.apply({"params": params}, jnp.zeros((1, 2, d)), jnp.zeros((1, 2), jnp.int32),
                jnp.ones((1, 2, 3), bool), method=pg.Model.llm_forward)


def test_wrong_image_size_is_a_clear_error(tiny):
  _, _, params, (image, text, mask_ar), forward = tiny
  with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\].*\(2, 16, 16, 3\)"):
    forward(params, image[:, :16, :16], text, mask_ar)


def test_bf16_remat_dropout_gradients():
  cfg = pg.get_config("tiny_pg2").to_dict()
  _, params = _random_params(cfg)
  image, text, mask_ar = _inputs(cfg["llm"]["vocab_size"], cfg["img"]["image_size"])

  def loss_and_grad(overrides, train=False):
    c = {"img": {**cfg["img"], **overrides}, "llm": {**cfg["llm"], **overrides}}
    model = pg.Model(**c)
    def loss(p):
      logits, _ = model.apply({"params": p}, image, text, mask_ar, train=train,
                              rngs={"dropout": jax.random.PRNGKey(0)})
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params)

  base_loss, base_grad = loss_and_grad({})
  remat_loss, remat_grad = loss_and_grad({"remat": "nothing_saveable"})
  np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(remat_grad), jax.tree_util.tree_leaves(base_grad)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # bf16 compute + remat + dropout (train): params and grads stay f32, finite; dropout acts.
  bf16_loss, bf16_grad = loss_and_grad({"dtype": "bfloat16", "remat": True, "dropout": 0.3},
                                       train=True)
  assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
             for g in jax.tree_util.tree_leaves(bf16_grad))
  assert abs(float(bf16_loss) - float(base_loss)) > 1e-3
  assert abs(float(bf16_loss) - float(base_loss)) < 0.5 * abs(float(base_loss))


@pytest.mark.parametrize("unroll", [True, 2])
def test_scan_unroll_leaves_no_layer_loop_and_changes_no_number(unroll):
  """Unrolled layers (the XLA:CPU setting: its layer loop copies the stacked activations
  the backward pass keeps) take the same params and give the same loss and gradients."""
  cfg = pg.get_config("tiny_pg2").to_dict()  # depth 2 in each tower
  _, params = _random_params(cfg)
  image, text, mask_ar = _inputs(cfg["llm"]["vocab_size"], cfg["img"]["image_size"])

  def grad_fn(value):
    model_cfg = {part: dict(cfg[part], scan_unroll=value) for part in ("img", "llm")}
    model = pg.Model(**model_cfg)
    def loss(p):
      logits, _ = model.apply({"params": p}, image, text, mask_ar)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    assert jax.tree.map(lambda x: x.shape, pg.param_shapes(model_cfg)) == \
        jax.tree.map(lambda x: x.shape, params)
    return jax.jit(jax.value_and_grad(loss))

  scanned, unrolled = grad_fn(False), grad_fn(unroll)
  assert scanned.lower(params).compile().as_text().count(" while(") == 4  # 2 towers x fwd/bwd
  assert unrolled.lower(params).compile().as_text().count(" while(") == 0
  (loss, grad), (loss_u, grad_u) = scanned(params), unrolled(params)
  np.testing.assert_allclose(loss_u, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad_u), jax.tree.leaves(grad)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _vit_count(width, depth, mlp, patch, tokens, out):
  block = 4 * width + 4 * (width * width + width) + 2 * width * mlp + mlp + width
  return patch * patch * 3 * width + width + tokens * width + depth * block + 2 * width + width * out + out


def _gemma_count(vocab, width, depth, mlp, heads, kv, head_dim, post_norms):
  block = (2 + 2 * post_norms) * width + (2 * heads + 2 * kv) * width * head_dim + 3 * width * mlp
  return vocab * width + depth * block + width


@pytest.mark.parametrize("variant,expected", [
    ("pg1_3b_224", _vit_count(1152, 27, 4304, 14, 256, 2048)
     + _gemma_count(257152, 2048, 18, 16384, 8, 1, 256, False)),
    ("pg2_3b_224", _vit_count(1152, 27, 4304, 14, 256, 2304)
     + _gemma_count(257152, 2304, 26, 9216, 8, 4, 256, True)),
    ("pg2_28b_448", _vit_count(1152, 27, 4304, 14, 1024, 4608)
     + _gemma_count(257152, 4608, 46, 36864, 32, 16, 128, True)),
])
def test_param_counts_without_allocating(variant, expected):
  shapes = pg.param_shapes(pg.get_config(variant))
  assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree_util.tree_leaves(shapes))
  count = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  assert count == expected
  if variant == "pg1_3b_224":
    assert 2.92e9 < count < 2.93e9


def test_small_variant_sizes():
  count = lambda v: sum(int(np.prod(s.shape)) for s in
                        jax.tree_util.tree_leaves(pg.param_shapes(pg.get_config(v))))
  assert count("bench_100m") >= 100e6
  assert pg.get_config("bench_100m").llm.vocab_size == 257152
  assert pg.get_config("demo").llm.vocab_size == 1000 + 1024 + 128
  tiny = pg.get_config("tiny").llm
  assert tiny.num_kv_heads == 1 and tiny.num_heads * tiny.head_dim != tiny.width
