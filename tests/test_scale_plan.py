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
