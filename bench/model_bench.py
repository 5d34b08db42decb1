"""Decoding: our JAX PaliGemma vs HF transformers (PyTorch CPU) used well, same weights.

python -m bench.model_bench [--quick] [--json PATH] [--configs bench_100m,tiny]
    [--batches 1,8,32] [--dtypes float32,bfloat16] [--steps N] [--profile]

For each config, dtype and batch, with the same random weights (converted to HF with
`hf_interop.save_hf`, loaded by `from_pretrained`, sdpa attention) in the same dtype on
both sides (bfloat16: ours `weights_dtype=bfloat16`, HF the model in bfloat16):
  prefill_ms   one generate call with 1 new token (image + prompt, then the head at the
               last position: HF's `generate` keeps that one logit row too)
  step_ms      one decode step: (time(N new) - time(1 new)) / (N - 1), same on both sides
  roofline_ms  what one step must read (step_mb: the LLM weights, the [V, D] head and the
               KV cache) divided by the memory bandwidth, the best measured between the
               calls of all rows of the config (`bandwidth`; rows print the best so far
               as they go, the final table the best of the run)
  tok_s        greedy generation of N new tokens (no EOS), whole call; ratio_* = ours / HF
HF runs `generate` under torch.inference_mode() with the dynamic cache (`hf_dyn`) and the
static cache (`hf_static`), torch threads = cores, and with 1 thread at batch 1
(`hf_1t`: on a shared 2-core box one thread can be faster); the best HF is the reference.
Inputs are built outside the timed region. Every function is warmed up, then all are
timed interleaved (ours, HF, ..., ours, HF, ...), medians kept. same_tokens: greedy
tokens equal to HF's at the same dtype; same_as_f32: ours in this dtype vs ours in f32.
--profile: where our decode step's time goes, per row: one more generate call traced
(jax.profiler), each operation of the compiled decode loop (those run once per step) in
ms per step, the largest first, with its HLO result shape.
"""
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from big_vision_cxr import host_allocator
from big_vision_cxr import decode
from big_vision_cxr import hf_interop
from big_vision_cxr.models import paligemma as pg

PROMPT_LEN = 16  # BOS + 14 prompt tokens + "\n": the same tokens on both sides, no padding.
interleaved = common.interleaved


def random_params(model, image_size, seed=0):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
                          jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def load_hf(params, cfg, folder, dtype="float32"):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import PaliGemmaForConditionalGeneration  # pylint: disable=import-outside-toplevel
  # No padding rows: HF's vocabulary is exactly ours, `<image>` is the id just past it.
  hf_interop.save_hf(params, cfg, folder, vocab_pad_multiple=0)
  model = PaliGemmaForConditionalGeneration.from_pretrained(
      folder, dtype=getattr(torch, dtype), attn_implementation="sdpa")
  return model.eval()


class Ours:
  def __init__(self, model, params, steps, weights_dtype=None):
    self.params = decode.prepare(jax.device_put(params), weights_dtype)  # Once, as Predictor does.
    self.fns = {n: decode.make_generate_fn(model, max_decode_len=n, eos_id=-1,
                                           weights_dtype=weights_dtype) for n in (1, steps)}
    self.steps = steps

  def generate(self, images, text, new):
    fn = self.fns[new]
    return np.asarray(jax.block_until_ready(fn(self.params, images, text, text != 0, None))[0])


class HF:
  def __init__(self, model, cache, threads):
    import torch  # pylint: disable=import-outside-toplevel
    self.torch, self.model, self.cache, self.threads = torch, model, cache, threads

  def inputs(self, images, text):
    torch = self.torch
    n_img = self.model.config.text_config.num_image_tokens
    ids = np.concatenate([np.full((len(text), n_img), self.model.config.image_token_index), text], 1)
    return dict(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
                token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
                pixel_values=torch.tensor(np.transpose(images, (0, 3, 1, 2))).to(self.model.dtype))

  def generate(self, inputs, new):
    torch = self.torch
    torch.set_num_threads(self.threads)
    with torch.inference_mode():
      out = self.model.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=-1,
                                pad_token_id=0, cache_implementation=self.cache)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


class Bandwidth:
  """Memory bandwidth, best of the calls: a 512 MiB torch copy (bytes read + written) and a
  jitted float32 matrix-vector product over a 512 MiB matrix (bytes read)."""

  def __init__(self):
    import torch  # pylint: disable=import-outside-toplevel
    n = 2 ** 27
    self.src, self.dst = torch.ones(n), torch.empty(n)
    self.mat = jnp.ones((2 ** 10, n // 2 ** 10), jnp.float32)
    self.gemv = jax.jit(lambda m: jnp.ones((1, m.shape[0]), m.dtype) @ m)
    jax.block_until_ready(self.gemv(self.mat))
    self.best = 0.0

  def __call__(self):
    t = time.perf_counter()
    self.dst.copy_(self.src)
    copy = 2 * 4 * self.src.numel() / (time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(self.gemv(self.mat))
    read = self.mat.nbytes / (time.perf_counter() - t)
    self.best = max(self.best, copy, read)


def step_bytes(cfg, batch, cache_len, dtype):
  """Bytes one decode step must read: LLM weights (head included) and the KV cache."""
  llm = cfg.llm
  d, f, n, k, h = llm.width, llm.mlp_dim, llm.num_heads, llm.num_kv_heads, llm.head_dim
  layer = d * (n * h + 2 * k * h + n * h) + 3 * d * f
  size = jnp.dtype(dtype).itemsize
  cache = 2 * llm.depth * batch * cache_len * k * h * size
  return (llm.depth * layer + llm.vocab_size * d) * size + cache


def inputs(batch, image_size):
  rng = np.random.default_rng(batch)
  images = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
  text = rng.integers(3, 1000, (batch, PROMPT_LEN)).astype(np.int32)
  text[:, 0], text[:, -1] = 2, 108
  return images, text


def profile_step(ours, images, text, top=8):
  """[{op, hlo_shape, ms_per_step}] of the decode loop's operations (those traced once per
  step), the `top` largest, then the rest summed and the whole loop."""
  steps = ours.steps - 1
  fn = ours.fns[ours.steps]
  shapes = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+\[[\d,]*\])", fn.lower(
      ours.params, images, text, text != 0, None).compile().as_text(), re.M))
  with tempfile.TemporaryDirectory(prefix="model_bench_trace_") as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      ours.generate(images, text, ours.steps)
    with gzip.open(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]) as f:
      events = json.load(f)["traceEvents"]
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in shapes:
      total[e["name"]] += e.get("dur", 0) / 1e3
      count[e["name"]] += 1
  loop = sorted(((total[k] / steps, k) for k in total if count[k] == steps), reverse=True)
  rows = [dict(op=k, hlo_shape=shapes[k], ms_per_step=ms) for ms, k in loop[:top]]
  rows.append(dict(op=f"the other {max(len(loop) - top, 0)} ops", hlo_shape="",
                   ms_per_step=sum(ms for ms, _ in loop[top:])))
  rows.append(dict(op="decode loop, all ops", hlo_shape="", ms_per_step=sum(ms for ms, _ in loop)))
  return rows


def set_roofline(row, bandwidth):
  """The row's roofline columns from its step_mb and `bandwidth` (bytes/s)."""
  row.update(roofline_ms=1e3 * row["step_mb"] * 1e6 / bandwidth,
             bandwidth_gb_s=bandwidth / 1e9)
  row["step_vs_roofline"] = row["step_ms_ours"] / row["roofline_ms"]


def decode_rate(tokens, seconds):
  """Tokens/s of the decode steps; None when they took no measurable time (tiny models)."""
  return tokens / seconds if seconds > 1e-3 else None


def bench_config(name, batches, dtypes, steps, repeats, profiles=None):
  cfg = pg.get_config(name)
  model = pg.Model(**cfg)
  params = random_params(model, cfg.img.image_size)
  cores = os.cpu_count()
  rows, f32_tokens = [], {}
  bandwidth = Bandwidth()
  for dtype in dtypes:
    with tempfile.TemporaryDirectory(prefix="model_bench_") as folder:
      hf_model = load_hf(params, cfg, folder, dtype)
    ours = Ours(model, params, steps, None if dtype == "float32" else jnp.dtype(dtype))
    for batch in batches:
      images, text = inputs(batch, cfg.img.image_size)
      hfs = {"hf_dyn": HF(hf_model, "dynamic", cores), "hf_static": HF(hf_model, "static", cores)}
      if batch == 1 and cores > 1:
        hfs["hf_1t"] = HF(hf_model, "dynamic", 1)
      hf_in = hfs["hf_dyn"].inputs(images, text)
      fns = [lambda n=n: ours.generate(images, text, n) for n in (1, steps)]
      for hf in hfs.values():
        fns += [lambda n=n, hf=hf: hf.generate(hf_in, n) for n in (1, steps)]
      ours_tokens = ours.generate(images, text, steps)
      hf_tokens = hfs["hf_dyn"].generate(hf_in, steps)
      f32_tokens.setdefault(batch, ours_tokens)
      times = interleaved(fns + [bandwidth], repeats)[:-1]
      one, gen = dict(zip(["ours", *hfs], times[0::2])), dict(zip(["ours", *hfs], times[1::2]))
      step = {k: max(gen[k] - one[k], 0.0) / (steps - 1) for k in gen}
      best_hf = min(hfs, key=lambda k: gen[k])
      cache_len = (cfg.img.image_size // cfg.img.patch_size) ** 2 + PROMPT_LEN + steps
      new = batch * steps
      row = dict(config=name, dtype=dtype, batch=batch, prefill_ms_ours=1e3 * one["ours"],
                 prefill_ms_hf=1e3 * one[best_hf], step_ms_ours=1e3 * step["ours"],
                 step_mb=step_bytes(cfg, batch, cache_len, dtype) / 1e6)
      set_roofline(row, bandwidth.best)
      row.update({f"step_ms_{k}": 1e3 * step[k] for k in hfs})
      row.update(tok_s_ours=new / gen["ours"], tok_s_best_hf=new / gen[best_hf], best_hf=best_hf,
                 ratio_tok_s=gen[best_hf] / gen["ours"],
                 ratio_step=(step[min(hfs, key=lambda k: step[k])] / step["ours"]
                             if step["ours"] > 0 else None),
                 same_tokens=float(np.mean(ours_tokens == hf_tokens)),
                 same_as_f32=float(np.mean(ours_tokens == f32_tokens[batch])))
      rows.append(row)
      print(common.format_table([row]), flush=True)
      if profiles is not None:
        profiles += [dict(config=name, dtype=dtype, batch=batch, **r)
                     for r in profile_step(ours, images, text)]
        print(common.format_table(profiles[-10:]), flush=True)
    del hf_model
  for row in rows:  # Every row against the best bandwidth of the run.
    set_roofline(row, bandwidth.best)
  return rows


def main(argv=None):
  parser = common.arg_parser(__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--configs", default=None, help="comma-separated paligemma variants")
  parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--steps", type=int, default=None, help="new tokens per generate call")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--profile", action="store_true", help="also trace our decode step's ops")
  args = parser.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  configs = (args.configs or ("tiny" if args.quick else "bench_100m,tiny")).split(",")
  steps = args.steps or (8 if args.quick else 17)
  repeats = args.repeats or (2 if args.quick else 3)
  rows, profiles = [], [] if args.profile else None
  for name in configs:
    batches = args.batches or ("1,8" if args.quick or name == "tiny" else "1,8,32")
    rows += bench_config(name, [int(b) for b in batches.split(",")], args.dtypes.split(","),
                         steps, repeats, profiles)
  notes = [
      f"HF transformers {transformers.__version__} (torch {torch.__version__}, {os.cpu_count()} "
      f"threads unless hf_1t, sdpa) vs jax {jax.__version__}; prompt = {PROMPT_LEN} text tokens "
      f"after the image tokens; {steps} new tokens; medians of {repeats} interleaved runs.",
      "ratio_tok_s = our tokens/s / the best HF's (> 1: we are faster); ratio_step = the best "
      "HF decode step time / ours; step_vs_roofline = our step / roofline_ms (1 = at the "
      "memory-bandwidth floor).",
      "same_tokens: fraction of greedy tokens identical to HF's (dynamic cache) at the same dtype; "
      "same_as_f32: ours at this dtype vs ours in float32.",
  ]
  if profiles:
    print("\nOur decode step's operations (ms per step, one traced call per row):")
    print(common.format_table(profiles))
  common.report("Model bench: decoding, ours (JAX) vs HF transformers (PyTorch), same weights",
                rows, args, notes=notes, extra=dict(profile=profiles) if profiles else None)


if __name__ == "__main__":
  host_allocator.reexec()  # both sides run with the CLIs' malloc settings
  main()
