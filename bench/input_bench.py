"""Input-pipeline throughput at 224 px with tokenisation, on the real images or at scale.

    python -m bench.input_bench [--quick] [--json PATH] [--batch_size 32]
    python -m bench.input_bench --scale [--n 50000] [--size 512] [--workers 0,1,2] [--data_dir D]

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

--scale: a phantom `cxr_tb` of --n records at --size px written as ArrayRecord
(`distinct_images` pictures, so the build takes minutes; every record is its own
PNG on disk, read and decoded per example), then streamed at 224 px in a fresh
process per --workers value (grain worker processes): one pass of --n examples
(first epoch, nothing cached) with the default pp_image at 224 px: examples/s, CPU
time per example, and the peak RSS of the process (and of its workers) after 5k
examples and at the end: it must stay flat. Rows also give the ceilings: PNG decode
alone, and decode + resize, on this machine's cores.
"""
import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
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


PP_SCALE = "decode|resize(224)|value_range(-1, 1)"  # the default pp_image at 224 px
CHECK_AT = 5000  # examples: the first RSS reading compared with the end


class _Memory:
  """Peak RSS (bytes) of this process and of this process plus its children, sampled."""

  def __init__(self):
    import psutil  # pylint: disable=import-outside-toplevel
    self.proc, self.peak, self.peak_all = psutil.Process(), 0, 0
    threading.Thread(target=self._run, daemon=True).start()

  def _run(self):
    while True:
      try:
        own = self.proc.memory_info().rss
        kids = sum(c.memory_info().rss for c in self.proc.children(recursive=True))
        self.peak, self.peak_all = max(self.peak, own), max(self.peak_all, own + kids)
      except Exception:  # A worker ending between the two calls: sample again.
        pass
      time.sleep(0.05)


def _cpu_seconds(proc):
  """User + system CPU seconds of `proc` and its live children (grain workers)."""
  return sum(sum(p.cpu_times()[:2]) for p in [proc] + proc.children(recursive=True))


def stream_once(data_dir, n, workers, bs):
  """One first pass over `n` streamed examples (run in a fresh process): JSON figures."""
  mem = _Memory()
  tok = ops_text.default_tokenizer()
  config = dict(datasets={"scale": dict(source="tfds", name=data_dir)}, tasks=TASKS,
                split_fractions=(1.0, 0.0, 0.0), text_len=64, pp_image=PP_SCALE,
                num_workers=workers)
  config["datasets"]["scale"]["split_map"] = {"val": "train", "test": "train"}
  it = input_pipeline.training(config, batch_size=bs, seed=0, tokenizer=tok)
  next(it)  # start-up (workers spawn and import) is not throughput
  cpu0 = _cpu_seconds(mem.proc)
  t0, drawn, at_check, trace = time.perf_counter(), 0, None, []
  check = min(CHECK_AT, n // 10)
  while drawn < n:
    next(it)
    drawn += bs
    if at_check is None and drawn >= check:
      at_check = (mem.peak, mem.peak_all)
    if drawn % (n // 10) < bs:
      trace.append((drawn, round(mem.peak / 2 ** 20)))
  seconds = time.perf_counter() - t0
  cpu = _cpu_seconds(mem.proc) - cpu0
  time.sleep(0.1)
  it.close()
  return dict(workers=workers, examples=drawn, check_at=check, seconds=seconds,
              examples_per_s=drawn / seconds, cpu_ms_per_example=1e3 * cpu / drawn,
              rss_5k=at_check[0], rss_end=mem.peak, rss_all_5k=at_check[1],
              rss_all_end=mem.peak_all, trace=trace, load=os.getloadavg()[0])


def build_scale(n, size, distinct, data_dir):
  """cxr_tb phantom of n records at `size` px as ArrayRecord: (dataset dir, seconds)."""
  from tfds_builders import cxr_tb  # pylint: disable=import-outside-toplevel
  cfg = cxr_tb.CxrTbConfig(name=f"phantom_{n}_{size}", source="phantom", n=n, size=size,
                           difficulty=0.3, distinct_images=distinct)
  builder = cxr_tb.CxrTb(config=cfg, data_dir=data_dir)
  t0 = time.perf_counter()
  builder.download_and_prepare()
  return str(builder.data_dir), time.perf_counter() - t0


def ceilings(data_dir, repeats=200):
  """Images/s and CPU ms per image on one core of: PNG decode alone, decode + the default
  resize to 224, and decode + resize with antialias, on stored records (TensorFlow on one
  thread, as in the pipeline's workers: `scale` sets it before TensorFlow starts)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class Undecoded(tfds.decode.Decoder):
    def decode_example(self, serialized):
      return serialized
    decode_example_np = decode_batch_example_np = decode_example

  builder = tfds.builder_from_directory(data_dir)
  source = builder.as_data_source("train", decoders={"image": Undecoded(),
                                                     "objects": {"mask": Undecoded()}})
  pngs = [source[i]["image"] for i in range(min(repeats, len(source)))]
  decode = lambda p: builder.info.features["image"].decode_example_np(p)[..., 0]
  rates, cpu_ms = [], []
  for pp in (None, PP_SCALE, "decode|resize(224, antialias=True)|value_range(-1, 1)"):
    model_input = pp and ops_image.model_input_fn(pp, 224)
    fn = decode if pp is None else (lambda p, m=model_input: m.stored(decode(p)))
    cpu = time.process_time()
    rates.append(len(pngs) / common.time_fn(lambda f=fn: [f(p) for p in pngs], repeats=3))
    cpu_ms.append(1e3 * (time.process_time() - cpu) / (4 * len(pngs)))  # warm-up + 3 repeats
  return rates, cpu_ms


def scale(args):
  os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")  # the ceilings: one core each
  os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
  bs, workers = args.batch_size, [int(w) for w in args.workers.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    data_dir, t_build = build_scale(args.n, args.size, args.distinct, args.data_dir or tmp)
    du = sum(f.stat().st_size for f in pathlib.Path(data_dir).iterdir())
    (dec, dec_resize, dec_antialias), cpu_ms = ceilings(data_dir)
    runs = []
    for w in workers:
      out = subprocess.run([sys.executable, "-m", "bench.input_bench", "--stream_once", data_dir,
                            "--n", str(args.n), "--workers", str(w), "--batch_size", str(bs)],
                           capture_output=True, text=True, check=True)
      runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  cores = os.cpu_count()
  mb = lambda b: b / 2 ** 20
  rows = [dict(stage=f"first epoch, {r['workers']} worker(s)", examples_per_s=r["examples_per_s"],
               rss_mb_5k=mb(r["rss_5k"]), rss_mb_end=mb(r["rss_end"]),
               rss_mb_with_workers_5k=mb(r["rss_all_5k"]),
               rss_mb_with_workers_end=mb(r["rss_all_end"]),
               cpu_ms_per_example=r["cpu_ms_per_example"],
               vs_target=common.ratio(r["examples_per_s"], TARGET),
               vs_ceiling=common.ratio(r["examples_per_s"], cores * dec_resize), load=r["load"])
          for r in runs]
  rows += [dict(stage=f"ceiling: PNG decode alone x {cores} cores", examples_per_s=cores * dec,
                cpu_ms_per_example=cpu_ms[0]),
           dict(stage=f"ceiling: decode + resize(224) x {cores} cores",
                examples_per_s=cores * dec_resize, cpu_ms_per_example=cpu_ms[1]),
           dict(stage=f"ceiling: decode + resize(224, antialias=True) x {cores} cores",
                examples_per_s=cores * dec_antialias, cpu_ms_per_example=cpu_ms[2])]
  common.report(
      f"input pipeline at scale: {args.n} phantom records at {args.size} px (ArrayRecord) "
      "-> 224 px",
      rows, args,
      notes=[f"Build: {t_build:.0f} s (0 when reused), {mb(du):.0f} MB on disk ({args.distinct} "
             "distinct pictures; every record stores and decodes its own PNG). The file was just "
             "written, so reads come mostly from the page cache.",
             f"One pass of {args.n} examples per row, batch {bs}, tasks {', '.join(TASKS)}; "
             f"RSS: peaks after {runs[0]['check_at']} examples and at the end; the trace (examples, "
             f"peak MB of the process) of each run: {[r['trace'] for r in runs]}.",
             f"Target {TARGET:.0f} examples/s; vs_ceiling: against decode + resize on all cores. "
             "CPU ms: user + system of the process and its workers per example (the ceilings' "
             "include TensorFlow's idle-spinning threads, so compare their wall rates)."],
      extra=dict(runs=runs, build_s=t_build, disk_bytes=du, decode_per_s_1core=dec,
                 ceiling_cpu_ms=cpu_ms,
                 decode_resize_per_s_1core=dec_resize, decode_antialias_per_s_1core=dec_antialias))


def main():
  parser = common.arg_parser(__doc__)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--scale", action="store_true", help="stream a phantom ArrayRecord dataset")
  parser.add_argument("--n", type=int, default=50000)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--distinct", type=int, default=200)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--data_dir", default=None, help="build the scale dataset here and keep it "
                      "(a second run reuses it); default: a temporary folder")
  parser.add_argument("--stream_once", metavar="DIR", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.stream_once:
    print(json.dumps(stream_once(args.stream_once, args.n, int(args.workers), args.batch_size)))
    return
  if args.scale:
    scale(args)
    return
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
    while len(it.examples.image_cache) < n_images and drawn < 50 * n_examples:
      next(it)
      drawn += bs
    now = time.perf_counter()
    t_first = now - t0  # reading + curation + first pass
    first_rate = drawn / (now - t_epoch_start)
    first_with_read = drawn / t_first
    steps = 20 if args.quick else 100
    t_cached = common.time_fn(lambda: [next(it) for _ in range(steps)], repeats=3) / steps
    cached = [it.examples.image(ex) for ex in it.next_examples()]
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
