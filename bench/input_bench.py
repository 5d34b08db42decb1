"""Input-pipeline throughput at 224 px with tokenisation, on the real images.

    python -m bench.input_bench [--quick] [--json PATH] [--batch_size 32]

Data: the TBX11K subset + NIH normals from ../shared/data (falls back to the
phantom, and says so, when they are absent). Tasks: diagnosis, VQA, report,
detection (segmentation needs the VQ-VAE at curation time and is left out).
Rows:
- read+decode: the readers (PNG decode, XML/CSV parsing), images/s;
- first epoch: reading + curation + a fresh iterator (resize to 224 px and
  tokenise on first use of each image/example) until every image was cached;
- cached: later batches (images come from the in-memory cache);
- reference: stacking and value-ranging the same batches of cached uint8
  images (the floor a numpy pipeline cannot beat on this machine).
Target: >= 500 examples/s on 2 cores.
"""
import csv
import pathlib
import tempfile
import time

import numpy as np

from bench import common
from big_vision_cxr import input_pipeline
from big_vision_cxr.pp import ops_image, ops_text

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("diagnosis", "vqa", "report", "detection")
TARGET = 500.0


def datasets(quick, tmp):
  tbx, nih = SHARED / "tbx11k_tb_subset", SHARED / "nih_cxr14_nofinding_pa"
  if not (tbx / "TBX11K").is_dir() or not (nih / "manifest.csv").is_file():
    n = 100 if quick else 400
    return {"phantom": dict(source="phantom", n=n, size=512)}, f"phantom ({n} images, 512 px): ../shared/data absent"
  rows = list(csv.DictReader(open(nih / "manifest.csv")))
  if quick:
    rows = rows[:30]
  small = pathlib.Path(tmp) / "nih.csv"
  with open(small, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=rows[0].keys())
    writer.writeheader()
    writer.writerows(rows)
  everything = {"train": None, "val": None}  # re-split by patient: all go to 'train' below
  return ({"tbx11k": dict(source="tbx11k", path=str(tbx), splits=("val",) if quick else ("train", "val"),
                          split_map=everything),
           "nih": dict(source="manifest", preset="nih_cxr14", path=str(small), root=str(nih))},
          f"real: TBX11K {'val (100)' if quick else 'train+val (250)'} + NIH normals ({len(rows)})")


def main():
  parser = common.arg_parser(__doc__)
  parser.add_argument("--batch_size", type=int, default=32)
  args = parser.parse_args()
  tok = ops_text.default_tokenizer()
  bs = args.batch_size
  with tempfile.TemporaryDirectory() as tmp:
    ds, data_note = datasets(args.quick, tmp)
    config = dict(datasets=ds, tasks=TASKS, split_fractions=(1.0, 0.0, 0.0), text_len=64,
                  pp_image="decode|resize(224, antialias=True)|value_range(-1, 1)")
    ops_image.resize(np.zeros((8, 8, 1), np.uint8), 4)  # import TensorFlow before timing
    t0 = time.perf_counter()
    recs = {name: input_pipeline.load_records(name, cfg)[0] for name, cfg in ds.items()}
    t_read = time.perf_counter() - t0
    n_images = sum(len(r) for r in recs.values())
    it = input_pipeline.training(config, batch_size=bs, seed=0, tokenizer=tok)
    n_examples = sum(len(u) for u in it.units.values())
    t_epoch_start = time.perf_counter()
    drawn = 0
    while len(it.processor.cache) < n_images and drawn < 50 * n_examples:
      next(it)
      drawn += bs
    now = time.perf_counter()
    t_first = now - t0  # reading + curation + first pass
    first_rate = drawn / (now - t_epoch_start)
    first_with_read = drawn / t_first
    steps = 20 if args.quick else 100
    t_cached = common.time_fn(lambda: [next(it) for _ in range(steps)], repeats=3) / steps
    cached = [it.processor.image(ex) for ex in it.next_examples()]
    t_ref = common.time_fn(lambda: ops_image.value_range(
        np.broadcast_to(np.stack(cached), (bs, 224, 224, 3))), repeats=20)
  rows = [
      dict(stage="read+decode (readers)", examples_per_s=None, images_per_s=n_images / t_read,
           vs_target=None, vs_reference=None),
      dict(stage="first epoch incl. read+decode", examples_per_s=first_with_read, images_per_s=None,
           vs_target=common.ratio(first_with_read, TARGET), vs_reference=common.ratio(first_with_read, bs / t_ref)),
      dict(stage="first epoch (resize+tokenise, after read)", examples_per_s=first_rate, images_per_s=None,
           vs_target=common.ratio(first_rate, TARGET), vs_reference=common.ratio(first_rate, bs / t_ref)),
      dict(stage="cached", examples_per_s=bs / t_cached, images_per_s=None,
           vs_target=common.ratio(bs / t_cached, TARGET), vs_reference=common.ratio(bs / t_cached, bs / t_ref)),
      dict(stage="reference: stack+value_range only", examples_per_s=bs / t_ref, images_per_s=None,
           vs_target=common.ratio(bs / t_ref, TARGET), vs_reference=1.0),
  ]
  common.report(
      f"input pipeline, 224 px, text_len 64, batch {bs}", rows, args,
      notes=[f"Data: {data_note}; {n_images} images -> {n_examples} examples "
             f"({', '.join(f'{u}={len(v)}' for u, v in it.units.items())}); first epoch drew "
             f"{drawn} examples until all {n_images} images were cached.",
             "Single Python process (the pipeline is numpy; tf.image.resize may use both cores).",
             f"Target {TARGET:.0f} examples/s."],
      extra=dict(n_images=n_images, n_examples=n_examples, data=data_note))


if __name__ == "__main__":
  main()
