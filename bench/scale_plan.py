"""Scale plan: per-device memory and FLOPs of the real update step, compiled, never run.

python -m bench.scale_plan [--quick] [--json PATH] [--variants pg1_3b_224,...]
    [--devices 1,8] [--recipes paper,full,lora] [--remat off,on]
    [--dtypes bfloat16,float32] [--batches 1,4,16] [--microbatches 1] [--chips] [--measure]

For each PaliGemma variant and option, the train state (f32 params, optimizer state) is
built abstractly (`jax.eval_shape`) from `configs/cxr_mix.py` exactly as train.py builds
it, sharded by the recipe's FSDP rule over a simulated mesh of N CPU devices, and the
trainer's own step (`train.make_update_fn` over `train.make_loss_fn`, the same jit
in/out shardings and state donation) is lowered and compiled from ShapeDtypeStructs.
One python per device count (XLA_FLAGS=--xla_force_host_platform_device_count=N).

Per device, from `compiled.memory_analysis()`: arguments (state + batch), outputs,
temporaries (activations, gradients, XLA scratch) and aliased (donated state reused for
the outputs); peak = arguments + outputs - aliased + temporaries.
FLOPs per example, from `compiled.cost_analysis()`: XLA counts a while loop's body once,
so the scanned layer stacks are counted once whatever their depth. We compile the same
step (1 device, microbatches=1) with the scans fully unrolled at depths (img, llm) =
(1, 1), (2, 1), (1, 2); each stack's per-layer cost is the difference, and
flops = F(1,1) + (D_img - 1) * c_img + (D_llm - 1) * c_llm.
Options: recipe paper (SigLIP + projection frozen, Gemma trained), full (everything
trained), lora (`:lora`, rank 16 on the LLM's attention and MLP); remat off/on (both
stacks); compute dtype bfloat16/float32 (params and optimizer state stay float32, as
train.py keeps them); per-device batch with `microbatches` gradient-accumulation steps.
`--chips` adds the verdict per accelerator: fits (peak <= 90% of its memory) and the
step time at 40% MFU of its bf16 peak (FLOPs / devices, communication not counted).
"""
import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench import common

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cxr_mix.py"
GiB = 2 ** 30
# (name, memory GiB, dense bf16 peak TFLOP/s as published by the vendor).
CHIPS = (("TPU v5e", 16, 197), ("L4", 24, 121), ("TPU v4", 32, 275), ("A100-40GB", 40, 312),
         ("H100-SXM", 80, 989), ("TPU v5p", 95, 459), ("H200", 141, 989))
MARGIN, MFU = 0.9, 0.4
FULL_VARIANTS = "pg1_3b_224,pg1_3b_448,pg2_3b_224,pg2_3b_448,pg2_10b_224,pg2_28b_224"


def recipe_config(variant, recipe, remat, dtype, batch, microbatches):
  """configs/cxr_mix.py (`:lora` for lora) with the variant and options set."""
  from big_vision_cxr import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config(f"{CONFIG}:variant={variant}" + (",lora" if recipe == "lora"
                                                                     else ""))
  if recipe == "full":
    config.schedule = [(".*", dict(decay_type="cosine", warmup_percent=0.05))]
    config.wd_mults = [(".*", 1.0)]
  for part in ("img", "llm"):
    config.model[part]["remat"] = remat == "on"
  config.compute_dtype = dtype
  config.input.batch_size = batch
  config.microbatches = microbatches
  return config


@contextlib.contextmanager
def unrolled_scans():
  """nn.scan fully unrolled (so that XLA's cost analysis sees every layer)."""
  scan = nn.scan
  with mock.patch.object(nn, "scan", lambda target, **kw: scan(target, unroll=kw["length"], **kw)):
    yield


def compile_step(config, mesh):
  """The trainer's update step for `config`, lowered from shapes and compiled on `mesh`."""
  from big_vision_cxr import optim, sharding, train  # pylint: disable=import-outside-toplevel
  from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
  model = model_common.build_model(config)
  lora_cfg = config.get("lora") or None
  init = train.init_params_fn(model, config, lora_cfg)
  params_shape = jax.eval_shape(init, jax.random.key(0))
  tx, plan, sched_fns = optim.make(config, params_shape, total_steps=config.total_steps,
                                   batch_size=config.input.batch_size)
  mask = optim.trainable_mask(plan, params_shape)
  state_shape = jax.eval_shape(
      lambda p: {"step": np.zeros([], np.int32), "params": p, "opt": tx.init(p)}, params_shape)
  state_sharding = sharding.infer_sharding(state_shape, config.sharding_strategy, mesh)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = sharding.batch_sharding(mesh)
  loss_fn = train.make_loss_fn(model, config, mask, lora_cfg)
  update = jax.jit(train.make_update_fn(loss_fn, tx, mask, config, sched_fns),
                   in_shardings=(state_sharding, batch_sharding, repl),
                   out_shardings=(state_sharding, repl), donate_argnums=(0,))
  abstract = lambda tree, shard: jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shard)
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
      train.example_batch(model, config.input.text_len, config.input.batch_size))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
  compiled = update.lower(abstract(state_shape, state_sharding), batch, rng).compile()
  counts = dict(
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_shape)),
      trained=sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(params_shape),
                                                         jax.tree.leaves(mask)) if t))

  def inputs():
    """Real (state, batch, rng) for `compiled`: initialised params, a zero batch."""
    state = jax.jit(lambda r: {"step": jnp.zeros([], jnp.int32), "params": init(r),
                               "opt": tx.init(init(r))}, out_shardings=state_sharding)(
                                   jax.random.key(0))
    zeros = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), batch)
    return state, zeros, jax.random.key(0)
  return compiled, counts, inputs


def measure_step(compiled, inputs):
  """Runs the compiled step: (bytes of live arrays before it, peak RSS growth during it).

  The first step is measured: the heap pages its temporaries leave are reused by later
  steps (the allocator keeps them), so those grow the RSS by almost nothing.
  """
  state, batch, rng = inputs()
  live = sum(x.nbytes for x in jax.live_arrays())
  with common.PeakRSS() as peak:
    state, metrics = jax.block_until_ready(compiled(state, batch, rng))
  del state, metrics
  return live, peak.peak_bytes


def _cost(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def flops_per_example(variant, recipe, remat, dtype, batch):
  """Step FLOPs / example, the scanned stacks extrapolated from unrolled depth 1 and 2."""
  from big_vision_cxr import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.create_mesh([("data", 1)], devices=jax.devices()[:1])
  depths = {}

  def at(d_img, d_llm):
    config = recipe_config(variant, recipe, remat, dtype, batch, 1)
    depths.setdefault("img", _depth(config, "img"))
    depths.setdefault("llm", _depth(config, "llm"))
    config.model.img["depth"], config.model.llm["depth"] = d_img, d_llm
    with unrolled_scans():
      return _cost(compile_step(config, mesh)[0])

  f11, f21, f12 = at(1, 1), at(2, 1), at(1, 2)
  c_img, c_llm = f21 - f11, f12 - f11
  total = f11 + (depths["img"] - 1) * c_img + (depths["llm"] - 1) * c_llm
  return total / batch, dict(gflop_layer_img=c_img / batch, gflop_layer_llm=c_llm / batch)


def _depth(config, part):
  from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
  return int(model_common.model_config(config)[part]["depth"])


def plan_row(variant, recipe, remat, dtype, batch, microbatches, measure=False):
  """One row: per-device bytes of the real step on all this process's devices.

  measure (1 device only): also runs the step and adds the measured live bytes before it
  (vs args_gib) and the peak RSS growth during it (vs out - alias + temp).
  """
  from big_vision_cxr import sharding  # pylint: disable=import-outside-toplevel
  n = jax.device_count()
  config = recipe_config(variant, recipe, remat, dtype, batch * n, microbatches)
  mesh = sharding.create_mesh(config.mesh)
  sharding.check_batch_fits(config.input.batch_size, mesh, microbatches)
  t0 = time.perf_counter()
  compiled, counts, inputs = compile_step(config, mesh)
  mem = compiled.memory_analysis()
  row = dict(variant=variant, recipe=recipe, remat=remat, dtype=dtype, devices=n,
             batch_per_device=batch, microbatches=microbatches,
             params_m=round(counts["params"] / 1e6, 1),
             trained_m=round(counts["trained"] / 1e6, 1),
             args_gib=mem.argument_size_in_bytes / GiB, out_gib=mem.output_size_in_bytes / GiB,
             temp_gib=mem.temp_size_in_bytes / GiB, alias_gib=mem.alias_size_in_bytes / GiB,
             xla_gflop_step=_cost(compiled) / 1e9, compile_s=time.perf_counter() - t0)
  row["peak_gib"] = row["args_gib"] + row["out_gib"] - row["alias_gib"] + row["temp_gib"]
  if measure and n == 1:
    live, growth = measure_step(compiled, inputs)
    row.update(measured_live_gib=live / GiB, measured_rss_growth_gib=growth / GiB,
               planned_growth_gib=row["out_gib"] - row["alias_gib"] + row["temp_gib"])
  return row


def worker(args):
  """Runs in a python whose device count XLA_FLAGS fixed; prints one JSON row per line."""
  for variant in args.variants.split(","):
    for recipe in args.recipes.split(","):
      for remat in args.remat.split(","):
        for dtype in args.dtypes.split(","):
          for batch in [int(b) for b in args.batches.split(",")]:
            try:
              row = plan_row(variant, recipe, remat, dtype, batch, args.microbatches,
                             args.measure)
              if args.flops:
                t0 = time.perf_counter()
                flops, layers = flops_per_example(variant, recipe, remat, dtype, batch)
                row.update({k: v / 1e9 for k, v in layers.items()}, gflop_per_example=flops / 1e9,
                           flops_s=time.perf_counter() - t0)
            except Exception as e:  # pylint: disable=broad-except  # reported in the table
              row = dict(variant=variant, recipe=recipe, remat=remat, dtype=dtype,
                         devices=jax.device_count(), batch_per_device=batch,
                         error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            print("ROW " + json.dumps(row), flush=True)
            jax.clear_caches()


def run_devices(devices, args, flops, timeout):
  """The worker in a fresh python with `devices` CPU devices -> its rows."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "bench.scale_plan", "--worker", "--variants", args.variants,
         "--recipes", args.recipes, "--remat", args.remat, "--dtypes", args.dtypes,
         "--batches", args.batches, "--microbatches", str(args.microbatches)]
  cmd += ["--measure"] if args.measure else []
  out = subprocess.run(cmd + (["--flops"] if flops else []), env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
  rows = [json.loads(l[4:]) for l in out.stdout.splitlines() if l.startswith("ROW ")]
  if out.returncode:
    raise RuntimeError(f"scale_plan worker ({devices} devices) failed:\n{out.stderr[-3000:]}")
  return rows


def verdicts(row):
  """{chip: 'fits 1.2 s' or 'no'} for one row (step time at 40% MFU of the bf16 peak)."""
  out = {}
  flops = row.get("gflop_per_example", float("nan")) * 1e9 * row["batch_per_device"]
  for name, mem_gib, tflops in CHIPS:
    if row["peak_gib"] > MARGIN * mem_gib:
      out[name] = "no"
    else:
      out[name] = f"{flops / (MFU * tflops * 1e12):.2g} s"
  return out


def main(argv=None):
  parser = common.arg_parser(__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default=None,
                      help=f"default {FULL_VARIANTS}; --quick: bench_100m")
  parser.add_argument("--devices", default="1,8", help="simulated device counts (one python each)")
  parser.add_argument("--recipes", default="paper", help="paper,full,lora")
  parser.add_argument("--remat", default="off", help="off,on")
  parser.add_argument("--dtypes", default="bfloat16", help="compute dtypes: bfloat16,float32")
  parser.add_argument("--batches", default=None, help="per-device batch (default 1,4,16; --quick: 4)")
  parser.add_argument("--microbatches", type=int, default=1)
  parser.add_argument("--chips", action="store_true", help="add the per-chip verdict columns")
  parser.add_argument("--measure", action="store_true",
                      help="1 device: also run the step, measure live bytes and peak RSS growth")
  parser.add_argument("--timeout", type=int, default=3600, help="seconds per device count")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.variants = args.variants or ("bench_100m" if args.quick else FULL_VARIANTS)
  args.batches = args.batches or ("4" if args.quick else "1,4,16")
  if args.worker:
    return worker(args)
  t0 = time.perf_counter()
  devices = sorted(int(d) for d in args.devices.split(","))
  rows, flops = [], {}
  for i, n in enumerate(devices):
    for row in run_devices(n, args, flops=i == 0, timeout=args.timeout):
      key = tuple(row[k] for k in ("variant", "recipe", "remat", "dtype", "batch_per_device"))
      if "gflop_per_example" in row:
        flops[key] = row["gflop_per_example"]
      elif key in flops:
        row["gflop_per_example"] = flops[key]
      rows.append(row)
  if args.chips:
    for row in rows:
      if "peak_gib" in row:
        row.update(verdicts(row))
  columns = ["variant", "recipe", "remat", "dtype", "devices", "batch_per_device",
             "microbatches", "params_m", "trained_m", "args_gib", "out_gib", "temp_gib",
             "alias_gib", "peak_gib", "gflop_per_example", "compile_s"]
  columns += [c for c, _, _ in CHIPS] if args.chips else []
  columns += (["measured_live_gib", "planned_growth_gib", "measured_rss_growth_gib"]
              if args.measure else [])
  columns += ["error"] if any("error" in r for r in rows) else []
  wall = time.perf_counter() - t0
  notes = [
      f"Compiled (never run) on {', '.join(map(str, devices))} simulated CPU device(s) in "
      f"{wall:.0f} s; per-device GiB from compiled.memory_analysis(); peak = args + out - "
      "alias + temp. XLA:CPU's plan: GPU/TPU compilers fuse and schedule differently.",
      "gflop_per_example: compiled.cost_analysis() of the step with unrolled scans at "
      "depths (1,1), (2,1), (1,2), extrapolated linearly to the real depths (first device "
      "count only; microbatches=1).",
  ]
  if args.chips:
    notes.append(f"Chip columns: step time at {MFU:.0%} MFU of the bf16 peak per device "
                 f"(communication not counted), 'no' where peak > {MARGIN:.0%} of memory: "
                 + ", ".join(f"{c} {m} GiB {t} TFLOP/s" for c, m, t in CHIPS) + ".")
  common.report("Scale plan: the real update step compiled per device", rows, args,
                columns=columns, notes=notes, extra=dict(wall_s=wall, chips=CHIPS))
  return rows


if __name__ == "__main__":
  main()
