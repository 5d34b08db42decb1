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

import numpy as np

from big_vision_cxr.data import prompts as prompts_lib

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
MANIFEST_KEYS = ("image", "path", "image_path")
TASKS = ("diagnosis", "report", "vqa", "detection", "segmentation")


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
    lines.append(f"{item['prompt'].strip()} -> {item['text']}")
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
