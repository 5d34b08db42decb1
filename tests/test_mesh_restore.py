"""A checkpoint saved from an 8-device FSDP run restores onto 4 and 1 devices and trains on.

Each device count is its own python (XLA_FLAGS fixes it per process). The 8-device run
trains 6 steps with a checkpoint at step 3; a copy of that checkpoint alone is resumed on
4 and on 1 device: the restored arrays (laid out by the new mesh's FSDP shardings) equal
the 8-device ones bit for bit, and steps 4-6 give the uninterrupted run's losses.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import _trainer_testlib as lib

STEPS, CKPT_STEP = 6, 3
_FSDP = [(".*", "fsdp(axis='data', min_size_to_shard_mb=0)")]

_RUNNER = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
import ml_collections
import numpy as np
import _trainer_testlib as lib
from big_vision_cxr import checkpointing, sharding, train
from big_vision_cxr.models import common as model_common
spec = json.loads(sys.argv[1])
config = ml_collections.ConfigDict(spec["config"])
lib.use_stand_in_batches(train)
if spec["before"] == "train":
  train.train(config, spec["workdir"])

# The abstract state on this process's mesh, built as train.train builds it.
model = model_common.build_model(config)
mesh = sharding.create_mesh(config.mesh)
plan = train.state_plan(config, model, mesh, config.total_steps)
ckpt = checkpointing.Checkpointer(spec["workdir"], async_save=False)
state, _ = ckpt.restore(spec["step"], plan.abstract())
ckpt.close()
flat = {{}}
layout = {{}}
for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
  name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  flat[name] = np.asarray(jax.device_get(leaf))
  layout[name] = dict(ndev=len(leaf.sharding.device_set), shape=list(leaf.shape),
                      shard=list(leaf.addressable_shards[0].data.shape))
np.savez(spec["values"], **flat)
print("LAYOUT " + json.dumps(layout))
if spec["before"] == "restore":
  train.train(config, spec["workdir"])
"""


def _run(devices, config, workdir, values, before):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  spec = dict(config=config.to_dict(), workdir=str(workdir), step=CKPT_STEP,
              values=str(values), before=before)
  out = subprocess.run([sys.executable, "-c", _RUNNER.format(tests=str(lib.REPO / "tests")),
                        json.dumps(spec)], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  line, = [l for l in out.stdout.splitlines() if l.startswith("LAYOUT ")]
  return json.loads(line[len("LAYOUT "):])


@pytest.mark.slow
def test_fsdp_checkpoint_restores_onto_fewer_devices_and_trains_on(tmp_path):
  config = lib.tiny_config(total_steps=STEPS, ckpt_steps=CKPT_STEP, keep_ckpts=3,
                           mesh=[("data", -1)], sharding_strategy=_FSDP)
  ref_dir = tmp_path / "eight"
  layouts = {8: _run(8, config, ref_dir, tmp_path / "8.npz", before="train")}
  ref_losses = lib.read_losses(ref_dir)
  assert sorted(ref_losses) == list(range(1, STEPS + 1))

  for devices in (4, 1):
    workdir = tmp_path / f"on{devices}"
    shutil.copytree(ref_dir / "checkpoints" / str(CKPT_STEP),
                    workdir / "checkpoints" / str(CKPT_STEP))
    layouts[devices] = _run(devices, config, workdir, tmp_path / f"{devices}.npz",
                            before="restore")
    # Identical values, whatever the layout.
    with np.load(tmp_path / "8.npz") as ref, np.load(tmp_path / f"{devices}.npz") as got:
      assert sorted(ref.files) == sorted(got.files)
      for name in ref.files:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    # Training continues where the 8-device run went on: steps 4..6, the same losses.
    losses = lib.read_losses(workdir)
    assert sorted(losses) == list(range(CKPT_STEP + 1, STEPS + 1)), losses
    for step in losses:
      np.testing.assert_allclose(losses[step], ref_losses[step], rtol=2e-5, atol=2e-5,
                                 err_msg=f"{devices} devices, step {step}")

  # The restored arrays really are laid out by each mesh: the embedding [2304, 32] is split
  # 8 / 4 ways along its rows, and whole on one device; so is Adam's first moment of it.
  emb = "params/llm/embedder/input_embedding"
  assert {d: (layouts[d][emb]["ndev"], layouts[d][emb]["shard"]) for d in layouts} == {
      8: (8, [288, 32]), 4: (4, [576, 32]), 1: (1, [2304, 32])}
  mu = [n for n in layouts[4] if n.startswith("opt/") and n.endswith(emb[len("params/"):])
        and "mu" in n]
  assert mu and layouts[4][mu[0]]["shard"] == [576, 32], mu
