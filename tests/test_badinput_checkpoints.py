"""Corrupt or mismatched checkpoints: one line naming the step, resume and predict fall back."""
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _trainer_testlib as lib
from big_vision_cxr import checkpointing
from big_vision_cxr import predict
from big_vision_cxr import train
from big_vision_cxr.data import phantom
from big_vision_cxr.models import paligemma

CORRUPTIONS = ("truncated_data", "flipped_data", "garbage_state_metadata",
               "garbage_checkpoint_metadata", "garbage_meta")


def corrupt(step_dir, how):
  """Damages a saved step folder the way a failing disk or a bad copy would."""
  data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  path = {"truncated_data": data, "flipped_data": data,
          "garbage_state_metadata": step_dir / "state" / "_METADATA",
          "garbage_checkpoint_metadata": step_dir / "_CHECKPOINT_METADATA",
          "garbage_meta": step_dir / "meta" / "metadata"}[how]
  blob = bytearray(path.read_bytes())
  if how == "truncated_data":
    blob = blob[:len(blob) // 2]
  elif how == "flipped_data":  # a few bits: one alone may fall where it changes no value
    for k in range(1, 8):
      blob[len(blob) * k // 8] ^= 0x04
  else:
    blob = bytearray(b"\x00garbage\xff{")
  path.write_bytes(bytes(blob))


def _state(v):
  return {"step": jnp.asarray(v, jnp.int32),
          "params": {"w": jax.random.normal(jax.random.key(v), (64, 96)), "b": jnp.full((8,), v)}}


def _abstract(state=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state or _state(0))


def _two_steps(workdir, accs=(0.9, 0.1)):
  ckpt = checkpointing.Checkpointer(workdir, keep_last=3, best_metric="acc", async_save=False)
  for step, acc in zip((1, 2), accs):
    ckpt.save(step, _state(step), input_state={"index": step}, metrics={"acc": acc})
  ckpt.close()
  return workdir / "checkpoints"


# ------------------------------------------------------------ checkpointing

@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_newest_step_is_named_and_the_intact_one_used(tmp_path, caplog, how):
  root = _two_steps(tmp_path)
  corrupt(root / "2", how)
  with pytest.raises(checkpointing.CorruptCheckpointError) as e:
    checkpointing.restore_params(tmp_path, step=2)
  assert str(root / "2") in str(e.value) and "\n" not in str(e.value)
  with caplog.at_level(logging.WARNING):
    params, step = checkpointing.restore_params(tmp_path)  # read-only: moves nothing
  assert step == 1 and (root / "2").is_dir()
  np.testing.assert_array_equal(params["w"], _state(1)["params"]["w"])
  assert any("step 2" in r.getMessage() and str(root / "2") in r.getMessage()
             for r in caplog.records if r.levelno == logging.WARNING)
  caplog.clear()
  ckpt = checkpointing.Checkpointer(tmp_path, keep_last=3, best_metric="acc")
  with pytest.raises(checkpointing.CorruptCheckpointError, match=str(root / "2")):
    ckpt.restore(2, _abstract())
  with caplog.at_level(logging.WARNING):
    step, state, meta = ckpt.restore_latest(_abstract())
  assert step == 1 and meta["input_state"] == {"index": 1}
  np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert "Skipping checkpoint step 2" in warning and "Resuming from step 1" in warning
  # Kept for inspection, out of the way of the run's next save of step 2.
  assert ckpt.complete_steps() == [1] and (root / "corrupt-2").is_dir()
  ckpt.save(2, _state(2), metrics={"acc": 0.5})
  ckpt.close()
  assert checkpointing.restore_params(tmp_path)[1] == 2


def test_no_restorable_step_is_an_error_naming_them_and_nothing_moves(tmp_path):
  root = _two_steps(tmp_path)
  corrupt(root / "1", "truncated_data")
  corrupt(root / "2", "garbage_meta")
  ckpt = checkpointing.Checkpointer(tmp_path)
  with pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.restore_latest(_abstract())
  ckpt.close()
  assert "no checkpoint under" in str(e.value) and "steps 2, 1" in str(e.value)
  assert str(root / "1") in str(e.value) and str(root / "2") in str(e.value)
  assert sorted(p.name for p in root.iterdir()) == ["1", "2"]
  with pytest.raises(checkpointing.CheckpointError, match="steps 2, 1"):
    checkpointing.restore_params(tmp_path)


def test_older_step_with_unreadable_meta_is_set_aside_not_ranked_or_pruned(tmp_path, caplog):
  root = _two_steps(tmp_path)  # step 1 is the best by acc
  corrupt(root / "1", "garbage_meta")
  ckpt = checkpointing.Checkpointer(tmp_path, keep_last=1, best_metric="acc")
  with caplog.at_level(logging.WARNING):
    assert ckpt.restore_latest(_abstract())[0] == 2
  assert any(str(root / "1") in r.getMessage() for r in caplog.records)
  assert ckpt.best_step() == 2 and (root / "corrupt-1").is_dir()
  ckpt.close()


def test_other_shapes_are_one_error_naming_the_parameter_and_both_shapes(tmp_path):
  _two_steps(tmp_path)
  other = _abstract(dict(_state(0), params={"w": jnp.zeros((64, 80)), "b": jnp.zeros((8,))}))
  ckpt = checkpointing.Checkpointer(tmp_path)
  with pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.restore_latest(other)
  assert not isinstance(e.value, checkpointing.CorruptCheckpointError)  # not skipped
  assert ("params/w has shape (64, 96) there but (64, 80) here" in str(e.value)
          and str(tmp_path / "checkpoints" / "2") in str(e.value))
  more = _abstract(dict(_state(0), params={**_state(0)["params"], "lora": jnp.zeros((2,))}))
  with pytest.raises(checkpointing.CheckpointError, match="it has no params/lora"):
    ckpt.restore(1, more)
  ckpt.close()


# ------------------------------------------------------------------ train

def _use_stand_in_batches(monkeypatch):
  for name in ("make_tokenizer", "make_seg_codec", "make_train_iter"):
    monkeypatch.setattr(train, name, getattr(train, name))  # put back after the test
  lib.use_stand_in_batches(train)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """8 tiny steps with checkpoints at 4 and 8: (workdir, {step: loss})."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  with pytest.MonkeyPatch.context() as mp:
    _use_stand_in_batches(mp)
    train.train(lib.tiny_config(total_steps=8, ckpt_steps=4, keep_ckpts=2), workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]
  return workdir, lib.read_losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_newest_checkpoint_resume_continues_from_the_older_one(
    uninterrupted, tmp_path, monkeypatch, caplog, how):
  ref_dir, ref_losses = uninterrupted
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  corrupt(workdir / "checkpoints" / "8", how)
  metrics = workdir / "metrics.jsonl"  # rows 5..8 can only come from the resumed run
  metrics.write_text("".join(f"{l}\n" for l in metrics.read_text().splitlines()
                             if json.loads(l).get("step", 0) <= 4))
  _use_stand_in_batches(monkeypatch)
  with caplog.at_level(logging.WARNING):
    summary = train.train(lib.tiny_config(total_steps=8, ckpt_steps=4, keep_ckpts=2), workdir)
  assert summary["step"] == 8
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("Skipping checkpoint step 8" in w and str(workdir / "checkpoints" / "8") in w
             and "Resuming from step 4" in w for w in warnings), warnings
  rows = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
  losses = lib.read_losses(workdir)
  np.testing.assert_array_equal([losses[s] for s in range(5, 9)],
                                [ref_losses[s] for s in range(5, 9)])
  root = workdir / "checkpoints"
  assert (root / "corrupt-8").is_dir() and checkpointing.restore_params(workdir)[1] == 8


_SMALL_CONFIG = """
import importlib.util
_spec = importlib.util.spec_from_file_location("cxr_mix", {mix!r})
_mix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mix)


def get_config(arg=None):
  c = _mix.get_config("demo,task=diagnosis")
  c.model.img = dict(image_size=32, patch_size=8, width=24, depth=1, mlp_dim=32, num_heads=2)
  c.model.llm = dict(width=32, depth=1, mlp_dim=48, num_heads=2, head_dim=16)
  c.model_init = ""
  c.input.datasets = {{"phantom": dict(source="phantom", n=16, size=64, seed=0)}}
  c.input.pp_image = "decode|resize(32)|value_range(-1, 1)"
  c.input.batch_size = 4
  c.total_steps, c.ckpt_steps, c.log_training_steps = 1, 0, 1
  c.evals = {{}}
  return c
"""


@pytest.mark.slow
def test_resume_with_other_shapes_is_one_error_line_without_event_loop_noise(tmp_path):
  config = tmp_path / "small.py"
  config.write_text(_SMALL_CONFIG.format(mix=str(lib.REPO / "configs" / "cxr_mix.py")))
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "big_vision_cxr.train", "--config", str(config),
         "--workdir", str(tmp_path / "wd")]
  first = subprocess.run(cmd, cwd=lib.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  out = subprocess.run(cmd + ["--config.model.llm.mlp_dim=64", "--config.total_steps=2"],
                       cwd=lib.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr[-3000:]
  assert str(tmp_path / "wd" / "checkpoints" / "1") in errors[0]
  assert ("params/llm/layers/mlp/gating_einsum has shape (1, 2, 32, 48) there but (1, 2, 32, 64) "
          "here" in errors[0]), errors[0]
  assert "Event loop is closed" not in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  """Random `demo` PaliGemma params checkpointed at steps 4 and 8, and one input image."""
  folder = tmp_path_factory.mktemp("predict")
  rng = np.random.default_rng(0)
  shapes = paligemma.param_shapes(paligemma.get_config("demo"))
  ckpt = checkpointing.Checkpointer(folder / "workdir", async_save=False)
  for step in (4, 8):
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.02).astype(s.dtype), shapes)
    ckpt.save(step, {"step": np.int32(step), "params": params})
  ckpt.close()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(phantom.generate(3, size=64).image).save(folder / "x.png")
  return folder


def _predict_argv(workdir, image, out, *extra):
  return ["--checkpoint", str(workdir), "--model_variant", "demo", "--input", str(image),
          "--out", str(out), "--tasks", "diagnosis", "--max_decode_len", "8", "--no_overlay",
          "--no_progress", *extra]


def test_predict_corrupt_step_is_one_error_line_naming_it(demo_workdir, tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(demo_workdir / "workdir", workdir)
  corrupt(workdir / "checkpoints" / "8", "truncated_data")
  corrupt(workdir / "checkpoints" / "4", "flipped_data")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  for extra, named in [(["--step", "8"], [workdir / "checkpoints" / "8"]),
                       ([], [workdir / "checkpoints" / "8", workdir / "checkpoints" / "4"])]:
    out = subprocess.run(
        [sys.executable, "-m", "big_vision_cxr.predict",
         *_predict_argv(workdir, demo_workdir / "x.png", tmp_path / "out", *extra)],
        cwd=lib.REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert all(str(p) in lines[0] for p in named), lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_predict_without_step_falls_back_to_the_newest_intact_step(demo_workdir, tmp_path, caplog):
  workdir = tmp_path / "workdir"
  shutil.copytree(demo_workdir / "workdir", workdir)
  corrupt(workdir / "checkpoints" / "8", "flipped_data")
  with caplog.at_level(logging.WARNING):
    assert predict.main(_predict_argv(workdir, demo_workdir / "x.png", tmp_path / "out")) == 0
  assert any("Skipping checkpoint step 8" in r.getMessage() and "Using step 4" in r.getMessage()
             for r in caplog.records)
  assert json.loads((tmp_path / "out" / "x.json").read_text())["model"]["step"] == 4
  assert (workdir / "checkpoints" / "8").is_dir()  # predict is read-only


ECHO_PROBE = """
import asyncio, gc, logging, sys, threading
from big_vision_cxr import checkpointing
logging.basicConfig()
loop = asyncio.new_event_loop()
echo = RuntimeError("Event loop is closed")
with checkpointing._reading("step", "state"):  # Echoes can come before the read's own error.
  for text in ['OUT_OF_RANGE: Error reading "a" in OCDBT database', "a real future error"]:
    future = loop.create_future()  # Garbage-collected with its error unread: asyncio logs it.
    future.set_exception(ValueError(text))
    del future
    gc.collect()
  sys.excepthook(RuntimeError, echo, None)  # What a native callback's PyErr_Print calls.
  thread = threading.Thread(target=lambda: (_ for _ in ()).throw(echo))
  thread.start(); thread.join()
  sys.unraisablehook(type("U", (), dict(exc_value=echo, exc_type=RuntimeError,
                                        exc_traceback=None, err_msg=None, object=None))())
  sys.excepthook(ValueError, ValueError("a real error"), None)
"""


def test_echoes_of_a_failed_read_are_dropped_from_every_hook_and_nothing_else():
  """From the start of an orbax read, the echoes of its failure ("Event loop is closed"
  from tensorstore's callbacks, in whichever hook they surface, and the unread errors of
  its other reads) print nothing, even before the failure itself is raised; other errors
  still print."""
  out = subprocess.run([sys.executable, "-c", ECHO_PROBE], cwd=lib.REPO, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr
  assert "Event loop is closed" not in out.stderr, out.stderr
  assert "Error reading" not in out.stderr, out.stderr
  assert "ValueError: a real error" in out.stderr
  assert "ValueError: a real future error" in out.stderr
