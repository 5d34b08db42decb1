"""bench.checkpoint_bench: the trainer's checkpoints saved and restored over 8 devices."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import _trainer_testlib as lib


def test_restored_arrays_must_equal_the_saved_ones():
  from bench import checkpoint_bench  # pylint: disable=import-outside-toplevel
  saved = {"params": {"w": np.zeros((2, 3), np.float32)}, "step": np.int32(4)}
  assert checkpoint_bench._assert_equal(saved, saved, "same") == 2
  with pytest.raises(AssertionError, match=r"restored \['params'\]\['w'\] differs"):
    checkpoint_bench._assert_equal(saved, {"params": {"w": np.ones((2, 3), np.float32)},
                                           "step": np.int32(4)}, "other")
  with pytest.raises(AssertionError, match="differs"):  # same values, another dtype
    checkpoint_bench._assert_equal(saved, {"params": {"w": np.zeros((2, 3), np.float16)},
                                           "step": np.int32(4)}, "dtype")


@pytest.mark.slow
def test_quick_bench_saves_restores_and_extrapolates(tmp_path):
  out = tmp_path / "ckpt.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  run = subprocess.run([sys.executable, "-m", "bench.checkpoint_bench", "--quick", "--json",
                        str(out)], cwd=lib.REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "save warm" in run.stdout and "pg2_10b_224" in run.stdout
  result = json.loads(out.read_text())
  assert {"rows", "extrapolation", "filesystem", "hardware", "notes"} <= set(result)
  assert result["variant"] == "demo" and result["jax_devices"].startswith("8 x ")
  assert result["leaves_verified"] == result["leaves"] > 10  # every array, restored equal
  ops = [r["op"] for r in result["rows"]]
  assert ops == ["save first", "save warm (median of 2)", "restore 8 devices",
                 "restore 1 device"], ops
  for row in result["rows"]:
    for key in ("state_mb", "disk_mb", "seconds", "disk_mb_s", "state_mb_s"):
      assert row[key] > 0, (key, row)
    assert row["peak_extra_rss_mb"] >= 0
    # Dense random values barely compress: the files hold about the state's bytes.
    assert 0.7 * row["state_mb"] < row["disk_mb"] < 1.2 * row["state_mb"], row
  extra = {r["variant"]: r for r in result["extrapolation"]}
  assert sorted(extra) == ["demo", "pg1_3b_224", "pg2_10b_224"]
  # f32 params plus Adam's two f32 moments of the trained LLM: more than 4, under 12 bytes
  # per parameter.
  for row in extra.values():
    assert 4 < row["state_gb"] * 1e3 / row["params_m"] < 12, row
  assert 2800 < extra["pg1_3b_224"]["params_m"] < 3000
  assert extra["pg2_10b_224"]["save_s"] > extra["pg1_3b_224"]["save_s"] > 0
