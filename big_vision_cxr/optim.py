"""big_vision-style optimizer: a schedule list with freezing, lr/wd multipliers, LoRA.

The chain (big_vision/optax.py order) is:
  clip_by_global_norm (trainable, optax's up to rounding) -> optax.<optax_name> (trainable)
  -> lr * lr_mult + decoupled weight decay (wd * wd_mult * param)
  -> per-pattern schedule multiplier -> zero for frozen -> negate.
Weight decay is NOT multiplied by `lr`, only by the schedule (so `wd` ~ lr * torch_wd).
Frozen params (schedule entry `None`) get no optimizer state at all.

Paths are '/'-joined param names (e.g. 'llm/layers/attn/q_einsum/w'); patterns are
matched with `re.fullmatch`, first match wins, and every param must be matched.
"""
import dataclasses
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_vision_cxr import errors
from big_vision_cxr import param_paths


class OptimConfigError(errors.Error):
  """A schedule / lr_mults / wd_mults / lora setting that cannot be applied."""


# ---------------------------------------------------------------- schedules --

def _steps_of(kw, prefix, total_steps, batch_size, data_size):
  """Resolves `{prefix}_{steps,percent,examples,epochs}` to a step count."""
  given = {k: kw.pop(f"{prefix}_{k}") for k in ("steps", "percent", "examples", "epochs")
           if f"{prefix}_{k}" in kw}
  if len(given) > 1:
    raise OptimConfigError(f"schedule: give only one of {sorted(prefix + '_' + k for k in given)}.")
  if not given:
    return 0
  (unit, value), = given.items()
  if unit == "steps":
    return int(value)
  if unit == "percent":
    return int(round(value * total_steps))
  if not batch_size:
    raise OptimConfigError(f"schedule: {prefix}_{unit} needs the batch size.")
  if unit == "examples":
    return int(math.ceil(value / batch_size))
  if not data_size:
    raise OptimConfigError(f"schedule: {prefix}_epochs needs the dataset size.")
  return int(math.ceil(value * data_size / batch_size))


def create_learning_rate_schedule(total_steps, batch_size=None, data_size=None, *,
                                  decay_type="cosine", base=1.0, **kw):
  """Multiplier schedule `step -> float` (big_vision utils.create_learning_rate_schedule).

  decay_type: 'cosine' (to `linear_end`), 'linear'/'polynomial' (`power`, `linear_end`),
  'rsqrt' (`timescale`), 'constant', 'stair' (`steps`, `mults`). Warmup is linear from 0,
  cooldown linear to 0, each given as {warmup,cooldown}_{steps,percent,examples,epochs}.
  """
  kw = dict(kw)
  warmup = _steps_of(kw, "warmup", total_steps, batch_size, data_size)
  cooldown = _steps_of(kw, "cooldown", total_steps, batch_size, data_size)
  linear_end = kw.pop("linear_end", 0.0)
  power = kw.pop("power", 1.0)
  timescale = kw.pop("timescale", 10_000)
  stair_steps = kw.pop("steps", ())
  stair_mults = kw.pop("mults", ())
  if kw:
    raise OptimConfigError(f"schedule: unknown setting(s) {sorted(kw)} for decay_type={decay_type!r}.")
  if warmup + cooldown > total_steps:
    raise OptimConfigError(f"schedule: warmup ({warmup}) + cooldown ({cooldown}) steps exceed "
                           f"total_steps ({total_steps}).")
  known = ("cosine", "linear", "polynomial", "rsqrt", "constant", "stair")
  if decay_type not in known:
    raise OptimConfigError(f"schedule: unknown decay_type {decay_type!r}; known: {known}.")

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((step - warmup) / max(1, total_steps - warmup), 0.0, 1.0)
    if decay_type == "cosine":
      lr = linear_end + (1.0 - linear_end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif decay_type in ("linear", "polynomial"):
      lr = linear_end + (1.0 - linear_end) * (1.0 - frac) ** power
    elif decay_type == "rsqrt":
      lr = jax.lax.rsqrt(jnp.maximum(1.0, (step - warmup + timescale) / timescale))
    elif decay_type == "constant":
      lr = jnp.ones_like(step)
    else:
      lr = jnp.ones_like(step)
      for s, m in zip(stair_steps, stair_mults):
        lr = jnp.where(step >= s, m, lr)
    if warmup:
      lr = lr * jnp.minimum(1.0, step / warmup)
    if cooldown:
      lr = lr * jnp.minimum(1.0, (total_steps - step) / cooldown)
    return base * lr
  return fn


# ---------------------------------------------------------------- the chain --

@dataclasses.dataclass(frozen=True)
class ParamPlan:
  """Per-param decisions: schedule label (None = frozen), lr and wd multipliers."""
  labels: dict      # name -> schedule index or None
  lr_mults: dict    # name -> float
  wd_mults: dict    # name -> float

  def trainable(self, name):
    return self.labels[name] is not None


def plan_params(config, params):
  """Matches every param against the schedule / lr_mults / wd_mults lists."""
  sched = config.get("schedule", dict(decay_type="cosine", warmup_percent=0.05))
  if isinstance(sched, (dict, flax.core.FrozenDict)) or hasattr(sched, "to_dict"):
    sched = [(".*", sched)]
  compiled = param_paths.compile_rules(sched, "config.schedule", OptimConfigError)
  lr_mults = param_paths.compile_rules(config.get("lr_mults") or [], "config.lr_mults",
                                      OptimConfigError)
  wd_mults = param_paths.compile_rules(config.get("wd_mults", [(".*/kernel$", 1.0)]) or [],
                                      "config.wd_mults",
                                       OptimConfigError)
  labels, lrm, wdm, unmatched = {}, {}, {}, []
  for name, _ in param_paths.tree_names(params):
    label = None
    for i, (rx, value) in enumerate(compiled):
      if rx.fullmatch(name):
        label = None if value is None else i
        break
    else:
      unmatched.append(name)
    labels[name] = label
    found, mult = param_paths.first_match(name, lr_mults)
    lrm[name] = float(mult) if found else 1.0
    found, mult = param_paths.first_match(name, wd_mults)
    wdm[name] = float(mult) if found else 0.0
  if unmatched:
    shown = ", ".join(unmatched[:5]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 5 else "")
    raise OptimConfigError(
        f"config.schedule does not match every parameter; unmatched: {shown}. "
        f"Patterns: {[p for p, _ in sched]}. Add a pattern (use None to freeze).")
  return ParamPlan(labels, lrm, wdm)


def make_schedules(config, total_steps, batch_size=None, data_size=None):
  """One multiplier fn per schedule-list entry (None for frozen entries)."""
  sched = config.get("schedule", dict(decay_type="cosine", warmup_percent=0.05))
  if isinstance(sched, (dict, flax.core.FrozenDict)) or hasattr(sched, "to_dict"):
    sched = [(".*", sched)]
  fns = []
  for _, kw in sched:
    if kw is None:
      fns.append(None)
    else:
      kw = kw.to_dict() if hasattr(kw, "to_dict") else dict(kw)
      fns.append(create_learning_rate_schedule(total_steps, batch_size, data_size, **kw))
  return fns


class ScheduleState(flax.struct.PyTreeNode):
  count: jax.Array


def _lr_wd_schedule(lr, wd, plan, sched_fns, names_tree):
  """u -> sched(t) * (lr * lr_mult * u + wd * wd_mult * p); frozen -> 0."""

  def init(params):
    del params
    return ScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    mults = [None if f is None else f(state.count) for f in sched_fns]

    def one(name, u, p):
      label = plan.labels[name]
      if label is None:
        return jnp.zeros_like(u)
      out = lr * plan.lr_mults[name] * u
      if wd and plan.wd_mults[name]:
        out = out + wd * plan.wd_mults[name] * p.astype(u.dtype)
      return (mults[label] * out).astype(u.dtype)

    new = jax.tree.map(one, names_tree, updates, params)
    return new, ScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def clip_by_global_norm(max_norm):
  """optax.clip_by_global_norm as one scalar factor, `g * min(1, max_norm / norm)`, equal
  to optax's up to rounding (1 ulp). optax selects between `g` and `g / norm * max_norm`,
  and XLA:CPU writes that scaled copy of every trained weight's gradient to memory before
  the moments read both; a factor fuses into the moments' own loops."""
  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def make(config, params, *, total_steps, batch_size=None, data_size=None):
  """Returns (tx, plan, sched_fns) for `params` (a tree of arrays or ShapeDtypeStructs)."""
  plan = plan_params(config, params)
  sched_fns = make_schedules(config, total_steps, batch_size, data_size)
  names_tree = param_paths.tree_map_with_names(lambda n, _: n, params)
  mask = jax.tree.map(plan.trainable, names_tree)
  optax_name = config.get("optax_name", "scale_by_adam")
  if not hasattr(optax, optax_name):
    raise OptimConfigError(f"config.optax_name={optax_name!r} is not an optax function.")
  optax_kw = dict(config.get("optax", {}) or {})
  parts = []
  if config.get("grad_clip_norm"):
    parts.append(optax.masked(clip_by_global_norm(config.grad_clip_norm), mask))
  parts.append(optax.masked(getattr(optax, optax_name)(**optax_kw), mask))
  parts.append(_lr_wd_schedule(config.lr, config.get("wd", 0.0), plan, sched_fns, names_tree))
  parts.append(optax.scale(-1.0))
  return optax.chain(*parts), plan, sched_fns


def trainable_mask(plan, params):
  return param_paths.tree_map_with_names(lambda n, _: plan.trainable(n), params)


def current_lr(config, sched_fns, step):
  """The lr of the first trained schedule entry at `step` (for logging)."""
  for fn in sched_fns:
    if fn is not None:
      return config.lr * fn(step)
  return jnp.zeros([], jnp.float32)


# ---------------------------------------------------------------------- LoRA --

def lora_matrix_shape(shape):
  """How a weight is viewed for LoRA: [batch..., m, n].

  2D weights are [m, n]; weights with >= 3 dims are stacked layers: the leading axis is
  the layer axis and the rest is viewed as [prod(middle axes), last axis].
  """
  if len(shape) < 2:
    raise OptimConfigError(f"LoRA needs a weight with >= 2 dims, got shape {shape}.")
  if len(shape) == 2:
    return (), shape[0], shape[1]
  return (shape[0],), int(np.prod(shape[1:-1])), shape[-1]


def lora_init(lora_cfg, params, rng):
  """{'llm~layers~attn~q_einsum~w': {'a': [.., m, r], 'b': [.., r, n]}, ...}, with B = 0.

  Keys are the matched param names with '/' replaced by '~' (safe as checkpoint keys).
  """
  rank = int(lora_cfg.rank)
  try:
    target = re.compile(lora_cfg.targets)
  except re.error as e:
    raise OptimConfigError(f"config.lora.targets: bad regex {lora_cfg.targets!r}: {e}") from e
  flat = {}
  for name, leaf in param_paths.tree_names(params):
    if target.fullmatch(name) and len(leaf.shape) >= 2:
      batch, m, n = lora_matrix_shape(leaf.shape)
      rng, sub = jax.random.split(rng)
      a = jax.random.normal(sub, (*batch, m, rank), jnp.float32) / np.sqrt(m)
      flat[name.replace("/", "~")] = {"a": a, "b": jnp.zeros((*batch, rank, n), jnp.float32)}
  if not flat:
    raise OptimConfigError(f"config.lora.targets={lora_cfg.targets!r} matches no 2D+ weight.")
  return flat


def lora_merge(lora_cfg, params, lora):
  """params with W + (alpha / rank) * reshape(A @ B) for every LoRA'd weight."""
  scale = float(lora_cfg.alpha) / float(lora_cfg.rank)

  def merge(name, w):
    ab = lora.get(name.replace("/", "~"))
    if ab is None:
      return w
    delta = jnp.einsum("...mr,...rn->...mn", ab["a"], ab["b"])  # [.., m, n]
    return w + (scale * delta).reshape(w.shape).astype(w.dtype)

  return param_paths.tree_map_with_names(merge, params)
