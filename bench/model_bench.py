"""Our JAX PaliGemma vs HF transformers (PyTorch CPU) on the same weights.

python -m bench.model_bench [--quick] [--json PATH] [--configs tiny,bench_100m]

For each config and batch size, with the same random weights (converted to HF
with `hf_interop.save_hf`, loaded by `from_pretrained`), float32 on both sides:
  prefill_ms   forward over image + prompt, filling the KV cache, logits of the last
               position only (HF: `logits_to_keep=1`, as its `generate` does)
  *_bf16head   ours again with the tied head in bfloat16 (`head_dtype`), HF unchanged
  gen_tok_s    greedy generation of N new tokens (no EOS), tokens/s over the whole
               call (prefill included): ours `decode.make_generate_fn`, HF `generate`
  decode_tok_s tokens/s of the decode steps alone: B*(N-1) / (time(N new) - time(1 new)),
               both sides measured the same way
  peak_mb      process RSS growth (sampled every 1 ms) during one warmed-up generate
               call: activations, KV cache, logits (weights excluded). Measured in a
               child process where glibc mmaps every allocation >= 64 KiB, so RSS
               follows live buffers for both frameworks; ours_xla_temp_mb is XLA's own
               count of the temporary buffers of that program
Ratios are ours / HF (prefill: < 1 is faster; tokens/s: > 1 is faster; memory: < 1 is
smaller). Ours and HF are timed interleaved (ours, HF, ours, HF, ...) and the best run
of each is kept (see `interleaved`: contention slows PyTorch far more than XLA).
"""
import argparse
import gc
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
from big_vision_cxr import decode
from big_vision_cxr import hf_interop
from big_vision_cxr.models import paligemma as pg

PROMPT_LEN = 16  # BOS + 14 prompt tokens + "\n": the same tokens on both sides, no padding.


def random_params(model, image_size, seed=0):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
                          jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def load_hf(params, cfg, folder):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import PaliGemmaForConditionalGeneration  # pylint: disable=import-outside-toplevel
  # No padding rows: HF's vocabulary is exactly ours, `<image>` is the id just past it.
  hf_interop.save_hf(params, cfg, folder, vocab_pad_multiple=0)
  model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="sdpa")
  return model.eval()


class Ours:
  def __init__(self, model, params, steps, head_dtype=None):
    self.model, self.params = model, jax.device_put(params)
    self.generate = decode.make_generate_fn(model, max_decode_len=steps, eos_id=-1,
                                            head_dtype=head_dtype)
    self.generate_one = decode.make_generate_fn(model, max_decode_len=1, eos_id=-1,
                                                head_dtype=head_dtype)
    self.prefill = jax.jit(lambda p, im, t, m: decode.prefill(model, p, im, t, m, steps,
                                                              jnp.float32)[:2])

  def run_prefill(self, images, text):
    jax.block_until_ready(self.prefill(self.params, images, text, text != 0))

  def run_generate(self, images, text, one=False):
    fn = self.generate_one if one else self.generate
    return np.asarray(jax.block_until_ready(fn(self.params, images, text, text != 0, None))[0])

  def xla_temp_mb(self, images, text):
    compiled = self.generate.lower(self.params, images, text, text != 0, None).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


class HF:
  def __init__(self, model, steps):
    import torch  # pylint: disable=import-outside-toplevel
    self.torch, self.model, self.steps = torch, model, steps

  def inputs(self, images, text):
    torch = self.torch
    n_img = self.model.config.text_config.num_image_tokens
    ids = np.concatenate([np.full((len(text), n_img), self.model.config.image_token_index), text], 1)
    return dict(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
                token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
                pixel_values=torch.tensor(np.transpose(images, (0, 3, 1, 2))))

  def run_prefill(self, images, text):
    with self.torch.inference_mode():
      self.model(**self.inputs(images, text), use_cache=True, logits_to_keep=1)

  def run_generate(self, images, text, one=False):
    inputs = self.inputs(images, text)
    with self.torch.inference_mode():
      out = self.model.generate(**inputs, max_new_tokens=1 if one else self.steps,
                                do_sample=False, eos_token_id=-1, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


def interleaved(fns, repeats):
  """Best (minimum) seconds of each fn, calling them in turn `repeats` times after one
  warm-up each. The minimum, not the median: on the shared CPU, PyTorch's OpenMP threads
  slow down up to 10x whenever another process holds a core (XLA's pool far less), so
  medians would flatter us; the best run approximates a quiet machine for both."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      t = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - t)
  return [float(np.min(t)) for t in times]


def peak_mb(fn):
  gc.collect()
  with common.PeakRSS(interval_s=0.001) as mem:
    fn()
  return mem.peak_bytes / 2**20


def setup(name, steps):
  cfg = pg.get_config(name)
  model = pg.Model(**cfg)
  params = random_params(model, cfg.img.image_size)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  with tempfile.TemporaryDirectory(prefix="model_bench_") as folder:
    hf = HF(load_hf(params, cfg, folder), steps)
  return Ours(model, params, steps), hf, n_params, cfg.img.image_size


def inputs(batch, image_size):
  rng = np.random.default_rng(batch)
  images = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
  text = rng.integers(3, 1000, (batch, PROMPT_LEN)).astype(np.int32)
  text[:, 0], text[:, -1] = 2, 108
  return images, text


def decode_rate(tokens, seconds):
  """Tokens/s of the decode steps; None when they took no measurable time (tiny models)."""
  return tokens / seconds if seconds > 1e-3 else None


def time_config(name, batches, steps, repeats):
  ours, hf, n_params, image_size = setup(name, steps)
  bf16 = Ours(ours.model, ours.params, steps, head_dtype=jnp.bfloat16)
  rows = []
  for batch in batches:
    images, text = inputs(batch, image_size)
    ours_tokens, hf_tokens = ours.run_generate(images, text), hf.run_generate(images, text)
    bf16_tokens = bf16.run_generate(images, text)
    pre_ours, pre_hf = interleaved([lambda: ours.run_prefill(images, text),
                                    lambda: hf.run_prefill(images, text)], repeats)
    gen_ours, gen_hf, gen_bf16, one_ours, one_hf, one_bf16 = interleaved(
        [lambda: ours.run_generate(images, text), lambda: hf.run_generate(images, text),
         lambda: bf16.run_generate(images, text),
         lambda: ours.run_generate(images, text, one=True),
         lambda: hf.run_generate(images, text, one=True),
         lambda: bf16.run_generate(images, text, one=True)], repeats)
    new = batch * steps
    rows.append(dict(
        config=name, params_m=round(n_params / 1e6, 1), batch=batch, new_tokens=steps,
        prefill_ms_ours=1e3 * pre_ours, prefill_ms_hf=1e3 * pre_hf,
        prefill_ratio=common.ratio(pre_ours, pre_hf),
        gen_tok_s_ours=new / gen_ours, gen_tok_s_hf=new / gen_hf,
        gen_ratio=common.ratio(gen_hf, gen_ours),
        decode_tok_s_ours=decode_rate(batch * (steps - 1), gen_ours - one_ours),
        decode_tok_s_hf=decode_rate(batch * (steps - 1), gen_hf - one_hf),
        gen_tok_s_bf16head=new / gen_bf16, gen_ratio_bf16head=common.ratio(gen_hf, gen_bf16),
        decode_tok_s_bf16head=decode_rate(batch * (steps - 1), gen_bf16 - one_bf16),
        ours_xla_temp_mb=ours.xla_temp_mb(images, text),
        same_tokens=float(np.mean(ours_tokens == hf_tokens)),
        same_tokens_bf16head=float(np.mean(bf16_tokens == hf_tokens))))
  return rows


def memory_config(name, batches, steps):
  """Peak RSS growth of one warmed-up generate call, ours then HF (child process only)."""
  ours, hf, _, image_size = setup(name, steps)
  out = []
  for batch in batches:
    images, text = inputs(batch, image_size)
    ours.run_generate(images, text)
    hf.run_generate(images, text)
    out.append(dict(peak_mb_ours=peak_mb(lambda: ours.run_generate(images, text)),
                    peak_mb_hf=peak_mb(lambda: hf.run_generate(images, text))))
  return out


def measure_memory(configs, batches, steps):
  """Runs `memory_config` in a child where glibc mmaps (and unmaps) every allocation
  >= 64 KiB, so RSS follows live buffers rather than what the allocator keeps cached."""
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
  cmd = [sys.executable, "-m", "bench.model_bench", "--memory_probe", "--configs",
         ",".join(configs), "--steps", str(steps)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"memory probe failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = common.arg_parser(__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--configs", default=None, help="comma-separated paligemma variants")
  parser.add_argument("--steps", type=int, default=None, help="new tokens per generate call")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--memory_probe", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  torch.set_num_threads(os.cpu_count())
  configs = (args.configs or ("tiny" if args.quick else "tiny,bench_100m")).split(",")
  steps = args.steps or (8 if args.quick else 32)
  repeats = args.repeats or (1 if args.quick else 5)
  batches = (1, 8)
  if args.memory_probe:
    print(json.dumps([m for name in configs for m in memory_config(name, batches, steps)]))
    return
  rows = [row for name in configs for row in time_config(name, batches, steps, repeats)]
  for row, mem in zip(rows, measure_memory(configs, batches, steps)):
    row.update(mem, mem_ratio=common.ratio(mem["peak_mb_ours"], mem["peak_mb_hf"]))
  columns = ["config", "params_m", "batch", "prefill_ms_ours", "prefill_ms_hf", "prefill_ratio",
             "gen_tok_s_ours", "gen_tok_s_hf", "gen_ratio", "decode_tok_s_ours", "decode_tok_s_hf",
             "gen_tok_s_bf16head", "gen_ratio_bf16head", "decode_tok_s_bf16head",
             "peak_mb_ours", "peak_mb_hf", "mem_ratio", "ours_xla_temp_mb", "same_tokens",
             "same_tokens_bf16head"]
  notes = [
      f"float32 both sides; HF transformers {transformers.__version__} (torch "
      f"{torch.__version__}, {torch.get_num_threads()} threads, sdpa attention) vs jax "
      f"{jax.__version__}; prompt = {PROMPT_LEN} text tokens after the image tokens; "
      f"{steps} new tokens; best of {repeats} interleaved runs.",
      "prefill_ratio = ours/HF time (<1: we are faster); gen_ratio = ours/HF tokens/s "
      "(>1: we are faster); mem_ratio = ours/HF peak RSS growth during one generate call.",
      "same_tokens: fraction of greedy tokens identical to HF's (same weights).",
      "decode_tok_s is empty where time(N new) - time(1 new) is below timer noise.",
      "*_bf16head: ours with decode.make_generate_fn(head_dtype=bfloat16): the tied 257k-vocab "
      "head on a bf16 copy of the table, f32 accumulation (everything else f32); "
      "same_tokens_bf16head shows what that rounding changes in the greedy tokens.",
  ]
  common.report("Model bench: ours (JAX) vs HF transformers (PyTorch), same weights", rows, args,
                columns=columns, notes=notes)


if __name__ == "__main__":
  main()
