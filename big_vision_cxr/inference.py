"""Running a trained model: loading it with the settings it was trained with, and the task runner.

`load` takes our orbax workdir (or one of its step folders) or a big_vision
`.npz`. A workdir carries its resolved settings (run_settings.py): model,
LoRA, tokenizer, VQ-VAE, class names, prompts and image preprocessing all come
from there, and a command-line value that contradicts them is an error. A
`.npz` needs the model from a training config or a variant name.

`Runner` runs the five tasks (and free prompts) on radiographs through one
`decode.Predictor` and returns one result dict per image: the diagnosis with
P(tb), the report, VQA answers, boxes (normalised and in pixels) with scores,
and masks as COCO RLE. predict.py, serving.py and convert.py build on this;
none of them needs the trainer.
"""
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_cxr import checkpointing
from big_vision_cxr import confidence
from big_vision_cxr import decode
from big_vision_cxr import errors
from big_vision_cxr import loc_codec
from big_vision_cxr import optim
from big_vision_cxr import run_settings
from big_vision_cxr import seg_codec as seg_codec_lib
from big_vision_cxr import tokenizer as tokenizer_lib
from big_vision_cxr.data import prompts as prompts_lib
from big_vision_cxr.data import records
from big_vision_cxr.evaluators import coco
from big_vision_cxr.models import common as model_common
from big_vision_cxr.models import paligemma
from big_vision_cxr.pp import ops_image

TASKS = prompts_lib.TASKS


class InferenceError(errors.Error):
  """A model, checkpoint or request that cannot be run."""


def merge_lora(params, lora_cfg):
  """The params the model sees: LoRA factors (params['lora']) merged into the weights."""
  if not lora_cfg:
    return params
  params = dict(params)
  return optim.lora_merge(lora_cfg, params, params.pop("lora"))


@dataclasses.dataclass
class Loaded:
  """Everything running a model needs, and where it came from."""
  model: object
  model_cfg: object
  params: object
  tokenizer: object
  seg_codec: object
  prompts: dict  # data.prompts.task_prompts(class_names): exactly what training asked
  class_names: tuple
  pp_image: str  # training's image preprocessing; "" = the default
  provenance: dict
  config: object = None  # the training config (stored or given), None for a bare .npz

  @property
  def image_size(self):
    return int(self.model_cfg["img"]["image_size"])

  @functools.cached_property
  def model_input(self):
    """fn(uint8 [H, W]) -> float32 [size, size, 3] in [-1, 1], preprocessed as in training."""
    return ops_image.model_input_fn(self.pp_image, self.image_size)


def _settings(checkpoint, config, *, tokenizer, vqvae, class_names, with_vqvae):
  """(config, tokenizer path, VQ-VAE path, class names, pp_image) for `checkpoint`.

  A workdir's stored settings win; what the caller gives must agree with them.
  """
  path = pathlib.Path(str(checkpoint).split(":")[0])
  workdir = path.parents[1] if path.name.isdigit() and path.parent.name == "checkpoints" else path
  stored = run_settings.read(workdir) if path.is_dir() else None
  if stored is not None:
    stored_config, resolved = stored
    if config is not None:
      run_settings.check_config(config, stored_config, resolved, workdir)
    run_settings.check_same("class names", resolved["class_names"],
                            sorted(class_names) if class_names else None, workdir)
    tok = run_settings.stored_file("tokenizer", resolved["tokenizer"], tokenizer, workdir)
    codec = None
    if with_vqvae:
      entry = resolved.get("vqvae")
      codec = (run_settings.stored_file("vqvae", entry, vqvae, workdir) if entry
               else vqvae or seg_codec_lib.DEMO_VQVAE)
    return (stored_config, tok, codec, tuple(resolved["class_names"]), resolved["pp_image"],
            resolved["prompts"])
  if config is not None:  # a bare .npz: settings resolved from the config as training does
    from big_vision_cxr import input_pipeline  # pylint: disable=import-outside-toplevel
    tokenizer = tokenizer or config.get("tokenizer")
    vqvae = vqvae or seg_codec_lib.npz_path(config.input.get("seg_codec"))
    class_names = class_names or input_pipeline.class_names(config.input)
    pp_image = config.input.get("pp_image") or ""
  else:
    pp_image = ""
  class_names = tuple(sorted(class_names or records.CLASS_NAMES))
  return (config, tokenizer or tokenizer_lib.DEMO_TOKENIZER,
          (vqvae or seg_codec_lib.DEMO_VQVAE) if with_vqvae else None, class_names, pp_image,
          prompts_lib.task_prompts(class_names))


def load(checkpoint, *, config=None, model_variant=None, tokenizer=None, vqvae=None,
         class_names=None, step=None, with_vqvae=True):
  """Model, params, tokenizer, VQ-VAE, prompts and preprocessing for running `checkpoint`.

  checkpoint: our orbax workdir (or one of its step folders), or a big_vision
    `.npz` (official or ours; `file.npz:llm` style sub-trees too).
  config: the training ConfigDict; optional for a workdir that stores its settings.
  model_variant: the PaliGemma variant of a `.npz` when there is no config.
  with_vqvae: False skips the VQ-VAE (`seg_codec` is None), for work without masks.
  """
  path = pathlib.Path(str(checkpoint).split(":")[0])
  if not path.exists():
    raise InferenceError(f"checkpoint {checkpoint} does not exist.")
  config, tok_path, vqvae_path, class_names, pp_image, prompts = _settings(
      checkpoint, config, tokenizer=tokenizer, vqvae=vqvae, class_names=class_names,
      with_vqvae=with_vqvae)
  if config is not None:
    model_cfg, variant = model_common.model_config(config), config.model.variant
  elif model_variant:
    model_cfg, variant = paligemma.get_config(model_variant), model_variant
  else:
    raise InferenceError(f"{checkpoint}: say which model: --config (the training config) or "
                         f"--model_variant (workdirs written by training store it themselves).")
  if path.is_dir():
    params, step = checkpointing.restore_params(path, step)
    if "lora" in params:
      if config is None or not config.get("lora"):
        raise InferenceError(f"{checkpoint} holds LoRA params but no LoRA settings: pass the "
                             f"training --config to merge them.")
      params = merge_lora(params, config.get("lora"))
  else:
    params, step = paligemma.load(paligemma.param_shapes(model_cfg), str(checkpoint), model_cfg), None
  params = jax.tree.map(jnp.asarray, params)
  tok = tokenizer_lib.Tokenizer(tok_path)
  vocab = model_cfg["llm"]["vocab_size"]
  if tok.vocab_size != vocab:
    raise InferenceError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model "
                         f"(variant {variant}) has a vocabulary of {vocab}: they must be equal.")
  provenance = dict(checkpoint=str(checkpoint), step=step, model_variant=variant,
                    tokenizer=str(tok_path), vqvae=None if vqvae_path is None else str(vqvae_path),
                    class_names=list(class_names), pp_image=pp_image)
  codec = None if vqvae_path is None else seg_codec_lib.SegCodec.from_npz(vqvae_path)
  return Loaded(model=paligemma.Model(**model_cfg), model_cfg=model_cfg,
                params=params, tokenizer=tok, seg_codec=codec, prompts=prompts,
                class_names=class_names, pp_image=pp_image, provenance=provenance, config=config)


# ----------------------------------------------------------------------------
# The task runner.


@dataclasses.dataclass
class Job:
  """One generation: image `index` in the batch, the result `key` it fills, its prefix."""
  index: int
  key: tuple
  prefix: str


def task_jobs(n_images, tasks, prompts, extra_prompts=()):
  """The generations `tasks` (with their `prompts`) and `extra_prompts` need for `n_images`."""
  per_image = []
  for task in TASKS:
    if task not in tasks:
      continue
    if task not in prompts:
      raise InferenceError(f"task {task} has no prompt: the model was trained without class "
                           f"names for it.")
    if task == "vqa":
      per_image += [(("vqa", q), q) for q in prompts["vqa"]]
    else:
      per_image.append(((task,), prompts[task]))
  per_image += [(("prompt", p), p) for p in extra_prompts]
  return [Job(i, key, prefix) for i in range(n_images) for key, prefix in per_image]


def box_entry(box, name, score, height, width):
  """A normalised (y_min, x_min, y_max, x_max) box -> its JSON entry."""
  box = [float(v) for v in box]
  scale = (height, width, height, width)
  return dict(label=name, score=None if score is None else float(score), bbox=box,
              bbox_pixels=[round(v * s, 2) for v, s in zip(box, scale)])


def needs_masks(prompt):
  """Whether a free prompt asks for masks (PaliGemma's `segment ...` family)."""
  return prompt.strip().startswith("segment")


def _question(prefix):
  return prefix[len("answer en "):] if prefix.startswith("answer en ") else prefix


class Runner:
  """Runs the chosen tasks/prompts on batches of images through one Predictor."""

  def __init__(self, loaded, *, tasks=TASKS, prompts=(), batch_size=8, max_decode_len=96):
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
      raise InferenceError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}.")
    if not tasks and not prompts:
      raise InferenceError("nothing to do: no tasks and no --prompt.")
    if not isinstance(batch_size, int) or batch_size < 1:
      raise InferenceError(f"batch_size must be a positive int, got {batch_size!r}.")
    self.loaded, self.tasks, self.prompts = loaded, tuple(tasks), tuple(prompts)
    self.batch_size = batch_size
    self.predictor = decode.Predictor(loaded.model, loaded.tokenizer, max_decode_len=max_decode_len)

  def _generate(self, inputs, jobs):
    out = []
    for start in range(0, len(jobs), self.batch_size):
      chunk = jobs[start:start + self.batch_size]
      out += self.predictor.generate(self.loaded.params, inputs[[j.index for j in chunk]],
                                     [j.prefix for j in chunk])
    return out

  def _objects(self, gen, height, width, masks):
    """Generated output -> box entries (and RLE masks if `masks`)."""
    parsed = loc_codec.parse_token_ids(gen["tokens"], self.loaded.tokenizer, require_seg=masks)
    scores = confidence.box_scores(parsed, gen["token_logprobs"])
    entries = [box_entry(o.box, o.name, s, height, width) for o, s in zip(parsed.objects, scores)]
    if masks and parsed.objects:
      if self.loaded.seg_codec is None:
        raise InferenceError("masks need the VQ-VAE: load the model with with_vqvae=True.")
      seg = np.stack([o.seg_ids for o in parsed.objects])
      boxes = np.stack([o.box for o in parsed.objects])
      for entry, mask in zip(entries, self.loaded.seg_codec.decode(seg, boxes, height, width)):
        entry["rle"] = coco.mask_to_rle(mask)
        entry["area"] = int(mask.sum())
    return entries, parsed.n_invalid

  def run(self, images):
    """uint8 [H, W] radiographs -> one result dict per image (see the module docstring)."""
    inputs = np.stack([self.loaded.model_input(im) for im in images])
    jobs = task_jobs(len(images), self.tasks, self.loaded.prompts, self.prompts)
    gens = self._generate(inputs, jobs)
    results = [dict(height=int(im.shape[0]), width=int(im.shape[1]), model=self.loaded.provenance,
                    generated={}) for im in images]
    if "vqa" in self.tasks:
      for r in results:
        r["answers"] = []
    if self.prompts:
      for r in results:
        r["prompts"] = []
    for job, gen in zip(jobs, gens):
      r, kind = results[job.index], job.key[0]
      r["generated"][job.prefix] = gen["text"]
      if kind == "diagnosis":
        r["diagnosis"] = dict(text=gen["text"])
      elif kind == "report":
        r["report"] = gen["text"]
      elif kind == "vqa":
        r["answers"].append(dict(question=_question(job.prefix), answer=gen["text"]))
      elif kind in ("detection", "segmentation"):
        entries, invalid = self._objects(gen, r["height"], r["width"], kind == "segmentation")
        r["boxes" if kind == "detection" else "masks"] = entries
        r[f"{kind}_invalid_objects"] = invalid
      else:
        entries, _ = self._objects(gen, r["height"], r["width"], "<seg" in gen["text"])
        r["prompts"].append(dict(prompt=job.prefix, text=gen["text"], objects=entries))
    if "diagnosis" in self.tasks:
      probs = confidence.diagnosis_probabilities(self.predictor, self.loaded.params, inputs,
                                                 [self.loaded.prompts["diagnosis"]] * len(inputs))
      label_of = {answer: label for label, answer in prompts_lib.DIAGNOSIS_ANSWERS.items()}
      for i, r in enumerate(results):
        p = {label_of[answer]: float(v[i]) for answer, v in probs.items()}
        r["diagnosis"].update(label=max(p, key=p.get), probability_tb=p["tb"], probabilities=p)
    return results
