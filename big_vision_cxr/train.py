"""Multi-task PaliGemma fine-tuning: python -m big_vision_cxr.train --config configs/cxr_mix.py.

Flow (big_vision trainers/proj/paligemma/train.py): validate the config, build the mesh,
input, model shapes, optimizer and shardings; resume from the last complete checkpoint in
the workdir (or load `model_init`); then the jitted update loop with logging (JSONL +
TensorBoard + tqdm), evaluators, checkpoints, and a guard that stops on a NaN/Inf loss.
"""
import collections
import functools
import json
import logging
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from big_vision_cxr import checkpointing
from big_vision_cxr import config as config_lib
from big_vision_cxr import npz
from big_vision_cxr import optim
from big_vision_cxr import sharding
from big_vision_cxr.registry import MODELS

TASKS = config_lib.TASKS


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/Inf; the message names the step, tasks and last good checkpoint."""


# ---------------------------------------------------------------- model -----

# The jax.checkpoint_policies that are policies themselves (the others build one from names).
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


def check_remat(part, value):
  """config.model.{img,llm}.remat: a bool or a REMAT_POLICIES name, else a ConfigError."""
  if value is None or isinstance(value, bool) or value in ("none", "") or (
      isinstance(value, str) and value in REMAT_POLICIES and hasattr(jax.checkpoint_policies, value)):
    return
  raise config_lib.ConfigError(
      f"config.model.{part}.remat={value!r}: use True (recompute each layer's activations in "
      f"the backward pass), False, or a jax.checkpoint_policies name: {list(REMAT_POLICIES)}.")


def model_config(config):
  """Resolves config.model (variant + img/llm overrides + compute dtype) to Model kwargs."""
  module = sys.modules[MODELS.get(config.model_name).__module__]
  cfg = module.get_config(config.model.variant)
  for part in ("img", "llm"):
    overrides = config.model.get(part) or {}
    for key, value in dict(overrides).items():
      cfg[part][key] = value
    check_remat(part, cfg[part].get("remat", False))
  dtype = config.get("compute_dtype")
  if dtype:
    for part in ("img", "llm"):
      cfg[part]["dtype"] = jnp.dtype(dtype)
  return cfg


def build_model(config):
  return MODELS.get(config.model_name)(**model_config(config))


def example_batch(config, batch_size):
  """Zero batch of the right shapes (for init / eval_shape)."""
  res = model_config(config).img.image_size
  length = config.input.text_len + 1
  return {"image": np.zeros((batch_size, res, res, 3), np.float32),
          "text": np.zeros((batch_size, length), np.int32),
          "mask_ar": np.zeros((batch_size, length), np.int32),
          "mask_loss": np.zeros((batch_size, length), np.int32),
          "task_id": np.zeros((batch_size,), np.int32)}


def init_params_fn(model, config, lora_cfg):
  def init(rng):
    b = example_batch(config, 1)
    rng_model, rng_lora = jax.random.split(rng)
    params = model.init(rng_model, b["image"], b["text"][:, :-1], b["mask_ar"][:, :-1])["params"]
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    params = dict(params)
    if lora_cfg:
      params["lora"] = optim.lora_init(lora_cfg, params, rng_lora)
    return params
  return init


# ---------------------------------------------------------------- loss ------

def loc_soft_targets(targets, loc_start, num_loc, sigma_bins):
  """Gaussian soft targets over the loc bins for `<locDDDD>` targets.

  Returns (is_loc [B, T] bool, q [B, T, num_loc]): q sums to 1 over the bins,
  ∝ exp(-(i - t)^2 / (2 sigma^2)) around the target bin t (one-hot at sigma 0), so a
  near-miss bin is penalised less than a far one; q is meaningless where not is_loc.
  """
  bin_ = targets - loc_start  # [B, T]
  is_loc = (bin_ >= 0) & (bin_ < num_loc)
  bin_ = jnp.where(is_loc, bin_, 0)  # far-off bins would underflow to 0/0 = NaN (and NaN grads)
  dist = jnp.arange(num_loc)[None, None, :] - bin_[..., None]  # [B, T, num_loc]
  if sigma_bins == 0:
    return is_loc, (dist == 0).astype(jnp.float32)
  q = jnp.exp(-0.5 * jnp.square(dist / sigma_bins).astype(jnp.float32))
  return is_loc, q / q.sum(-1, keepdims=True)


def per_example_loss(logits, targets, weights, label_smoothing=0.0, loc_smoothing=None):
  """Facts §2.6: -sum(w * log p(target)) / max(1, sum w) per example; [B].

  `loc_smoothing=dict(loc_start, num_loc, sigma_bins)`: `<loc>` targets use the
  Gaussian soft target of `loc_soft_targets` (cross-entropy over the loc bins)
  instead of one-hot and `label_smoothing`; other tokens are unchanged.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
  if label_smoothing:
    v = logits.shape[-1]
    off = label_smoothing / (v - 1)
    tok = -((1.0 - label_smoothing - off) * target_logp + off * logp.sum(-1))
  else:
    tok = -target_logp
  if loc_smoothing:
    start, n = loc_smoothing["loc_start"], loc_smoothing["num_loc"]
    is_loc, q = loc_soft_targets(targets, start, n, loc_smoothing["sigma_bins"])
    loc_tok = -jnp.einsum("btl,btl->bt", q, logp[..., start:start + n])
    tok = jnp.where(is_loc, loc_tok, tok)
  weights = weights.astype(jnp.float32)
  return (tok * weights).sum(-1) / jnp.maximum(1.0, weights.sum(-1))


def make_loss_fn(model, config, mask, lora_cfg, loc_start=None):
  """loss_fn(params, batch, rng) -> (mean loss, per-example losses [B]).

  `config.loc_label_smoothing = dict(sigma_bins=S)` with S > 0 needs `loc_start`, the
  id of `<loc0000>` (the tokenizer's `loc_id(0)`); S = 0 is the plain one-hot loss.
  """
  loc_smoothing = None
  if (config.get("loc_label_smoothing") or {}).get("sigma_bins", 0.0) > 0:
    if loc_start is None:
      raise config_lib.ConfigError("config.loc_label_smoothing needs the tokenizer's <loc0000> id "
                                   "(set config.tokenizer).")
    from big_vision_cxr import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    loc_smoothing = dict(loc_start=loc_start, num_loc=tokenizer_lib.NUM_LOC,
                         sigma_bins=float(config.loc_label_smoothing["sigma_bins"]))

  def loss_fn(params, batch, rng):
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)
    if lora_cfg:
      params = dict(params)
      lora = params.pop("lora")
      params = optim.lora_merge(lora_cfg, params, lora)
    text, mask_ar = batch["text"], batch["mask_ar"]
    logits, _ = model.apply({"params": params}, batch["image"], text[:, :-1], mask_ar[:, :-1],
                            train=True, rngs={"dropout": rng})
    per_ex = per_example_loss(logits, text[:, 1:], batch["mask_loss"][:, 1:],
                              config.get("label_smoothing", 0.0), loc_smoothing)
    return per_ex.mean(), per_ex
  return loss_fn


def accumulate_grads(loss_fn, params, batch, rng, microbatches):
  """Mean-loss gradient over the batch, computed in `microbatches` equal pieces.

  The batch is viewed as [B/m, m, ...] so each microbatch takes examples from every
  device's local shard (no cross-device shuffling). Returns (grads, per-example loss).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (_, per_ex), grads = grad_fn(params, batch, rng)
    return grads, per_ex
  split = jax.tree.map(lambda x: x.reshape(x.shape[0] // microbatches, microbatches,
                                           *x.shape[1:]).swapaxes(0, 1), batch)

  def body(acc, xs):
    mb, i = xs
    (_, per_ex), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(lambda a, g: a + g / microbatches, acc, grads), per_ex

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, per_ex = jax.lax.scan(body, zeros, (split, jnp.arange(microbatches)))
  return grads, per_ex.swapaxes(0, 1).reshape(-1)  # back to the batch order


def make_update_fn(loss_fn, tx, mask, config, sched_fns):
  microbatches = config.get("microbatches", 1)

  def update(state, batch, rng):
    step_rng = jax.random.fold_in(rng, state["step"])
    grads, per_ex = accumulate_grads(loss_fn, state["params"], batch, step_rng, microbatches)
    trained = jax.tree.leaves(jax.tree.map(lambda g, t: g if t else None, grads, mask))
    grad_norm = optax.global_norm(trained)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    onehot = jax.nn.one_hot(batch["task_id"], len(TASKS), dtype=jnp.float32)  # [B, K]
    metrics = {"loss": per_ex.mean(), "grad_norm": grad_norm,
               "lr": optim.current_lr(config, sched_fns, state["step"]),
               "task_loss_sum": per_ex @ onehot, "task_count": onehot.sum(0)}
    return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics

  return update


# ---------------------------------------------------------------- logging ---

class MetricWriter:
  """metrics.jsonl (one JSON object per line) + TensorBoard event files in the workdir."""

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled and jax.process_index() == 0
    self._file = self._tb = None
    if self.enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(str(workdir / "tb"))
      except ImportError:
        logging.warning("tensorboardX is not installed; writing metrics.jsonl only.")

  def write(self, step, metrics):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self):
    if self._file:
      self._file.close()
    if self._tb:
      self._tb.close()


def _jsonable(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def _task_summary(task_ids):
  counts = collections.Counter(TASKS[int(t)] if 0 <= int(t) < len(TASKS) else str(int(t))
                               for t in np.asarray(task_ids))
  return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


# ---------------------------------------------------------------- pieces ----

def make_tokenizer(config):
  from big_vision_cxr import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.Tokenizer(config.tokenizer)


def make_train_iter(config, tokenizer, seg_codec):
  from big_vision_cxr import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.training(
      config.input, batch_size=config.input.batch_size // jax.process_count(), seed=config.seed,
      tokenizer=tokenizer, process_index=jax.process_index(),
      process_count=jax.process_count(), seg_codec=seg_codec)


def make_seg_codec(config):
  """The VQ-VAE codec when the tasks include segmentation (config.input.seg_codec; None = demo)."""
  if "segmentation" not in tuple(config.input.get("tasks", TASKS)):
    return None
  from big_vision_cxr import seg_codec as seg_codec_lib  # pylint: disable=g-import-not-at-top
  return seg_codec_lib.from_config(config.input.get("seg_codec"))


def make_evaluators(config, model, tokenizer, seg_codec):
  """{name: (evaluator, every_n_steps)} from config.evals (docs/EVALUATION.md).

  every_n_steps = 0 or None: only at the end of training.
  """
  if not config.get("evals"):
    return {}
  from big_vision_cxr import decode  # pylint: disable=g-import-not-at-top
  from big_vision_cxr import input_pipeline  # pylint: disable=g-import-not-at-top
  from big_vision_cxr.registry import EVALUATORS  # pylint: disable=g-import-not-at-top
  out = {}
  for name, ev in config.evals.items():
    ev = ev.to_dict()
    predictor = decode.Predictor(model, tokenizer, **ev.pop("pred_kw", {}))
    data = input_pipeline.evaluation(config.input, task=ev.pop("task"), split=ev.pop("split"),
                                     batch_size=ev.pop("batch_size", 8), tokenizer=tokenizer,
                                     seg_codec=seg_codec)
    every = ev.pop("log_steps", None)
    kind = ev.pop("type")
    if kind == "segmentation" and seg_codec is not None:
      ev.setdefault("seg_codec", seg_codec)
    out[name] = (EVALUATORS.get(kind)(predictor, data, **ev), every)
  return out


def trivial_records(records, task, majority):
  """The records with each prediction replaced by a trivial one (see trivial_baselines)."""
  out = []
  for r in records:
    r = dict(r)
    if task in ("detection", "segmentation"):
      r.update(prediction="", objects=[], n_invalid=0)
    else:
      r["prediction"] = majority.get((task, r.get("prefix")), majority.get((task, None), ""))
      if "p_tb" in r:
        r["p_tb"] = 0.5
    out.append(r)
  return out


def majority_answers(units):
  """{(task, prefix): most common training suffix} and {(task, None): per task} from examples."""
  by_prefix, by_task = collections.defaultdict(collections.Counter), collections.defaultdict(
      collections.Counter)
  for examples in units.values():
    for ex in examples:
      by_prefix[(ex.task, ex.prefix)][ex.suffix] += 1
      by_task[(ex.task, None)][ex.suffix] += 1
  return {k: c.most_common(1)[0][0] for k, c in {**by_prefix, **by_task}.items()}


def model_params(params, lora_cfg):
  """The params the model sees (LoRA merged), for evaluators."""
  if not lora_cfg:
    return params
  params = dict(params)
  lora = params.pop("lora")
  return optim.lora_merge(lora_cfg, params, lora)


# ---------------------------------------------------------------- main ------

def train(config, workdir):
  """Runs training; returns a summary dict (final step, last metrics, eval results)."""
  workdir = pathlib.Path(workdir or config.get("workdir") or "workdir")
  config_lib.validate(config)
  sharding.maybe_initialize_distributed(config)
  mesh = sharding.create_mesh(config.get("mesh", [("data", -1)]))
  microbatches = config.get("microbatches", 1)
  sharding.check_batch_fits(config.input.batch_size, mesh, microbatches)
  total_steps = config_lib.total_steps(config, config.input.get("data_size"))
  lora_cfg = config.get("lora") or None

  model = build_model(config)
  init = init_params_fn(model, config, lora_cfg)
  params_shape = jax.eval_shape(init, jax.random.key(0))
  tx, plan, sched_fns = optim.make(config, params_shape, total_steps=total_steps,
                                   batch_size=config.input.batch_size,
                                   data_size=config.input.get("data_size"))
  mask = optim.trainable_mask(plan, params_shape)

  def init_state(rng):
    params = init(rng)
    return {"step": jnp.zeros([], jnp.int32), "params": params, "opt": tx.init(params)}

  state_shape = jax.eval_shape(init_state, jax.random.key(0))
  strategy = config.get("sharding_strategy", [(".*", "fsdp(axis='data')")])
  state_sharding = sharding.infer_sharding(state_shape, strategy, mesh)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  ckpt = checkpointing.Checkpointer(
      workdir, keep_last=config.get("keep_ckpts", 2), best_metric=config.get("best_metric"),
      best_mode=config.get("best_mode", "max"))
  tokenizer = make_tokenizer(config)
  vocab = model_config(config).llm.get("vocab_size")
  if tokenizer is not None and vocab and tokenizer.vocab_size > vocab:
    raise config_lib.ConfigError(
        f"config.tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
        f"(config.model.variant={config.model.variant!r}) has only {vocab} rows.")
  seg_codec = make_seg_codec(config)
  train_iter = make_train_iter(config, tokenizer, seg_codec)

  rng = jax.random.key(config.get("seed", 0))
  rng_init, rng_train = jax.random.split(rng)
  resume_step = ckpt.latest_step() if config.get("resume", True) else None
  if resume_step is not None:
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            state_shape, state_sharding)
    state, meta = ckpt.restore(resume_step, abstract)
    if meta.get("input_state") is not None:
      train_iter.set_state(meta["input_state"])
    logging.info("Resumed from %s/%d.", ckpt.directory, resume_step)
  else:
    state = jax.jit(init_state, out_shardings=state_sharding)(rng_init)
    if config.get("model_init"):
      state = _load_init(config, state, state_sharding, lora_cfg)

  loss_fn = make_loss_fn(model, config, mask, lora_cfg,
                         loc_start=None if tokenizer is None else tokenizer.loc_id(0))
  update = jax.jit(make_update_fn(loss_fn, tx, mask, config, sched_fns),
                   in_shardings=(state_sharding, sharding.batch_sharding(mesh), repl),
                   out_shardings=(state_sharding, repl), donate_argnums=(0,))
  evaluators = make_evaluators(config, model, tokenizer, seg_codec)
  writer = MetricWriter(workdir)
  summary = _loop(config, state, update, train_iter, mesh, ckpt, evaluators, writer,
                  rng_train, total_steps, lora_cfg)
  ckpt.close()
  writer.close()
  if config.get("baseline_table") and summary["records"]:
    rows, text = baseline_table(config, evaluators, summary["records"], summary["eval"],
                                train_iter)
    summary["table"] = rows
    print(text, flush=True)
    if jax.process_index() == 0:
      (workdir / "final_metrics.json").write_text(json.dumps(
          {"step": summary["step"], "eval": summary["eval"],
           "table": [dict(task=t, metric=m, model=v, trivial=b) for t, m, v, b in rows]},
          indent=1))
  return summary


def _load_init(config, state, state_sharding, lora_cfg):
  module = sys.modules[MODELS.get(config.model_name).__module__]
  params = jax.device_get(state["params"])
  lora = params.pop("lora", None)
  loaded = module.load(params, config.model_init, model_config(config),
                       dont_load=config.get("model_load", {}).get("dont_load", ()))
  loaded = dict(jax.tree.map(lambda x: np.asarray(x, np.float32), loaded))
  if lora is not None:
    loaded["lora"] = lora
  state = dict(state, params=jax.device_put(loaded, state_sharding["params"]))
  return state


def _run_evals(evaluators, state, step, total_steps, lora_cfg):
  """Runs the evaluators due at `step` -> ({'name/metric': value}, {name: records})."""
  results, records, params = {}, {}, None
  for name, (evaluator, every) in evaluators.items():
    if (every and step % every == 0) or step == total_steps:
      if params is None:
        params = model_params(state["params"], lora_cfg)
      t0 = time.perf_counter()
      records[name] = evaluator.predict(params)
      if evaluator.outfile:
        from big_vision_cxr.evaluators import common  # pylint: disable=g-import-not-at-top
        common.write_jsonl(evaluator.outfile, records[name])
      for key, value in evaluator.compute_metrics(records[name], **evaluator.metric_kw).items():
        results[f"{name}/{key}"] = float(value)
      results[f"{name}/eval_s"] = time.perf_counter() - t0
  return results, records


def baseline_table(config, evaluators, records, results, train_iter):
  """Per-task metrics next to trivial baselines (majority answer per question, empty boxes).

  Returns (rows, text): rows = [(task, metric, model, baseline)].
  """
  majority = majority_answers(getattr(train_iter, "units", {}))
  rows = []
  for name, (evaluator, _) in evaluators.items():
    if name not in records:
      continue
    task = config.evals[name].task
    trivial = evaluator.compute_metrics(trivial_records(records[name], task, majority),
                                        **evaluator.metric_kw)
    for metric in (config.get("table_metrics") or {}).get(name, ()):
      model_value = results.get(f"{name}/{metric}", float("nan"))
      rows.append((task, metric, model_value, float(trivial.get(metric, float("nan")))))
  lines = [f"{'task':<13} {'metric':<18} {'model':>8} {'trivial':>8}",
           "-" * 50]
  lines += [f"{t:<13} {m:<18} {v:>8.3f} {b:>8.3f}" for t, m, v, b in rows]
  return rows, "\n".join(lines)


def _loop(config, state, update, train_iter, mesh, ckpt, evaluators, writer, rng, total_steps,
          lora_cfg):
  step = int(jax.device_get(state["step"]))
  log_every = config.get("log_training_steps", 10)
  ckpt_every = config.get("ckpt_steps", 0)
  progress = _progress(step, total_steps)
  pending = None  # (step, metrics, task_ids) of the last dispatched update, checked lazily
  window = collections.defaultdict(float)
  t_start, start_step, eval_results, eval_records = time.perf_counter(), step, {}, {}

  def check(p):
    s, metrics, task_ids = p
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      ckpt.wait()
      last = ckpt.latest_step()
      where = f"{ckpt.directory}/{last}" if last is not None else "none (no checkpoint yet)"
      raise NonFiniteLossError(
          f"Loss is {loss} at step {s} (batch tasks: {_task_summary(task_ids)}); stopping. "
          f"Last good checkpoint: {where}. Lower config.lr, check the data, or resume from it.")
    return loss

  while step < total_steps:
    batch = next(train_iter)
    task_ids = np.asarray(batch["task_id"])
    global_batch = sharding.make_global_batch(batch, mesh)
    state, metrics = update(state, global_batch, rng)
    if pending is not None:
      check(pending)
    step += 1
    pending = (step, metrics, task_ids)
    progress.update(1)
    if step % log_every == 0 or step == total_steps or step == start_step + 1:
      loss = check(pending)
      m = jax.device_get(metrics)
      elapsed = time.perf_counter() - t_start
      done = step - start_step
      row = {"loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
             "examples_per_s": done * config.input.batch_size / elapsed,
             "eta_s": elapsed / done * (total_steps - step)}
      for k, name in enumerate(TASKS):
        if m["task_count"][k] > 0:
          row[f"loss/{name}"] = float(m["task_loss_sum"][k] / m["task_count"][k])
      writer.write(step, row)
      progress.set_postfix(loss=f"{loss:.4f}")
      window = row
    is_last = step == total_steps
    new_evals, records = _run_evals(evaluators, state, step, total_steps, lora_cfg)
    if new_evals:
      check(pending)
      eval_results, eval_records = new_evals, records
      writer.write(step, new_evals)
    if (ckpt_every and step % ckpt_every == 0) or is_last:
      check(pending)
      ckpt.save(step, state, input_state=train_iter.get_state(), metrics=new_evals)
  if pending is not None:
    check(pending)
  progress.close()
  ckpt.wait()
  wall = time.perf_counter() - t_start
  writer.write(step, {"wall_s": wall})
  return {"step": step, "train": dict(window), "eval": eval_results, "records": eval_records,
          "state": state, "wall_s": wall}


def _progress(start, total):
  try:
    import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    tqdm = None
  if tqdm is not None and sys.stderr.isatty():
    return tqdm.tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

  class _Silent:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass
  return _Silent()


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger().setLevel(logging.INFO)
  try:
    config, workdir = config_lib.parse_flags(sys.argv[1:] if argv is None else argv)
    summary = train(config, workdir)
  except (config_lib.ConfigError, sharding.ShardingError, optim.OptimConfigError,
          checkpointing.CheckpointError, npz.CheckpointError, NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"step": summary["step"], **summary["train"], **summary["eval"]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
