"""Runs a trained model on radiographs: all five tasks, a JSON and an overlay per image.

  python -m big_vision_cxr.predict --checkpoint WORKDIR_OR_NPZ [--model_variant V] \
      --input IMAGE|FOLDER|MANIFEST.csv|MANIFEST.jsonl --out OUT_DIR \
      [--tasks diagnosis,report,vqa,detection,segmentation] [--prompt "answer en ..."]...

Inputs: PNG/JPEG/DICOM (read by data/images.py), a folder of them, or a manifest
(CSV with an `image` or `path` column, or JSONL with such a key; relative paths
are taken from the manifest's folder).

Per image, OUT_DIR/<image_id>.json holds: the diagnosis with P(tb), the report,
the VQA answers, boxes (normalised y_min, x_min, y_max, x_max and the same in
pixels of the original image) with scores and class, masks as COCO RLE, the raw
generated texts, and the model's provenance; OUT_DIR/<image_id>.png is the
overlay. A file that cannot be used is reported with its name and the reason,
the others are still processed, a summary is printed at the end, and the exit
status is 1 when any input failed (2 when there was nothing to process).
"""
import argparse
import csv
import dataclasses
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_cxr import checkpointing
from big_vision_cxr import confidence
from big_vision_cxr import decode
from big_vision_cxr import loc_codec
from big_vision_cxr import seg_codec as seg_codec_lib
from big_vision_cxr import tokenizer as tokenizer_lib
from big_vision_cxr.data import images as images_lib
from big_vision_cxr.data import phantom
from big_vision_cxr.data import prompts as prompts_lib
from big_vision_cxr.data import records
from big_vision_cxr.pp import builder as pp_builder
from big_vision_cxr.pp import ops_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
MANIFEST_KEYS = ("image", "path", "image_path")
TASKS = ("diagnosis", "report", "vqa", "detection", "segmentation")
DEMO_TOKENIZER = pathlib.Path(__file__).parent / "assets" / "cxr_demo_spm.model"
MIN_SIDE = 32  # pixels; smaller images hold no usable radiograph
MAX_PIXELS = 64_000_000  # refuse larger images (8000 x 8000) before decoding them


class PredictError(ValueError):
  """An input (file, folder, manifest, argument) that cannot be predicted on."""


# ----------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass
class Inputs:
  """Files to predict on, plus what was skipped (not an error) while listing."""
  files: list
  skipped: list  # (path, reason)


def _manifest_paths(path):
  folder = path.parent
  rows = []
  try:
    with open(path, encoding="utf-8", newline="") as f:
      if path.suffix.lower() == ".csv":
        reader = csv.DictReader(f)
        key = next((k for k in MANIFEST_KEYS if k in (reader.fieldnames or ())), None)
        if key is None:
          raise PredictError(f"manifest {path}: needs one of the columns {MANIFEST_KEYS}, "
                             f"has {reader.fieldnames}.")
        rows = [(n + 2, r[key]) for n, r in enumerate(reader)]
      else:
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise PredictError(f"manifest {path}, line {n}: not JSON ({e}).") from e
          key = next((k for k in MANIFEST_KEYS if isinstance(row, dict) and k in row), None)
          if key is None:
            raise PredictError(f"manifest {path}, line {n}: needs one of the keys {MANIFEST_KEYS}.")
          rows.append((n, row[key]))
  except (OSError, UnicodeDecodeError) as e:
    raise PredictError(f"cannot read manifest {path}: {e}") from e
  files = []
  for line, value in rows:
    if not isinstance(value, str) or not value.strip():
      raise PredictError(f"manifest {path}, line {line}: empty image path.")
    p = pathlib.Path(value)
    files.append(p if p.is_absolute() else folder / p)
  return files


def collect_inputs(path):
  """An image, a folder (searched recursively) or a manifest -> Inputs.

  In a folder, files with an image suffix or with no suffix (DICOM often has
  none) are taken; other files are listed as skipped. Raises PredictError for
  a missing path, an empty folder or a bad manifest.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise PredictError(f"input {path} does not exist.")
  if path.is_file():
    if path.suffix.lower() in MANIFEST_SUFFIXES:
      files = _manifest_paths(path)
      if not files:
        raise PredictError(f"manifest {path} lists no images.")
      return Inputs(files, [])
    return Inputs([path], [])
  files, skipped = [], []
  for p in sorted(path.rglob("*")):
    if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
      continue
    if p.suffix.lower() in IMAGE_SUFFIXES or not p.suffix:
      files.append(p)
    else:
      skipped.append((p, f"suffix {p.suffix!r} is not one of {IMAGE_SUFFIXES}"))
  if not files:
    raise PredictError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)} or "
                       f"DICOM without suffix){f'; skipped {len(skipped)} other files' if skipped else ''}.")
  return Inputs(files, skipped)


def unique_ids(files):
  """A file name stem per file, made unique with a numeric suffix where needed."""
  seen, ids = {}, []
  for f in files:
    stem = pathlib.Path(f).stem or "image"
    n = seen.get(stem, 0)
    seen[stem] = n + 1
    ids.append(stem if n == 0 else f"{stem}_{n}")
  return ids


# ----------------------------------------------------------------------------
# Outputs.


def mask_to_rle(mask):
  """bool [H,W] -> COCO RLE dict(size=[H, W], counts=str) (pycocotools, column-major)."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  return dict(size=[int(v) for v in rle["size"]], counts=rle["counts"].decode("ascii"))


def rle_to_mask(rle):
  """COCO RLE dict (as written by `mask_to_rle`) -> bool [H,W]."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  return mask_utils.decode(dict(size=rle["size"], counts=rle["counts"].encode("ascii"))).astype(bool)


def box_entry(box, name, score, height, width):
  """A normalised (y_min, x_min, y_max, x_max) box -> its JSON entry."""
  box = [float(v) for v in box]
  scale = (height, width, height, width)
  return dict(label=name, score=None if score is None else float(score), bbox=box,
              bbox_pixels=[round(v * s, 2) for v, s in zip(box, scale)])


def header_lines(result):
  """Text lines above the overlay: diagnosis with P(tb), then the report."""
  lines = []
  diag = result.get("diagnosis")
  if diag:
    p = diag.get("probability_tb")
    lines.append(f"diagnosis: {diag['label']}" + ("" if p is None else f"   P(tb) = {p:.2f}"))
  if result.get("report"):
    lines.append(f"report: {result['report']}")
  for item in result.get("prompts", []):
    lines.append(f"{item['prompt'].strip()} -> {item['text'] or '(no output)'}")
  return lines


def overlay_objects(result):
  """The boxes and masks of a result, in the form visualize.overlay() takes."""
  from big_vision_cxr import visualize  # pylint: disable=import-outside-toplevel,unused-import
  objects = [dict(bbox=b["bbox"], label=b["label"], score=b["score"]) for b in result.get("boxes", [])]
  for m in result.get("masks", []):
    objects.append(dict(bbox=m["bbox"], label=m["label"], score=m["score"], mask=rle_to_mask(m["rle"])))
  for item in result.get("prompts", []):
    for o in item.get("objects", []):
      mask = rle_to_mask(o["rle"]) if o.get("rle") else None
      objects.append(dict(bbox=o["bbox"], label=o["label"], score=o.get("score"), mask=mask))
  return objects


def write_outputs(out_dir, image_id, image, result, overlay=True):
  """Writes OUT/<image_id>.json (atomically) and, if asked, OUT/<image_id>.png."""
  from big_vision_cxr import visualize  # pylint: disable=import-outside-toplevel
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{image_id}.json"
  tmp = out_dir / f".{image_id}.json.tmp"
  tmp.write_text(json.dumps(result, indent=1))
  os.replace(tmp, path)
  if overlay:
    visualize.save_overlay(out_dir / f"{image_id}.png", image, overlay_objects(result),
                           header_lines(result))
  return path


# ----------------------------------------------------------------------------
# The model side: every task as prompts through decode.Predictor.


@dataclasses.dataclass
class Job:
  """One generation: image `index` in the batch, the result `key` it fills, its prefix."""
  index: int
  key: tuple
  prefix: str


def task_jobs(n_images, tasks, class_names, prompts=()):
  """The generations all `tasks` and extra `prompts` need for `n_images` images."""
  per_image = []
  if "diagnosis" in tasks:
    per_image.append((("diagnosis",), prompts_lib.DIAGNOSIS_PREFIX))
  if "report" in tasks:
    per_image.append((("report",), prompts_lib.REPORT_PREFIX))
  if "vqa" in tasks:
    for q in (*prompts_lib.CLOSED_QUESTIONS, *prompts_lib.OPEN_QUESTIONS):
      per_image.append((("vqa", q), q))
  if "detection" in tasks:
    per_image.append((("detection",), prompts_lib.detect_prefix(class_names)))
  if "segmentation" in tasks:
    per_image.append((("segmentation",), prompts_lib.segment_prefix(class_names)))
  for p in prompts:
    per_image.append((("prompt", p), p))
  return [Job(i, key, prefix) for i in range(n_images) for key, prefix in per_image]


@dataclasses.dataclass
class Loaded:
  """Everything predicting needs, and where it came from."""
  model: object
  model_cfg: object
  params: object
  tokenizer: object
  seg_codec: object
  image_size: int
  class_names: tuple
  provenance: dict
  pp_image: str = ""  # the training's image preprocessing; "" = decode|resize|value_range(-1, 1)

  def model_input(self, image):
    """uint8 [H, W] -> float32 [size, size, 3] in [-1, 1], preprocessed as in training."""
    if not self.pp_image:
      return model_input(image, self.image_size)
    out = pp_builder.get_preprocess_fn(self.pp_image)({"image": image})["image"]
    if out.shape != (self.image_size, self.image_size, 3):
      raise PredictError(f"pp_image {self.pp_image!r} gives images of shape {out.shape}, the model "
                         f"takes {(self.image_size, self.image_size, 3)}.")
    return np.asarray(out, np.float32)


def _latest_complete_step(workdir):
  folder = pathlib.Path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in folder.iterdir() if checkpointing.is_complete(p)) if folder.is_dir() else []
  if not steps:
    raise PredictError(f"{workdir}: no complete checkpoint under {folder}.")
  return steps[-1]


def restore_params(workdir, step=None):
  """Our orbax checkpoint (workdir or workdir/checkpoints/STEP) -> (params, step).

  Read-only: unlike `checkpointing.Checkpointer` it never moves, cleans or
  creates anything, so it is safe on the workdir of a running training.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(workdir)
  if path.name.isdigit() and checkpointing.is_complete(path):
    step_dir = path
  else:
    step = _latest_complete_step(path) if step is None else int(step)
    step_dir = path / "checkpoints" / str(step)
    if not checkpointing.is_complete(step_dir):
      raise PredictError(f"checkpoint {step_dir} is missing or incomplete.")
  state = ocp.StandardCheckpointer().restore(step_dir.absolute() / "state")
  if "params" not in state:
    raise PredictError(f"{step_dir}: the saved state has no 'params' (keys: {sorted(state)}).")
  return state["params"], int(step_dir.name)


def config_class_names(config):
  """The detect/segment class names training used: config.input.class_names if set, else
  (like input_pipeline) the phantom's classes for phantom-only data, else records.CLASS_NAMES."""
  given = config.input.get("class_names")
  if given:
    return tuple(sorted(given))
  sources = {d.get("source") for d in dict(config.input.get("datasets") or {}).values()}
  return phantom.CLASS_NAMES if sources == {"phantom"} else records.CLASS_NAMES


def load(checkpoint, *, config=None, model_variant=None, tokenizer=None, vqvae=None,
         class_names=None, step=None, with_vqvae=True):
  """Model, params, tokenizer and VQ-VAE for predicting.

  checkpoint: our orbax workdir (or one of its step folders), or a big_vision
    `.npz` (official or ours). The model comes from `config` (a training
    ConfigDict: model, tokenizer, seg_codec, class names) or from `model_variant`.
  with_vqvae: False skips the VQ-VAE (`seg_codec` is None), for work without masks.
  """
  from big_vision_cxr import train  # pylint: disable=import-outside-toplevel
  from big_vision_cxr.models import paligemma  # pylint: disable=import-outside-toplevel
  if config is not None:
    model_cfg = train.model_config(config)
    variant = config.model.variant
    tokenizer = tokenizer or config.get("tokenizer")
    vqvae = vqvae or config.input.get("seg_codec")
    class_names = class_names or config_class_names(config)
    pp_image = config.input.get("pp_image") or ""
  elif model_variant:
    model_cfg, variant = paligemma.get_config(model_variant), model_variant
    pp_image = ""
  else:
    raise PredictError("say which model: --config (the training config) or --model_variant.")
  tokenizer = tokenizer or DEMO_TOKENIZER
  vqvae = vqvae or seg_codec_lib.DEMO_VQVAE
  class_names = tuple(class_names or records.CLASS_NAMES)
  model = paligemma.Model(**model_cfg)
  path = pathlib.Path(str(checkpoint).split(":")[0])
  if not path.exists():
    raise PredictError(f"checkpoint {checkpoint} does not exist.")
  if path.is_dir():
    params, step = restore_params(path, step)
    if "lora" in params:
      if config is None:
        raise PredictError(f"{checkpoint} holds LoRA params: pass the training --config to merge them.")
      params = train.model_params(params, config.get("lora"))
  else:
    params, step = paligemma.load(paligemma.param_shapes(model_cfg), str(checkpoint), model_cfg), None
  params = jax.tree.map(jnp.asarray, params)
  tok = tokenizer_lib.Tokenizer(tokenizer)
  vocab = model_cfg["llm"]["vocab_size"]
  if tok.vocab_size != vocab:
    raise PredictError(f"tokenizer {tokenizer} has {tok.vocab_size} tokens but the model "
                       f"(variant {variant}) has a vocabulary of {vocab}: they must be equal.")
  provenance = dict(checkpoint=str(checkpoint), step=step, model_variant=variant,
                    tokenizer=str(tokenizer), vqvae=str(vqvae) if with_vqvae else None,
                    class_names=list(class_names))
  codec = seg_codec_lib.SegCodec.from_npz(vqvae) if with_vqvae else None
  return Loaded(model=model, model_cfg=model_cfg, params=params, tokenizer=tok, seg_codec=codec,
                image_size=int(model_cfg["img"]["image_size"]), class_names=class_names,
                provenance=provenance, pp_image=pp_image)


def check_size(path):
  """Refuses an image below MIN_SIDE or above MAX_PIXELS from its header, before decoding."""
  try:
    if images_lib.is_dicom(path):
      import pydicom  # pylint: disable=import-outside-toplevel
      ds = pydicom.dcmread(path, stop_before_pixels=True)
      height, width = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
      if not height or not width:
        raise images_lib.ImageError(f"{path}: DICOM header has no Rows/Columns: no image in it.")
    else:
      from PIL import Image  # pylint: disable=import-outside-toplevel
      with Image.open(path) as im:
        width, height = im.size
  except images_lib.ImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise images_lib.ImageError(f"{path}: not a readable image: {type(e).__name__}: {e}") from e
  if height * width > MAX_PIXELS:
    raise PredictError(f"{path}: {width}x{height} is over the limit of {MAX_PIXELS} pixels "
                       f"(predict.MAX_PIXELS); downscale it first.")
  if min(height, width) < MIN_SIDE:
    raise PredictError(f"{path}: {width}x{height} is smaller than {MIN_SIDE} pixels on a side "
                       f"(predict.MIN_SIDE): not a radiograph.")


def read_checked(path):
  """A radiograph uint8 [H, W] from `path`, or PredictError/ImageError naming it."""
  check_size(path)
  image = images_lib.read_image(path)
  if min(image.shape) < MIN_SIDE or image.size > MAX_PIXELS:
    raise PredictError(f"{path}: decoded to {image.shape[1]}x{image.shape[0]}, outside "
                       f"[{MIN_SIDE} px a side, {MAX_PIXELS} pixels].")
  return image


def model_input(image, size):
  """uint8 [H, W] -> float32 [size, size, 3] in [-1, 1], as the training pipeline does."""
  rgb = ops_image.to_rgb(image)
  return ops_image.value_range(ops_image.resize(rgb, size), -1.0, 1.0)


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
      raise PredictError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}.")
    if not tasks and not prompts:
      raise PredictError("nothing to do: no tasks and no --prompt.")
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
        raise PredictError("masks need the VQ-VAE: load the model with with_vqvae=True.")
      seg = np.stack([o.seg_ids for o in parsed.objects])
      boxes = np.stack([o.box for o in parsed.objects])
      for entry, mask in zip(entries, self.loaded.seg_codec.decode(seg, boxes, height, width)):
        entry["rle"] = mask_to_rle(mask)
        entry["area"] = int(mask.sum())
    return entries, parsed.n_invalid

  def run(self, images):
    """uint8 [H, W] radiographs -> one result dict per image (see the module docstring)."""
    inputs = np.stack([self.loaded.model_input(im) for im in images])
    jobs = task_jobs(len(images), self.tasks, self.loaded.class_names, self.prompts)
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
        has_seg = "<seg" in gen["text"]
        entries, _ = self._objects(gen, r["height"], r["width"], has_seg)
        r["prompts"].append(dict(prompt=job.prefix, text=gen["text"], objects=entries))
    if "diagnosis" in self.tasks:
      probs = confidence.diagnosis_probabilities(self.predictor, self.loaded.params, inputs,
                                                 [prompts_lib.DIAGNOSIS_PREFIX] * len(inputs))
      label_of = {answer: label for label, answer in prompts_lib.DIAGNOSIS_ANSWERS.items()}
      for i, r in enumerate(results):
        p = {label_of[answer]: float(v[i]) for answer, v in probs.items()}
        r["diagnosis"].update(label=max(p, key=p.get), probability_tb=p["tb"], probabilities=p)
    return results


# ----------------------------------------------------------------------------
# The CLI.


@dataclasses.dataclass
class Summary:
  done: list = dataclasses.field(default_factory=list)  # (path, json path)
  failed: list = dataclasses.field(default_factory=list)  # (path, reason)
  skipped: list = dataclasses.field(default_factory=list)  # (path, reason)

  def lines(self):
    out = [f"predicted {len(self.done)} image(s), {len(self.failed)} failed, "
           f"{len(self.skipped)} skipped."]
    out += [f"  FAILED  {r}" for _, r in self.failed]
    out += [f"  skipped {p}: {r}" for p, r in self.skipped]
    return out


def predict_files(runner, files, out_dir, *, overlay=True, progress=True, log=None):
  """Predicts on `files` in batches; a file that fails is reported and the rest go on."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  log = log or sys.stderr
  summary = Summary()
  ids = unique_ids(files)
  bar = tqdm(total=len(files), unit="img", disable=not progress or len(files) < 2, file=log)
  batch = []

  def flush():
    if not batch:
      return
    try:
      results = runner.run([im for _, _, im in batch])
    except Exception as e:  # pylint: disable=broad-except
      if len(batch) == 1:  # Only this file's failure: name it and go on.
        path = batch[0][0]
        msg = f"{path}: prediction failed: {type(e).__name__}: {e}"
        summary.failed.append((path, msg))
        print(f"error: {msg}", file=log)
        batch.clear()
        return
      items = list(batch)  # Retry one by one to find the file that fails.
      batch.clear()
      for item in items:
        batch.append(item)
        flush()
      return
    for (path, image_id, image), result in zip(batch, results):
      result = dict(image=str(path), image_id=image_id, **result)
      summary.done.append((path, write_outputs(out_dir, image_id, image, result, overlay)))
    bar.update(len(batch))
    batch.clear()

  for path, image_id in zip(files, ids):
    try:
      image = read_checked(path)
    except (PredictError, images_lib.ImageError, images_lib.DataPathError, OSError) as e:
      msg = str(e) if str(path) in str(e) else f"{path}: {e}"
      summary.failed.append((path, msg))
      print(f"error: {msg}", file=log)
      bar.update(1)
      continue
    batch.append((path, image_id, image))
    if len(batch) == runner.batch_size:
      flush()
  flush()
  bar.close()
  return summary


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m big_vision_cxr.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="our orbax workdir (or workdir/checkpoints/STEP) or a big_vision .npz")
  p.add_argument("--config", help="the training config (file.py:args), e.g. configs/cxr_mix.py:demo")
  p.add_argument("--model_variant", help="PaliGemma variant when there is no --config (e.g. demo)")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
  p.add_argument("--tokenizer", help=f"SentencePiece model (default: {DEMO_TOKENIZER.name})")
  p.add_argument("--vqvae", help=f"VQ-VAE .npz (default: {seg_codec_lib.DEMO_VQVAE.name})")
  p.add_argument("--classes", help="detection/segmentation class names, ';'-separated")
  p.add_argument("--input", required=True, help="image, folder, or manifest .csv/.jsonl")
  p.add_argument("--out", required=True, help="output folder for <id>.json and <id>.png")
  p.add_argument("--tasks", default=",".join(TASKS),
                 help="comma-separated subset of the five tasks; '' for none (only --prompt)")
  p.add_argument("--prompt", action="append", default=[],
                 help='an extra prompt, e.g. "answer en is there a cavity?" (repeatable)')
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_decode_len", type=int, default=96,
                 help="new tokens per prompt (an object with a mask is ~23 tokens)")
  p.add_argument("--no_overlay", action="store_true", help="write the JSON only")
  p.add_argument("--no_progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    inputs = collect_inputs(args.input)
    config = None
    if args.config:
      from big_vision_cxr import config as config_lib  # pylint: disable=import-outside-toplevel
      config = config_lib.load_config(args.config)
    classes = [c.strip() for c in args.classes.split(";")] if args.classes else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    loaded = load(args.checkpoint, config=config, model_variant=args.model_variant,
                  tokenizer=args.tokenizer, vqvae=args.vqvae, class_names=classes, step=args.step,
                  with_vqvae="segmentation" in tasks or any(needs_masks(p) for p in args.prompt))
    runner = Runner(loaded, tasks=tasks, prompts=args.prompt, batch_size=args.batch_size,
                    max_decode_len=args.max_decode_len)
  except (PredictError, tokenizer_lib.TokenizerError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary = predict_files(runner, inputs.files, args.out, overlay=not args.no_overlay,
                          progress=not args.no_progress)
  summary.skipped += inputs.skipped
  print("\n".join(summary.lines()), file=sys.stderr)
  return 1 if summary.failed else 0


if __name__ == "__main__":
  sys.exit(main())
