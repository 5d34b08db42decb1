"""Atomic checkpoints: keep last K + best, incomplete ones never restored, SIGKILL + resume."""
import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _trainer_testlib as lib
from big_vision_cxr import checkpointing


def _state(v):
  return {"step": jnp.asarray(v, jnp.int32), "params": {"w": jnp.full((3, 4), float(v))}}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def test_keeps_last_k_and_best_and_restores_iterator_state(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, keep_last=2, best_metric="acc")
  accs = {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.4, 5: 0.3}
  for step, acc in accs.items():
    ckpt.save(step, _state(step), input_state={"index": step * 10}, metrics={"acc": acc})
  ckpt.wait()
  assert ckpt.complete_steps() == [2, 4, 5]  # best (2) + last two
  assert ckpt.best_step() == 2
  state, meta = ckpt.restore(5, _abstract())
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 4), 5.0))
  assert meta["input_state"] == {"index": 50} and meta["metrics"] == {"acc": 0.3}
  ckpt.close()
  # A new Checkpointer (a restarted run) recovers the best from the checkpoints' metadata.
  again = checkpointing.Checkpointer(tmp_path, keep_last=2, best_metric="acc")
  again.restore(again.latest_step(), _abstract())
  assert again.best_step() == 2
  again.close()


def test_half_written_checkpoints_are_never_picked(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, keep_last=3)
  for step in (1, 2):
    ckpt.save(step, _state(step), input_state={"index": step})
  ckpt.close()
  root = tmp_path / "checkpoints"
  # A write cut off before orbax's rename: a leftover tmp dir for a later step.
  shutil.copytree(root / "2", root / "7.orbax-checkpoint-tmp-1234")
  # A step dir copied without its metadata / items (no atomic rename on this filesystem).
  (root / "9" / "state").mkdir(parents=True)
  ckpt = checkpointing.Checkpointer(tmp_path, keep_last=3)
  assert ckpt.latest_step() == 2
  assert not (root / "7.orbax-checkpoint-tmp-1234").exists()
  assert (root / "incomplete-9").is_dir() and not (root / "9").exists()
  with pytest.raises(checkpointing.CheckpointError, match="missing or incomplete"):
    ckpt.restore(9, _abstract())
  ckpt.close()


def test_meta_holds_checksums_and_a_checkpoint_without_them_still_restores(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, _state(1))
  meta_file = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  assert sorted(meta["checksums"]) == ["params/w", "step"]
  del meta["checksums"]  # as written before checksums were stored
  meta_file.write_text(json.dumps(meta))
  state, _ = ckpt.restore(1, _abstract())
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 4), 1.0))
  ckpt.close()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
  steps, kill_after = 16, 8
  config = lib.tiny_config(total_steps=steps, ckpt_steps=4, keep_ckpts=2)
  ref = lib.subprocess_train([dict(config=config, workdir=tmp_path / "ref")])
  assert ref.returncode == 0, ref.stderr[-3000:]

  workdir = tmp_path / "killed"
  proc = lib.subprocess_train([dict(config=config, workdir=workdir)], delay_s=0.4,
                              background=True)
  ckpt_dir = workdir / "checkpoints" / str(kill_after)
  deadline = time.time() + 300
  while not checkpointing.is_complete(ckpt_dir):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "checkpoint never completed"
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  first = lib.read_losses(workdir)
  assert kill_after <= max(first) < steps, "the run finished before the kill; slow it down"
  n_before = len((workdir / "metrics.jsonl").read_text().splitlines())  # killed: no wall_s row
  resumed = lib.subprocess_train([dict(config=config, workdir=workdir)])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  losses, ref_losses = lib.read_losses(workdir), lib.read_losses(tmp_path / "ref")
  assert sorted(losses) == list(range(1, steps + 1))
  # Steps after the restored checkpoint were recomputed from it and equal the reference.
  resumed_steps = range(kill_after + 1, steps + 1)
  np.testing.assert_array_equal([losses[s] for s in resumed_steps],
                                [ref_losses[s] for s in resumed_steps])
  # The restarted run began right after checkpoint `kill_after`, not from scratch.
  rows = (workdir / "metrics.jsonl").read_text().splitlines()[n_before:]
  assert [json.loads(r)["step"] for r in rows if "loss" in r] == list(resumed_steps)
