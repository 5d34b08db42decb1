"""Checkpointing at size: the trainer's orbax save and restore of a sharded train state.

python -m bench.checkpoint_bench [--quick] [--json PATH] [--warm 3]

In a python with 8 simulated CPU devices (XLA_FLAGS), the real train state of
`configs/cxr_mix.py:variant=bench_100m` (--quick: the tiny `demo` variant; f32 params,
Adam's moments for the trained LLM) is planned by `train.state_plan` and made under jit
with its FSDP shardings, as train.py does, every float array drawn from N(0, 0.02): a
trained state is dense, the initial one's zero Adam moments would compress to nothing.
It is saved with train.py's own path (`checkpointing.Checkpointer`: keep_last=2, async
orbax write to a tmp dir renamed once complete, checksums in `meta`) into a temp dir
under /tmp: a first save (which compiles the checksums), then --warm more. A save is timed
until `save()` returns (the training pause) and until the write is finished (`wait()`);
`os.sync()` is timed after it. Before each restore the checkpoint's files are dropped from
the page cache (`posix_fadvise(DONTNEED)` after the sync), so restores read the disk:
`restore_latest` onto the same 8-device shardings (train.py's resume) and `restore` onto
1 device (a 1-device mesh's `plan.abstract()`). Both verify the checksums; here every
restored array must also equal the saved one (np.array_equal) or the bench fails.
MB/s = checkpoint bytes on disk (and state bytes) / seconds, MB = 1e6 bytes. Peak extra
RSS: growth of the process's RSS above its level before the call (common.PeakRSS, freed
heap pages returned to the OS first); a restore's includes the restored state itself.
The extrapolation plans the states of pg1_3b_224 and pg2_10b_224 from shapes alone
(`train.state_plan`, nothing allocated) and applies the measured MB/s and extra/state
ratios to them.
"""
import argparse
import ctypes
import gc
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from bench import common
from bench import scale_plan

DEVICES = 8
MB = 1e6
EXTRAPOLATE = ("pg1_3b_224", "pg2_10b_224")


def filesystem(path):
  """'TYPE DEVICE on MOUNTPOINT' of the mount holding `path` (from /proc/mounts)."""
  path, best = os.path.realpath(path), ("?", "?", "/")
  with open("/proc/mounts") as f:
    for line in f:
      device, mount, fstype = line.split()[:3]
      if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(
          best[2]):
        best = (fstype, device, mount)
  return f"{best[0]} {best[1]} on {best[2]}"


def _files(folder):
  return [p for p in pathlib.Path(folder).rglob("*") if p.is_file()]


def disk_bytes(folder):
  return sum(p.stat().st_size for p in _files(folder))


def drop_page_cache(folder):
  """Writes back and evicts `folder`'s files from the page cache (no root needed)."""
  os.sync()
  for p in _files(folder):
    fd = os.open(p, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def state_plan(variant, mesh=None):
  """(config, train.state_plan) of configs/cxr_mix.py:variant=VARIANT (paper recipe) on
  `mesh` (default: the config's, over all devices, as train.py makes it)."""
  from big_vision_cxr import sharding, train  # pylint: disable=import-outside-toplevel
  from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
  config = scale_plan.recipe_config(variant, "paper", "off", "bfloat16", DEVICES, 1)
  model = model_common.build_model(config)
  mesh = mesh or sharding.create_mesh(config.get("mesh", [("data", -1)]))
  return config, train.state_plan(config, model, mesh, config.total_steps)


def state_bytes(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def param_count(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return sum(x.size for x in jax.tree.leaves(tree))


def _assert_equal(saved, restored, what):
  """Every restored leaf equals the saved one (values, dtype); -> number of leaves."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  flat, treedef = jax.tree_util.tree_flatten_with_path(saved)
  assert jax.tree.structure(restored) == treedef, (what, jax.tree.structure(restored))
  for (path, a), b in zip(flat, jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), (
        f"{what}: restored {jax.tree_util.keystr(path)} differs from the saved array")
  return len(flat)


def dense_state(plan, rng):
  """The planned state with every float array N(0, 0.02): a trained state is dense, while
  the initial Adam moments are zeros, which orbax's compression shrinks to nothing."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  leaves, treedef = jax.tree.flatten(plan.init_state(rng))
  keys = jax.random.split(rng, len(leaves))
  return treedef.unflatten([
      0.02 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x for k, x in zip(keys, leaves)])


def release_freed():
  """Returns freed heap pages to the OS, so that the next PeakRSS sees every allocation."""
  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)


def _row(op, state_b, disk_b, seconds, peak_b, **kw):
  return dict(op=op, state_mb=state_b / MB, disk_mb=disk_b / MB, seconds=seconds,
              disk_mb_s=disk_b / MB / seconds, state_mb_s=state_b / MB / seconds, **kw,
              peak_extra_rss_mb=peak_b / MB, extra_per_state=peak_b / state_b)


def worker(args):
  """Runs with 8 CPU devices: saves and restores the state; prints one RESULT JSON line."""
  import jax  # pylint: disable=import-outside-toplevel
  from big_vision_cxr import checkpointing, sharding  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == DEVICES, jax.devices()
  config, plan = state_plan(args.variant)
  state = jax.block_until_ready(jax.jit(lambda rng: dense_state(plan, rng),
                                        out_shardings=plan.sharding)(jax.random.key(0)))
  nbytes = state_bytes(state)
  sharded = sum(len(x.sharding.device_set) == DEVICES and not x.sharding.is_fully_replicated
                for x in jax.tree.leaves(state))
  keep = config.get("keep_ckpts", 2)
  rows, saves = [], []
  with tempfile.TemporaryDirectory(prefix="ckpt_bench_", dir="/tmp") as workdir:
    ckpt = checkpointing.Checkpointer(workdir, keep_last=keep,
                                      best_metric=config.get("best_metric"),
                                      best_mode=config.get("best_mode", "max"))
    for step in range(1, args.warm + 2):
      release_freed()
      with common.PeakRSS() as peak:
        t0 = time.perf_counter()
        ckpt.save(step, state, input_state=None, metrics={})
        blocking = time.perf_counter() - t0
        ckpt.wait()
        seconds = time.perf_counter() - t0
      t0 = time.perf_counter()
      os.sync()
      saves.append(dict(seconds=seconds, blocking_s=blocking, sync_s=time.perf_counter() - t0,
                        peak=peak.peak_bytes, disk=disk_bytes(ckpt.directory / str(step))))
    ckpt.close()
    assert sorted(int(p.name) for p in ckpt.directory.iterdir()) == list(
        range(args.warm + 2 - keep, args.warm + 2)), list(ckpt.directory.iterdir())
    disk = saves[-1]["disk"]
    first, warm = saves[0], saves[1:]
    rows.append(_row("save first", nbytes, first["disk"], first["seconds"], first["peak"],
                     blocking_s=first["blocking_s"], sync_s=first["sync_s"]))
    rows.append(_row(f"save warm (median of {len(warm)})", nbytes, disk,
                     statistics.median(s["seconds"] for s in warm), max(s["peak"] for s in warm),
                     blocking_s=statistics.median(s["blocking_s"] for s in warm),
                     sync_s=statistics.median(s["sync_s"] for s in warm)))

    # train.py's resume: a fresh Checkpointer, the newest step, the run's own shardings.
    drop_page_cache(workdir)
    release_freed()
    with common.PeakRSS() as peak:
      t0 = time.perf_counter()
      ckpt = checkpointing.Checkpointer(workdir, keep_last=keep)
      step, restored, meta = ckpt.restore_latest(plan.abstract())
      jax.block_until_ready(restored)
      seconds = time.perf_counter() - t0
    ckpt.close()
    assert step == args.warm + 1 and meta["step"] == step, (step, meta)
    assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(state),
                                                        jax.tree.leaves(restored)))
    leaves = _assert_equal(state, restored, "8-device restore")
    rows.append(_row(f"restore {DEVICES} devices", nbytes, disk, seconds, peak.peak_bytes))
    del restored

    # Onto 1 device: the same state laid out by a 1-device mesh's shardings.
    _, plan1 = state_plan(args.variant, sharding.create_mesh([("data", 1)],
                                                             devices=jax.devices()[:1]))
    drop_page_cache(workdir)
    release_freed()
    with common.PeakRSS() as peak:
      t0 = time.perf_counter()
      ckpt = checkpointing.Checkpointer(workdir, keep_last=keep)
      restored, _ = ckpt.restore(step, plan1.abstract())
      jax.block_until_ready(restored)
      seconds = time.perf_counter() - t0
    ckpt.close()
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(restored))
    _assert_equal(state, restored, "1-device restore")
    rows.append(_row("restore 1 device", nbytes, disk, seconds, peak.peak_bytes))
    fs = filesystem(workdir)
  print("RESULT " + json.dumps(dict(
      rows=rows, filesystem=fs, variant=args.variant, params_m=param_count(state["params"]) / 1e6,
      leaves=len(jax.tree.leaves(state)), leaves_sharded=sharded, leaves_verified=leaves,
      jax_devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}")), flush=True)


def run_worker(variant, warm):
  """The worker in a fresh python with 8 CPU devices -> its RESULT dict."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
  out = subprocess.run([sys.executable, "-m", "bench.checkpoint_bench", "--worker",
                        f"--variant={variant}", f"--warm={warm}"], env=env,
                       cwd=scale_plan.REPO, capture_output=True, text=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    raise RuntimeError(f"checkpoint_bench worker failed:\n{out.stderr[-3000:]}")
  return json.loads(lines[0][len("RESULT "):])


def extrapolate(result):
  """Rows for the measured variant and EXTRAPOLATE: state bytes from shapes alone, seconds
  at the measured MB/s (of state bytes), peak extra memory at the measured extra/state."""
  import jax  # pylint: disable=import-outside-toplevel
  from big_vision_cxr import sharding  # pylint: disable=import-outside-toplevel
  rows = {r["op"].split(" (")[0]: r for r in result["rows"]}
  save, r8, r1 = rows["save warm"], rows[f"restore {DEVICES} devices"], rows["restore 1 device"]
  mesh = sharding.create_mesh([("data", 1)], devices=jax.devices()[:1])
  out = []
  for variant in (result["variant"],) + EXTRAPOLATE:
    _, plan = state_plan(variant, mesh)
    state_mb = state_bytes(plan.shape) / MB
    out.append(dict(
        variant=variant, measured=variant == result["variant"],
        params_m=param_count(plan.shape["params"]) / 1e6, state_gb=state_mb / 1e3,
        disk_gb=state_mb * save["disk_mb"] / save["state_mb"] / 1e3,
        save_s=state_mb / save["state_mb_s"],
        save_blocking_s=save["blocking_s"] * state_mb / save["state_mb"],
        restore_8dev_s=state_mb / r8["state_mb_s"], restore_1dev_s=state_mb / r1["state_mb_s"],
        save_extra_gb=save["extra_per_state"] * state_mb / 1e3,
        restore_extra_gb=max(r8["extra_per_state"], r1["extra_per_state"]) * state_mb / 1e3))
  return out


def main(argv=None):
  parser = common.arg_parser(__doc__.split("\n\n")[0])
  parser.add_argument("--warm", type=int, default=None,
                      help="saves after the first one (default 3; --quick 2)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.variant = args.variant or ("demo" if args.quick else "bench_100m")
  args.warm = args.warm or (2 if args.quick else 3)
  if args.worker:
    return worker(args)
  t0 = time.perf_counter()
  result = run_worker(args.variant, args.warm)
  wall = time.perf_counter() - t0
  extra = dict(result, extrapolation=extrapolate(result), wall_s=wall)
  rows = extra.pop("rows")
  common.report(
      f"Checkpointing: {args.variant} train state ({result['params_m']:.1f}M params) saved and "
      f"restored over {DEVICES} simulated CPU devices", rows, args,
      columns=["op", "state_mb", "disk_mb", "seconds", "blocking_s", "sync_s", "disk_mb_s",
               "state_mb_s", "peak_extra_rss_mb", "extra_per_state"],
      notes=[
          f"{wall:.0f} s. Worker: {result['jax_devices']}; {result['leaves']} state arrays, "
          f"{result['leaves_sharded']} split over the {DEVICES} devices (FSDP), all "
          f"{result['leaves_verified']} restored equal to the saved ones, twice.",
          f"Checkpoints in a temp dir under /tmp ({result['filesystem']}), removed afterwards. "
          "seconds: until the write is finished (save) or the state is on its devices "
          "(restore, page cache dropped first); blocking_s: until save() returns (the "
          "training pause); sync_s: os.sync() afterwards (not in seconds). MB = 1e6 bytes.",
          "peak_extra_rss_mb: RSS growth above the level before the call (a restore's "
          "includes the restored state); extra_per_state: that / state bytes."],
      extra=extra)
  print("\nExtrapolated from the measured MB/s (state bytes) and extra/state ratios on this "
        "CPU's disk; state sizes from shapes alone (train.state_plan, paper recipe, f32)\n")
  print(common.format_table(extra["extrapolation"]))
  return rows, extra


if __name__ == "__main__":
  main()
