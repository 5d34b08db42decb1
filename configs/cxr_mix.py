r"""PaliGemma-CXR: one PaliGemma jointly fine-tuned on five TB chest X-ray tasks.

  python -m big_vision_cxr.train --config configs/cxr_mix.py --workdir runs/mix \
      --config.model_init=/path/paligemma-3b-pt-224.npz --config.tokenizer=/path/paligemma_tokenizer.model

Default = the paper's recipe (docs/TRAINING.md): PaliGemma 1 3B pt-224, SigLIP and the
projection frozen, the Gemma LLM trained; tasks drawn with p_t ∝ 1/N_t; Adam(b2=0.999)
with decoupled weight decay, global-norm clipping 1.0, cosine schedule with 5% warmup.

Args (after ':', comma-separated):
  task=diagnosis|vqa|report|detection|segmentation   single-task baseline, same recipe.
  demo      fine-tunes a tiny pt model (shipped) on the synthetic phantom (2 CPU cores, ~7 min),
            evaluated on held-out phantom patients, next to trivial baselines.
  demo_pt   makes that tiny pt model: from scratch on other phantom patients (~17 min).
  lora      LoRA (rank 16) on the LLM's attention and MLP weights instead of full fine-tuning.
  variant=pg2_3b_224   another PaliGemma (default pg1_3b_224); with a PG2 one, also set
            --config.model_init to its pt .npz.
Paths default to environment variables: BVCXR_MODEL_INIT, BVCXR_TOKENIZER, BVCXR_VQVAE,
BVCXR_TBX11K (default ../shared/data/tbx11k_tb_subset), BVCXR_NIH.
"""
import os

import ml_collections

from big_vision_cxr.config import ConfigError, parse_arg
from big_vision_cxr.data.prompts import TASKS
from big_vision_cxr.evaluators.common import TASK_EVALS

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "big_vision_cxr", "assets")
_SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                       "shared", "data")
# Each tower's options, named so that --config.model.{img,llm}.<option>= overrides them:
# remat and scan_unroll, docs/TRAINING.md (on CPU, set model.llm.scan_unroll=True).
_TOWERS = dict(remat=False, scan_unroll=False)
# Evaluators: TASK_EVALS, the type and decoding length of each task (evaluators/common.py).
# The final table's first rows per eval (evaluators/table.py adds each task's headline
# metrics: diagnosis sensitivity/specificity/ECE, ...); the first is the best_metric.
TABLE_METRICS = {"diagnosis": ("accuracy", "auc"), "vqa": ("closed/accuracy", "all/exact_match"),
                 "report": ("bleu4", "rougeL"), "detection": ("ones/AP50", "mean_loc/AP50"),
                 "segmentation": ("ones/AP50", "mean_loc/AP50")}


def get_config(arg=None):
  arg = parse_arg(arg, task="", demo=False, demo_pt=False, lora=False, variant="")
  if arg.task and arg.task not in TASKS:
    raise ConfigError(f"configs/cxr_mix.py: task={arg.task!r} is not one of {TASKS}.")
  if arg.variant and (arg.demo or arg.demo_pt):
    raise ConfigError("configs/cxr_mix.py: variant= and demo/demo_pt exclude each other "
                     "(the demo has its own tiny model).")
  tasks = (arg.task,) if arg.task else TASKS
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.resume = True  # continue from the last complete checkpoint in the workdir
  c.distributed = False  # jax.distributed.initialize() (multi-host); or BVCXR_DISTRIBUTED=1
  c.model_name = "paligemma"
  c.model = dict(variant=arg.variant or "pg1_3b_224", img=dict(_TOWERS), llm=dict(_TOWERS))
  if c.model.variant.startswith("pg2_"):
    # PaliGemma 2 pt models soft-cap the final logits at 30; big_vision fine-tunes them
    # without that cap (its PG2 transfer configs set 0.0), and so do we.
    c.model.llm.final_logits_softcap = 0.0
  c.model_init = os.environ.get("BVCXR_MODEL_INIT", "paligemma-3b-pt-224.npz")
  c.model_load = dict(dont_load=())
  c.tokenizer = os.environ.get("BVCXR_TOKENIZER", "paligemma_tokenizer.model")
  c.compute_dtype = "bfloat16"

  c.input = dict(
      batch_size=32,
      datasets={
          "tbx11k": dict(source="tbx11k",
                         path=os.environ.get("BVCXR_TBX11K", os.path.join(_SHARED, "tbx11k_tb_subset")),
                         lists="TBX11K"),
          "nih": dict(source="manifest", preset="nih_cxr14",
                      path=os.environ.get("BVCXR_NIH", os.path.join(
                          _SHARED, "nih_cxr14_nofinding_pa", "manifest.csv"))),
      },
      split="train", tasks=tasks, mix_by="task", weights="inverse_size",
      pp_image="decode|resize(224)|value_range(-1, 1)", text_len=128,
      seg_codec=os.environ.get("BVCXR_VQVAE", "vae-oid.npz"), seg_from_boxes=True,
      object_tasks_positives_only=False)

  c.total_steps = 4000
  c.optax_name = "scale_by_adam"
  c.optax = dict(b2=0.999)
  c.lr = 3e-5
  c.wd = 3e-5 * 0.01  # torch AdamW's 0.01 in big_vision units (decay not multiplied by lr)
  c.wd_mults = [("llm/.*", 1.0)]
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0
  c.loc_label_smoothing = dict(sigma_bins=0.0)  # > 0: Gaussian soft targets over the loc bins
  c.microbatches = 1
  c.schedule = [("img/.*", None),
                ("llm/.*", dict(decay_type="cosine", warmup_percent=0.05))]

  c.mesh = [("data", -1)]
  c.sharding_strategy = [(".*", "fsdp(axis='data')")]
  c.log_training_steps = 50
  c.ckpt_steps = 500
  c.keep_ckpts = 2
  c.best_metric = f"{tasks[0]}/{TABLE_METRICS[tasks[0]][0]}"
  c.best_mode = "max"
  c.evals = {t: dict(TASK_EVALS[t], task=t, split="val", batch_size=16, log_steps=1000)
             for t in tasks}
  c.table_metrics = {t: TABLE_METRICS[t] for t in tasks}
  c.baseline_table = False

  if arg.lora:
    c.lora = dict(rank=16, alpha=16.0, targets="llm/layers/(attn/.*|mlp/.*)")
    c.schedule = [("lora/.*", dict(decay_type="cosine", warmup_percent=0.05)), (".*", None)]
    c.wd_mults = [("lora/.*", 1.0)]
    c.lr = 3e-4
    c.wd = 3e-4 * 0.01
  if arg.demo or arg.demo_pt:
    _demo(c, tasks, pretrain=arg.demo_pt)
  return c


def _demo(c, tasks, pretrain):
  """A tiny PaliGemma on the synthetic phantom, on 2 CPU cores.

  demo: fine-tunes the shipped tiny pt model (assets/cxr_demo_pt.npz) like the paper
  fine-tunes PaliGemma pt, on phantom seed 0, in ~7 minutes; evaluated on the held-out
  test patients of seed 0. demo_pt: how that pt model was made (from scratch, phantom
  seed 1: other images and patients, 1500 steps, ~17 minutes), then
  `python -m big_vision_cxr.convert export ... --bf16`.
  """
  c.model = dict(variant="demo", img=dict(_TOWERS), llm=dict(_TOWERS))
  c.model_init = "" if pretrain else os.path.join(_ASSETS, "cxr_demo_pt.npz")
  c.tokenizer = os.path.join(_ASSETS, "cxr_demo_spm.model")
  c.compute_dtype = ""
  c.input.batch_size = 32
  c.input.datasets = {"phantom": dict(source="phantom", n=3000, size=128, difficulty=0.0,
                                      seed=1 if pretrain else 0)}
  # Localisation needs most of the draws: diagnosis and the report are learned from few.
  with c.input.ignore_type():
    c.input.weights = dict(diagnosis=0.1, vqa=0.1, report=0.1, detection=0.45,
                           segmentation=0.25)
  # Boxes are learned from images that have some; evaluation still covers every image.
  c.input.object_tasks_positives_only = True
  c.input.pp_image = "decode|resize(64)|value_range(-1, 1)"
  c.input.text_len = 64
  c.input.seg_codec = None  # the demo VQ-VAE (big_vision_cxr/assets/vqvae_cxr_demo.npz)
  c.input.seg_from_boxes = False
  c.schedule = [(".*", dict(decay_type="cosine", warmup_percent=0.05))]
  c.wd_mults = [(".*", 1.0)]
  c.lr = 1e-3 if pretrain else 5e-4
  c.wd = c.lr * 1e-4
  c.total_steps = 1500 if pretrain else 600
  c.log_training_steps = 25
  c.ckpt_steps = 250
  c.evals = {t: dict(TASK_EVALS[t], task=t, split="test", batch_size=32, log_steps=0) for t in tasks}
  c.baseline_table = True
