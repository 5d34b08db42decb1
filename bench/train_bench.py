"""Training-step throughput and MFU: our jitted update vs HF transformers (PyTorch CPU).

python -m bench.train_bench [--quick] [--json PATH] [--configs tiny,bench_100m]

One step = forward + backward + optimizer update on the same model (our params converted
to HF with `hf_interop.save_hf`), the same batch and the same frozen set (the paper's
recipe: SigLIP and the projection frozen, the LLM trained), float32 on both sides:
  ours  train.make_update_fn: the suffix token cross-entropy, global-norm clip 1.0, Adam +
        decoupled weight decay (big_vision chain, equal to AdamW), jitted, state donated.
  HF    PaliGemmaForConditionalGeneration forward, the same loss on its logits,
        backward, clip_grad_norm_(1.0), torch.optim.AdamW; vision tower and projector
        with requires_grad=False.
Columns: examples/s and text tokens/s; step_ratio = HF step time / ours (> 1: we are
faster); MFU = XLA's FLOP count of our step / time / peak, where peak is the FLOP/s of
a large float32 matmul measured in the same run (jax.jit, 2048^3); HF's MFU uses the
same FLOP count. Steps are timed interleaved (ours, HF, ours, ...), median kept.
"""
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench import common
from bench import model_bench
from big_vision_cxr import optim
from big_vision_cxr import train
from big_vision_cxr.models import common as model_common
from big_vision_cxr.models import paligemma as pg

PREFIX_LEN, SUFFIX_LEN = 16, 48  # text tokens after the image tokens: prompt block + causal answer
LR, TORCH_WD = 1e-4, 0.01


def matmul_peak_flops(n=2048, repeats=5):
  """FLOP/s of an n x n x n float32 matmul (jitted), the machine's measured peak."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  seconds = common.time_fn(lambda: jax.block_until_ready(f(a)), repeats=repeats)
  return 2 * n ** 3 / seconds


def make_batch(batch, image_size, seed=0):
  rng = np.random.default_rng(seed)
  length = PREFIX_LEN + SUFFIX_LEN
  text = rng.integers(3, 1000, (batch, length)).astype(np.int32)
  text[:, 0], text[:, PREFIX_LEN - 1] = 2, 108
  mask_ar = np.zeros((batch, length), np.int32)
  mask_ar[:, PREFIX_LEN:] = 1
  return {"image": rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32),
          "text": text, "mask_ar": mask_ar, "mask_loss": mask_ar.copy(),
          "task_id": np.zeros((batch,), np.int32)}


def recipe_config(variant, batch):
  return ml_collections.ConfigDict(dict(
      model_name="paligemma", model=dict(variant=variant), input=dict(batch_size=batch),
      lr=LR, wd=LR * TORCH_WD, wd_mults=[("llm/.*", 1.0)], grad_clip_norm=1.0,
      optax_name="scale_by_adam", optax=dict(b2=0.999),
      schedule=[("img/.*", None), ("llm/.*", dict(decay_type="constant"))]))


class Ours:
  """Our jitted training step on params `params` (not modified: copied into the state)."""

  def __init__(self, variant, params, batch):
    config = recipe_config(variant, batch)
    model = model_common.build_model(config)
    tx, plan, sched_fns = optim.make(config, params, total_steps=1000)
    mask = optim.trainable_mask(plan, params)
    loss_fn = train.make_loss_fn(model, config, mask, None)
    self.update = jax.jit(train.make_update_fn(loss_fn, tx, mask, config, sched_fns),
                          donate_argnums=(0,))
    params = jax.tree.map(jnp.array, params)
    self.state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt": tx.init(params)}
    self.rng = jax.random.key(0)

  def flops(self, batch):
    compiled = self.update.lower(self.state, batch, self.rng).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))

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
    trained = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(trained, lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=TORCH_WD)
    self.trained = trained

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

  def step(self, batch):
    torch = self.torch
    inputs = self.inputs(batch)
    n_text = batch["text"].shape[1] - 1
    targets = torch.tensor(batch["text"][:, 1:], dtype=torch.long)
    weights = torch.tensor(batch["mask_loss"][:, 1:], dtype=torch.float32)
    self.opt.zero_grad(set_to_none=True)
    logits = self.model(**inputs).logits[:, -n_text:].float()  # [B, T, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    per_ex = -(logp * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
    loss = per_ex.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
    self.opt.step()
    return float(loss.detach())


def bench_config(name, batch, repeats, peak):
  cfg = pg.get_config(name)
  model = pg.Model(**cfg)
  image_size = cfg.img.image_size
  params = model_bench.random_params(model, image_size)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_trained = sum(x.size for x in jax.tree.leaves(params["llm"]))
  with tempfile.TemporaryDirectory(prefix="train_bench_") as folder:
    hf = HF(model_bench.load_hf(params, cfg, folder))
  ours = Ours(name, params, batch)
  data = make_batch(batch, image_size)
  flops = ours.flops(data)
  loss_ours, loss_hf = ours.step(data), hf.step(data)  # first step: same weights, same loss
  t_ours, t_hf = model_bench.interleaved([lambda: ours.step(data), lambda: hf.step(data)],
                                         repeats)
  tokens = batch * (PREFIX_LEN + SUFFIX_LEN)
  return dict(
      config=name, params_m=round(n_params / 1e6, 1), trained_m=round(n_trained / 1e6, 1),
      batch=batch, step_s_ours=t_ours, step_s_hf=t_hf,
      ex_s_ours=batch / t_ours, ex_s_hf=batch / t_hf,
      tok_s_ours=tokens / t_ours, tok_s_hf=tokens / t_hf,
      step_ratio=common.ratio(t_hf, t_ours),
      gflop_step=flops / 1e9, mfu_ours=flops / t_ours / peak, mfu_hf=flops / t_hf / peak,
      first_loss_ours=loss_ours, first_loss_hf=loss_hf)


def main(argv=None):
  parser = common.arg_parser(__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default=None,
                      help="paligemma variants (default tiny,bench_100m; --quick: tiny)")
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(os.cpu_count())
  repeats = args.repeats or (2 if args.quick else 5)
  peak = matmul_peak_flops(1024 if args.quick else 2048)
  batches = {"tiny": 8, "bench_100m": 4}
  configs = (args.configs or ("tiny" if args.quick else "tiny,bench_100m")).split(",")
  rows = [bench_config(name, batches.get(name, 4), repeats, peak) for name in configs]
  columns = ["config", "params_m", "trained_m", "batch", "step_s_ours", "step_s_hf", "step_ratio",
             "ex_s_ours", "ex_s_hf", "tok_s_ours", "tok_s_hf", "gflop_step", "mfu_ours",
             "mfu_hf", "first_loss_ours", "first_loss_hf"]
  notes = [
      f"Measured matmul peak: {peak / 1e9:.1f} GFLOP/s (float32, jax.jit). float32 both "
      f"sides; HF transformers {transformers.__version__} (torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads) vs jax {jax.__version__}.",
      f"Text: {PREFIX_LEN} prompt + {SUFFIX_LEN} answer tokens after the image tokens; "
      "image side frozen, LLM trained (AdamW lr 1e-4, wd 0.01, clip 1.0) on both sides.",
      "step_ratio = HF step time / ours (> 1: we are faster). first_loss_*: the loss of "
      "the first step (same weights and batch: should agree to ~1e-4).",
  ]
  common.report("Train bench: one training step, ours (JAX) vs HF transformers (PyTorch)",
                rows, args, columns=columns, notes=notes, extra=dict(peak_flops=peak))


if __name__ == "__main__":
  main()
