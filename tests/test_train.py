"""The training loop: loss (§2.6), gradient accumulation, freezing, LoRA, guards."""
import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _trainer_testlib as lib
from big_vision_cxr import losses
from big_vision_cxr import optim
from big_vision_cxr.config import ConfigError
from big_vision_cxr import sharding
from big_vision_cxr import train
from big_vision_cxr.models import common as model_common


@pytest.fixture
def stand_in(monkeypatch):
  """train.py with the seeded stand-in batches (no tokenizer, no input pipeline)."""
  monkeypatch.setattr(train, "make_tokenizer", lambda config: None)
  monkeypatch.setattr(train, "make_seg_codec", lambda config: None)

  def use(**kw):
    monkeypatch.setattr(train, "make_train_iter", lambda config, tok, seg, *_, **__: lib.StandInBatches(
        config.input.batch_size, config.seed, **kw))
  use()
  return use


def test_per_example_loss_matches_manual_computation_with_label_smoothing():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = np.array([[1, 2, 0], [4, 4, 3]], np.int32)
  weights = np.array([[0, 1, 1], [0, 0, 0]], np.int32)
  ls = 0.2
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  dist = np.full((2, 3, 5), ls / 4)
  np.put_along_axis(dist, targets[..., None], 1 - ls, axis=-1)
  tok = -(dist * logp).sum(-1)
  expect = [(tok[0] * weights[0]).sum() / 2, 0.0]  # no suffix tokens -> 0, not NaN
  got = losses.per_example_loss(jnp.asarray(logits), targets, weights, ls)
  np.testing.assert_allclose(got, expect, rtol=1e-5)


def test_loc_soft_targets_sum_to_one_peak_at_target_and_are_one_hot_at_sigma_zero():
  targets = jnp.asarray([[10, 12, 20 + 0, 20 + 7]], jnp.int32)  # two text ids, loc bins 0 and 7
  is_loc, q = losses.loc_soft_targets(targets, 20, 8, 1.5)
  np.testing.assert_array_equal(is_loc, [[False, False, True, True]])
  np.testing.assert_allclose(q[0, 2:].sum(-1), [1.0, 1.0], rtol=1e-6)
  assert int(jnp.argmax(q[0, 2])) == 0 and int(jnp.argmax(q[0, 3])) == 7
  expect = np.exp(-0.5 * (np.arange(8) / 1.5) ** 2)
  np.testing.assert_allclose(q[0, 2], expect / expect.sum(), rtol=1e-5)
  _, q0 = losses.loc_soft_targets(targets, 20, 8, 0.0)
  np.testing.assert_array_equal(q0[0, 2:], np.eye(8)[[0, 7]])


def test_loc_smoothing_changes_only_loc_tokens_and_is_plain_ce_at_sigma_zero():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 4, 12)).astype(np.float32))
  targets = np.array([[1, 6, 9, 2], [3, 4, 11, 0]], np.int32)  # loc ids 6..11 (6 bins)
  loc = dict(loc_start=6, num_loc=6, sigma_bins=0.0)
  text_only = np.array([[1, 0, 0, 1], [1, 1, 0, 1]], np.int32)  # weights on non-loc tokens only
  for ls in (0.0, 0.1):
    np.testing.assert_allclose(
        losses.per_example_loss(logits, targets, text_only, ls, dict(loc, sigma_bins=3.0)),
        losses.per_example_loss(logits, targets, text_only, ls), rtol=1e-6)
  ones = np.ones((2, 4), np.int32)
  np.testing.assert_allclose(losses.per_example_loss(logits, targets, ones, 0.0, loc),
                             losses.per_example_loss(logits, targets, ones), rtol=1e-6)
  far = np.array([[0, 1, 9, 2], [3, 4, 11, 0]], np.int32)  # ids 0-5: 6+ bins away at sigma 0.1
  grads = jax.grad(lambda x: losses.per_example_loss(x, far, ones, 0.0, dict(loc, sigma_bins=0.1)
                                                    ).sum())(logits)
  assert np.isfinite(np.asarray(grads)).all()  # no 0/0 from targets far from the loc range
  logp = np.asarray(jax.nn.log_softmax(logits))
  only_loc = np.array([[0, 0, 1, 0], [0, 0, 0, 0]], np.int32)  # target bin 3 of 6
  q = np.exp(-0.5 * ((np.arange(6) - 3) / 2.0) ** 2)
  expect = -(q / q.sum() * logp[0, 2, 6:]).sum()
  np.testing.assert_allclose(
      losses.per_example_loss(logits, targets, only_loc, 0.0, dict(loc, sigma_bins=2.0)),
      [expect, 0.0], rtol=1e-5)


def test_gradient_accumulation_equals_full_batch():
  config = lib.tiny_config()
  model = model_common.build_model(config)
  params = train.init_params_fn(model, config, None)(jax.random.key(0))
  plan = optim.plan_params(config, params)
  mask = optim.trainable_mask(plan, params)
  loss_fn = train.make_loss_fn(model, config, mask, None)
  batch = next(lib.StandInBatches(8, 0))
  batch["mask_loss"][:4, 6:] = 0  # unequal suffix lengths: per-example means still average right
  full, per_full = jax.jit(lambda p, b: train.accumulate_grads(loss_fn, p, b, jax.random.key(1), 1))(
      params, batch)
  acc, per_acc = jax.jit(lambda p, b: train.accumulate_grads(loss_fn, p, b, jax.random.key(1), 4))(
      params, batch)
  np.testing.assert_allclose(per_acc, per_full, rtol=1e-5)
  # Four partial sums in another order: f32 rounding of ~1e-7 on gradients of ~1e-4.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc, full)
  llm_norm = optax_norm(full["llm"])
  assert llm_norm > 0
  assert optax_norm(full["img"]) == 0.0  # frozen: stop_gradient, no gradient at all


def test_loss_on_loss_positions_only_equals_the_full_logits_loss():
  """make_loss_fn's head on the loss positions (losses.head_loss) gives the loss and the
  gradients of the old path: per_example_loss on the model's logits at every text position."""
  config = lib.tiny_config()
  model = model_common.build_model(config)
  params = train.init_params_fn(model, config, None)(jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), params)
  mask = optim.trainable_mask(optim.plan_params(config, params), params)
  loss_fn = train.make_loss_fn(model, config, mask, None)
  batch = next(lib.StandInBatches(4, 0))
  batch["mask_loss"][:2, 6:] = 0

  def full_logits_loss(p, b, rng):
    text, mask_ar = b["text"], b["mask_ar"]
    logits, _ = model.apply({"params": p}, b["image"], text[:, :-1], mask_ar[:, :-1], train=True,
                            rngs={"dropout": rng})
    per_ex = losses.per_example_loss(logits, text[:, 1:], b["mask_loss"][:, 1:])
    return per_ex.mean(), per_ex
  grad = lambda fn: jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch, jax.random.key(1))
  (loss, per_ex), grads = grad(loss_fn)
  (ref_loss, ref_per_ex), ref_grads = grad(full_logits_loss)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(per_ex, ref_per_ex, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads["llm"],
               ref_grads["llm"])


def optax_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))


def test_frozen_params_do_not_change_and_trained_ones_do(stand_in, tmp_path):
  config = lib.tiny_config(total_steps=3)
  model = model_common.build_model(config)
  before = jax.jit(train.init_params_fn(model, config, None))(
      jax.random.split(jax.random.key(config.seed))[0])
  summary = train.train(config, tmp_path)
  after = jax.device_get(summary["state"]["params"])
  jax.tree.map(np.testing.assert_array_equal, after["img"], jax.device_get(before["img"]))
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after["llm"],
                                         jax.device_get(before["llm"])))
  assert all(changed)


def test_lora_trains_only_a_and_b(stand_in, tmp_path):
  config = lib.tiny_config(
      total_steps=3, lora=dict(rank=2, alpha=4.0, targets="llm/layers/(attn/.*|mlp/.*)"),
      schedule=[("lora/.*", dict(decay_type="constant")), (".*", None)])
  model = model_common.build_model(config)
  before = jax.device_get(jax.jit(train.init_params_fn(model, config, config.lora))(
      jax.random.split(jax.random.key(config.seed))[0]))
  summary = train.train(config, tmp_path)
  after = jax.device_get(summary["state"]["params"])
  for part in ("img", "llm"):
    jax.tree.map(np.testing.assert_array_equal, after[part], before[part])
  assert sorted(after["lora"]) == ["llm~layers~attn~attn_vec_einsum~w", "llm~layers~attn~kv_einsum~w",
                                   "llm~layers~attn~q_einsum~w", "llm~layers~mlp~gating_einsum",
                                   "llm~layers~mlp~linear"]
  for name, ab in after["lora"].items():
    assert np.any(ab["b"] != 0), name  # B starts at 0 and has moved
  opt_floats = sum(x.size for x in jax.tree.leaves(summary["state"]["opt"]) if x.ndim)
  lora_floats = sum(x.size for x in jax.tree.leaves(after["lora"]))
  assert opt_floats == 2 * lora_floats  # Adam moments for A, B only
  losses = lib.read_losses(tmp_path)
  assert losses[3] < losses[1]


def test_nan_loss_stops_with_step_tasks_and_last_checkpoint(stand_in, tmp_path):
  stand_in(nan_at=4)  # the 5th batch (step 5) has a NaN pixel
  config = lib.tiny_config(total_steps=8, ckpt_steps=2)
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train(config, tmp_path)
  msg = str(e.value)
  assert "Loss is nan at step 5" in msg
  tasks = lib.StandInBatches(8, 0)
  for _ in range(4):
    next(tasks)
  expected = train._task_summary(next(tasks)["task_id"])
  assert f"batch tasks: {expected})" in msg
  assert f"Last good checkpoint: {tmp_path.absolute()}/checkpoints/4." in msg


def test_nan_checkpoint_lr_1e30_is_never_saved_and_the_named_one_is_good(stand_in, tmp_path):
  """lr=1e30 gives finite params whose next loss is NaN: they must not become 'last good'."""
  from big_vision_cxr import checkpointing  # pylint: disable=g-import-not-at-top
  config = lib.tiny_config(total_steps=4, ckpt_steps=1, lr=1e30)  # step 1: warmup, lr 0
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train(config, tmp_path)
  msg = str(e.value)
  bad = int(msg.split("parameters after step ")[1].split()[0])
  good = int(msg.split(f"Last good checkpoint: {tmp_path.absolute()}/checkpoints/")[1].split(".")[0])
  assert good == bad - 1 and "not saving them" in msg
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())[-1] == good
  params, step = checkpointing.restore_params(tmp_path)
  assert step == good and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  model = model_common.build_model(config)
  batch = next(lib.StandInBatches(8, 0))
  mask = jax.tree.map(lambda _: True, params)
  loss, _ = train.make_loss_fn(model, config, mask, None)(params, batch, jax.random.key(0))
  assert np.isfinite(loss)  # resuming from it trains on


def test_resume_keeps_one_metrics_row_per_step(stand_in, tmp_path):
  """A crash after the last checkpoint: the steps logged since are dropped, then logged again."""
  import shutil  # pylint: disable=g-import-not-at-top
  config = lib.tiny_config(total_steps=6, ckpt_steps=2)
  train.train(config, tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if killed after step 6, before its save
  before = lib.read_losses(tmp_path)
  train.train(config, tmp_path)
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(l)]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert lib.read_losses(tmp_path) == pytest.approx(before, rel=1e-6)


def test_config_that_cannot_fit_fails_before_compiling(stand_in, tmp_path, monkeypatch):
  compiled = []
  monkeypatch.setattr(train, "make_update_fn", lambda *a, **k: compiled.append(1))
  config = lib.tiny_config(input=dict(batch_size=6), microbatches=4)
  with pytest.raises(sharding.ShardingError, match=r"batch_size=6 cannot be split into "
                                                   r"config.microbatches=4"):
    train.train(config, tmp_path)
  assert not compiled and not (tmp_path / "checkpoints").exists()
  assert train.main(["--config", str(lib.REPO / "tests" / "_no_such_config.py")]) == 2


def _small_real_config(arg, tmp_path):
  """configs/cxr_mix.py:ARG on a few tiny phantom images, the 'tiny' model, 2 steps."""
  from big_vision_cxr import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(f"{lib.REPO / 'configs' / 'cxr_mix.py'}:{arg}")
  # The demo model shrunk further (vocabulary = the demo tokenizer's 2152 ids).
  config.model.img = dict(image_size=32, patch_size=8, width=24, depth=1, mlp_dim=32, num_heads=2)
  config.model.llm = dict(width=32, depth=1, mlp_dim=48, num_heads=2, head_dim=16)
  config.model_init = ""  # the shipped demo pt model has the demo's shapes, not these
  config.input.datasets = {"phantom": dict(source="phantom", n=48, size=64, seed=0)}
  config.input.pp_image = "decode|resize(32)|value_range(-1, 1)"
  config.input.batch_size = 4
  config.total_steps = 2
  config.ckpt_steps = 0
  config.log_training_steps = 1
  return config


def test_demo_mixture_runs_on_the_real_pipeline(tmp_path):
  config = _small_real_config("demo", tmp_path)
  config.input.tasks = ("diagnosis", "vqa", "report", "detection")
  config.evals = {}
  summary = train.train(config, tmp_path)
  assert summary["step"] == 2 and np.isfinite(summary["train"]["loss"])
  # The mixture draws examples of several tasks in one run (per-task losses logged).
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  tasks = {k for r in rows for k in r if k.startswith("loss/")}
  assert len(tasks) >= 2, tasks


def test_single_task_runs_with_its_evaluator_and_baseline_table(tmp_path, capsys):
  config = _small_real_config("demo,task=diagnosis", tmp_path)
  config.evals.diagnosis.batch_size = 4
  config.evals.diagnosis.score_candidates = False
  summary = train.train(config, tmp_path)
  assert set(summary["eval"]) >= {"diagnosis/accuracy", "diagnosis/n"}
  assert summary["eval"]["diagnosis/n"] > 0
  out = capsys.readouterr().out
  assert "diagnosis     accuracy" in out
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  (row,) = [r for r in final["table"] if r["metric"] == "accuracy"]
  # The trivial baseline is the most common training answer: its accuracy is that
  # answer's share of the held-out examples.
  from big_vision_cxr import input_pipeline  # pylint: disable=g-import-not-at-top
  units = lambda split: input_pipeline.curated_units(config.input, split=split,
                                                     tasks=("diagnosis",))["diagnosis"]
  majority = collections.Counter(e.suffix for e in units("train")).most_common(1)[0][0]
  held_out = units("test")
  assert held_out and row["trivial"] == pytest.approx(
      np.mean([e.suffix == majority for e in held_out]))
  assert row["model"] == summary["eval"]["diagnosis/accuracy"]


def test_model_init_loads_the_npz_and_frozen_params_keep_its_values(stand_in, tmp_path):
  from big_vision_cxr import npz  # pylint: disable=g-import-not-at-top
  config = lib.tiny_config(total_steps=2)
  model = model_common.build_model(config)
  weights = jax.device_get(train.init_params_fn(model, config, None)(jax.random.key(7)))
  weights = jax.tree.map(lambda x: x + 0.5, weights)  # distinct from any fresh init
  npz.save_npz({"params": weights}, str(tmp_path / "init.npz"))
  config.model_init = str(tmp_path / "init.npz")
  summary = train.train(config, tmp_path / "run")
  after = jax.device_get(summary["state"]["params"])
  jax.tree.map(np.testing.assert_array_equal, after["img"], weights["img"])
  np.testing.assert_allclose(after["llm"]["final_norm"]["scale"],
                             weights["llm"]["final_norm"]["scale"], atol=0.05)  # 2 small steps


def _remat_config(llm, img):
  """The tiny model with both towers trained (so remat in either changes the backward pass)."""
  return lib.tiny_config(total_steps=3, model=dict(variant="tiny", llm=dict(remat=llm),
                                                   img=dict(remat=img)),
                         schedule=[(".*", dict(decay_type="cosine", warmup_steps=1))])


def _remat_policies(config):
  """The policies of the remat (jax.checkpoint) calls in the training gradient's jaxpr."""
  model = model_common.build_model(config)
  params = jax.eval_shape(train.init_params_fn(model, config, None), jax.random.key(0))
  loss_fn = train.make_loss_fn(model, config, jax.tree.map(lambda _: True, params), None)
  batch = next(lib.StandInBatches(8, 0))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0))[0]))(params))
  return {part.split("policy=")[1].split("\n")[0] for part in jaxpr.split("remat2[")[1:]}


def test_remat_reaches_both_towers_and_changes_neither_losses_nor_updates(stand_in, tmp_path):
  remat = _remat_config(llm=True, img="dots_saveable")
  plain = _remat_config(llm=False, img=False)
  assert _remat_policies(remat) == {"None", str(jax.checkpoint_policies.dots_saveable)}
  assert _remat_policies(plain) == set()
  before = jax.device_get(jax.jit(train.init_params_fn(model_common.build_model(plain), plain, None))(
      jax.random.split(jax.random.key(plain.seed))[0]))
  runs = {name: train.train(cfg, tmp_path / name) for name, cfg in (("remat", remat),
                                                                     ("plain", plain))}
  losses = {name: lib.read_losses(tmp_path / name) for name in runs}
  assert sorted(losses["remat"]) == [1, 2, 3]
  np.testing.assert_allclose([losses["remat"][s] for s in (1, 2, 3)],
                             [losses["plain"][s] for s in (1, 2, 3)], rtol=1e-5, atol=1e-5)
  after = {name: jax.device_get(s["state"]["params"]) for name, s in runs.items()}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               after["remat"], after["plain"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after["remat"], before))
  assert all(moved)  # every weight, of both towers, was updated


@pytest.mark.parametrize("policy", ["dots_saveabel", "save_only_these_names", 1])
def test_unknown_remat_policy_fails_before_compiling(stand_in, tmp_path, monkeypatch, policy):
  compiled = []
  monkeypatch.setattr(train, "make_update_fn", lambda *a, **k: compiled.append(1))
  with pytest.raises(ConfigError, match=rf"config.model.llm.remat={policy!r}: use True .*\['nothing_"
                                        r"saveable', 'everything_saveable', 'dots_saveable'"):
    train.train(_remat_config(llm=policy, img=False), tmp_path)
  assert not compiled and not (tmp_path / "checkpoints").exists()
