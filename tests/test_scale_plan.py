"""bench.scale_plan --quick: the real update step compiles on 1 and 8 simulated devices."""
import json
import os
import subprocess
import sys

import pytest

import _trainer_testlib as lib


@pytest.mark.slow
def test_quick_plan_is_positive_and_fsdp_shrinks_arguments(tmp_path):
  out = tmp_path / "plan.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  run = subprocess.run([sys.executable, "-m", "bench.scale_plan", "--quick", "--chips",
                        "--json", str(out)], cwd=lib.REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Scale plan" in run.stdout and "peak_gib" in run.stdout
  rows = {r["devices"]: r for r in json.loads(out.read_text())["rows"]}
  assert sorted(rows) == [1, 8], rows
  for row in rows.values():
    assert "error" not in row, row
    for key in ("args_gib", "out_gib", "temp_gib", "peak_gib", "gflop_per_example",
                "params_m", "trained_m"):
      assert row[key] > 0, (key, row)
    assert row["peak_gib"] < 0.9 * 141 and row["H200"].endswith(" s")
  # The FLOPs per example do not depend on the mesh, and undo XLA's once-per-loop count.
  assert rows[8]["gflop_per_example"] == rows[1]["gflop_per_example"]
  assert rows[1]["gflop_per_example"] * rows[1]["batch_per_device"] > rows[1]["xla_gflop_step"]
  # FSDP: the state is split 8 ways (the 257k-row embedding and its Adam moments dominate),
  # the replicated small tensors and the batch shard stay whole.
  assert rows[8]["args_gib"] < rows[1]["args_gib"] / 4, (rows[1]["args_gib"], rows[8]["args_gib"])
  assert rows[8]["alias_gib"] < rows[1]["alias_gib"] / 4



def _row(devices, batch, peak_gib):
  return dict(variant="v", recipe="paper", remat="on", dtype="bfloat16", params="float32",
              microbatches=1, devices=devices, batch_per_device=batch, peak_gib=peak_gib,
              gflop_per_example=1000.0)


def test_summary_takes_the_smallest_mesh_then_the_largest_batch_that_fits():
  from bench import scale_plan
  rows = [_row(1, 1, 30.0), _row(1, 4, 60.0), _row(8, 1, 5.0), _row(8, 4, 13.0),
          _row(8, 16, 40.0), dict(variant="v", devices=32, error="timed out")]
  (entry,) = scale_plan.summary(rows)
  # A chip fits a row when its peak is at most 90% of the chip's memory.
  step = 1000e9 * 4 / (scale_plan.MFU * 197e12)  # GFLOP/example x batch at 40% of 197 TFLOP/s
  assert entry["TPU v5e"] == f"8x b4 {step:.2g} s {8 * 4 / step:.0f} ex/s"  # 14.4 GiB
  assert entry["Colab T4"].startswith("8x b4 ")  # 13.5 GiB
  assert entry["TPU v4"].startswith("8x b4 ")  # 28.8 GiB: 30 GiB on one device does not fit
  assert entry["A100-40GB"].startswith("1x b1 ")  # 36 GiB
  assert entry["A100-80GB"].startswith("1x b4 ")  # 72 GiB
  assert scale_plan.verdicts(_row(1, 1, 127.0))["H200"] == "no"  # 126.9 GiB
  assert scale_plan.summary([_row(8, 1, 20.0)])[0]["TPU v5e"] == "no (<= 8 devices)"


def test_decoding_plan_holds_the_weights_and_a_cache_linear_in_the_batch():
  from bench import scale_plan
  one, four = (scale_plan.inference_row("demo", b, prompt_len=8, decode_len=16) for b in (1, 4))
  assert one["weights_gib"] == four["weights_gib"] > 0
  assert one["prepared_gib"] == four["prepared_gib"] >= one["weights_gib"]
  # keys and values [B, T, ...] per layer; a few scalars (the write position) do not scale
  assert four["kv_cache_gib"] == pytest.approx(4 * one["kv_cache_gib"], rel=1e-3)
  for row in (one, four):  # the prepared weights are the program's argument; the cache inside
    assert row["args_gib"] <= row["prepared_gib"] * 1.1
    assert row["temp_gib"] >= row["kv_cache_gib"]
    assert row["f32_temp_gib"] >= 2 * row["kv_cache_gib"]  # the f32 program's cache is f32
    assert row["peak_gib"] == (row["weights_gib"] + row["args_gib"] + row["out_gib"]
                               + row["temp_gib"])
    assert row["accel_peak_gib"] == (row["weights_gib"] + row["prepared_gib"] + row["out_gib"]
                                     + row["f32_temp_gib"])
  assert four["accel_peak_gib"] > one["accel_peak_gib"]
