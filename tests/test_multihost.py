"""Multi-host training: 2 processes x 4 CPU devices on localhost through jax.distributed.

Each process is a fresh python (XLA_FLAGS before jax is imported) running the real
trainer with gloo CPU collectives. Compared with 1-process runs on 8 devices and on 1
device: the same losses, each process feeding only its own rows of the global batch,
checkpoints written once to the shared workdir, and a crash of both processes resumed
with the losses of the uninterrupted run.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import _trainer_testlib as lib

STEPS, CKPT_EVERY, CRASH_AT = 8, 2, 5  # both processes fail fetching batch 5 (step 6)
TIMEOUT_S = 240  # a hang (a lost peer, a barrier never met) fails instead of blocking CI
TOL = 2e-5  # tests/test_sharding.py's 8-device vs 1-device tolerance

_RUNNER = """
import json, sys
sys.path.insert(0, {tests!r})
import numpy as np
import jax
import ml_collections
import _trainer_testlib as lib
from big_vision_cxr import input_pipeline, sharding, train

spec = json.loads(sys.argv[1])
# jax < 0.5's default: no CPU collectives. The trainer must select gloo itself.
jax.config.update("jax_cpu_collectives_implementation", None)
report = {{"feeds": [], "shards": []}}


class HostRows:
  \"\"\"The input pipeline's per-host contract on stand-in batches: of each global batch
  (StandInBatches of batch_size * process_count rows), rows p, p + P, ... for process p.\"\"\"

  def __init__(self, batch_size, seed, process_index, process_count):
    self.whole = lib.StandInBatches(batch_size * process_count, seed)
    self.p, self.n = process_index, process_count

  def __iter__(self):
    return self

  def __next__(self):
    if self.whole.index == spec.get("crash_at"):
      raise RuntimeError(f"simulated host failure at batch {{self.whole.index}}")
    index = self.whole.index
    batch = {{k: v[self.p::self.n] for k, v in next(self.whole).items()}}
    report["feeds"].append(dict(index=index, text=batch["text"].tolist()))
    return batch

  def get_state(self):
    return self.whole.get_state()

  def set_state(self, state):
    self.whole.set_state(state)


def training(input_config, *, batch_size, seed, tokenizer, process_index=0, process_count=1,
             seg_codec=None, class_names=None, image_size=None):
  report["pipeline_args"] = dict(batch_size=batch_size, process_index=process_index,
                                 process_count=process_count)
  return HostRows(batch_size, seed, process_index, process_count)


make_global_batch = sharding.make_global_batch


def recording_global_batch(local_batch, mesh):
  out = make_global_batch(local_batch, mesh)
  text = out["text"]
  report["shards"].append(dict(
      global_shape=list(text.shape),
      rows=[[s.index[0].start, s.index[0].stop, np.asarray(s.data).tolist()]
            for s in text.addressable_shards]))
  return out


train.make_tokenizer = lambda config: None
train.make_seg_codec = lambda config: None
input_pipeline.training = training
sharding.make_global_batch = recording_global_batch
try:
  summary = train.train(ml_collections.ConfigDict(spec["config"]), spec["workdir"])
  report["step"] = summary["step"]
finally:
  report.update(process_index=jax.process_index(), process_count=jax.process_count(),
                devices=jax.device_count(), local_devices=jax.local_device_count())
  with open(spec["report"], "w") as f:
    json.dump(report, f)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _config(**kw):
  return lib.tiny_config(
      total_steps=STEPS, ckpt_steps=CKPT_EVERY, keep_ckpts=2, mesh=[("data", -1)],
      sharding_strategy=[(".*", "fsdp(axis='data', min_size_to_shard_mb=0)")], **kw)


def _start(name, workdir, tmp, *, processes, devices, crash_at=None):
  """Starts the trainer in `processes` processes of `devices` CPU devices each."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),  # the restart reuses the programs
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  procs, logs = [], []
  for p in range(processes):
    distributed = processes > 1 and dict(coordinator_address=f"localhost:{port}",
                                         num_processes=processes, process_id=p,
                                         initialization_timeout=60)
    spec = dict(config=_config(distributed=distributed).to_dict(), workdir=str(workdir),
                crash_at=crash_at, report=str(tmp / f"{name}.{p}.json"))
    log = open(tmp / f"{name}.{p}.log", "w")  # files, not pipes: a full pipe would block
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, "-c", _RUNNER.format(tests=str(lib.REPO / "tests")), json.dumps(spec)],
        env=env, stdout=log, stderr=subprocess.STDOUT))
  return name, procs, logs


def _finish(tmp, name, procs, logs):
  """Waits for the processes of _start -> (exit codes, reports, log tails)."""
  processes = len(procs)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    for log in logs:
      log.close()
  text = "\n".join(f"--- {name} process {p}:\n" + (tmp / f"{name}.{p}.log").read_text()[-3000:]
                   for p in range(processes))
  if codes is None:
    pytest.fail(f"{name}: no exit within {TIMEOUT_S} s (a hang)\n{text}")
  reports = [json.loads((tmp / f"{name}.{p}.json").read_text()) for p in range(processes)]
  return codes, reports, text


def _run(name, workdir, tmp, **kw):
  return _finish(tmp, *_start(name, workdir, tmp, **kw))


def _runs_of(workdir):
  """metrics.jsonl split into runs (a restart logs from its resume step on): [{step: loss}]."""
  runs, last = [], None
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" not in row:
      continue
    if last is None or row["step"] <= last:
      runs.append({})
    runs[-1][row["step"]] = row["loss"]
    last = row["step"]
  return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  out = {}
  started = [_start(name, tmp / name, tmp, processes=1, devices=devices)  # side by side
             for name, devices in (("one", 1), ("eight", 8))]
  for name, procs, logs in started:
    codes, reports, text = _finish(tmp, name, procs, logs)
    assert codes == [0], text
    out[name] = dict(reports=reports, losses=_runs_of(tmp / name))
  workdir = tmp / "two_hosts"
  codes, crashed, text = _run("crashed", workdir, tmp, processes=2, devices=4, crash_at=CRASH_AT)
  assert all(c != 0 for c in codes) and f"simulated host failure at batch {CRASH_AT}" in text, text
  ckpts_after_crash = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  (first,) = _runs_of(workdir)
  codes, resumed, text = _run("resumed", workdir, tmp, processes=2, devices=4)
  assert codes == [0, 0], text
  # The restart dropped the rows logged after its checkpoint, then logged them again.
  (whole,) = _runs_of(workdir)
  resume_step = resumed[0]["feeds"][0]["index"]
  second = {s: loss for s, loss in whole.items() if s > resume_step}
  out["two"] = dict(crashed=crashed, resumed=resumed, losses=(first, second), workdir=workdir,
                    ckpts_after_crash=ckpts_after_crash)
  return out


def _ref(runs):
  (one,), (eight,) = runs["one"]["losses"], runs["eight"]["losses"]
  assert sorted(one) == sorted(eight) == list(range(1, STEPS + 1))
  ref = np.array([one[s] for s in range(1, STEPS + 1)])
  np.testing.assert_allclose([eight[s] for s in range(1, STEPS + 1)], ref, rtol=TOL, atol=TOL)
  assert ref[-1] < ref[0] - 0.1  # it trains
  return ref


@pytest.mark.slow
def test_two_processes_train_like_one_process_on_8_devices_and_on_1(runs):
  ref = _ref(runs)
  for reports in (runs["two"]["crashed"], runs["two"]["resumed"]):
    assert [(r["process_index"], r["process_count"], r["devices"], r["local_devices"])
            for r in reports] == [(0, 2, 8, 4), (1, 2, 8, 4)]
  first, second = runs["two"]["losses"]  # before the crash, after the restart
  assert sorted(first) == list(range(1, CRASH_AT + 1))  # steps 1-5 ran, then the crash
  got = np.array([first[s] for s in sorted(first)])
  np.testing.assert_allclose(got, ref[:len(got)], rtol=TOL, atol=TOL)


@pytest.mark.slow
def test_each_process_feeds_only_its_half_of_the_global_batch(runs):
  for p, report in enumerate(runs["two"]["crashed"] + runs["two"]["resumed"]):
    p %= 2
    # What the trainer asked of the input pipeline: this host's slice of the global batch.
    assert report["pipeline_args"] == dict(batch_size=4, process_index=p, process_count=2)
    for feed, shards in zip(report["feeds"], report["shards"], strict=True):
      whole = _global_batch(feed["index"])["text"]
      assert feed["text"] == whole[p::2].tolist()  # rows p, p + 2, ...: half, disjoint
      # make_global_batch: an 8-row global array whose rows on this host's 4 devices are
      # exactly this host's rows, one per device, in order.
      assert shards["global_shape"] == [8, lib.TEXT_LEN + 1]
      starts = sorted(start for start, _, _ in shards["rows"])
      assert starts == [4 * p + i for i in range(4)]
      local = [row for _, _, data in sorted(shards["rows"]) for row in data]
      assert local == feed["text"]


def _global_batch(index):
  batches = lib.StandInBatches(8, 0)
  batches.set_state({"index": index})
  return next(batches)


@pytest.mark.slow
def test_checkpoints_are_written_once_and_a_restart_resumes_them(runs):
  ref = _ref(runs)
  two = runs["two"]
  # At the crash: checkpoint 2 for sure (saving 4 waited for it), 4 unless its async write
  # was cut off (a cut-off write is never used: see test_checkpointing.py).
  assert "2" in two["ckpts_after_crash"], two["ckpts_after_crash"]
  first, second = two["losses"]
  resume_step = min(second) - 1
  assert resume_step in (2, 4)
  assert sorted(second) == list(range(resume_step + 1, STEPS + 1))
  # The restart continued with the losses of the uninterrupted run (and of its own first run).
  np.testing.assert_allclose([second[s] for s in sorted(second)], ref[resume_step:],
                             rtol=TOL, atol=TOL)
  for s in set(first) & set(second):
    assert second[s] == pytest.approx(first[s], rel=TOL, abs=TOL)
  # The resumed processes started at the checkpoint's batch index.
  for report in two["resumed"]:
    assert report["feeds"][0]["index"] == resume_step and report["step"] == STEPS
  # One checkpoint per step in the shared workdir (keep last 2), complete, nothing left over;
  # only process 0 wrote metrics (every step logged once: a restart drops the rows after its
  # checkpoint before logging them again).
  root = two["workdir"] / "checkpoints"
  assert sorted(p.name for p in root.iterdir()) == ["6", "8"]
  from big_vision_cxr import checkpointing  # pylint: disable=g-import-not-at-top
  assert all(checkpointing.is_complete(root / s) for s in ("6", "8"))
  meta = json.loads(next((root / "8" / "meta").iterdir()).read_text())
  assert meta["step"] == STEPS and meta["input_state"] == {"index": STEPS}
  rows = [json.loads(l) for l in (two["workdir"] / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))


def test_distributed_settings_from_config_and_env():
  from big_vision_cxr import sharding  # pylint: disable=g-import-not-at-top
  settings = lambda distributed, **env: sharding.distributed_settings(
      lib.tiny_config(distributed=distributed), environ=env)
  assert settings(False) is None
  assert settings(True) == {}  # jax auto-detects (TPU, Slurm, Open MPI) or reads JAX_* env
  assert settings(False, BVCXR_DISTRIBUTED="1", BVCXR_NUM_PROCESSES="4",
                  BVCXR_PROCESS_ID="3") == dict(num_processes=4, process_id=3)
  explicit = dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                  local_device_ids=[0, 1])
  assert settings(explicit, BVCXR_PROCESS_ID="0") == explicit  # the config wins over env
  assert settings(dict(coordinator_address="h:1", num_processes=2),
                  BVCXR_PROCESS_ID="1") == dict(coordinator_address="h:1", num_processes=2,
                                                process_id=1)
  with pytest.raises(sharding.ShardingError, match=r"unknown keys \['num_hosts'\]"):
    settings(dict(num_hosts=2))
  with pytest.raises(sharding.ShardingError, match=r"env BVCXR_PROCESS_ID='one' is not an int"):
    settings(True, BVCXR_PROCESS_ID="one")
  with pytest.raises(sharding.ShardingError, match=r"config.distributed.num_processes must be an "
                                                   r"int, got '2'"):
    settings(dict(num_processes="2"))
  with pytest.raises(sharding.ShardingError, match="must be a bool or a dict"):
    settings("yes")


def test_incomplete_distributed_settings_fail_with_what_to_set():
  # A fresh process: jax.distributed.initialize must run before JAX's backend starts, and
  # this pytest worker may already have started it in another test.
  code = """
import sys
sys.path.insert(0, "tests")
import _trainer_testlib as lib
from big_vision_cxr import sharding
config = lib.tiny_config(distributed=dict(coordinator_address="localhost:1",
                                          cluster_detection_method="deactivate"))
try:
  sharding.maybe_initialize_distributed(config)
except sharding.ShardingError as e:
  print("ShardingError:", e)
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], cwd=lib.REPO, env=env, timeout=120,
                       capture_output=True, text=True)
  assert re.search(r"ShardingError: .*Number of processes must be defined.*set "
                   r"coordinator_address, num_processes and process_id", out.stdout), (
                       out.stdout + out.stderr)
