"""bench/gpu_check.sh --variant tiny --quick on CPU: every phase runs and reports sane numbers.

~70 s on the shared 2-core machine at load 2-4, ~165 s at load 7 (~105 s of CPU time):
over pytest.ini's 30 s, so marked slow.
"""
import json
import math
import os
import subprocess
import sys

import pytest

import _trainer_testlib as lib


@pytest.mark.slow
def test_tiny_dry_run_reports_training_mfu_and_decoding_against_hf(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path), PYTHON=sys.executable,
             WHEELS=str(tmp_path / "no_wheels"))
  run = subprocess.run(["bash", "bench/gpu_check.sh", "--variant", "tiny", "--quick"],
                       cwd=lib.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "GPU check (tiny on cpu)" in run.stdout
  assert (tmp_path / "gpu_check.log").read_text() == run.stdout
  out = json.loads((tmp_path / "gpu_check.json").read_text())
  assert out["errors"] == {}, out["errors"]
  assert out["matmul"]["peak"] == max(out["matmul"]["before"], out["matmul"]["after"]) > 0
  train = out["train"]
  assert train["examples_s"] > 0 and train["gflop_per_example"] > 0
  assert math.isfinite(train["mfu"]) and 0 < train["mfu"] <= 1.5, train
  assert math.isfinite(train["loss"])
  # Decoding in float32 on CPU: ours and HF agree token for token on the same weights.
  assert out["hf"]["dtype"] == "float32" and out["hf"]["cache"] == "static"
  assert sorted(r["batch"] for r in out["decode"]) == [1, 2, 4]
  for row in out["decode"]:
    assert row["agree"] == 1.0, row
    for side in ("ours", "hf"):
      assert row[f"prefill_ms_{side}"] > 0 and row[f"gen_tok_s_{side}"] > 0, row
      # The tiny model's decode steps can be below timer noise: then None, never <= 0.
      assert row[f"decode_tok_s_{side}"] is None or row[f"decode_tok_s_{side}"] > 0, row
  assert set(out["targets"]) == {"train_mfu>=0.4", "decode_b8_vs_hf>=2.0"}
