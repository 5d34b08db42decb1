"""Multi-task PaliGemma fine-tuning: python -m big_vision_cxr.train --config configs/cxr_mix.py.

`train(config, workdir)` reads top to bottom in sections: config and mesh;
model, tokenizer and input; the run's settings written to the workdir; params,
optimizer and shardings; resume or initialise; the jitted update step;
evaluators; the loop (logging, evals, checkpoints, a guard that stops on a
NaN/Inf loss); the final table next to trivial baselines. The update step is a
pure function built by `make_update_fn`.
"""
import collections
import json
import logging
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_vision_cxr import atomic
from big_vision_cxr import checkpointing
from big_vision_cxr import config as config_lib
from big_vision_cxr import errors
from big_vision_cxr import host_allocator
from big_vision_cxr import losses
from big_vision_cxr import metric_writer
from big_vision_cxr import optim
from big_vision_cxr import run_settings
from big_vision_cxr import sharding
from big_vision_cxr.data.prompts import TASKS
from big_vision_cxr.models import common as model_common


class NonFiniteLossError(errors.Error):
  """The loss became NaN/Inf; the message names the step, tasks and last good checkpoint."""


# ---------------------------------------------------------------- pieces ----

def example_batch(model, text_len, batch_size):
  """Zero batch of the right shapes (for init / eval_shape)."""
  res, length = model.img["image_size"], text_len + 1
  return {"image": np.zeros((batch_size, res, res, 3), np.float32),
          "text": np.zeros((batch_size, length), np.int32),
          "mask_ar": np.zeros((batch_size, length), np.int32),
          "mask_loss": np.zeros((batch_size, length), np.int32),
          "task_id": np.zeros((batch_size,), np.int32)}


def param_dtype(config):
  """The dtype params (and so Adam's moments) are stored and updated in: float32 unless
  `config.param_dtype='bfloat16'` (half the state's memory, at bf16's rounding of every
  update; `config.optax.mu_dtype` sets the first moment's dtype apart)."""
  return jnp.dtype(config.get("param_dtype") or "float32")


def init_params_fn(model, config, lora_cfg):
  """rng -> params in `param_dtype(config)` (plus params['lora'] when LoRA is on)."""
  dtype = param_dtype(config)

  def init(rng):
    b = example_batch(model, config.input.text_len, 1)
    rng_model, rng_lora = jax.random.split(rng)
    params = model.init(rng_model, b["image"], b["text"][:, :-1], b["mask_ar"][:, :-1])["params"]
    params = dict(jax.tree.map(lambda x: x.astype(dtype), params))
    if lora_cfg:
      params["lora"] = optim.lora_init(lora_cfg, params, rng_lora)
    return params
  return init


class StatePlan(collections.namedtuple(
    "StatePlan", "init tx mask sched_fns shape sharding")):
  """The train state from shapes alone: `init(rng)` -> params, the optimizer `tx` and its
  trainable `mask` and schedules, the state's ShapeDtypeStructs and its shardings."""

  def abstract(self):
    """The state as ShapeDtypeStructs carrying the shardings (a restore or lower target)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.shape, self.sharding)

  def init_state(self, rng):
    params = self.init(rng)
    return {"step": jnp.zeros([], jnp.int32), "params": params, "opt": self.tx.init(params)}


def state_plan(config, model, mesh, total_steps, lora_cfg=None):
  """Params, optimizer and their shardings on `mesh`, as `train` builds them; nothing
  is allocated (`jax.eval_shape`)."""
  init = init_params_fn(model, config, lora_cfg)
  params_shape = jax.eval_shape(init, jax.random.key(0))
  tx, plan, sched_fns = optim.make(config, params_shape, total_steps=total_steps,
                                   batch_size=config.input.batch_size,
                                   data_size=config.input.get("data_size"))
  mask = optim.trainable_mask(plan, params_shape)
  partial = StatePlan(init, tx, mask, sched_fns, None, None)
  shape = jax.eval_shape(partial.init_state, jax.random.key(0))
  state_sharding = sharding.infer_sharding(
      shape, config.get("sharding_strategy", [(".*", "fsdp(axis='data')")]), mesh)
  return partial._replace(shape=shape, sharding=state_sharding)


def jit_update(config, model, mesh, plan, lora_cfg=None, loc_start=None):
  """The jitted train step (state donated) and its loss_fn, with the plan's shardings."""
  loss_fn = make_loss_fn(model, config, plan.mask, lora_cfg, loc_start=loc_start,
                         batch_shards=mesh.size)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  update = jax.jit(make_update_fn(loss_fn, plan.tx, plan.mask, config, plan.sched_fns),
                   in_shardings=(plan.sharding, sharding.batch_sharding(mesh), repl),
                   out_shardings=(plan.sharding, repl), donate_argnums=(0,))
  return update, loss_fn


def make_tokenizer(config):
  from big_vision_cxr import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.Tokenizer(config.tokenizer)


def make_seg_codec(config):
  """The VQ-VAE codec when the tasks include segmentation (config.input.seg_codec; None = demo)."""
  if "segmentation" not in tuple(config.input.get("tasks", TASKS)):
    return None
  from big_vision_cxr import seg_codec as seg_codec_lib  # pylint: disable=g-import-not-at-top
  return seg_codec_lib.from_config(config.input.get("seg_codec"))


def make_train_iter(config, tokenizer, seg_codec, class_names=None, image_size=None):
  from big_vision_cxr import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.training(
      config.input, batch_size=config.input.batch_size // jax.process_count(), seed=config.seed,
      tokenizer=tokenizer, process_index=jax.process_index(),
      process_count=jax.process_count(), seg_codec=seg_codec, class_names=class_names,
      image_size=image_size)


def data_class_names(config):
  """The detect/segment class names training prompts with (config or data), resolved once."""
  from big_vision_cxr import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.class_names(config.input)


def make_loss_fn(model, config, mask, lora_cfg, loc_start=None, batch_shards=1):
  """loss_fn(params, batch, rng) -> (mean loss, per-example losses [B]).

  `batch_shards`: how many devices split the batch (`sharding.batch_sharding`); the head
  gathers each shard's loss positions on its own device.

  `config.loc_label_smoothing = dict(sigma_bins=S)` with S > 0 needs `loc_start`, the
  id of `<loc0000>` (the tokenizer's `loc_id(0)`); S = 0 is the plain one-hot loss.
  """
  from big_vision_cxr import inference  # pylint: disable=g-import-not-at-top
  from big_vision_cxr import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  loc_smoothing = None
  if (config.get("loc_label_smoothing") or {}).get("sigma_bins", 0.0) > 0:
    if loc_start is None:
      raise config_lib.ConfigError("config.loc_label_smoothing needs the tokenizer's <loc0000> id "
                                   "(set config.tokenizer).")
    loc_smoothing = dict(loc_start=loc_start, num_loc=tokenizer_lib.NUM_LOC,
                         sigma_bins=float(config.loc_label_smoothing["sigma_bins"]))

  smoothed = config.get("label_smoothing", 0.0) or loc_smoothing

  def loss_fn(params, batch, rng):
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)
    params = inference.merge_lora(params, lora_cfg)
    text, mask_ar = batch["text"], batch["mask_ar"]
    targets, weights = text[:, 1:], batch["mask_loss"][:, 1:]
    if smoothed:  # Soft targets: the full text logits.
      logits, _ = model.apply({"params": params}, batch["image"], text[:, :-1], mask_ar[:, :-1],
                              train=True, rngs={"dropout": rng})
      per_ex = losses.per_example_loss(logits, targets, weights,
                                       config.get("label_smoothing", 0.0), loc_smoothing)
      return per_ex.mean(), per_ex
    # The 257k-vocab head only where the loss is (never the prompt), gradient formed in place.
    hidden = model.apply({"params": params}, batch["image"], text[:, :-1], mask_ar[:, :-1],
                         train=True, rngs={"dropout": rng}, method="text_hidden")
    return losses.head_loss(hidden, params["llm"]["embedder"]["input_embedding"], targets,
                            weights, model.llm.get("final_logits_softcap"), groups=batch_shards)
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
  """The pure train step: (state, batch, rng) -> (state, metrics)."""
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


def _task_summary(task_ids):
  counts = collections.Counter(TASKS[int(t)] if 0 <= int(t) < len(TASKS) else str(int(t))
                               for t in np.asarray(task_ids))
  return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def _load_init(config, model_cfg, params):
  """params with the weights of config.model_init loaded (LoRA factors kept)."""
  params = dict(params)
  lora = params.pop("lora", None)
  loaded = model_common.model_module(config.model_name).load(
      params, config.model_init, model_cfg,
      dont_load=config.get("model_load", {}).get("dont_load", ()))
  loaded = dict(jax.tree.map(lambda x: np.asarray(x, param_dtype(config)), loaded))
  if lora is not None:
    loaded["lora"] = lora
  return loaded


def _check_resumed_settings(workdir, resolved):
  """A resume must train the same model on the same tasks, classes and tokenizer."""
  stored = run_settings.read(workdir)
  if stored is None:
    return
  for key in ("variant", "tasks", "class_names", "tokenizer", "vqvae", "lora"):
    old, new = stored[1].get(key), resolved.get(key)
    if isinstance(old, dict) and isinstance(new, dict) and "sha256" in old:
      old, new = old["sha256"], new["sha256"]
    run_settings.check_same(f"resuming: {key}", old, new, workdir)


# ---------------------------------------------------------------- main ------

def train(config, workdir):
  """Runs training; returns a summary dict (final step, last metrics, eval results)."""
  from big_vision_cxr.evaluators import baselines  # pylint: disable=g-import-not-at-top
  from big_vision_cxr.evaluators import common as eval_common  # pylint: disable=g-import-not-at-top
  from big_vision_cxr import inference  # pylint: disable=g-import-not-at-top

  # ---- Config and mesh: everything that can be checked before compiling.
  workdir = pathlib.Path(workdir or config.get("workdir") or "workdir")
  config_lib.validate(config)
  sharding.maybe_initialize_distributed(config)  # before anything touches a device
  if jax.process_index() == 0:
    atomic.writable_dir(workdir, "the workdir")
  model_cfg = model_common.model_config(config)
  mesh = sharding.create_mesh(config.get("mesh", [("data", -1)]))
  sharding.check_batch_fits(config.input.batch_size, mesh, config.get("microbatches", 1))
  total_steps = config_lib.total_steps(config, config.input.get("data_size"))
  lora_cfg = config.get("lora") or None

  # ---- Model, tokenizer and input.
  model = model_common.model_module(config.model_name).Model(**model_cfg)
  tokenizer = make_tokenizer(config)
  vocab = model_cfg.llm.get("vocab_size")
  if tokenizer is not None and vocab and tokenizer.vocab_size > vocab:
    raise config_lib.ConfigError(
        f"config.tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
        f"(config.model.variant={config.model.variant!r}) has only {vocab} rows.")
  seg_codec = make_seg_codec(config)
  class_names = data_class_names(config) if tokenizer else ()
  train_iter = make_train_iter(config, tokenizer, seg_codec, class_names,
                               image_size=model_cfg.img.image_size)

  # ---- Params, optimizer and their shardings (shapes only: nothing allocated yet).
  plan = state_plan(config, model, mesh, total_steps, lora_cfg)

  # ---- Resume from the last complete checkpoint, or initialise (and load model_init).
  ckpt = checkpointing.Checkpointer(
      workdir, keep_last=config.get("keep_ckpts", 2), best_metric=config.get("best_metric"),
      best_mode=config.get("best_mode", "max"))
  resolved = run_settings.resolve(config, model_cfg, class_names=class_names) if tokenizer else None
  rng_init, rng_train = jax.random.split(jax.random.key(config.get("seed", 0)))
  resume_step = ckpt.latest_step() if config.get("resume", True) else None
  if resume_step is not None:
    if resolved:
      _check_resumed_settings(workdir, resolved)
    resume_step, state, meta = ckpt.restore_latest(plan.abstract())  # skips corrupt newer steps
    if meta.get("input_state") is not None:
      train_iter.set_state(meta["input_state"])
    logging.info("Resumed from %s/%d.", ckpt.directory, resume_step)
  else:
    state = jax.jit(plan.init_state, out_shardings=plan.sharding)(rng_init)
    if config.get("model_init"):
      params = _load_init(config, model_cfg, jax.device_get(state["params"]))
      state = dict(state, params=jax.device_put(params, plan.sharding["params"]))
  if resolved and jax.process_index() == 0:
    run_settings.write(workdir, config, resolved)

  # ---- The update step.
  update, loss_fn = jit_update(config, model, mesh, plan, lora_cfg,
                               loc_start=None if tokenizer is None else tokenizer.loc_id(0))
  # A checkpoint is good when its params are finite and give a finite loss on the batch
  # they were trained on last (lr=1e30 gives finite params whose next loss is NaN).
  healthy = jax.jit(lambda p, b: jnp.isfinite(loss_fn(p, b, rng_train)[0]) & jnp.all(
      jnp.asarray([jnp.isfinite(x).all() for x in jax.tree.leaves(p)])))

  # ---- Evaluators: {name: (evaluator, every_n_steps)}; 0/None = at the end only.
  evaluators = eval_common.from_config(config, model, tokenizer, seg_codec,
                                       class_names=class_names or None,
                                       image_size=model_cfg.img.image_size)

  def run_evals(step):
    """Runs the evaluators due at `step` -> ({'name/metric': value}, {name: records})."""
    results, records, params = {}, {}, None
    for name, (evaluator, every) in evaluators.items():
      if (every and step % every == 0) or step == total_steps:
        params = inference.merge_lora(state["params"], lora_cfg) if params is None else params
        t0 = time.perf_counter()
        records[name] = evaluator.predict(params)
        if evaluator.outfile:
          eval_common.write_jsonl(evaluator.outfile, records[name])
        for key, value in evaluator.compute_metrics(records[name], **evaluator.metric_kw).items():
          results[f"{name}/{key}"] = float(value)
        results[f"{name}/eval_s"] = time.perf_counter() - t0
    return results, records

  def check(pending):
    """The loss of a dispatched step, or NonFiniteLossError naming a good checkpoint."""
    s, metrics, task_ids = pending
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      ckpt.wait()
      last = ckpt.latest_step()
      where = f"{ckpt.directory}/{last}" if last is not None else "none (no checkpoint yet)"
      raise NonFiniteLossError(
          f"Loss is {loss} at step {s} (batch tasks: {_task_summary(task_ids)}); stopping. "
          f"Last good checkpoint: {where}. Lower config.lr, check the data, or resume from it.")
    return loss

  # ---- The loop.
  step = start_step = int(jax.device_get(state["step"]))
  log_every, ckpt_every = config.get("log_training_steps", 10), config.get("ckpt_steps", 0)
  writer = metric_writer.MetricWriter(workdir, resume_step=resume_step)
  progress = metric_writer.Progress(step, total_steps)
  pending, last_row, eval_results, eval_records = None, {}, {}, {}
  t_start = time.perf_counter()
  while step < total_steps:
    batch = next(train_iter)
    task_ids = np.asarray(batch["task_id"])
    global_batch = sharding.make_global_batch(batch, mesh)
    state, metrics = update(state, global_batch, rng_train)
    if pending is not None:
      check(pending)  # the previous step's loss, read while this step runs
    step += 1
    pending = (step, metrics, task_ids)
    progress.update(1)
    if step % log_every == 0 or step == total_steps or step == start_step + 1:
      loss, m = check(pending), jax.device_get(metrics)
      elapsed, done = time.perf_counter() - t_start, step - start_step
      last_row = {"loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                  "examples_per_s": done * config.input.batch_size / elapsed,
                  "eta_s": elapsed / done * (total_steps - step)}
      for k, name in enumerate(TASKS):
        if m["task_count"][k] > 0:
          last_row[f"loss/{name}"] = float(m["task_loss_sum"][k] / m["task_count"][k])
      writer.write(step, last_row)
      progress.log(step, last_row)
    new_evals, records = run_evals(step)
    if new_evals:
      check(pending)
      eval_results, eval_records = new_evals, records
      writer.write(step, new_evals)
    if (ckpt_every and step % ckpt_every == 0) or step == total_steps:
      check(pending)
      if not bool(healthy(state["params"], global_batch)):
        ckpt.wait()
        last = ckpt.latest_step()
        raise NonFiniteLossError(
            f"the parameters after step {step} hold NaN/Inf or give a NaN/Inf loss; not saving "
            f"them. Last good checkpoint: "
            f"{'none' if last is None else f'{ckpt.directory}/{last}'}. Lower config.lr.")
      ckpt.save(step, state, input_state=train_iter.get_state(), metrics=new_evals)
  if pending is not None:
    check(pending)
  progress.close()
  ckpt.close()
  wall = time.perf_counter() - t_start
  writer.write(step, {"wall_s": wall})
  writer.close()
  summary = {"step": step, "train": last_row, "eval": eval_results, "records": eval_records,
             "state": state, "wall_s": wall}

  # ---- The final table: each headline metric with its patient-bootstrap CI, next to a
  # trivial baseline (evaluators/table.py; `python -m big_vision_cxr.evaluate` prints the same).
  if config.get("baseline_table") and eval_records:
    from big_vision_cxr.evaluators import table as table_lib  # pylint: disable=g-import-not-at-top
    majority = baselines.majority_answers(getattr(train_iter, "units", {}))
    table = table_lib.results_table(evaluators, eval_records, eval_results, majority,
                                    table_metrics_cfg=config.get("table_metrics") or {})
    summary["table"] = table["rows"]
    print(table_lib.to_text(table), flush=True)
    if jax.process_index() == 0:
      atomic.write_text(workdir / "final_metrics.json", json.dumps(
          {"step": step, "eval": eval_results, "table": table["rows"], "notes": table["notes"],
           "bootstrap": table["bootstrap"], "majority": baselines.to_json(majority)}, indent=1))
      atomic.write_text(workdir / "final_metrics.md", table_lib.to_markdown(table))
  return summary


def run(argv):
  metric_writer.setup_logging(verbose="--verbose" in argv)
  config, workdir = config_lib.parse_flags([a for a in argv if a != "--verbose"])
  summary = train(config, workdir)
  workdir = pathlib.Path(workdir or config.get("workdir") or "workdir")
  print(f"done: step {summary['step']} in {summary['wall_s']:.0f} s; metrics in "
        f"{workdir / 'metrics.jsonl'}" + (f", final table in {workdir / 'final_metrics.json'}"
                                         if "table" in summary else ""))
  return 0


def main(argv=None):
  return errors.cli_main(run, argv)


if __name__ == "__main__":
  host_allocator.reexec()
  sys.exit(main())
