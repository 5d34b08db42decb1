"""Training-step time and MFU: our jitted update vs HF transformers (PyTorch CPU), HF used well.

python -m bench.train_bench [--quick] [--json PATH] [--configs bench_100m] [--profile]

One step = forward + backward + optimizer update on the same model (our params converted
to HF with `hf_interop.save_hf`), the same batch and the same frozen set (the paper's
recipe: SigLIP and the projection frozen, the LLM trained), float32 on both sides:
  ours  train.make_update_fn: the suffix token cross-entropy (the vocab head on the loss
        positions only), global-norm clip 1.0, Adam + decoupled weight decay (big_vision
        chain, equal to AdamW), jitted, state donated; the LLM's layers unrolled
        (`model.llm.scan_unroll=True`, the setting docs/TRAINING.md gives for CPU).
  HF    PaliGemmaForConditionalGeneration (sdpa attention, torch threads = cores) with
        `logits_to_keep` = the loss positions (its head never sees the image tokens or the
        prompt), the same loss, backward, clip_grad_norm_(1.0), torch.optim.AdamW
        (foreach); vision tower and projector with requires_grad=False.
Rows: batch 1-8 at 64 text tokens (16 prompt + 48 answer), then text length 32-256 at
batch 2 (16-token prompt); `--shapes 4x64,8x64` picks rows. Each row starts both sides
from the same weights; the first step's losses must agree. step_ratio = HF step time / ours
(> 1: we are faster), medians of interleaved repeats (ours, HF, matmul peak, ours, HF, ...)
after a warm-up each.
gflop_step: the model's FLOPs for the step: our step's from XLA's cost analysis with the
layer scans fully unrolled at depths (img, llm) = (1, 1), (2, 1), (1, 2) and extrapolated
to the real depths (XLA counts a loop body once), with XLA's count of the vocabulary head
(`losses.head_loss`: a switch over chunk sizes, counted at the largest) replaced by that of
the same loss on exactly the loss positions, as HF computes it; both sides are credited
with the same useful work. MFU = gflop_step / step time / peak, the peak being the best
FLOP/s of a 2048^3 float32 jitted matmul timed between the steps of the same row.
--profile adds a table of where our step's time goes (its jitted parts timed alone).
--allocators: our step (batch 2, text 64) under each glibc malloc setting of ALLOCATORS,
each in a fresh process (settings act at start-up), the settings interleaved round by
round: minor page faults, kernel and user CPU seconds and wall seconds per step (medians).
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
import ml_collections
import numpy as np

from bench import common
from bench import model_bench
from big_vision_cxr import host_allocator
from big_vision_cxr import losses
from big_vision_cxr import optim
from big_vision_cxr import train
from big_vision_cxr.models import common as model_common
from big_vision_cxr.models import paligemma as pg

PREFIX_LEN = 16  # BOS + prompt + "\n"; the rest of the text is the answer (the loss positions).
LR, TORCH_WD = 1e-4, 0.01


class Peak:
  """FLOP/s of an n^3 float32 matmul, timed whenever called (the best run is the peak)."""

  def __init__(self, n=2048):
    self.n, self.best = n, 0.0
    self.a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    self.f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(self.f(self.a))

  def __call__(self):
    seconds = common.time_fn(lambda: jax.block_until_ready(self.f(self.a)), repeats=1, warmup=0)
    self.best = max(self.best, 2 * self.n ** 3 / seconds)


def make_batch(batch, image_size, text_len, seed=0):
  rng = np.random.default_rng(seed)
  text = rng.integers(3, 1000, (batch, text_len)).astype(np.int32)
  text[:, 0], text[:, PREFIX_LEN - 1] = 2, 108
  mask_ar = np.zeros((batch, text_len), np.int32)
  mask_ar[:, PREFIX_LEN:] = 1
  return {"image": rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32),
          "text": text, "mask_ar": mask_ar, "mask_loss": mask_ar.copy(),
          "task_id": np.zeros((batch,), np.int32)}


def recipe_config(variant, batch, depths=None):
  config = ml_collections.ConfigDict(dict(
      model_name="paligemma", model=dict(variant=variant, img={}, llm=dict(scan_unroll=True)),
      input=dict(batch_size=batch),
      lr=LR, wd=LR * TORCH_WD, wd_mults=[("llm/.*", 1.0)], grad_clip_norm=1.0,
      optax_name="scale_by_adam", optax=dict(b2=0.999),
      schedule=[("img/.*", None), ("llm/.*", dict(decay_type="constant"))]))
  if depths:
    config.model.img.depth, config.model.llm.depth = depths
  return config


def make_update(config, params):
  """(jitted update, tx, model, loss_fn) of the trainer for `config` (params may be
  ShapeDtypeStructs)."""
  model = model_common.build_model(config)
  tx, plan, sched_fns = optim.make(config, params, total_steps=1000)
  mask = optim.trainable_mask(plan, params)
  loss_fn = train.make_loss_fn(model, config, mask, None)
  return jax.jit(train.make_update_fn(loss_fn, tx, mask, config, sched_fns),
                 donate_argnums=(0,)), tx, model, loss_fn


def step_flops(variant, data):
  """Our step's FLOPs with each scanned stack counted at its depth (see the docstring)."""
  cfg = pg.get_config(variant)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data)

  def at(d_img, d_llm):
    config = recipe_config(variant, len(data["text"]), (d_img, d_llm))
    config.model.img.scan_unroll = True  # XLA counts each layer (llm: unrolled already).
    shapes = pg.param_shapes(model_common.model_config(config))
    update, tx, _, _ = make_update(config, shapes)
    state = jax.eval_shape(lambda p: {"step": jnp.zeros([], jnp.int32), "params": p,
                                      "opt": tx.init(p)}, shapes)
    cost = update.lower(state, batch, rng).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])

  f11, f21, f12 = at(1, 1), at(2, 1), at(1, 2)
  return f11 + (cfg.img.depth - 1) * (f21 - f11) + (cfg.llm.depth - 1) * (f12 - f11)


def head_flops_excess(variant, data):
  """The FLOPs of a head on exactly the loss positions (HF's `logits_to_keep`) less XLA's
  count of `losses.head_loss` in our step: its switch counted at the largest chunk
  size and its loop body once, whatever the count (see the docstring)."""
  llm = pg.get_config(variant).llm
  b, t = data["text"].shape
  targets, weights = data["text"][:, 1:], data["mask_loss"][:, 1:]
  n = t - PREFIX_LEN  # The loss positions are the last n.

  def exact(hidden, table):
    logits = jnp.einsum("BnD,VD->BnV", hidden[:, -n:], table)
    return losses.per_example_loss(logits, targets[:, -n:], weights[:, -n:]).mean()

  def flops(loss):
    args = (jax.ShapeDtypeStruct((b, t - 1, llm.width), jnp.float32),
            jax.ShapeDtypeStruct((llm.vocab_size, llm.width), jnp.float32))
    cost = jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  return flops(exact) - flops(lambda h, w: losses.head_loss(h, w, targets, weights)[0])


class Ours:
  """Our jitted training step; `reset` starts again from `params`."""

  def __init__(self, variant, params):
    self.params = params
    self.update, self.tx, self.model, _ = make_update(recipe_config(variant, 1), params)
    self.rng = jax.random.key(0)

  def reset(self):
    params = jax.tree.map(jnp.array, self.params)
    self.state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt": self.tx.init(params)}

  def step(self, batch):
    self.state, metrics = self.update(self.state, batch, self.rng)
    return float(jax.block_until_ready(metrics["loss"]))


class HF:
  """The same step in HF transformers: frozen vision tower + projector, AdamW, clip 1.0."""

  def __init__(self, model):
    import torch  # pylint: disable=import-outside-toplevel
    self.torch, self.model = torch, model.train()
    for name, p in model.named_parameters():
      p.requires_grad = "language_model" in name or "lm_head" in name
    self.trained = [p for p in model.parameters() if p.requires_grad]
    self.initial = {k: v.clone() for k, v in model.state_dict().items()}

  def reset(self):
    self.model.load_state_dict(self.initial)
    self.opt = self.torch.optim.AdamW(self.trained, lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=TORCH_WD, foreach=True)

  def inputs(self, batch):
    torch = self.torch
    cfg = self.model.config
    n_img = cfg.text_config.num_image_tokens
    text = batch["text"]
    ids = np.concatenate([np.full((len(text), n_img), cfg.image_token_index), text], 1)
    token_type = np.concatenate([np.zeros((len(text), n_img), np.int64), batch["mask_ar"]], 1)
    return dict(input_ids=torch.tensor(ids[:, :-1], dtype=torch.long),
                attention_mask=torch.ones(ids[:, :-1].shape, dtype=torch.long),
                token_type_ids=torch.tensor(token_type[:, :-1], dtype=torch.long),
                pixel_values=torch.tensor(np.transpose(batch["image"], (0, 3, 1, 2))))

  def prepare(self, batch):
    """Tensors built outside the timed step; the loss positions are the last n_loss."""
    n_loss = batch["text"].shape[1] - PREFIX_LEN
    torch = self.torch
    return (self.inputs(batch), n_loss, torch.tensor(batch["text"][:, -n_loss:], dtype=torch.long),
            torch.tensor(batch["mask_loss"][:, -n_loss:], dtype=torch.float32))

  def step(self, prepared):
    torch = self.torch
    inputs, n_loss, targets, weights = prepared
    self.opt.zero_grad(set_to_none=True)
    logits = self.model(**inputs, logits_to_keep=n_loss).logits.float()  # [B, n_loss, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    per_ex = -(logp * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
    loss = per_ex.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
    self.opt.step()
    return float(loss.detach())


def bench_row(name, ours, hf, image_size, batch, text_len, repeats, peak_n, pause=0.0):
  data = make_batch(batch, image_size, text_len)
  prepared = hf.prepare(data)
  ours.reset()
  hf.reset()
  loss_ours, loss_hf = ours.step(data), hf.step(prepared)  # Same weights: the same loss.
  peak = Peak(peak_n)
  t_ours, t_hf, _ = common.interleaved([lambda: ours.step(data), lambda: hf.step(prepared), peak],
                                       repeats, pause=pause)
  n_loss = batch * (text_len - PREFIX_LEN)
  flops = step_flops(name, data) + head_flops_excess(name, data)
  return dict(
      config=name, batch=batch, text_len=text_len, step_s_ours=t_ours, step_s_hf=t_hf,
      step_ratio=common.ratio(t_hf, t_ours), loss_positions=n_loss,
      head_rows_ours=losses.head_rows(n_loss, batch * (text_len - 1)),
      loss_tok_s_ours=n_loss / t_ours,
      loss_tok_s_hf=n_loss / t_hf, gflop_step=flops / 1e9, peak_gflop_s=peak.best / 1e9,
      mfu_ours=flops / t_ours / peak.best, mfu_hf=flops / t_hf / peak.best,
      first_loss_ours=loss_ours, first_loss_hf=loss_hf, loss_diff=abs(loss_ours - loss_hf))


def profile(ours, image_size, batch, text_len, repeats):
  """Where our step's time goes: its parts jitted and timed alone (medians, seconds)."""
  data = make_batch(batch, image_size, text_len)
  model, params = ours.model, ours.params
  text, mask_ar = data["text"][:, :-1], data["mask_ar"][:, :-1]
  x, _, _ = model.apply({"params": params}, data["image"], text, mask_ar=mask_ar,
                        method="embed_image_and_text")
  hidden = model.apply({"params": params}, data["image"], text, mask_ar, method="text_hidden")
  table = params["llm"]["embedder"]["input_embedding"]
  targets, weights = data["text"][:, 1:], data["mask_loss"][:, 1:]
  grads = jax.tree.map(jnp.ones_like, params)
  opt = ours.tx.init(params)

  def llm(p):  # The LLM stack on fixed inputs (image embedded), to its final norm.
    emb = model.apply({"params": p}, data["image"], text, mask_ar=mask_ar, method="embed_image_and_text")
    return jnp.sum(model.apply({"params": p}, *emb[:1], jnp.broadcast_to(
        jnp.arange(x.shape[1]), x.shape[:2]), pg.make_attn_mask(emb[1], emb[2]),
        method="llm_forward")[1]["pre_logits"])
  parts = {
      "ViT forward (frozen)": jax.jit(lambda p: model.apply(
          {"params": p}, data["image"], method="embed_image")[0]),
      "LLM forward": jax.jit(llm),
      "LLM forward + backward": jax.jit(jax.grad(lambda p: llm(dict(
          p, img=jax.lax.stop_gradient(p["img"]))))),
      "head + cross-entropy, forward + backward (head_loss)": jax.jit(jax.grad(
          lambda h, w: losses.head_loss(h, w, targets, weights)[0], (0, 1))),
      "optimizer update (clip + AdamW)": jax.jit(lambda g, o, p: ours.tx.update(g, o, p)),
      "whole step": lambda *_: ours.step(data),
  }
  args = {"ViT forward (frozen)": (params,), "LLM forward": (params,),
          "LLM forward + backward": (params,),
          "head + cross-entropy, forward + backward (head_loss)": (hidden, table),
          "optimizer update (clip + AdamW)": (grads, opt, params), "whole step": ()}
  ours.reset()
  rows = []
  for name, fn in parts.items():
    seconds = common.time_fn(lambda fn=fn, name=name: jax.block_until_ready(fn(*args[name])),
                             repeats=repeats)
    rows.append(dict(part=name, seconds=seconds))
  return rows


def kernel_time(fn, repeats):
  """(CPU seconds in the kernel, minor page faults) per call of fn, from getrusage."""
  import resource  # pylint: disable=import-outside-toplevel
  fn()
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(repeats):
    fn()
  after = resource.getrusage(resource.RUSAGE_SELF)
  return ((after.ru_stime - before.ru_stime) / repeats,
          (after.ru_minflt - before.ru_minflt) / repeats)


# name: GLIBC_TUNABLES of the process (glibc reads it at start-up only).
ALLOCATORS = {
    "glibc defaults": None,
    "glibc.malloc.hugetlb=1": "glibc.malloc.hugetlb=1",
    "host_allocator.TUNABLES (the CLIs restart with them)": host_allocator.TUNABLES,
    "host_allocator.TUNABLES + glibc.malloc.hugetlb=1":
        host_allocator.TUNABLES + ":glibc.malloc.hugetlb=1",
}


def allocator_probe(name, variant, batch=2, text_len=64, repeats=3, warmup=6):
  """Per-step figures of our step in this process, after `warmup` steps (a heap that keeps
  freed blocks grows for 3-6 steps before it reuses them all)."""
  import resource  # pylint: disable=import-outside-toplevel
  cfg = pg.get_config(variant)
  ours = Ours(variant, model_bench.random_params(pg.Model(**cfg), cfg.img.image_size))
  data = make_batch(batch, cfg.img.image_size, text_len)
  ours.reset()
  for _ in range(warmup):
    ours.step(data)
  before, seconds = resource.getrusage(resource.RUSAGE_SELF), []
  for _ in range(repeats):
    start = time.perf_counter()
    ours.step(data)
    seconds.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return dict(allocator=name, step_s=float(np.median(seconds)),
              minor_faults_per_step=(after.ru_minflt - before.ru_minflt) / repeats,
              kernel_s_per_step=(after.ru_stime - before.ru_stime) / repeats,
              user_s_per_step=(after.ru_utime - before.ru_utime) / repeats,
              max_rss_gb=after.ru_maxrss / 2**20)


def allocator_rows(variant, rounds, repeats):
  """ALLOCATORS each in a fresh process, interleaved `rounds` times; medians per setting."""
  runs = {name: [] for name in ALLOCATORS}
  for _ in range(rounds):
    for name, tunables in ALLOCATORS.items():
      env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
      env.update({"GLIBC_TUNABLES": tunables} if tunables else {host_allocator.OPT_OUT: "default"})
      out = subprocess.run(
          [sys.executable, "-m", "bench.train_bench", "--allocator_probe", name, "--configs",
           variant, "--repeats", str(repeats)], env=env, check=True, capture_output=True,
          text=True).stdout
      runs[name].append(json.loads(out.strip().splitlines()[-1]))
      print(runs[name][-1], flush=True)
  keys = ["step_s", "minor_faults_per_step", "kernel_s_per_step", "user_s_per_step", "max_rss_gb"]
  return [dict(allocator=name, config=variant,
               **{k: float(np.median([r[k] for r in rs])) for k in keys}) for name, rs in runs.items()]


def main(argv=None):
  parser = common.arg_parser(__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default=None, help="paligemma variants (default bench_100m; "
                                                      "--quick: tiny)")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--profile", action="store_true", help="also time our step's parts")
  parser.add_argument("--pause", type=float, default=0.0,
                      help="seconds of sleep before each timed call (common.interleaved)")
  parser.add_argument("--shapes", default=None, metavar="BxT,...",
                      help="only these rows, batch x text length (e.g. 4x64,8x64)")
  parser.add_argument("--allocators", type=int, metavar="ROUNDS",
                      help="only compare the malloc settings (ALLOCATORS), ROUNDS rounds")
  parser.add_argument("--allocator_probe", choices=ALLOCATORS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  variant = args.configs or ("tiny" if args.quick else "bench_100m")
  if args.allocator_probe:
    print(json.dumps(allocator_probe(args.allocator_probe, variant, repeats=args.repeats or 3)))
    return
  if args.allocators:
    rows = allocator_rows(variant, args.allocators, args.repeats or 3)
    common.report("Train bench: our step (batch 2, text 64) under each malloc setting", rows, args,
                  notes=["Each setting in a fresh process; minor faults and CPU times from "
                         "getrusage over the repeats after 6 warm-up steps, step_s their median; "
                         "medians over the rounds (settings interleaved)."])
    return
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(os.cpu_count())
  repeats = args.repeats or (2 if args.quick else 3)
  peak_n = 1024 if args.quick else 2048
  shapes = ([(2, 32)] if args.quick else
            [(1, 64), (2, 64), (4, 64), (8, 64), (2, 32), (2, 128), (2, 256)])
  if args.shapes:
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
  rows, profile_rows = [], []
  for name in variant.split(","):
    cfg = pg.get_config(name)
    model = pg.Model(**cfg)
    params = model_bench.random_params(model, cfg.img.image_size)
    with tempfile.TemporaryDirectory(prefix="train_bench_") as folder:
      hf = HF(model_bench.load_hf(params, cfg, folder))
    ours = Ours(name, params)
    for batch, text_len in shapes:
      rows.append(bench_row(name, ours, hf, cfg.img.image_size, batch, text_len, repeats, peak_n,
                            args.pause))
      print(common.format_table(rows[-1:]), flush=True)
    if args.profile:
      data = make_batch(4, cfg.img.image_size, 64)
      prepared = hf.prepare(data)
      ours.reset()
      hf.reset()
      profile_rows = profile(ours, cfg.img.image_size, 4, 64, repeats)
      stime, faults = kernel_time(lambda: ours.step(data), repeats)
      profile_rows.append(dict(part="(kernel CPU time per step, getrusage)", seconds=stime))
      profile_rows.append(dict(part="(minor page faults per step)", seconds=faults))
      hf_stime, hf_faults = kernel_time(lambda: hf.step(prepared), repeats)
      profile_rows.append(dict(part="(HF: kernel CPU time per step)", seconds=hf_stime))
      profile_rows.append(dict(part="(HF: minor page faults per step)", seconds=hf_faults))
  columns = ["config", "batch", "text_len", "step_s_ours", "step_s_hf", "step_ratio",
             "loss_positions", "head_rows_ours", "loss_tok_s_ours", "loss_tok_s_hf", "gflop_step",
             "peak_gflop_s", "mfu_ours", "mfu_hf", "first_loss_ours", "first_loss_hf", "loss_diff"]
  notes = [
      f"float32 both sides; HF transformers {transformers.__version__} (torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads, sdpa, logits_to_keep = loss positions) vs jax "
      f"{jax.__version__}; medians of {repeats} interleaved repeats after 1 step each.",
      f"Text: {PREFIX_LEN} prompt tokens then the answer (loss) tokens, after the image tokens; "
      "image side frozen, LLM trained (AdamW lr 1e-4, wd 0.01, clip 1.0) on both sides.",
      "step_ratio = HF step time / ours (> 1: we are faster); loss_diff = |first-step loss ours - "
      "HF| (same weights and batch); head_rows_ours: the rows our head computes for the "
      "loss_positions (HF's: exactly those).",
  ]
  if profile_rows:
    print("\nOur step at batch 4, text 64, its parts timed alone (seconds; medians):")
    print(common.format_table(profile_rows))
  common.report("Train bench: one training step, ours (JAX) vs HF transformers (PyTorch)",
                rows, args, columns=columns, notes=notes, extra=dict(profile=profile_rows))


if __name__ == "__main__":
  host_allocator.reexec()  # both sides run with the CLIs' malloc settings
  main()
