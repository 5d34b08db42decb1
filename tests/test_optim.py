"""Schedule list, freezing, lr/wd multipliers, AdamW equivalence and LoRA."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_vision_cxr import optim


def _config(**kw):
  base = dict(lr=1e-2, wd=0.0, grad_clip_norm=0.0, optax_name="scale_by_adam",
              schedule=[(".*", dict(decay_type="constant"))])
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _params():
  rng = np.random.default_rng(0)
  return {"img": {"head": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}},
          "llm": {"layers": {"w": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)},
                  "final_norm": {"scale": jnp.ones((4,), jnp.float32)}}}


def test_cosine_schedule_with_warmup_values():
  fn = optim.create_learning_rate_schedule(100, decay_type="cosine", warmup_steps=10)
  got = [float(fn(s)) for s in (0, 5, 10, 55, 100)]
  np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  fn = optim.create_learning_rate_schedule(200, decay_type="linear", warmup_percent=0.05,
                                           linear_end=0.1)
  np.testing.assert_allclose([float(fn(10)), float(fn(105)), float(fn(200))], [1.0, 0.55, 0.1],
                             atol=1e-6)
  with pytest.raises(optim.OptimConfigError, match="unknown decay_type 'cosin'"):
    optim.create_learning_rate_schedule(10, decay_type="cosin")
  with pytest.raises(optim.OptimConfigError, match=r"unknown setting\(s\) \['warmup_stepz'\]"):
    optim.create_learning_rate_schedule(10, warmup_stepz=3)


def test_every_param_must_match_the_schedule():
  config = _config(schedule=[("img/.*", None), ("llm/layers/.*", dict(decay_type="cosine"))])
  with pytest.raises(optim.OptimConfigError, match="unmatched: llm/final_norm/scale"):
    optim.make(config, _params(), total_steps=10)


def test_adamw_equivalence_and_frozen_params_have_no_state():
  # Decoupled wd in big_vision units: wd_bv = lr * torch_wd gives exactly AdamW.
  lr, torch_wd = 1e-2, 0.1
  config = _config(lr=lr, wd=lr * torch_wd, wd_mults=[(".*", 1.0)],
                   schedule=[("img/.*", None), ("llm/.*", dict(decay_type="constant"))])
  params = _params()
  tx, plan, _ = optim.make(config, params, total_steps=10)
  assert plan.trainable("llm/layers/w") and not plan.trainable("img/head/kernel")
  ref = optax.adamw(lr, weight_decay=torch_wd)
  llm = params["llm"]
  state, ref_state = tx.init(params), ref.init(llm)
  # Optimizer state: Adam moments only for trained params (llm: 20 + 60 + 4 values, x2).
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  assert n_state == 2 * (60 + 4)
  p, q = params, llm
  for i in range(5):
    grads = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p)
    upd, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, upd)
    ref_upd, ref_state = ref.update(grads["llm"], ref_state, q)
    q = optax.apply_updates(q, ref_upd)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p["llm"], q)
  np.testing.assert_array_equal(p["img"]["head"]["kernel"], params["img"]["head"]["kernel"])


def test_lr_mults_wd_mults_and_grad_clip():
  config = _config(lr=0.1, wd=0.01, optax_name="identity", grad_clip_norm=1.0,
                   lr_mults=[("llm/layers/.*", 0.5)], wd_mults=[(".*/kernel$", 2.0)])
  params = _params()
  tx, _, _ = optim.make(config, params, total_steps=10)
  grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), params)
  upd, _ = tx.update(grads, tx.init(params), params)
  norm = np.sqrt(9.0 * sum(x.size for x in jax.tree.leaves(params)))
  g = 3.0 / norm  # clipped to global norm 1
  np.testing.assert_allclose(upd["llm"]["layers"]["w"], -0.1 * 0.5 * g, rtol=1e-5)
  np.testing.assert_allclose(upd["llm"]["final_norm"]["scale"], -0.1 * g, rtol=1e-5)
  k = params["img"]["head"]["kernel"]
  np.testing.assert_allclose(upd["img"]["head"]["kernel"], -(0.1 * g + 0.01 * 2.0 * k),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [0.01, 100.0])  # Under the max norm, then over it.
def test_clip_equals_optax_and_keeps_no_clipped_copy_of_the_gradient(scale):
  params = {"table": jnp.ones((4096, 64)), "w": jnp.ones((64, 64))}
  grads = jax.tree.map(lambda x: scale * jnp.sin(jnp.arange(x.size, dtype=jnp.float32))
                       .reshape(x.shape), params)
  ours, ref = (tx.update(grads, tx.init(params))[0] for tx in
               (optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-7, atol=0)
  assert float(optax.tree.norm(ours)) == pytest.approx(min(1.0, float(optax.tree.norm(grads))),
                                                       rel=1e-6)
  # The trainer's chain, donated as the trainer runs it: XLA keeps no gradient-sized buffer.
  config = _config(grad_clip_norm=1.0, wd=1e-4)
  tx, _, _ = optim.make(config, params, total_steps=10)
  def step(p, o, g):
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o
  step = jax.jit(step, donate_argnums=(0, 1))
  temp = step.lower(params, tx.init(params), grads).compile().memory_analysis().temp_size_in_bytes
  assert temp < params["table"].nbytes / 8, temp  # optax's clip: a whole clipped copy (1.06 MB)


def test_lora_merge_trains_only_low_rank_and_saves_optimizer_memory():
  w = jax.random.normal(jax.random.key(0), (4, 64, 96))  # 4 stacked layers of [64, 96]
  params = {"llm": {"layers": {"w": w}, "norm": jnp.ones((64,))}}
  lora_cfg = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, targets="llm/layers/.*"))
  lora = optim.lora_init(lora_cfg, params, jax.random.key(1))
  assert lora["llm~layers~w"]["a"].shape == (4, 64, 4)
  assert lora["llm~layers~w"]["b"].shape == (4, 4, 96)
  merged = optim.lora_merge(lora_cfg, params, lora)
  np.testing.assert_array_equal(merged["llm"]["layers"]["w"], w)  # B = 0 at init
  lora["llm~layers~w"]["b"] = jnp.ones((4, 4, 96))
  merged = optim.lora_merge(lora_cfg, params, lora)
  expect = w + 2.0 * jnp.einsum("lmr,lrn->lmn", lora["llm~layers~w"]["a"], jnp.ones((4, 4, 96)))
  np.testing.assert_allclose(merged["llm"]["layers"]["w"], expect, rtol=1e-5, atol=1e-5)

  full = dict(params)
  with_lora = dict(params, lora=lora)
  full_tx, _, _ = optim.make(_config(schedule=[(".*", dict(decay_type="constant"))]), full,
                             total_steps=10)
  lora_tx, _, _ = optim.make(_config(schedule=[("lora/.*", dict(decay_type="constant")),
                                               (".*", None)]), with_lora, total_steps=10)
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  full_bytes, lora_bytes = size(full_tx.init(full)), size(lora_tx.init(with_lora))
  # Adam moments for A,B only: 2 * 4 * (64*4 + 4*96) floats vs 2 * (4*64*96 + 64).
  assert lora_bytes < full_bytes / 4, (lora_bytes, full_bytes)
  assert lora_bytes == 4 * 2 * 4 * (64 * 4 + 4 * 96) + 2 * 4  # + Adam and schedule counts
  with pytest.raises(optim.OptimConfigError, match="matches no 2D"):
    optim.lora_init(ml_collections.ConfigDict(dict(rank=2, alpha=2, targets="nothing")),
                    params, jax.random.key(0))
