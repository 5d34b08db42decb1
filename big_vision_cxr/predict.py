"""Runs a trained model on radiographs: all five tasks, a JSON and an overlay per image.

  python -m big_vision_cxr.predict --checkpoint WORKDIR_OR_NPZ [--model_variant V] \
      --input IMAGE|FOLDER|MANIFEST.csv|MANIFEST.jsonl --out OUT_DIR \
      [--tasks diagnosis,vqa,report,detection,segmentation] [--prompt "answer en ..."]... \
      [--min_score S] [--box_units pixels|normalized]

A training workdir carries its settings (model, tokenizer, VQ-VAE, class names,
prompts, preprocessing): nothing else is needed. A `.npz` needs --config (the
training config) or --model_variant.

Inputs: PNG/JPEG/DICOM, a folder of them, or a manifest (CSV with an `image`,
`path` or `image_path` column (TSV too), or JSONL with such a key; paths relative to the
manifest's folder, never outside it). A manifest row's `boxes` field (the
format of data/manifest.py, in --box_units) is the ground truth: copied to the
JSON and drawn dashed on the overlay.

Per image, OUT_DIR/<image_id>.json holds: the diagnosis with P(tb), the report,
the VQA answers, boxes (normalised y_min, x_min, y_max, x_max and the same in
pixels of the original image) with scores, class and `drawn` (score >=
--min_score), masks as COCO RLE, the raw generated texts, the model's
provenance, and whether the tasks agree (`consistency`, consistency.py);
OUT_DIR/<image_id>.png is the overlay. A file that cannot be used is reported
with its name and the reason, the others are still processed, a summary (with
the number of images whose tasks disagree) is printed at the end, and the exit
status is 1 when any input failed (2 when there was nothing to process).
"""
import argparse
import dataclasses
import json
import pathlib
import sys

from big_vision_cxr import atomic
from big_vision_cxr import consistency
from big_vision_cxr import errors
from big_vision_cxr import host_allocator
from big_vision_cxr import inference
from big_vision_cxr.data import images as images_lib
from big_vision_cxr.data import manifest as manifest_lib
from big_vision_cxr.evaluators import coco

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")


class PredictError(errors.Error):
  """An input (file, folder, manifest, argument) that cannot be predicted on."""


# ----------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass
class Inputs:
  """Files to predict on, plus what was skipped (not an error) while listing."""
  files: list
  skipped: list  # (path, reason)


def collect_inputs(path):
  """An image, a folder (searched recursively) or a manifest -> Inputs.

  In a folder, files with an image suffix or with no suffix (DICOM often has
  none) are taken; other files are listed as skipped. Raises PredictError for
  a missing path or an empty folder, ManifestError for a bad manifest.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise PredictError(f"input {path} does not exist.")
  if path.is_file():
    if path.suffix.lower() in MANIFEST_SUFFIXES:
      files = manifest_lib.image_paths(path)
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
  """A file-name stem per file, made unique with `_N` where needed, never taking
  another file's own stem (`a/x.png`, `b/x.png`, `c/x_1.png` -> x, x_2, x_1)."""
  stems = [pathlib.Path(f).stem or "image" for f in files]
  reserved, used, ids = set(stems), set(), []
  for stem in stems:
    image_id, n = stem, 0
    while image_id in used or (image_id != stem and image_id in reserved):
      n += 1
      image_id = f"{stem}_{n}"
    used.add(image_id)
    ids.append(image_id)
  return ids


# ----------------------------------------------------------------------------
# Outputs.


def manifest_ground_truth(path, box_units="pixels"):
  """{image file: [dict(bbox, label)]} from the `boxes` field of a manifest's rows.

  The boxes are read by data/manifest.py (format, `box_units`, checks; a bad box
  is a ManifestError naming line and field). Rows without the field are left
  out, and so are rows whose image cannot be measured (predict names those).
  """
  return {image: [dict(bbox=[float(v) for v in box], label=label)
                  for box, label in zip(objs.bbox, objs.label)]
          for image, objs in manifest_lib.image_boxes(path, box_units).items()}


def _entries(result):
  """Every box and mask entry of a result, free prompts' objects included."""
  return [*result.get("boxes", []), *result.get("masks", []),
          *(o for item in result.get("prompts", []) for o in item.get("objects", []))]


def mark_drawn(result, min_score):
  """Sets `drawn` on every box and mask entry: unscored, or score >= min_score."""
  result["min_score"] = min_score
  for entry in _entries(result):
    entry["drawn"] = consistency.shown(entry, min_score)
  return result


def header_lines(result):
  """Text lines above the overlay: diagnosis with P(tb), the report, free prompts,
  what is not drawn, and whether the tasks agree (the `consistency` block)."""
  lines = []
  diag = result.get("diagnosis")
  if diag:
    p = diag.get("probability_tb")
    lines.append(f"diagnosis: {diag['label']}" + ("" if p is None else f"   P(tb) = {p:.2f}"))
  if result.get("report"):
    lines.append(f"report: {result['report']}")
  for item in result.get("prompts", []):
    lines.append(f"{item['prompt'].strip()} -> {item['text'] or '(no output)'}")
  hidden = sum(not e.get("drawn", True) for e in _entries(result))
  if hidden:
    lines.append(f"not drawn: {hidden} with score < {result['min_score']:g}")
  check = result.get("consistency")
  if check and check["checked"]:
    n = len(check["checked"])
    lines += [f"disagree: {f['message']}" for f in check["flags"]] or [
        f"tasks agree ({n} check{'' if n == 1 else 's'})"]
  return lines


def overlay_objects(result):
  """The drawn boxes and masks of a result, in the form visualize.overlay() takes."""
  objects = [dict(bbox=b["bbox"], label=b["label"], score=b["score"])
             for b in result.get("boxes", []) if b.get("drawn", True)]
  for m in result.get("masks", []):
    if m.get("drawn", True):
      objects.append(dict(bbox=m["bbox"], label=m["label"], score=m["score"],
                          mask=coco.rle_to_mask(m["rle"])))
  for item in result.get("prompts", []):
    for o in item.get("objects", []):
      if o.get("drawn", True):
        mask = coco.rle_to_mask(o["rle"]) if o.get("rle") else None
        objects.append(dict(bbox=o["bbox"], label=o["label"], score=o.get("score"), mask=mask))
  return objects


def write_outputs(out_dir, image_id, image, result, overlay=True):
  """Writes OUT/<image_id>.json and, if asked, OUT/<image_id>.png, each atomically."""
  from big_vision_cxr import visualize  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(out_dir) / f"{image_id}.json"
  atomic.write_text(path, json.dumps(result, indent=1))
  if overlay:
    truth = result.get("ground_truth")
    visualize.save_overlay(pathlib.Path(out_dir) / f"{image_id}.png", image,
                           overlay_objects(result), header_lines(result),
                           ground_truth=None if truth is None else truth["boxes"])
  return path


# ----------------------------------------------------------------------------
# The CLI.


@dataclasses.dataclass
class Summary:
  done: list = dataclasses.field(default_factory=list)  # (path, json path)
  failed: list = dataclasses.field(default_factory=list)  # (path, reason)
  skipped: list = dataclasses.field(default_factory=list)  # (path, reason)
  checked: int = 0  # images whose tasks could be compared (consistency.check)
  disagree: list = dataclasses.field(default_factory=list)  # (path, [flag codes])

  def lines(self):
    out = [f"predicted {len(self.done)} image(s), {len(self.failed)} failed, "
           f"{len(self.skipped)} skipped."]
    if self.checked:
      out.append(f"{len(self.disagree)} of {self.checked} image(s) with tasks that disagree "
                 f"(the JSON's 'consistency').")
    out += [f"  DISAGREE {p}: {', '.join(codes)}" for p, codes in self.disagree]
    out += [f"  FAILED  {r}" for _, r in self.failed]
    out += [f"  skipped {p}: {r}" for p, r in self.skipped]
    return out


def _failure(path, e):
  text = " ".join(str(e).split()) or type(e).__name__
  return text if str(path) in text else f"{path}: {text}"


def predict_files(runner, files, out_dir, *, overlay=True, progress=True, log=None, min_score=0.0,
                  ground_truth=None):
  """Predicts on `files` in batches; a file that fails is reported and the rest go on.

  Boxes and masks scoring below `min_score` stay in the JSON but are not drawn;
  `ground_truth` ({file: [dict(bbox, label)]}, e.g. manifest_ground_truth's) is
  added to the JSON and drawn dashed. Each JSON gets a `consistency` block.
  """
  ground_truth = ground_truth or {}
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  log = log or sys.stderr
  summary = Summary()
  ids = unique_ids(files)
  bar = tqdm(total=len(files), unit="img", disable=not progress or len(files) < 2, file=log)
  batch = []

  def fail(path, e, what=""):
    msg = _failure(path, f"{what}{type(e).__name__}: {e}" if what else e)
    summary.failed.append((path, msg))
    print(f"error: {msg}", file=log)

  def flush():
    if not batch:
      return
    try:
      results = runner.run([im for _, _, im in batch])
    except Exception as e:  # pylint: disable=broad-except
      if len(batch) == 1:  # Only this file's failure: name it and go on.
        fail(batch[0][0], e, "prediction failed: ")
        batch.clear()
        bar.update(1)
        return
      items = list(batch)  # Retry one by one to find the file that fails.
      batch.clear()
      for item in items:
        batch.append(item)
        flush()
      return
    for (path, image_id, image), result in zip(batch, results):
      result = mark_drawn(dict(image=str(path), image_id=image_id, **result), min_score)
      if path in ground_truth:
        result["ground_truth"] = dict(boxes=ground_truth[path])
      result["consistency"] = check = consistency.check(result, min_score)
      try:
        summary.done.append((path, write_outputs(out_dir, image_id, image, result, overlay)))
      except OSError as e:
        fail(path, e, "cannot write its outputs: ")
        continue
      summary.checked += bool(check["checked"])
      if check["flags"]:
        summary.disagree.append((path, [f["code"] for f in check["flags"]]))
    bar.update(len(batch))
    batch.clear()

  for path, image_id in zip(files, ids):
    try:
      image = images_lib.read_radiograph(path)
    except (errors.Error, OSError) as e:
      fail(path, e)
      bar.update(1)
      continue
    batch.append((path, image_id, image))
    if len(batch) == runner.batch_size:
      flush()
  flush()
  bar.close()
  return summary


def parse_args(argv):
  p = errors.ArgumentParser(prog="python -m big_vision_cxr.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="our orbax workdir (or workdir/checkpoints/STEP) or a big_vision .npz")
  p.add_argument("--config", help="the training config (file.py:args); workdirs store their own")
  p.add_argument("--model_variant", help="PaliGemma variant of a .npz without --config (e.g. demo)")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
  p.add_argument("--tokenizer", help="SentencePiece model (default: the run's, or the demo asset)")
  p.add_argument("--vqvae", help="VQ-VAE .npz (default: the run's, or the demo asset)")
  p.add_argument("--classes", help="detection/segmentation class names, ';'-separated "
                                   "(default: the run's)")
  p.add_argument("--input", required=True, help="image, folder, or manifest .csv/.jsonl")
  p.add_argument("--out", required=True, help="output folder for <id>.json and <id>.png")
  p.add_argument("--tasks", default=",".join(inference.TASKS),
                 help="comma-separated subset of the five tasks; '' for none (only --prompt)")
  p.add_argument("--prompt", action="append", default=[],
                 help='an extra prompt, e.g. "answer en is there a cavity?" (repeatable)')
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_decode_len", type=int, default=96,
                 help="new tokens per prompt (an object with a mask is ~23 tokens)")
  p.add_argument("--min_score", type=float, default=0.0,
                 help="draw only boxes/masks scoring at least this (all stay in the JSON, "
                      "flagged drawn: false); default 0: everything")
  p.add_argument("--box_units", choices=("pixels", "normalized"), default="pixels",
                 help="units of a manifest's ground-truth `boxes` (drawn dashed)")
  p.add_argument("--no_overlay", action="store_true", help="write the JSON only")
  p.add_argument("--no_progress", action="store_true")
  return p.parse_args(argv)


def run(argv):
  args = parse_args(argv)
  if args.batch_size < 1:
    raise PredictError(f"--batch_size must be >= 1, got {args.batch_size}.")
  if not 0 <= args.min_score <= 1:
    raise PredictError(f"--min_score must be in [0, 1], got {args.min_score}.")
  inputs = collect_inputs(args.input)
  truth = (manifest_ground_truth(args.input, args.box_units)
           if pathlib.Path(args.input).suffix.lower() in MANIFEST_SUFFIXES else None)
  atomic.writable_dir(args.out, "--out")  # before any model is loaded
  config = None
  if args.config:
    from big_vision_cxr import config as config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.load_config(args.config)
  classes = [c.strip() for c in args.classes.split(";")] if args.classes else None
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  loaded = inference.load(
      args.checkpoint, config=config, model_variant=args.model_variant, tokenizer=args.tokenizer,
      vqvae=args.vqvae, class_names=classes, step=args.step,
      with_vqvae="segmentation" in tasks or any(inference.needs_masks(p) for p in args.prompt))
  runner = inference.Runner(loaded, tasks=tasks, prompts=args.prompt, batch_size=args.batch_size,
                            max_decode_len=args.max_decode_len)
  summary = predict_files(runner, inputs.files, args.out, overlay=not args.no_overlay,
                          progress=not args.no_progress, min_score=args.min_score,
                          ground_truth=truth)
  summary.skipped += inputs.skipped
  print("\n".join(summary.lines()), file=sys.stderr)
  return 1 if summary.failed else 0


def main(argv=None):
  return errors.cli_main(run, argv)


if __name__ == "__main__":
  host_allocator.reexec()
  sys.exit(main())
