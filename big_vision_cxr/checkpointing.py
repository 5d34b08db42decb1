"""Atomic orbax checkpoints in `{workdir}/checkpoints/{step}`: keep last K + best, iterator state.

orbax writes each checkpoint into `{step}.orbax-checkpoint-tmp-*` and renames it to
`{step}` only once every item is on disk (plus `commit_success.txt` on filesystems
without atomic rename). On top of that, a step counts as complete only when its
`_CHECKPOINT_METADATA`, `state` and `meta` entries exist; anything else (a leftover tmp
dir, a half-copied step) is never restored: tmp dirs are removed at start-up and an
incomplete step dir is moved aside to `checkpoints/incomplete-{step}`.

Each checkpoint holds `state` (the train state pytree: step, params, opt) and `meta`
(JSON: step, the input iterator's state, eval metrics at that step).
"""
import logging
import os
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from big_vision_cxr.errors import CheckpointError

_ITEMS = ("state", "meta")


def is_complete(step_dir):
  step_dir = pathlib.Path(step_dir)
  return (step_dir.name.isdigit() and (step_dir / "_CHECKPOINT_METADATA").is_file()
          and all((step_dir / item).is_dir() for item in _ITEMS))


class Checkpointer:
  """Saves/restores {state, meta}; keeps the last `keep_last` plus the best by `best_metric`."""

  def __init__(self, workdir, *, keep_last=2, best_metric=None, best_mode="max", async_save=True):
    if best_mode not in ("max", "min"):
      raise CheckpointError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    if keep_last < 1:
      raise CheckpointError(f"keep_last must be >= 1, got {keep_last}.")
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.keep_last = keep_last
    self.best_metric = best_metric
    self.best_mode = best_mode
    if jax.process_index() == 0:
      self.directory.mkdir(parents=True, exist_ok=True)
      self._set_aside_incomplete()
    if jax.process_count() > 1:  # the others look at the directory only once it is tidied
      ocp.multihost.sync_global_processes("bvcxr_checkpointer_init")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    self._metrics = {}  # step -> metric value, for the steps still on disk

  def _set_aside_incomplete(self):
    for path in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in path.name:  # a write cut off before orbax's rename
        logging.warning("Removing the unfinished checkpoint write %s.", path)
        shutil.rmtree(path, ignore_errors=True)
      elif path.is_dir() and path.name.isdigit() and not is_complete(path):
        target = self.directory / f"incomplete-{path.name}"
        shutil.rmtree(target, ignore_errors=True)
        logging.warning("Checkpoint %s is incomplete; moved to %s, never restored.", path, target)
        os.replace(path, target)

  def complete_steps(self):
    self._manager.reload()
    return sorted(s for s in self._manager.all_steps() if is_complete(self.directory / str(s)))

  def latest_step(self):
    steps = self.complete_steps()
    return steps[-1] if steps else None

  def save(self, step, state, *, input_state=None, metrics=None):
    """Starts writing checkpoint `step` (async); the previous write is finished first."""
    self._manager.wait_until_finished()
    meta = {"step": int(step), "input_state": input_state, "metrics": dict(metrics or {})}
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if self.best_metric and self.best_metric in meta["metrics"]:
      self._metrics[int(step)] = float(meta["metrics"][self.best_metric])
    self._prune(int(step))

  def best_step(self):
    if not self._metrics:
      return None
    pick = max if self.best_mode == "max" else min
    return pick(self._metrics, key=lambda s: (self._metrics[s], s))

  def _prune(self, newest):
    keep = set(sorted(set(self._manager.all_steps()) | {newest})[-self.keep_last:])
    if self.best_step() is not None:
      keep.add(self.best_step())
    for step in self._manager.all_steps():
      if step not in keep and step != newest:
        self._manager.delete(step)
        self._metrics.pop(step, None)

  def restore(self, step, abstract_state):
    """Returns (state, meta) of `step`, laid out like `abstract_state` (with shardings)."""
    if not is_complete(self.directory / str(step)):
      raise CheckpointError(f"checkpoint {self.directory / str(step)} is missing or incomplete.")
    out = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    meta = out["meta"]
    if self.best_metric:
      for s in self._manager.all_steps():
        if s not in self._metrics and is_complete(self.directory / str(s)):
          m = self._manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
          if self.best_metric in m["meta"]["metrics"]:
            self._metrics[s] = float(m["meta"]["metrics"][self.best_metric])
    return out["state"], meta

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def latest_complete_step(workdir):
  folder = pathlib.Path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in folder.iterdir() if is_complete(p)) if folder.is_dir() else []
  if not steps:
    raise CheckpointError(f"{workdir}: no complete checkpoint under {folder}.")
  return steps[-1]


def restore_params(workdir, step=None):
  """The params of a checkpoint (workdir, or workdir/checkpoints/STEP) -> (params, step).

  Read-only: unlike `Checkpointer` it never moves, cleans or creates anything,
  so it is safe on the workdir of a running training.
  """
  path = pathlib.Path(workdir)
  if path.name.isdigit() and is_complete(path):
    step_dir = path
  else:
    step = latest_complete_step(path) if step is None else int(step)
    step_dir = path / "checkpoints" / str(step)
    if not is_complete(step_dir):
      raise CheckpointError(f"checkpoint {step_dir} is missing or incomplete.")
  try:
    state = ocp.StandardCheckpointer().restore(step_dir.absolute() / "state")
  except Exception as e:  # pylint: disable=broad-except  # orbax raises bare Exceptions
    raise CheckpointError(f"checkpoint {step_dir} cannot be read: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
  if "params" not in state:
    raise CheckpointError(f"{step_dir}: the saved state has no 'params' (keys: {sorted(state)}).")
  return state["params"], int(step_dir.name)
