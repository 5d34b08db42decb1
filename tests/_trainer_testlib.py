"""Helpers for the trainer tests: a tiny config, a seeded resumable batch source, subprocess runs.

The batch source stands in for the input pipeline where a test is about the training
machinery itself (sharding, resume, NaN guard): random tokens, deterministic per index,
so two runs see the same batches and a resumed run continues at the same one.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import ml_collections
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 2304  # the 'tiny' PaliGemma variant's vocabulary
TEXT_LEN = 8
RES = 32


def tiny_config(**overrides):
  config = dict(
      model_name="paligemma", model=dict(variant="tiny"),
      input=dict(batch_size=8, text_len=TEXT_LEN),
      total_steps=6, lr=3e-3, wd=1e-5, grad_clip_norm=1.0, seed=0,
      schedule=[("img/.*", None), ("llm/.*", dict(decay_type="cosine", warmup_steps=1))],
      log_training_steps=1, ckpt_steps=0, keep_ckpts=2)
  for key, value in overrides.items():
    if isinstance(value, dict) and isinstance(config.get(key), dict):
      config[key] = {**config[key], **value}
    else:
      config[key] = value
  return ml_collections.ConfigDict(config)


class StandInBatches:
  """Batch i is a function of (seed, i) only; get_state/set_state is the index."""

  def __init__(self, batch_size, seed, delay_s=0.0, nan_at=None):
    self.index, self.batch_size, self.seed = 0, batch_size, seed
    self.delay_s, self.nan_at = delay_s, nan_at

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.index])
    b, length = self.batch_size, TEXT_LEN + 1
    text = rng.integers(3, 40, (b, length)).astype(np.int32)  # a small vocabulary: learnable
    mask_ar = np.zeros((b, length), np.int32)
    mask_ar[:, 4:] = 1
    image = rng.uniform(-1, 1, (b, RES, RES, 3)).astype(np.float32)
    if self.nan_at is not None and self.index == self.nan_at:
      image[0, 0, 0, 0] = np.nan
    self.index += 1
    if self.delay_s:
      time.sleep(self.delay_s)
    return {"image": image, "text": text, "mask_ar": mask_ar, "mask_loss": mask_ar.copy(),
            "task_id": rng.integers(0, 5, (b,)).astype(np.int32)}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def use_stand_in_batches(train_module, delay_s=0.0, nan_at=None):
  """Points train.py at StandInBatches (and no tokenizer or VQ-VAE)."""
  train_module.make_tokenizer = lambda config: None
  train_module.make_seg_codec = lambda config: None
  train_module.make_train_iter = lambda config, tok, seg, *_, **__: StandInBatches(
      config.input.batch_size, config.seed, delay_s, nan_at)


def read_losses(workdir):
  """{step: loss} from metrics.jsonl; a step logged twice (after a resume) keeps the last."""
  out = {}
  path = pathlib.Path(workdir) / "metrics.jsonl"
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if "loss" in row:
      out[row["step"]] = row["loss"]
  return out


_RUNNER = """
import json, sys
sys.path.insert(0, {tests!r})
import ml_collections
import _trainer_testlib as lib
from big_vision_cxr import train
spec = json.loads(sys.argv[1])
lib.use_stand_in_batches(train, delay_s=spec.get("delay_s", 0.0))
for run in spec["runs"]:
  summary = train.train(ml_collections.ConfigDict(run["config"]), run["workdir"])
  if run.get("report_sharding"):
    import jax
    rows = {{}}
    for path, leaf in jax.tree_util.tree_flatten_with_path(summary["state"]["params"])[0]:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      rows[name] = dict(shape=list(leaf.shape), spec=str(leaf.sharding.spec),
                        shard=list(leaf.addressable_shards[0].data.shape),
                        ndev=len(leaf.sharding.device_set))
    print("SHARDING " + json.dumps(rows))
"""


def subprocess_train(runs, *, devices=1, delay_s=0.0, background=False, timeout=600):
  """Runs train.train for each (config, workdir) in a fresh python with `devices` CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  spec = json.dumps({"delay_s": delay_s, "runs": [
      dict(run, config=run["config"].to_dict() if hasattr(run["config"], "to_dict")
           else run["config"], workdir=str(run["workdir"])) for run in runs]})
  cmd = [sys.executable, "-c", _RUNNER.format(tests=str(REPO / "tests")), spec]
  if background:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
