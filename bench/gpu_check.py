"""GPU check: training MFU and decoding speed against HF transformers, in one short run.

python -m bench.gpu_check [--variant pg1_3b_224|tiny] [--json PATH] [--steps N] [--batch B]
    [--quick] [--remat off|on] [--new_tokens N] [--decode_batches 8,1,64]
    [--decode_dtype bfloat16|float32] [--hf_compile auto|off] [--budget_s S]

Made for a lent H100/H200 (`bench/gpu_check.sh` runs it there, ~8 min for pg1_3b_224);
runs on CPU with `--variant tiny`. Phases, each guarded (a failure is recorded as an
error string and the others still run), in this order:
  matmul   the bf16 matmul peak: a jitted [n, n] x [n, n] dot, timed before and after
           the training steps; the max is the peak MFU is measured against
  train    configs/cxr_mix.py's paper recipe (bench.scale_plan.recipe_config) with
           bf16 compute: random-init state on the device (jit'd init with the trainer's
           shardings), the trainer's own update step (scale_plan.compile_step), warm-up
           then timed steps on a random batch -> examples/s. FLOPs per example are
           counted as bench.scale_plan does (XLA:CPU's cost analysis with the layer
           scans unrolled at depths 1 and 2, batch 1 and 2, extrapolated), in a CPU
           subprocess while the GPU works; MFU = FLOPs/example x examples/s / peak
  decode   greedy generation, N new tokens, no EOS, batch 8, 1, 64 (the target first):
           ours (`decode.make_generate_fn` on params laid out once by `decode.prepare`;
           LLM weights, activations and KV cache in the decode dtype) and HF
           `PaliGemmaForConditionalGeneration` on the same weights (hf_interop, converted
           on the host), torch, sdpa, `generate(cache_implementation="static")` under
           inference_mode (on CUDA HF compiles the decode step itself: --hf_compile auto).
           prefill_ms = time to the first token (image + prompt through the model, cache
           filled, first token picked) = time(generate 1 new); decode_tok_s = B (N - 1) /
           (time(N new) - time(1 new)); gen_tok_s = B N / time(N new). Ours and HF are
           timed interleaved, medians of the repeats (bench.common.interleaved); agree =
           fraction of greedy tokens equal.
The decode dtype is bfloat16 on an accelerator and float32 on CPU, where XLA's bf16 is
slow and the agreement check needs float32 (random weights give near-tied logits that
bf16 rounding flips). A time budget (--budget_s) skips decode batches that would not fit.
Targets on a GPU: train MFU >= 0.4 of the measured bf16 peak; decode_tok_s at batch 8
>= 2x HF's.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bench import model_bench
from bench import scale_plan
from big_vision_cxr import hf_interop

# Per variant: per-device train batch, warm-up and timed steps, matmul size, new tokens,
# decode batches (the target's first), repeats.
DEFAULTS = {
    "pg1_3b_224": dict(batch=4, warmup=3, steps=10, matmul=8192, new_tokens=64,
                       decode_batches="8,1,64", repeats=3),
    "tiny": dict(batch=8, warmup=2, steps=10, matmul=1024, new_tokens=64,
                 decode_batches="2,1,4", repeats=3),
}
QUICK = dict(warmup=1, steps=3, new_tokens=16, repeats=2)
TARGET_MFU, TARGET_DECODE_RATIO, TARGET_BATCH = 0.4, 2.0, 8


def error_string(e):
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


class Budget:
  """Seconds left of the whole run."""

  def __init__(self, seconds):
    self.end = time.perf_counter() + seconds

  def left(self):
    return self.end - time.perf_counter()


def matmul_tflops(n, calls=10, repeats=3):
  """bf16 TFLOP/s of a jitted [n, n] x [n, n] dot (f32 accumulation): `calls` queued calls
  then one wait (no per-call sync in the time), best of `repeats`."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
  dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype))
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready([dot(a, b) for _ in range(calls)])
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 * calls / min(times) / 1e12


def gflop_per_example(variant, remat, batch):
  """The paper-recipe step's GFLOP per example, counted as bench.scale_plan counts it
  (layer scans unrolled at depths 1 and 2, batch 1 and 2, extrapolated)."""
  option = dict(variant=variant, recipe="paper", remat=remat, dtype="bfloat16",
                params="float32", microbatches=1)
  return scale_plan.flops_per_example(option, batch)[0]


def start_flops(variant, remat, batch):
  """`gflop_per_example` in a CPU-only python (compiles, no GPU needed) while the GPU
  works; its log goes to a temporary file, not a pipe that could fill."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "bench.gpu_check", "--flops_worker", "--variant", variant,
         "--remat", remat, "--batch", str(batch)]
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  proc = subprocess.Popen(cmd, env=env, cwd=scale_plan.REPO, stdout=out, stderr=err, text=True)
  return proc, out, err


def finish_flops(worker, timeout):
  """GFLOP per example from the worker started by `start_flops`."""
  proc, out, err = worker
  try:
    proc.wait(timeout=max(timeout, 1))
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise TimeoutError(f"FLOPs worker still running after the time budget ({timeout:.0f} s left)")
  out.seek(0)
  err.seek(0)
  lines = [l for l in out.read().splitlines() if l.startswith("GFLOP ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"FLOPs worker failed ({proc.returncode}): "
                       f"{err.read().strip().splitlines()[-1:]}")
  return json.loads(lines[-1][6:])


def random_batch(config, model, batch_sharding, seed=0):
  """A training batch of random tokens: prefix (mask_ar 0) then suffix (mask_ar 1, in the loss)."""
  from big_vision_cxr import train  # pylint: disable=import-outside-toplevel
  shapes = train.example_batch(model, config.input.text_len, config.input.batch_size)
  rng = np.random.default_rng(seed)
  b, length = shapes["text"].shape
  vocab = model.llm["vocab_size"]
  suffix = (np.arange(length) >= length // 4).astype(np.int32)
  batch = dict(image=rng.uniform(-1, 1, shapes["image"].shape).astype(np.float32),
               text=rng.integers(3, vocab, (b, length)).astype(np.int32),
               mask_ar=np.tile(suffix, (b, 1)), mask_loss=np.tile(suffix, (b, 1)),
               task_id=rng.integers(0, 5, (b,)).astype(np.int32))
  return jax.device_put(batch, batch_sharding)


def train_config(variant, remat, batch):
  """configs/cxr_mix.py's paper recipe, bf16 compute, per-device `batch` on every device."""
  return scale_plan.recipe_config(variant, "paper", remat, "bfloat16", batch * jax.device_count(),
                                  1)


def init_params(config):
  """Random-init float32 params on the device (jit'd init), for decoding without training."""
  from big_vision_cxr import train  # pylint: disable=import-outside-toplevel
  from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
  return jax.jit(train.init_params_fn(model_common.build_model(config), config, None))(
      jax.random.key(0))


def train_phase(config, warmup, steps):
  """The trainer's update step (FSDP mesh over all devices) on a random batch
  -> (result dict, final params)."""
  from big_vision_cxr import sharding  # pylint: disable=import-outside-toplevel
  from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
  mesh = sharding.create_mesh(config.mesh)
  t0 = time.perf_counter()
  compiled, counts, inputs = scale_plan.compile_step(config, mesh)
  compile_s = time.perf_counter() - t0
  state, _, rng = inputs()
  data = random_batch(config, model_common.build_model(config), sharding.batch_sharding(mesh))
  for _ in range(warmup):
    state, metrics = compiled(state, data, rng)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, data, rng)
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - t0) / steps
  stats = jax.devices()[0].memory_stats() or {}
  devices, batch = jax.device_count(), config.input.batch_size
  result = dict(batch=batch // devices, devices=devices, steps=steps, step_s=seconds,
                examples_s=batch / seconds, compile_s=compile_s,
                params_m=counts["params"] / 1e6, trained_m=counts["trained"] / 1e6,
                loss=float(metrics["loss"]),
                peak_gib=stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None)
  return result, state["params"]


class OursRunner:
  """Our greedy generation: N new tokens and 1 (the prefill), LLM weights in `dtype`.

  `host` keeps the params as stored (cast to `dtype`, numpy) for the HF conversion; the
  device holds them laid out for decoding once (`decode.prepare`), as `Predictor` does.
  """

  def __init__(self, config, params, dtype, new_tokens):
    from big_vision_cxr import decode  # pylint: disable=import-outside-toplevel
    from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
    config = config.copy_and_resolve_references()
    config.compute_dtype = jnp.dtype(dtype).name
    for part in ("img", "llm"):
      config.model[part]["remat"] = False  # Remat only matters for gradients.
    self.model_cfg = model_common.model_config(config)
    model = model_common.build_model(config)
    cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))(params)
    self.host = jax.device_get(cast)
    self.params = jax.jit(lambda p: decode.prepare(p, dtype))(cast)
    self.fns = {n: decode.make_generate_fn(model, max_decode_len=n, eos_id=-1, cache_dtype=dtype,
                                           weights_dtype=dtype) for n in (new_tokens, 1)}

  def inputs(self, images, text):
    return jax.device_put(images), jax.device_put(text)

  def generate(self, inputs, new):
    images, text = inputs
    out = self.fns[new](self.params, images, text, text != 0, None)[0]
    return np.asarray(jax.block_until_ready(out))


class HFRunner:
  """HF PaliGemma on the same weights (converted on the host), static cache, greedy."""

  def __init__(self, params, model_cfg, dtype, device, compile_):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    self.torch, self.device, self.compile, self.compile_error = torch, device, compile_, None
    self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[jnp.dtype(dtype).name]
    with tempfile.TemporaryDirectory(prefix="gpu_check_hf_") as folder:
      # No padding rows: HF's vocabulary is exactly ours, `<image>` is the id just past it.
      hf_interop.save_hf(params, model_cfg, folder, vocab_pad_multiple=0)
      model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
          folder, dtype=self.dtype, attn_implementation="sdpa")
    self.model = model.to(device).eval()
    self.versions = dict(torch=torch.__version__, transformers=transformers.__version__)

  def inputs(self, images, text):
    torch, config = self.torch, self.model.config
    ids = np.concatenate([np.full((len(text), config.text_config.num_image_tokens),
                                  config.image_token_index), text], 1)
    pixels = torch.tensor(np.transpose(images, (0, 3, 1, 2)))
    return dict(input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
                attention_mask=torch.ones(ids.shape, dtype=torch.long, device=self.device),
                token_type_ids=torch.zeros(ids.shape, dtype=torch.long, device=self.device),
                pixel_values=pixels.to(self.device, self.dtype))

  def generate(self, inputs, new):
    """Greedy tokens [B, new]; if HF's own compile fails, it is turned off (and noted)."""
    try:
      with self.torch.inference_mode():
        out = self.model.generate(**inputs, max_new_tokens=new, do_sample=False,
                                  eos_token_id=-1, pad_token_id=0, cache_implementation="static",
                                  disable_compile=not self.compile)
    except Exception as e:  # pylint: disable=broad-except  # torch.compile/inductor failures
      if not self.compile:
        raise
      self.compile, self.compile_error = False, error_string(e)
      return self.generate(inputs, new)
    return out[:, inputs["input_ids"].shape[1]:].cpu().numpy()


def decode_row(runners, batch, image_size, new, repeats):
  """The runners ({'ours': .., 'hf': ..}) on the same prompts: time to the first token,
  tokens/s, and the fraction of greedy tokens equal."""
  images, text = model_bench.inputs(batch, image_size)
  inputs = {name: r.inputs(images, text) for name, r in runners.items()}
  row, tokens = dict(batch=batch, new_tokens=new), {}
  for name, r in runners.items():  # First calls: compiles (ours; HF's on CUDA).
    t0 = time.perf_counter()
    tokens[name] = r.generate(inputs[name], new)
    row[f"first_call_s_{name}"] = time.perf_counter() - t0
  fns = [lambda r=r, x=inputs[name], n=n: r.generate(x, n)
         for name, r in runners.items() for n in (1, new)]
  times = iter(common.interleaved(fns, repeats))
  for name in runners:
    one, gen = next(times), next(times)
    row.update({f"prefill_ms_{name}": 1e3 * one, f"gen_tok_s_{name}": batch * new / gen,
                f"decode_tok_s_{name}": model_bench.decode_rate(batch * (new - 1), gen - one)})
  if "hf" in runners:
    row["agree"] = float(np.mean(tokens["ours"] == tokens["hf"]))
    row["gen_ratio"] = row["gen_tok_s_ours"] / row["gen_tok_s_hf"]
    if row["decode_tok_s_ours"] and row["decode_tok_s_hf"]:
      row["decode_ratio"] = row["decode_tok_s_ours"] / row["decode_tok_s_hf"]
  return row


def make_hf(ours, args, results):
  """HFRunner on our decode weights, on CUDA when torch has it (never a 3B on the CPU
  next to a GPU); notes the versions and settings in results['hf']."""
  import torch  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu" and jax.default_backend() != "cpu":
    raise RuntimeError(f"torch {torch.__version__} sees no CUDA device: HF not run on the CPU")
  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  dtype = jnp.dtype(args.decode_dtype)
  hf = HFRunner(ours.host, ours.model_cfg, dtype, device, compile_=args.hf_compile == "auto")
  results["hf"] = dict(hf.versions, device=device, compile=args.hf_compile, attn="sdpa",
                       cache="static", dtype=dtype.name)
  return hf


def decode_phase(ours, args, budget, results):
  """Fills results['decode'] (rows) and results['errors'] batch by batch, within the budget;
  without HF (its error recorded) ours is still timed."""
  hf = guarded("hf", results, make_hf, ours, args, results)
  del ours.host
  runners = dict(ours=ours, **({"hf": hf} if hf else {}))
  last = 0.0
  for batch in [int(b) for b in args.decode_batches.split(",")]:
    if budget.left() < last:
      results["errors"][f"decode_b{batch}"] = (f"skipped: {budget.left():.0f} s of the time "
                                              f"budget left, the last batch took {last:.0f} s")
      continue
    t0 = time.perf_counter()
    row = guarded(f"decode_b{batch}", results, decode_row, runners, batch,
                  ours.model_cfg["img"]["image_size"], args.new_tokens, args.repeats)
    if row:
      results["decode"].append(row)
    last = time.perf_counter() - t0
  if hf:
    results["hf"]["compiled"] = hf.compile and hf.device == "cuda"
    if hf.compile_error:
      results["errors"]["hf_compile"] = "HF ran without compile after: " + hf.compile_error


def guarded(name, results, fn, *a):
  """fn(*a), or None with the error recorded under `name`; adds its seconds to phase_s."""
  t0 = time.perf_counter()
  try:
    return fn(*a)
  except Exception as e:  # pylint: disable=broad-except  # each phase reports on its own
    results["errors"][name] = error_string(e)
    return None
  finally:
    phase_s = results["phase_s"]
    phase_s[name] = phase_s.get(name, 0.0) + time.perf_counter() - t0


def targets(results):
  """The issue's targets, None where a number is missing (they are meant for a GPU)."""
  mfu = (results.get("train") or {}).get("mfu")
  at8 = [r for r in results["decode"] if r["batch"] == TARGET_BATCH]
  ratio = at8[0].get("decode_ratio") if at8 else None
  return {f"train_mfu>={TARGET_MFU}": None if mfu is None else mfu >= TARGET_MFU,
          f"decode_b{TARGET_BATCH}_vs_hf>={TARGET_DECODE_RATIO}":
              None if ratio is None else ratio >= TARGET_DECODE_RATIO}


def table_rows(results):
  rows = [dict(phase=f"matmul {k}", tflops=v) for k, v in results["matmul"].items()]
  train = results.get("train")
  if train:
    rows.append(dict(phase="train", batch=train["batch"], examples_s=train["examples_s"],
                     step_s=train["step_s"], gflop_per_example=train.get("gflop_per_example"),
                     tflops=train.get("tflops"), mfu=train.get("mfu")))
  rows += [dict(phase="decode", **r) for r in sorted(results["decode"], key=lambda r: r["batch"])]
  return rows


def main(argv=None):
  parser = common.arg_parser(__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--variant", default="pg1_3b_224", choices=sorted(DEFAULTS))
  parser.add_argument("--batch", type=int, default=None,
                      help="per-device training batch (default 4 for pg1_3b_224, 8 for tiny)")
  parser.add_argument("--steps", type=int, default=None, help="timed training steps")
  parser.add_argument("--remat", default="off", choices=("off", "on"))
  parser.add_argument("--new_tokens", type=int, default=None)
  parser.add_argument("--decode_batches", default=None, help="comma-separated, run in this order")
  parser.add_argument("--decode_dtype", default=None, choices=("bfloat16", "float32"),
                      help="default bfloat16 on an accelerator, float32 on CPU")
  parser.add_argument("--hf_compile", default="auto", choices=("auto", "off"),
                      help="auto: HF's own torch.compile of the static-cache decode step on CUDA")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="seconds for the whole run (decode batches that would not fit are skipped)")
  parser.add_argument("--flops_worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  defaults = dict(DEFAULTS[args.variant], **(QUICK if args.quick else {}))
  for key, value in defaults.items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  if args.flops_worker:
    print("GFLOP " + json.dumps(gflop_per_example(args.variant, args.remat, args.batch)))
    return None
  budget = Budget(args.budget_s)
  backend = jax.default_backend()
  args.decode_dtype = args.decode_dtype or ("float32" if backend == "cpu" else "bfloat16")
  results = dict(variant=args.variant, backend=backend, matmul={}, decode=[], errors={},
                 phase_s={})
  flops = guarded("flops", results, start_flops, args.variant, args.remat, args.batch)
  results["matmul"]["before"] = guarded("matmul_before", results, matmul_tflops, args.matmul)
  config = train_config(args.variant, args.remat, args.batch)
  out = guarded("train", results, train_phase, config, args.warmup, args.steps)
  results["matmul"]["after"] = guarded("matmul_after", results, matmul_tflops, args.matmul)
  peaks = [v for v in results["matmul"].values() if v]
  results["matmul"]["peak"] = max(peaks) if peaks else None
  if out:
    results["train"], params = out
    del out
  else:  # Decoding still runs, on freshly initialised params.
    params = guarded("init", results, init_params, config)
  ours = None
  if params is not None:
    ours = guarded("decode", results, OursRunner, config, params, jnp.dtype(args.decode_dtype),
                   args.new_tokens)
  del params  # The float32 params; ours holds the decode-dtype copies.
  if ours:
    guarded("decode", results, decode_phase, ours, args, budget, results)
  gflop = flops and guarded("flops", results, finish_flops, flops, budget.left())
  train = results.get("train")
  if train and gflop:
    train.update(gflop_per_example=gflop,
                 tflops=gflop * train["examples_s"] / train["devices"] / 1e3)  # per device
    if results["matmul"]["peak"]:
      train["mfu"] = train["tflops"] / results["matmul"]["peak"]
  results["targets"] = targets(results)
  results["wall_s"] = args.budget_s - budget.left()
  columns = ["phase", "batch", "tflops", "examples_s", "step_s", "gflop_per_example", "mfu",
             "prefill_ms_ours", "prefill_ms_hf", "gen_tok_s_ours", "gen_tok_s_hf", "gen_ratio",
             "decode_tok_s_ours", "decode_tok_s_hf", "decode_ratio", "agree"]
  notes = [
      f"{args.variant}, paper recipe, bf16 compute, remat {args.remat}: {args.warmup} warm-up + "
      f"{args.steps} timed steps at batch {args.batch}; matmul peak = max of a {args.matmul}^3 "
      "bf16 dot before/after training; mfu = tflops / peak (FLOPs from XLA:CPU's count of "
      "the same step, scans extrapolated).",
      f"decode: {args.new_tokens} new greedy tokens, {args.decode_dtype} weights and KV cache "
      f"on both sides, HF {results.get('hf')}; prefill_ms = time to the first token; "
      "decode_tok_s = steps alone; ratios ours/HF (>1: we are faster); medians of "
      f"{args.repeats} interleaved.",
      f"targets (GPU): {results['targets']}; wall {results['wall_s']:.0f} s.",
  ] + [f"ERROR {k}: {v}" for k, v in results["errors"].items()]
  common.report(f"GPU check ({args.variant} on {backend})", table_rows(results), args,
                columns=columns, notes=notes, extra=results)
  return results


if __name__ == "__main__":
  main()
