"""Scale plan: per-device memory and FLOPs of the real update step, compiled, never run.

python -m bench.scale_plan [--quick] [--json PATH] [--variants pg1_3b_224,...]
    [--devices 1,8,16,32] [--recipes paper,full,lora] [--remat off,on]
    [--dtypes bfloat16,float32] [--params float32,bfloat16] [--batches 1,4,16]
    [--microbatches 1,4] [--chips] [--measure] [--inference]

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
stacks); compute dtype bfloat16/float32; params (and so Adam's moments) stored in
float32 or bfloat16 (`config.param_dtype`, with `config.optax.mu_dtype` alike); per-device
batch with `microbatches` gradient-accumulation steps (batches it does not divide are
skipped). `--chips` adds the verdict per accelerator: fits (peak <= 90% of its memory)
and the step time at 40% MFU of its bf16 peak (FLOPs / devices, communication not
counted), and a summary: per option and chip, the smallest mesh and the largest
per-device batch that fit. `--inference` plans greedy decoding instead (one device,
bf16 weights and KV cache): `decode.make_generate_fn` compiled at the `--batches`.
"""
import argparse
import functools
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cxr_mix.py"
GiB = 2 ** 30
# (name, memory GiB, dense bf16 peak TFLOP/s as published by the vendor). The T4 has no
# bf16 arithmetic (XLA computes bf16 dots in f32 there): its f32 peak, and the ~15 GiB a
# Colab T4 leaves usable.
CHIPS = (("Colab T4", 15, 8.1), ("TPU v5e", 16, 197), ("L4", 24, 121), ("TPU v4", 32, 275),
         ("A100-40GB", 40, 312), ("A100-80GB", 80, 312), ("H100-SXM", 80, 989),
         ("TPU v5p", 95, 459), ("H200", 141, 989))
MARGIN, MFU = 0.9, 0.4
FULL_VARIANTS = "pg1_3b_224,pg1_3b_448,pg2_3b_224,pg2_3b_448,pg2_10b_224,pg2_28b_224"


def recipe_config(variant, recipe, remat, dtype, batch, microbatches, params="float32"):
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
  config.param_dtype = params
  if params == "bfloat16":
    config.optax = dict(config.optax, mu_dtype="bfloat16")  # nu follows the params' dtype
  config.input.batch_size = batch
  config.microbatches = microbatches
  return config


def compile_step(config, mesh):
  """The trainer's update step for `config`, lowered from shapes and compiled on `mesh`."""
  from big_vision_cxr import sharding, train  # pylint: disable=import-outside-toplevel
  from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
  model = model_common.build_model(config)
  lora_cfg = config.get("lora") or None
  plan = train.state_plan(config, model, mesh, config.total_steps, lora_cfg)
  update, _ = train.jit_update(config, model, mesh, plan, lora_cfg)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
      train.example_batch(model, config.input.text_len, config.input.batch_size))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
  compiled = update.lower(plan.abstract(), batch, rng).compile()
  params, mask = plan.shape["params"], plan.mask
  counts = dict(
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
      trained=sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(mask)) if t))

  def inputs():
    """Real (state, batch, rng) for `compiled`: initialised params, a zero batch."""
    state = jax.jit(plan.init_state, out_shardings=plan.sharding)(jax.random.key(0))
    zeros = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), batch)
    return state, zeros, jax.random.key(0)
  return compiled, counts, inputs


def measure_step(compiled, inputs):
  """Runs the compiled step: (bytes of live arrays before it, peak RSS growth during it).

  The first step is measured: the heap pages its temporaries leave are reused by later
  steps (the allocator keeps them), so those grow the RSS by almost nothing.
  """
  state, batch, rng = jax.block_until_ready(inputs())  # not the state's own init
  live = sum(x.nbytes for x in jax.live_arrays())
  with common.PeakRSS() as peak:
    state, metrics = jax.block_until_ready(compiled(state, batch, rng))
  del state, metrics
  return live, peak.peak_bytes


def _cost(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def flops_per_step(option, batch):
  """Step FLOPs at per-device `batch` on one device, the scanned stacks extrapolated from
  unrolled depths 1 and 2 -> (flops, {per-layer GFLOP per example})."""
  from big_vision_cxr import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.create_mesh([("data", 1)], devices=jax.devices()[:1])
  depths = {}

  def at(d_img, d_llm):
    config = recipe_config(**dict(option, microbatches=1), batch=batch)
    depths.setdefault("img", _depth(config, "img"))
    depths.setdefault("llm", _depth(config, "llm"))
    for part, depth in (("img", d_img), ("llm", d_llm)):  # Unrolled: XLA counts each layer.
      config.model[part].update(depth=depth, scan_unroll=True)
    return _cost(compile_step(config, mesh)[0])

  f11, f21, f12 = at(1, 1), at(2, 1), at(1, 2)
  c_img, c_llm = f21 - f11, f12 - f11
  total = f11 + (depths["img"] - 1) * c_img + (depths["llm"] - 1) * c_llm
  return total, dict(gflop_layer_img=c_img / batch / 1e9, gflop_layer_llm=c_llm / batch / 1e9)


def flops_per_example(option, batch, _memo={}):  # pylint: disable=dangerous-default-value
  """GFLOP per example at per-device `batch`: the step is affine in the batch (the
  optimizer update is per step), so two small batches give it exactly (once per option;
  counted without gradient accumulation, which changes the FLOPs by nothing but the loop)."""
  key = tuple(sorted(dict(option, microbatches=1).items()))
  if key not in _memo:
    _memo[key] = flops_per_step(option, 1), flops_per_step(option, 2)[0]
  (f1, layers), f2 = _memo[key]
  return (f1 + (batch - 1) * (f2 - f1)) / batch / 1e9, layers


def _depth(config, part):
  from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
  return int(model_common.model_config(config)[part]["depth"])


def options(args):
  """The option grid: dicts of variant, recipe, remat, dtype, params, microbatches."""
  keys = ("variant", "recipe", "remat", "dtype", "params", "microbatches")
  values = (args.variants.split(","), args.recipes.split(","), args.remat.split(","),
            args.dtypes.split(","), args.params.split(","),
            [int(m) for m in args.microbatches.split(",")])
  return [dict(zip(keys, v)) for v in itertools.product(*values)]


def plan_row(option, batch, measure=False):
  """One row: per-device bytes of the real step on all this process's devices.

  measure (1 device only): also runs the step and adds the measured live bytes before it
  (vs args_gib) and the peak RSS growth during it (vs out - alias + temp).
  """
  from big_vision_cxr import sharding  # pylint: disable=import-outside-toplevel
  n = jax.device_count()
  config = recipe_config(**option, batch=batch * n)
  mesh = sharding.create_mesh(config.mesh)
  sharding.check_batch_fits(config.input.batch_size, mesh, option["microbatches"])
  t0 = time.perf_counter()
  compiled, counts, inputs = compile_step(config, mesh)
  mem = compiled.memory_analysis()
  row = dict(option, devices=n, batch_per_device=batch,
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


def _compiled_generate(model, params, dtype, batch, size, prompt_len, decode_len):
  """(prepared weights, compiled greedy decoding) with weights and KV cache in `dtype`, as
  decode.Predictor serves: the stored weights prepared once (the dot layout), reused."""
  from big_vision_cxr import decode  # pylint: disable=import-outside-toplevel
  prepared = jax.eval_shape(functools.partial(decode.prepare, weights_dtype=dtype), params)
  generate = decode.make_generate_fn(model, max_decode_len=decode_len, eos_id=-1,
                                     cache_dtype=dtype, weights_dtype=dtype)
  return prepared, generate.lower(
      prepared, jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
      jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
      jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_), jax.random.key(0)).compile()


def inference_row(variant, batch, prompt_len, decode_len):
  """Greedy decoding on one device with bf16 weights and KV cache, compiled from shapes.

  XLA:CPU computes bf16 matmuls in f32 and so holds f32 copies of the weights among its
  temporaries; an accelerator does not. `accel_peak_gib` bounds the accelerator's peak
  with the temporaries of the same program compiled in f32 (activations and cache at
  twice the size, no weight copies): stored + prepared bf16 weights + those temporaries.
  """
  from big_vision_cxr import train  # pylint: disable=import-outside-toplevel
  from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
  config = recipe_config(variant, "paper", "off", "bfloat16", batch, 1, params="bfloat16")
  model = model_common.build_model(config)
  params = jax.eval_shape(train.init_params_fn(model, config, None), jax.random.key(0))
  size = model_common.model_config(config).img.image_size
  t0 = time.perf_counter()
  prepared, compiled = _compiled_generate(model, params, jnp.bfloat16, batch, size,
                                          prompt_len, decode_len)
  config_f32 = recipe_config(variant, "paper", "off", "float32", batch, 1)
  model_f32 = model_common.build_model(config_f32)
  _, compiled_f32 = _compiled_generate(
      model_f32, jax.eval_shape(train.init_params_fn(model_f32, config_f32, None),
                                jax.random.key(0)), None, batch, size, prompt_len, decode_len)
  mem, mem_f32 = compiled.memory_analysis(), compiled_f32.memory_analysis()
  cache = model.init_cache(batch, (size // 14) ** 2 + prompt_len + decode_len, jnp.bfloat16)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / GiB
  row = dict(variant=variant, batch=batch, prompt_len=prompt_len, decode_len=decode_len,
             weights_gib=nbytes(params), prepared_gib=nbytes(prepared),
             kv_cache_gib=nbytes(cache),
             args_gib=mem.argument_size_in_bytes / GiB, temp_gib=mem.temp_size_in_bytes / GiB,
             out_gib=mem.output_size_in_bytes / GiB,
             f32_temp_gib=mem_f32.temp_size_in_bytes / GiB, compile_s=time.perf_counter() - t0)
  # The stored weights stay held beside their prepared copy (the caller's params).
  row["peak_gib"] = row["weights_gib"] + row["args_gib"] + row["out_gib"] + row["temp_gib"]
  row["accel_peak_gib"] = (row["weights_gib"] + row["prepared_gib"] + row["out_gib"]
                           + row["f32_temp_gib"])
  return row


def _error_row(base, e):
  return dict(base, devices=jax.device_count(),
              error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def worker(args):
  """Runs in a python whose device count XLA_FLAGS fixed; prints one JSON row per line."""
  batches = [int(b) for b in args.batches.split(",")]
  if args.inference:
    for variant, batch in itertools.product(args.variants.split(","), batches):
      try:
        row = inference_row(variant, batch, args.prompt_len, args.decode_len)
      except Exception as e:  # pylint: disable=broad-except  # reported in the table
        row = _error_row(dict(variant=variant, batch=batch), e)
      print("ROW " + json.dumps(row), flush=True)
      jax.clear_caches()
    return
  for option, batch in itertools.product(options(args), batches):
    if batch % option["microbatches"]:
      continue
    try:
      row = plan_row(option, batch, args.measure)
      if args.flops:
        t0 = time.perf_counter()
        gflop, layers = flops_per_example(option, batch)
        row.update(layers, gflop_per_example=gflop, flops_s=time.perf_counter() - t0)
    except Exception as e:  # pylint: disable=broad-except  # reported in the table
      row = _error_row(dict(option, batch_per_device=batch), e)
    print("ROW " + json.dumps(row), flush=True)
    jax.clear_caches()


def run_devices(devices, argv, flops, timeout):
  """The worker in a fresh python with `devices` CPU devices -> its rows."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "bench.scale_plan", "--worker", *argv]
  try:
    out = subprocess.run(cmd + (["--flops"] if flops else []), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:  # keep the rows it finished
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
    return [json.loads(l[4:]) for l in stdout.splitlines() if l.startswith("ROW ")] + [
        dict(devices=devices, error=f"worker timed out after {timeout} s (--timeout)")]
  rows = [json.loads(l[4:]) for l in out.stdout.splitlines() if l.startswith("ROW ")]
  if out.returncode:
    raise RuntimeError(f"scale_plan worker ({devices} devices) failed:\n{out.stderr[-3000:]}")
  return rows


def verdicts(row):
  """{chip: 'fits 1.2 s' or 'no'} for one row (step time at 40% MFU of the bf16 peak)."""
  out = {}
  for name, mem_gib, tflops in CHIPS:
    out[name] = "no" if row["peak_gib"] > MARGIN * mem_gib else (
        f"{step_seconds(row, tflops):.2g} s")
  return out


def step_seconds(row, tflops):
  return row.get("gflop_per_example", float("nan")) * 1e9 * row["batch_per_device"] / (
      MFU * tflops * 1e12)


OPTION_KEYS = ("variant", "recipe", "remat", "dtype", "params", "microbatches")


def summary(rows):
  """Per option and chip: the smallest mesh where some batch fits, and at that mesh the
  largest per-device batch, its step time and examples/s at 40% MFU."""
  out = {}
  for row in rows:
    if "peak_gib" not in row:
      continue
    key = tuple(row[k] for k in OPTION_KEYS)
    entry = out.setdefault(key, dict(zip(OPTION_KEYS, key)))
    for name, mem_gib, tflops in CHIPS:
      if row["peak_gib"] > MARGIN * mem_gib:
        continue
      best = entry.get(f"_{name}")
      cand = (row["devices"], -row["batch_per_device"])
      if best is None or cand < best[0]:
        entry[f"_{name}"] = (cand, row, tflops)
  table = []
  for entry in out.values():
    for name, _, _ in CHIPS:
      found = entry.pop(f"_{name}", None)
      if found is None:
        entry[name] = f"no (<= {max(r['devices'] for r in rows)} devices)"
        continue
      _, row, tflops = found
      t = step_seconds(row, tflops)
      entry[name] = (f"{row['devices']}x b{row['batch_per_device']} {t:.2g} s "
                     f"{row['devices'] * row['batch_per_device'] / t:.0f} ex/s")
    table.append(entry)
  return table


def main(argv=None):
  parser = common.arg_parser(__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default=None,
                      help=f"default {FULL_VARIANTS}; --quick: bench_100m")
  parser.add_argument("--devices", default=None,
                      help="simulated device counts, one python each (default 1,8,16,32; "
                           "--quick 1,8; --inference 1)")
  parser.add_argument("--recipes", default="paper", help="paper,full,lora")
  parser.add_argument("--remat", default=None, help="off,on (default both; --quick off)")
  parser.add_argument("--dtypes", default="bfloat16", help="compute dtypes: bfloat16,float32")
  parser.add_argument("--params", default="float32", help="stored param/Adam dtypes: "
                                                          "float32,bfloat16")
  parser.add_argument("--batches", default=None, help="per-device batch (default 1,4,16; "
                                                      "--quick 4; --inference 1,8,64)")
  parser.add_argument("--microbatches", default="1", help="gradient-accumulation steps: 1,4")
  parser.add_argument("--chips", action="store_true", help="add the per-chip verdicts")
  parser.add_argument("--measure", action="store_true",
                      help="1 device: also run the step, measure live bytes and peak RSS growth")
  parser.add_argument("--inference", action="store_true",
                      help="plan greedy decoding (1 device, bf16) instead of training")
  parser.add_argument("--prompt_len", type=int, default=32, help="--inference: prompt tokens")
  parser.add_argument("--decode_len", type=int, default=128, help="--inference: new tokens")
  parser.add_argument("--timeout", type=int, default=3600, help="seconds per device count")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.variants = args.variants or ("bench_100m" if args.quick else FULL_VARIANTS)
  args.batches = args.batches or ("1,8,64" if args.inference else "4" if args.quick
                                  else "1,4,16")
  args.remat = args.remat or ("off" if args.quick else "off,on")
  args.devices = args.devices or ("1" if args.inference else "1,8" if args.quick
                                  else "1,8,16,32")
  if args.worker:
    return worker(args)
  forward = [f"--{k}={getattr(args, k)}" for k in (
      "variants", "recipes", "remat", "dtypes", "params", "batches", "microbatches",
      "prompt_len", "decode_len")]
  forward += [f"--{k}" for k in ("measure", "inference") if getattr(args, k)]
  t0 = time.perf_counter()
  devices = sorted(int(d) for d in args.devices.split(","))
  rows, flops = [], {}
  for i, n in enumerate(devices):
    for row in run_devices(n, forward, flops=i == 0 and not args.inference,
                           timeout=args.timeout):
      key = tuple(row.get(k) for k in OPTION_KEYS[:5] + ("batch_per_device",))
      if "gflop_per_example" in row:
        flops[key] = row["gflop_per_example"]
      elif key in flops:
        row["gflop_per_example"] = flops[key]
      rows.append(row)
  wall = time.perf_counter() - t0
  if args.inference:
    return _report_inference(rows, args, wall)
  if args.chips:
    for row in rows:
      if "peak_gib" in row:
        row.update(verdicts(row))
  columns = list(OPTION_KEYS) + [
      "devices", "batch_per_device", "params_m", "trained_m", "args_gib", "out_gib",
      "temp_gib", "alias_gib", "peak_gib", "gflop_per_example", "compile_s"]
  columns += [c for c, _, _ in CHIPS] if args.chips else []
  columns += (["measured_live_gib", "planned_growth_gib", "measured_rss_growth_gib"]
              if args.measure else [])
  columns += ["error"] if any("error" in r for r in rows) else []
  notes = [
      f"Compiled (never run) on {', '.join(map(str, devices))} simulated CPU device(s) in "
      f"{wall:.0f} s; per-device GiB from compiled.memory_analysis(); peak = args + out - "
      "alias + temp. XLA:CPU's plan: GPU/TPU compilers fuse and schedule differently.",
      "gflop_per_example: compiled.cost_analysis() of the 1-device step with unrolled scans "
      "at depths (1,1), (2,1), (1,2), extrapolated linearly to the real depths, at batch 1 "
      "and 2, extrapolated linearly to the batch (first device count only).",
  ]
  extra = dict(wall_s=wall, chips=CHIPS)
  if args.chips:
    notes.append(f"Chip columns: step time at {MFU:.0%} MFU of the bf16 peak per device "
                 f"(communication not counted), 'no' where peak > {MARGIN:.0%} of memory: "
                 + ", ".join(f"{c} {m} GiB {t} TFLOP/s" for c, m, t in CHIPS) + ".")
    extra["summary"] = summary(rows)
  common.report("Scale plan: the real update step compiled per device", rows, args,
                columns=columns, notes=notes, extra=extra)
  if args.chips:
    print("\nPer option and chip: smallest mesh, largest per-device batch there, step time "
          "and examples/s at 40% MFU\n")
    print(common.format_table(extra["summary"], list(OPTION_KEYS) + [c for c, _, _ in CHIPS]))
  return rows


def _report_inference(rows, args, wall):
  for row in rows:
    if "peak_gib" in row:
      row.update({name: "fits" if row["accel_peak_gib"] <= MARGIN * mem else "no"
                  for name, mem, _ in CHIPS})
  columns = ["variant", "batch", "prompt_len", "decode_len", "weights_gib", "prepared_gib",
             "kv_cache_gib", "args_gib", "temp_gib", "peak_gib", "f32_temp_gib",
             "accel_peak_gib", "compile_s"] + [c for c, _, _ in CHIPS]
  columns += ["error"] if any("error" in r for r in rows) else []
  common.report("Scale plan: greedy decoding compiled on one device (bf16)", rows, args,
                columns=columns, extra=dict(wall_s=wall, chips=CHIPS), notes=[
                    f"{wall:.0f} s. decode.make_generate_fn (prefill + KV-cache loop) lowered "
                    "from shapes on decode.prepare's bf16 weights (as decode.Predictor serves); "
                    "bf16 cache with image tokens + prompt + new tokens slots; peak = stored "
                    "weights (held beside the prepared ones) + args + out + temp, on XLA:CPU "
                    "(temp holds f32 copies of the weights). accel_peak_gib: stored + prepared "
                    "bf16 weights + the f32 program's temp (no weight copies; activations and "
                    "cache at twice their bf16 size): the bound the chip columns use."])
  return rows


if __name__ == "__main__":
  main()
