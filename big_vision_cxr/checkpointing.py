"""Atomic orbax checkpoints in `{workdir}/checkpoints/{step}`: keep last K + best, iterator state.

orbax writes each checkpoint into `{step}.orbax-checkpoint-tmp-*` and renames it to
`{step}` only once every item is on disk (plus `commit_success.txt` on filesystems
without atomic rename). On top of that, a step counts as complete only when its
`_CHECKPOINT_METADATA`, `state` and `meta` entries exist; anything else (a leftover tmp
dir, a half-copied step) is never restored: tmp dirs are removed at start-up and an
incomplete step dir is moved aside to `checkpoints/incomplete-{step}`.

Each checkpoint holds `state` (the train state pytree: step, params, opt) and `meta`
(JSON: step, the input iterator's state, eval metrics at that step, and a checksum of
every state array). A restore reads `_CHECKPOINT_METADATA`, `meta` and the state's
metadata first, refuses a state whose shapes differ from the run's (naming the first
parameter), then checks every restored array against its checksum: a truncated,
garbled or bit-flipped file is a `CorruptCheckpointError` naming the step folder.
Resuming (`Checkpointer.restore_latest`, `restore_params` without a step) skips corrupt
newer steps with a warning and uses the newest intact one.
"""
import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from big_vision_cxr.errors import CheckpointError

_ITEMS = ("state", "meta")


class CorruptCheckpointError(CheckpointError):
  """A complete checkpoint whose files cannot be read back as they were saved."""


def is_complete(step_dir):
  step_dir = pathlib.Path(step_dir)
  return (step_dir.name.isdigit() and (step_dir / "_CHECKPOINT_METADATA").is_file()
          and all((step_dir / item).is_dir() for item in _ITEMS))


def _path_name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flatten(tree):
  """{'params/llm/...': leaf} (dicts, lists and namedtuples alike, as orbax stores them)."""
  return {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _bit_sum(x):
  """The sum (mod 2**32) of an array's bits: any one flipped bit changes it."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
  bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jnp.sum(bits, dtype=jnp.uint32)


_bit_sum_jit = jax.jit(_bit_sum)


def _checksums(flat):
  """{path: bit sum} of a flat {path: array} dict, computed where the arrays live, one
  array at a time: XLA may materialise an array's bits before summing them, so at most
  the largest array's worth of temporaries, not the whole state's. Each sum is awaited
  before the next starts: a sharded array's sum is a collective, and XLA:CPU deadlocks
  when its device threads pick up several collective programs in different orders."""
  return {k: int(_bit_sum_jit(v)) for k, v in flat.items()}


def _params_first(path):
  return not path.startswith("params/"), path


def _root_cause(e):
  """The innermost error (orbax wraps tensorstore's, which names the file), on one line."""
  while e.__cause__ or e.__context__:
    e = e.__cause__ or e.__context__
  lines = str(e).strip().splitlines()
  return e, f"{type(e).__name__}: {lines[0] if lines else ''}"


def _is_echo(e):
  """One of the errors a failed orbax read leaves: its other reads end on a closed loop,
  or fail on the same corrupt file in futures nobody awaits any more."""
  return ((isinstance(e, RuntimeError) and str(e) == "Event loop is closed")
          or (type(e) is Exception  # pylint: disable=unidiomatic-typecheck
              and str(e).startswith("Encountered error while reading array index"))
          or (isinstance(e, ValueError) and re.match(r"[A-Z_]+: Error reading ", str(e))))


def _not_an_echo(record):
  """asyncio's "exception was never retrieved" log records keep only non-echoes."""
  return not (record.exc_info and _is_echo(record.exc_info[1]))


def _drop_echoes():
  """From now on, Python's hooks for errors nobody caught drop those echoes of an error
  already reported: unraisable ones, a thread's, those native callbacks (tensorstore
  calling into a closed event loop) print through sys.excepthook, and those asyncio logs
  for futures garbage-collected with their error unread."""
  if getattr(sys.unraisablehook, "drops_orbax_echoes", False):
    return
  logging.getLogger("asyncio").addFilter(_not_an_echo)

  def filtered(previous, error_of):
    def hook(*args):
      if not _is_echo(error_of(*args)):
        previous(*args)
    hook.drops_orbax_echoes = True
    return hook
  sys.unraisablehook = filtered(sys.unraisablehook, lambda unraisable: unraisable.exc_value)
  threading.excepthook = filtered(threading.excepthook, lambda args: args.exc_value)
  sys.excepthook = filtered(sys.excepthook, lambda kind, value, tb: value)


@contextlib.contextmanager
def _reading(step_dir, what):
  """Any error in the block -> a CheckpointError naming `step_dir` and `what` (one line).

  Unreadable or undecodable data (a ValueError at the root, which is what tensorstore,
  json and utf-8 decoding raise) is a CorruptCheckpointError; anything else (permissions,
  memory) is a plain CheckpointError, never a reason to skip the step. The echo filters
  go in before the read: a failed read's siblings can echo before its error reaches here.
  """
  _drop_echoes()
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # orbax raises bare Exceptions
    root, text = _root_cause(e)
    cls = CorruptCheckpointError if isinstance(root, ValueError) else CheckpointError
    raise cls(f"checkpoint {step_dir}: {what} cannot be read ({text}).") from e


def _read_meta(step_dir):
  """The checkpoint's `meta` JSON, after checking `_CHECKPOINT_METADATA` parses too."""
  step_dir = pathlib.Path(step_dir)
  with _reading(step_dir, "_CHECKPOINT_METADATA"):
    if not isinstance(json.loads((step_dir / "_CHECKPOINT_METADATA").read_text()), dict):
      raise ValueError("not a JSON object")
  with _reading(step_dir, "meta"):
    meta = ocp.JsonCheckpointHandler().restore(step_dir / "meta", ocp.args.JsonRestore())
    if not isinstance(meta, dict) or meta.get("step") != int(step_dir.name):
      raise ValueError(f"not the meta of step {step_dir.name}: {str(meta)[:80]}")
  return meta


def _stored_arrays(step_dir):
  """{path: orbax ArrayMetadata (shape, dtype)} of the saved state."""
  with (_reading(step_dir, "state metadata (state/_METADATA)"),
        contextlib.closing(ocp.StandardCheckpointHandler()) as handler):
    return _flatten(handler.metadata(pathlib.Path(step_dir) / "state").tree)


def _check_fits(step_dir, stored, abstract_state):
  """A CheckpointError naming the first array (params first) whose shape differs."""
  wanted = _flatten(abstract_state)
  for path in sorted(wanted.keys() | stored.keys(), key=_params_first):
    if path not in stored:
      raise CheckpointError(f"checkpoint {step_dir} does not fit this run: it has no {path} "
                            f"(shape {tuple(wanted[path].shape)} here; another model or config?).")
    if path not in wanted:
      raise CheckpointError(f"checkpoint {step_dir} does not fit this run: it has {path} "
                            f"(shape {tuple(stored[path].shape)}), which this run has not "
                            f"(another model or config?).")
    if tuple(stored[path].shape) != tuple(wanted[path].shape):
      raise CheckpointError(
          f"checkpoint {step_dir} does not fit this run: {path} has shape "
          f"{tuple(stored[path].shape)} there but {tuple(wanted[path].shape)} here "
          f"(another model variant or config?).")


def _verify(step_dir, state, meta, stored):
  """The restored arrays against the checksums saved in `meta` (same dtype only)."""
  saved = meta.get("checksums") or {}
  flat = {k: x for k, x in _flatten(state).items()
          if k in saved and k in stored and jnp.dtype(x.dtype) == jnp.dtype(stored[k].dtype)}
  bad = [k for k, v in _checksums(flat).items() if v != saved[k]]
  if bad:
    raise CorruptCheckpointError(
        f"checkpoint {step_dir}: {len(bad)} state array(s) differ from what was saved "
        f"(checksum mismatch, first {min(bad, key=_params_first)}): a corrupt file under "
        f"{step_dir}/state.")


def _newest_readable(folder, steps, read):
  """(step, read(step), [(skipped step, error)]) for the newest step whose read works.

  Only corrupt steps are skipped; none readable is a CheckpointError naming them all.
  """
  skipped = []
  for step in sorted(steps, reverse=True):
    try:
      return step, read(step), skipped
    except CorruptCheckpointError as e:
      skipped.append((step, e))
  raise CheckpointError(f"no checkpoint under {folder} can be restored (steps "
                        f"{', '.join(str(s) for s, _ in skipped)}): "
                        + " ".join(str(e) for _, e in skipped))


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
    self._sync("bvcxr_checkpointer_init")  # the others look at the directory once it is tidied
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    self._metrics = {}  # step -> metric value, for the steps still on disk

  @staticmethod
  def _sync(key):
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(key)

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

  def _set_aside_corrupt(self, step):
    """Moves step to `corrupt-{step}` (kept for inspection, never restored); -> its new path."""
    target, n = self.directory / f"corrupt-{step}", 1
    while target.exists():
      target, n = self.directory / f"corrupt-{step}-{n}", n + 1
    if jax.process_index() == 0:
      os.replace(self.directory / str(step), target)
    self._sync(f"bvcxr_set_aside_{step}")
    self._manager.reload()
    self._metrics.pop(step, None)
    return target

  def complete_steps(self):
    self._manager.reload()
    return sorted(s for s in self._manager.all_steps() if is_complete(self.directory / str(s)))

  def latest_step(self):
    steps = self.complete_steps()
    return steps[-1] if steps else None

  def save(self, step, state, *, input_state=None, metrics=None):
    """Starts writing checkpoint `step` (async); the previous write is finished first."""
    self._manager.wait_until_finished()
    meta = {"step": int(step), "input_state": input_state, "metrics": dict(metrics or {}),
            "checksums": _checksums(_flatten(state))}
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

  def _restore(self, step, abstract_state):
    step_dir = self.directory / str(step)
    if not is_complete(step_dir):
      raise CheckpointError(f"checkpoint {step_dir} is missing or incomplete.")
    meta = _read_meta(step_dir)
    stored = _stored_arrays(step_dir)
    _check_fits(step_dir, stored, abstract_state)
    with _reading(step_dir, "state"):
      state = self._manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"]
    _verify(step_dir, state, meta, stored)
    return state, meta

  def _rank_all(self):
    """Reads the best_metric of every step on disk; an unreadable meta is set aside."""
    if not self.best_metric:
      return
    for s in self.complete_steps():
      if s not in self._metrics:
        try:
          metrics = _read_meta(self.directory / str(s)).get("metrics") or {}
        except CorruptCheckpointError as e:
          logging.warning("%s Moved to %s, never restored.", e, self._set_aside_corrupt(s))
          continue
        if self.best_metric in metrics:
          self._metrics[s] = float(metrics[self.best_metric])

  def restore(self, step, abstract_state):
    """Returns (state, meta) of `step`, laid out like `abstract_state` (with shardings)."""
    state, meta = self._restore(step, abstract_state)
    self._rank_all()
    return state, meta

  def restore_latest(self, abstract_state):
    """(step, state, meta) of the newest checkpoint that restores; None when there is none.

    Newer corrupt ones are moved to `corrupt-{step}` with a warning naming them; when
    none restores, a CheckpointError names them all (and nothing is moved).
    """
    steps = self.complete_steps()
    if not steps:
      return None
    step, (state, meta), skipped = _newest_readable(
        self.directory, steps, lambda s: self._restore(s, abstract_state))
    for bad, e in skipped:
      logging.warning("Skipping checkpoint step %d: %s Resuming from step %d instead; step %d "
                      "is kept as %s.", bad, e, step, bad, self._set_aside_corrupt(bad))
    self._rank_all()
    return step, state, meta

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _read_params(step_dir):
  """(params, step) of one complete step folder, checked against its checksums."""
  if not is_complete(step_dir):
    raise CheckpointError(f"checkpoint {step_dir} is missing or incomplete.")
  meta = _read_meta(step_dir)
  stored = _stored_arrays(step_dir)
  with _reading(step_dir, "state"), contextlib.closing(ocp.StandardCheckpointHandler()) as h:
    state = h.restore(step_dir.absolute() / "state")
  if "params" not in state:
    raise CheckpointError(f"{step_dir}: the saved state has no 'params' (keys: {sorted(state)}).")
  _verify(step_dir, state, meta, stored)
  return state["params"], int(step_dir.name)


def restore_params(workdir, step=None):
  """The params of a checkpoint (workdir, or workdir/checkpoints/STEP) -> (params, step).

  Without a step: the newest complete one that restores (a corrupt newer one is skipped
  with a warning). Read-only: unlike `Checkpointer` it never moves, cleans or creates
  anything, so it is safe on the workdir of a running training.
  """
  path = pathlib.Path(workdir)
  if path.name.isdigit() and is_complete(path):
    return _read_params(path)
  folder = path / "checkpoints"
  if step is not None:
    return _read_params(folder / str(int(step)))
  steps = [int(p.name) for p in folder.iterdir() if is_complete(p)] if folder.is_dir() else []
  if not steps:
    raise CheckpointError(f"{workdir}: no complete checkpoint under {folder}.")
  step, (params, _), skipped = _newest_readable(
      folder, steps, lambda s: _read_params(folder / str(s)))
  for bad, e in skipped:
    logging.warning("Skipping checkpoint step %d: %s Using step %d instead.", bad, e, step)
  return params, step
