"""What training writes as it goes: metrics.jsonl, TensorBoard, and progress a person can follow.

`MetricWriter` appends one JSON object per line to `{workdir}/metrics.jsonl` and
the same scalars to TensorBoard. On a resume it first drops the rows written
after the restored step, so a crash never leaves duplicate rows.

`Progress` is a tqdm bar on a terminal; otherwise (a log file) one plain line
per log interval: step/total, loss, per-task losses, examples/s and ETA.
"""
import json
import logging
import os
import pathlib
import re
import sys

import jax
import numpy as np

from big_vision_cxr import atomic

_TB_NAME = re.compile(r"[^A-Za-z0-9_./-]")


_NOISY = ("absl", "orbax", "jax", "tensorflow", "tensorboardX", "etils", "matplotlib", "PIL")


def setup_logging(verbose=False):
  """INFO lines with timestamps; the libraries' own INFO chatter (orbax and absl records,
  TF's banners) only when `verbose`."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  for name in _NOISY:
    logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  except ImportError:
    pass


class MetricWriter:
  """metrics.jsonl (one JSON object per line) + TensorBoard event files in the workdir."""

  def __init__(self, workdir, *, resume_step=None, enabled=True):
    self.enabled = enabled and jax.process_index() == 0
    self._file = self._tb = None
    if not self.enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    _truncate(path, -1 if resume_step is None else resume_step)
    self._file = open(path, "a", encoding="utf-8")
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(str(workdir / "tb"), purge_step=(
          None if resume_step is None else resume_step + 1))
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
          self._tb.add_scalar(_TB_NAME.sub("_", k), v, step)

  def close(self):
    if self._file:
      self._file.close()
    if self._tb:
      self._tb.close()


def _truncate(path, last_step):
  """Keeps the rows of `path` up to `last_step` (all rows go when last_step < 0)."""
  if not path.is_file():
    return
  keep = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      if int(json.loads(line)["step"]) <= last_step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      continue
  atomic.write_text(path, "".join(f"{line}\n" for line in keep))


def _jsonable(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def _duration(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """A tqdm bar on a terminal, else one plain line per `log()` call on stderr."""

  def __init__(self, start, total, stream=None):
    self.total, self.stream = total, stream or sys.stderr
    self._bar = None
    if self.stream.isatty():
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                            file=self.stream)

  def update(self, n=1):
    if self._bar:
      self._bar.update(n)

  def log(self, step, row):
    """Shows a log row (loss, loss/<task>, examples_per_s, eta_s) at `step`."""
    if self._bar:
      self._bar.set_postfix(loss=f"{row['loss']:.4f}")
      return
    tasks = " ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in row.items()
                     if k.startswith("loss/"))
    print(f"step {step}/{self.total}  loss {row['loss']:.4f}  [{tasks}]  "
          f"{row['examples_per_s']:.1f} ex/s  ETA {_duration(row['eta_s'])}",
          file=self.stream, flush=True)

  def close(self):
    if self._bar:
      self._bar.close()
