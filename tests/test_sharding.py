"""Mesh and FSDP rules, and 8-device data-parallel / FSDP runs equal to one device."""
import json
import types

import numpy as np
import pytest

import _trainer_testlib as lib
from big_vision_cxr import sharding


def _fake_mesh(**axes):
  return types.SimpleNamespace(shape=dict(axes), size=int(np.prod(list(axes.values()))))


def test_fsdp_rule_shards_largest_divisible_dim_and_skips_small():
  mesh = _fake_mesh(data=8)
  # Largest dim 2048 divisible by 8 -> dim 1.
  assert tuple(sharding.fsdp_spec((18, 2048, 256), 4, mesh, min_size_to_shard_mb=0)) == (
      None, "data", None)
  # Largest dim 257 not divisible -> next largest (16).
  assert tuple(sharding.fsdp_spec((257, 16), 4, mesh, min_size_to_shard_mb=0)) == (None, "data")
  # Nothing divisible -> replicated.
  assert tuple(sharding.fsdp_spec((7, 3), 4, mesh, min_size_to_shard_mb=0)) == (None, None)
  # 4 MiB threshold (big_vision default): 1M f32 = exactly 4 MiB stays whole, 4 MiB + 1 row shards.
  assert tuple(sharding.fsdp_spec((1024, 1024), 4, mesh)) == (None, None)
  assert tuple(sharding.fsdp_spec((1032, 1024), 4, mesh)) == ("data", None)
  with pytest.raises(sharding.ShardingError, match="'fsdp' is not in the mesh"):
    sharding.fsdp_spec((64, 64), 4, mesh, axis="fsdp", min_size_to_shard_mb=0)


def test_mesh_and_fit_errors_name_the_problem():
  with pytest.raises(sharding.ShardingError, match=r"does not fit 1 devices"):
    sharding.create_mesh([("data", 2)])
  with pytest.raises(sharding.ShardingError, match="at most one axis may be -1"):
    sharding.create_mesh([("data", -1), ("fsdp", -1)])
  with pytest.raises(sharding.ShardingError, match=r"batch_size=12 is not divisible by the 8 devices"):
    sharding.check_batch_fits(12, _fake_mesh(data=8))
  with pytest.raises(sharding.ShardingError, match="microbatches=2"):
    sharding.check_batch_fits(8, _fake_mesh(data=8), microbatches=2)
  with pytest.raises(sharding.ShardingError, match="unknown sharding rule 'shard_all'"):
    sharding._spec_for("shard_all()", (8, 8), 4, _fake_mesh(data=8))


@pytest.mark.slow
def test_eight_devices_fsdp_and_data_parallel_match_one_device(tmp_path):
  steps = 20
  base = lib.tiny_config(total_steps=steps)
  one = lib.subprocess_train([dict(config=base, workdir=tmp_path / "one")], devices=1)
  assert one.returncode == 0, one.stderr[-3000:]
  dp = lib.tiny_config(total_steps=steps, mesh=[("data", -1)],
                       sharding_strategy=[(".*", "replicate")])
  fsdp = lib.tiny_config(total_steps=steps, mesh=[("data", 2), ("fsdp", 4)],
                         sharding_strategy=[(".*", "fsdp(axis='fsdp', min_size_to_shard_mb=0)")])
  eight = lib.subprocess_train([
      dict(config=dp, workdir=tmp_path / "dp", report_sharding=True),
      dict(config=fsdp, workdir=tmp_path / "fsdp", report_sharding=True)], devices=8)
  assert eight.returncode == 0, eight.stderr[-3000:]
  reports = [json.loads(line[len("SHARDING "):]) for line in eight.stdout.splitlines()
             if line.startswith("SHARDING ")]
  dp_report, fsdp_report = reports

  losses = {name: lib.read_losses(tmp_path / name) for name in ("one", "dp", "fsdp")}
  assert sorted(losses["one"]) == list(range(1, steps + 1))
  ref = np.array([losses["one"][s] for s in range(1, steps + 1)])
  assert ref[-1] < ref[0] - 0.1  # it trains
  for name in ("dp", "fsdp"):
    got = np.array([losses[name][s] for s in range(1, steps + 1)])
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5, err_msg=name)

  # Data parallel: every param whole on all 8 devices.
  for row in dp_report.values():
    assert row["shard"] == row["shape"] and row["ndev"] == 8
  # FSDP over the 4-way 'fsdp' axis: the embedding [2304, 32] is split along its largest
  # dim, a per-device shard really holds 2304 / 4 rows.
  emb = fsdp_report["llm/embedder/input_embedding"]
  assert emb["shape"] == [2304, 32] and emb["shard"] == [576, 32], emb
  sharded = [n for n, r in fsdp_report.items() if r["shard"] != r["shape"]]
  assert len(sharded) >= len(fsdp_report) // 2, sharded
