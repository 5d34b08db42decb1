"""What the models and the trainer share: scanned layers, remat, a model from a config.

A model is a module `big_vision_cxr.models.<name>` (config.model_name) that defines
`Model`, `get_config(variant)` (the kwargs of Model) and `load(params, init_file,
model_cfg, dont_load)`; `model_module` imports it by that name.
"""
import importlib
import pkgutil

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_cxr import config as config_lib

MODEL_API = ("Model", "get_config", "load")
# The jax.checkpoint_policies that are policies themselves (the others build one from names).
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


def remat_policy(remat):
  """A remat config value -> (use_remat, policy). False/None/'none'/'': no remat; True:
  remat with jax's default policy; a REMAT_POLICIES name: that jax.checkpoint_policies one."""
  if remat is None or remat is False or remat in ("none", ""):
    return False, None
  if remat is True:
    return True, None
  if isinstance(remat, str) and remat in REMAT_POLICIES and hasattr(jax.checkpoint_policies, remat):
    return True, getattr(jax.checkpoint_policies, remat)
  raise ValueError(f"remat={remat!r}: use True (recompute each layer's activations in the "
                   f"backward pass), False, or a jax.checkpoint_policies name: "
                   f"{list(REMAT_POLICIES)}.")


def check_remat(part, value):
  """config.model.{img,llm}.remat: a bool or a REMAT_POLICIES name, else a ConfigError."""
  try:
    remat_policy(value)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.model.{part}.{e}") from None


def scan_unroll(unroll, depth):
  """A scan_unroll config value -> layers per loop iteration: True = all `depth` (no loop
  left), False = 1 (a loop over the layers), else an int in [1, depth]."""
  if unroll is True or unroll is False:
    return depth if unroll else 1
  if isinstance(unroll, int) and 1 <= unroll <= depth:
    return unroll
  raise ValueError(f"scan_unroll={unroll!r}: use True (unroll all {depth} layers), False, "
                   f"or a number of layers per loop iteration in [1, {depth}].")


def check_scan_unroll(part, cfg):
  """config.model.{img,llm}.scan_unroll: see scan_unroll, else a ConfigError."""
  try:
    scan_unroll(cfg.get("scan_unroll", False), cfg["depth"])
  except ValueError as e:
    raise config_lib.ConfigError(f"config.model.{part}.{e}") from None


def scan_blocks(block_cls, depth, remat, num_broadcast_args, static_argnums,
                variable_axes=("params",), unroll=False):
  """Wraps `block_cls` (a module whose __call__(x, *broadcast) returns (x, None))
  in optional remat and `nn.scan` over `depth` stacked layers, `unroll` (see
  scan_unroll) of them per loop iteration. `static_argnums` (counting `self` as 0) are
  the Python-valued arguments remat must not trace."""
  use_remat, policy = remat_policy(remat)
  if use_remat:
    block_cls = nn.remat(block_cls, prevent_cse=False, policy=policy,
                         static_argnums=static_argnums)
  return nn.scan(
      block_cls,
      variable_axes={name: 0 for name in variable_axes},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * num_broadcast_args,
      length=depth, unroll=scan_unroll(unroll, depth))


def _is_model(module):
  return all(hasattr(module, name) for name in MODEL_API)


def model_names():
  """The modules of big_vision_cxr.models that are models (define MODEL_API)."""
  names = [m.name for m in pkgutil.iter_modules(importlib.import_module(__package__).__path__)]
  return sorted(n for n in names if _is_model(importlib.import_module(f"{__package__}.{n}")))


def model_module(name):
  """config.model_name -> the module big_vision_cxr.models.<name>; else a ConfigError."""
  package = importlib.import_module(__package__)
  if name in {m.name for m in pkgutil.iter_modules(package.__path__)}:
    module = importlib.import_module(f"{__package__}.{name}")
    if _is_model(module):
      return module
  raise config_lib.ConfigError(f"config.model_name={name!r} is not a model; known: "
                               f"{', '.join(model_names())}.")


def model_config(config):
  """Resolves config.model (variant + img/llm overrides + compute dtype) to Model kwargs."""
  cfg = model_module(config.model_name).get_config(config.model.variant)
  for part in ("img", "llm"):
    overrides = config.model.get(part) or {}
    for key, value in dict(overrides).items():
      cfg[part][key] = value
    check_remat(part, cfg[part].get("remat", False))
    check_scan_unroll(part, cfg[part])
  dtype = config.get("compute_dtype")
  if dtype:
    for part in ("img", "llm"):
      cfg[part]["dtype"] = jnp.dtype(dtype)
  return cfg


def build_model(config):
  """The (unbound) flax Model that `config` describes."""
  return model_module(config.model_name).Model(**model_config(config))
