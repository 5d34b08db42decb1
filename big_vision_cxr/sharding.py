"""Device mesh, FSDP / data-parallel sharding rules and global batches.

`config.mesh = [('data', -1)]` (or e.g. `[('data', 2), ('fsdp', -1)]`) names the mesh
axes; -1 takes the remaining devices. `config.sharding_strategy` is a list of
`(regex, rule)` over the '/'-joined names of the train state ('params/llm/...',
'opt/...'), first match wins:
  'replicate'
  'fsdp(axis="data", min_size_to_shard_mb=4)'  big_vision's rule: shard the largest
      dimension divisible by the axis size; tensors below the size threshold stay whole.
  'shard_dim(axis="data", dim=0)'
Batches are global arrays split over all mesh axes on the batch dimension.
"""
import ast
import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_vision_cxr import errors
from big_vision_cxr import param_paths


class ShardingError(errors.Error):
  """A mesh or sharding rule that cannot be built for these devices or shapes."""


# jax.distributed.initialize arguments config.distributed may set.
DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id", "local_device_ids",
                    "cluster_detection_method", "initialization_timeout",
                    "coordinator_bind_address")
# jax 0.10 reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS itself, but has no variable
# for these two (only its TPU / Slurm / Open MPI / Kubernetes auto-detection sets them).
_ENV_INTS = {"num_processes": "BVCXR_NUM_PROCESSES", "process_id": "BVCXR_PROCESS_ID"}


def distributed_settings(config, environ=None):
  """Keyword arguments for jax.distributed.initialize, or None for a single-process run.

  config.distributed: False (default), True (auto-detect: TPU pods, Slurm, Open MPI,
  Kubernetes; or JAX_COORDINATOR_ADDRESS / JAX_LOCAL_DEVICE_IDS), or a dict of
  DISTRIBUTED_KEYS. Env BVCXR_DISTRIBUTED=1 turns it on from the command line, with
  BVCXR_NUM_PROCESSES / BVCXR_PROCESS_ID filling what the dict leaves unset.
  """
  environ = os.environ if environ is None else environ
  setting = config.get("distributed", False)
  if not setting and environ.get("BVCXR_DISTRIBUTED") != "1":
    return None
  if setting is None or isinstance(setting, bool):
    kwargs = {}
  elif hasattr(setting, "items"):
    kwargs = dict(setting.items())
    unknown = sorted(set(kwargs) - set(DISTRIBUTED_KEYS))
    if unknown:
      raise ShardingError(f"config.distributed has unknown keys {unknown}; known: "
                          f"{list(DISTRIBUTED_KEYS)}.")
  else:
    raise ShardingError(f"config.distributed must be a bool or a dict of {list(DISTRIBUTED_KEYS)}, "
                        f"got {setting!r}.")
  for key, var in _ENV_INTS.items():
    if kwargs.get(key) is None and environ.get(var):
      try:
        kwargs[key] = int(environ[var])
      except ValueError:
        raise ShardingError(f"env {var}={environ[var]!r} is not an int.") from None
  for key in ("num_processes", "process_id", "initialization_timeout"):
    if kwargs.get(key) is not None and (isinstance(kwargs[key], bool)
                                        or not isinstance(kwargs[key], int)):
      raise ShardingError(f"config.distributed.{key} must be an int, got {kwargs[key]!r}.")
  return {k: v for k, v in kwargs.items() if v is not None}


def maybe_initialize_distributed(config):
  """jax.distributed.initialize(**distributed_settings(config)); True when multi-process.

  Must run before anything touches the devices. Selects gloo CPU collectives when none
  are set (without them a multi-process CPU step fails with "Multiprocess computations
  aren't implemented on the CPU backend"). Calling it again in the same process is a no-op.
  """
  kwargs = distributed_settings(config)
  if kwargs is None:
    return False
  if jax.distributed.is_initialized():
    return True
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, RuntimeError) as e:
    raise ShardingError(
        f"jax.distributed.initialize({kwargs}) failed: {e}. Without TPU / Slurm / Open MPI "
        f"auto-detection set coordinator_address, num_processes and process_id (config."
        f"distributed dict, or env JAX_COORDINATOR_ADDRESS, BVCXR_NUM_PROCESSES, "
        f"BVCXR_PROCESS_ID), and call it before any JAX computation.") from e
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def create_mesh(mesh_spec, devices=None):
  """[('data', -1), ('fsdp', 4)] -> Mesh; -1 takes the devices left over."""
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in mesh_spec]
  sizes = [int(size) for _, size in mesh_spec]
  if len(set(names)) != len(names):
    raise ShardingError(f"config.mesh repeats an axis name: {names}.")
  if sizes.count(-1) > 1:
    raise ShardingError(f"config.mesh: at most one axis may be -1, got {list(mesh_spec)}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if known <= 0 or len(devices) % known:
    raise ShardingError(f"config.mesh {list(mesh_spec)} does not fit {len(devices)} devices.")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ShardingError(f"config.mesh {list(mesh_spec)} uses {int(np.prod(sizes))} devices, "
                        f"but there are {len(devices)}.")
  return Mesh(np.asarray(devices).reshape(sizes), names)


def _parse_rule(rule):
  """'fsdp(axis="data")' -> ('fsdp', {'axis': 'data'})."""
  try:
    node = ast.parse(rule, mode="eval").body
  except SyntaxError as e:
    raise ShardingError(f"bad sharding rule {rule!r}: {e}") from e
  if isinstance(node, ast.Name):
    return node.id, {}
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
    return node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
  raise ShardingError(f"bad sharding rule {rule!r}: expected name or name(key=value, ...).")


def fsdp_spec(shape, itemsize, mesh, axis="data", min_size_to_shard_mb=4):
  """big_vision's FSDP rule for one array: PartitionSpec sharding its largest divisible dim."""
  axes = (axis,) if isinstance(axis, str) else tuple(axis)
  for a in axes:
    if a not in mesh.shape:
      raise ShardingError(f"fsdp axis {a!r} is not in the mesh {dict(mesh.shape)}.")
  n = int(np.prod([mesh.shape[a] for a in axes]))
  spec = [None] * len(shape)
  if n == 1 or np.prod(shape, dtype=np.int64) * itemsize <= min_size_to_shard_mb * 2**20:
    return P(*spec)
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # largest first
    if shape[dim] % n == 0:
      spec[dim] = axes[0] if len(axes) == 1 else axes
      return P(*spec)
  return P(*spec)


def _spec_for(rule, shape, itemsize, mesh):
  name, kw = _parse_rule(rule)
  if name == "replicate":
    return P()
  if name == "fsdp":
    return fsdp_spec(shape, itemsize, mesh, **kw)
  if name == "shard_dim":
    axis, dim = kw.get("axis", "data"), kw.get("dim", 0)
    if not shape or dim >= len(shape) or shape[dim] % mesh.shape[axis]:
      return P()
    spec = [None] * len(shape)
    spec[dim] = axis
    return P(*spec)
  raise ShardingError(f"unknown sharding rule {name!r}; known: replicate, fsdp, shard_dim.")


def infer_sharding(tree, strategy, mesh):
  """NamedSharding for each leaf of `tree` (arrays or ShapeDtypeStructs) by strategy."""
  compiled = param_paths.compile_rules(strategy, "config.sharding_strategy", ShardingError)

  def one(name, leaf):
    found, rule = param_paths.first_match(name, compiled)
    if not found:
      raise ShardingError(f"config.sharding_strategy matches no rule for {name!r}.")
    shape = tuple(getattr(leaf, "shape", ()))
    itemsize = np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
    return NamedSharding(mesh, _spec_for(rule, shape, itemsize, mesh))

  return param_paths.tree_map_with_names(one, tree)


def batch_sharding(mesh):
  """Batch dim split over every mesh axis."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def make_global_batch(local_batch, mesh):
  """Per-process numpy batch -> global jax arrays sharded on the batch dimension."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def check_batch_fits(batch_size, mesh, microbatches=1):
  """Fails before compiling when the global batch cannot be split over the devices."""
  n = mesh.size
  if batch_size % n:
    raise ShardingError(f"config.input.batch_size={batch_size} is not divisible by the "
                        f"{n} devices of the mesh {dict(mesh.shape)}.")
  if batch_size % (microbatches * n):
    raise ShardingError(f"config.input.batch_size={batch_size} cannot be split into "
                        f"config.microbatches={microbatches} microbatches of a multiple of "
                        f"{n} devices each.")
  if batch_size % jax.process_count():
    raise ShardingError(f"config.input.batch_size={batch_size} is not divisible by the "
                        f"{jax.process_count()} processes.")
