"""Input-pipeline throughput at 224 px with tokenisation, on the real images or at scale.

    python -m bench.input_bench [--quick] [--json PATH] [--batch_size 32]
    python -m bench.input_bench --scale [--n 50000] [--size 512] [--workers 0,1,2] [--data_dir D]
                                [--page_cache warm|cold|as_is] [--read_threads N]

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
(first epoch, nothing cached by the pipeline) with the default pp_image at 224 px:
examples/s, CPU time per example, and the RSS of the process and of each worker after
5k examples and at the end (it must stay flat) and their peaks (VmHWM). Before each
run the dataset's files are read whole into the page cache (--page_cache warm: what
a box with the memory for its data set gives; their seconds are reported), or dropped
from it (cold: every record is read from storage), or left as they are (as_is).
--read_threads: the pipeline's read_threads (default: its own). The ceiling, PNG
decode alone and decode + resize(224) with the pipeline's own decoder and resize,
runs in one process per core at once (--ceiling_s per stage) before the first
run and after each one, so every run's "vs_ceiling" is against the mean of the
ceilings just before and after it: the shared machine's load weighs on both alike.
"""
import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import common
from big_vision_cxr import host_allocator, input_pipeline
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


def _memory(proc, key="VmRSS"):
  """(bytes of this process, [bytes of each live child]) for a /proc status key."""
  kids = []
  for child in proc.children(recursive=True):
    try:
      kids.append(common.status_bytes(child.pid, key))
    except OSError:  # A child ending meanwhile.
      pass
  return common.status_bytes(proc.pid, key), kids


def _faults(proc):
  """(minor page faults, bytes read from storage, not the page cache) of `proc` and its
  live children so far (Linux /proc/PID/stat and io)."""
  faults = disk = 0
  for p in [proc] + proc.children(recursive=True):
    try:
      with open(f"/proc/{p.pid}/stat") as f:
        faults += int(f.read().rsplit(")", 1)[1].split()[7])
      with open(f"/proc/{p.pid}/io") as f:
        disk += next(int(l.split()[1]) for l in f if l.startswith("read_bytes:"))
    except (OSError, StopIteration):  # A child ending meanwhile.
      pass
  return faults, disk


def _keep_heap():
  """glibc: large blocks from the heap, never trimmed. A small process decoding and
  resizing in a loop otherwise gets its buffers' pages back from the kernel every image
  (~470 minor faults, ~0.8 ms), which the pipeline's processes do not (see the runs'
  faults per example), so the ceiling would be low for a reason the pipeline lacks."""
  import ctypes  # pylint: disable=import-outside-toplevel
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # Not glibc.
    return
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  mallopt(-4, 0)  # M_MMAP_MAX
  mallopt(-1, -1)  # M_TRIM_THRESHOLD


def _cpu_seconds(proc):
  """User + system CPU seconds of `proc` and its live children (grain workers)."""
  return sum(sum(p.cpu_times()[:2]) for p in [proc] + proc.children(recursive=True))


def page_cache(data_dir, how):
  """Reads every file of `data_dir` into the page cache ('warm'), drops them from it
  ('cold', Linux) or does nothing ('as_is'): the seconds it took."""
  t0 = time.perf_counter()
  for path in sorted(pathlib.Path(data_dir).iterdir()):
    if how == "as_is" or not path.is_file():
      continue
    with open(path, "rb") as f:
      if how == "cold":
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
      else:
        while f.read(1 << 23):
          pass
  return time.perf_counter() - t0


def stream_once(data_dir, n, workers, bs, read_threads=None):
  """One first pass over `n` streamed examples (run in a fresh process): JSON figures."""
  import psutil  # pylint: disable=import-outside-toplevel
  proc = psutil.Process()
  tok = ops_text.default_tokenizer()
  config = dict(datasets={"scale": dict(source="tfds", name=data_dir)}, tasks=TASKS,
                split_fractions=(1.0, 0.0, 0.0), text_len=64, pp_image=PP_SCALE,
                num_workers=workers, read_threads=read_threads)
  config["datasets"]["scale"]["split_map"] = {"val": "train", "test": "train"}
  it = input_pipeline.training(config, batch_size=bs, seed=0, tokenizer=tok)
  next(it)  # start-up (workers spawn and import) is not throughput
  tf_loaded = "tensorflow" in sys.modules
  cpu0, faults0, load0 = _cpu_seconds(proc), _faults(proc), os.getloadavg()[0]
  t0, drawn, at_check, trace = time.perf_counter(), 0, None, []
  check = min(CHECK_AT, n // 10)
  while drawn < n:
    next(it)
    drawn += bs
    if at_check is None and drawn >= check:
      at_check = _memory(proc)
    if drawn % (n // 10) < bs:
      own, kids = _memory(proc)
      trace.append((drawn, round((own + sum(kids)) / 2 ** 20)))
  seconds = time.perf_counter() - t0
  cpu, (faults, disk) = _cpu_seconds(proc) - cpu0, np.subtract(_faults(proc), faults0)
  (own, kids), (own_peak, kids_peak) = _memory(proc), _memory(proc, "VmHWM")
  it.close()
  return dict(workers=workers, read_threads=read_threads, examples=drawn, check_at=check,
              seconds=seconds, examples_per_s=drawn / seconds, cpu_ms_per_example=1e3 * cpu / drawn,
              faults_per_example=faults / drawn, disk_kb_per_example=disk / 1024 / drawn, rss_5k=at_check[0], rss_workers_5k=at_check[1],
              rss_end=own, rss_workers_end=kids, peak=own_peak, peak_workers=kids_peak,
              trace=trace, tf_in_main=tf_loaded,
              load=(load0 + os.getloadavg()[0]) / 2)


def build_scale(n, size, distinct, data_dir):
  """cxr_tb phantom of n records at `size` px as ArrayRecord: (dataset dir, seconds)."""
  from tfds_builders import cxr_tb  # pylint: disable=import-outside-toplevel
  cfg = cxr_tb.CxrTbConfig(name=f"phantom_{n}_{size}", source="phantom", n=n, size=size,
                           difficulty=0.3, distinct_images=distinct)
  builder = cxr_tb.CxrTb(config=cfg, data_dir=data_dir)
  t0 = time.perf_counter()
  builder.download_and_prepare()
  return str(builder.data_dir), time.perf_counter() - t0


def ceiling_once(data_dir, seconds, start_at, count=200):
  """In one of the ceiling's processes: images/s and CPU ms per image of PNG decode alone,
  then of decode + resize to 224 (the pipeline's `tfds_source.decode_image` and
  `ModelInput.stored`), each over `count` stored PNGs in a loop for `seconds`, from
  `start_at` (time.time()) on, so that the processes run at once."""
  import resource  # pylint: disable=import-outside-toplevel
  from big_vision_cxr.data import tfds_source  # pylint: disable=import-outside-toplevel
  _keep_heap()
  source = tfds_source._source(data_dir, "train", masks=False)  # pylint: disable=protected-access
  pngs = [source[i]["image"] for i in range(min(count, len(source)))]
  decode = lambda p: tfds_source.decode_image(p)[..., 0]
  model_input = ops_image.model_input_fn(PP_SCALE, 224)
  out = {}
  for name, fn in (("decode", decode), ("decode_resize", lambda p: model_input.stored(decode(p)))):
    fn(pngs[0])
    time.sleep(max(0.0, start_at - time.time()))
    done, cpu, t0 = 0, time.thread_time(), time.perf_counter()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    while time.perf_counter() - t0 < seconds:
      for p in pngs:
        fn(p)
      done += len(pngs)
    wall = time.perf_counter() - t0
    out[name] = done / wall
    out[f"{name}_cpu_ms"] = 1e3 * (time.thread_time() - cpu) / done
    out[f"{name}_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / done
    start_at = 0.0  # the next stage right away (the processes end this one within a pass)
  return out


def ceiling(data_dir, seconds, env):
  """decode and decode + resize, images/s summed over one process per core running at
  once, with their CPU ms per image and the load: a dict."""
  cores, load0 = os.cpu_count(), os.getloadavg()[0]
  start_at = time.time() + 15.0  # after every process has imported and read its PNGs
  procs = [subprocess.Popen([sys.executable, "-m", "bench.input_bench", "--ceiling_once", data_dir,
                             "--ceiling_s", str(seconds), "--start_at", str(start_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
           for _ in range(cores)]
  outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
  return dict(decode=sum(o["decode"] for o in outs),
              decode_resize=sum(o["decode_resize"] for o in outs),
              decode_cpu_ms=float(np.mean([o["decode_cpu_ms"] for o in outs])),
              decode_resize_cpu_ms=float(np.mean([o["decode_resize_cpu_ms"] for o in outs])),
              decode_resize_faults=float(np.mean([o["decode_resize_faults"] for o in outs])),
              load=(load0 + os.getloadavg()[0]) / 2, processes=cores)


def scale(args):
  bs, workers = args.batch_size, [int(w) for w in args.workers.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    data_dir, t_build = build_scale(args.n, args.size, args.distinct, args.data_dir or tmp)
    du = sum(f.stat().st_size for f in pathlib.Path(data_dir).iterdir())
    env = host_allocator.environment()  # glibc's settings as the trainer runs (None: as is)
    ceilings, runs = [ceiling(data_dir, args.ceiling_s, env)], []
    threads = [] if args.read_threads is None else ["--read_threads", str(args.read_threads)]
    for w in workers:
      cache_s = page_cache(data_dir, args.page_cache)
      out = subprocess.run([sys.executable, "-m", "bench.input_bench", "--stream_once", data_dir,
                            "--n", str(args.n), "--workers", str(w), "--batch_size", str(bs),
                            *threads], capture_output=True, text=True, check=True, env=env)
      runs.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), page_cache_s=cache_s))
      ceilings.append(ceiling(data_dir, args.ceiling_s, env))
  mb = lambda b: b / 2 ** 20
  rows = []
  for i, r in enumerate(runs):
    ceil = (ceilings[i]["decode_resize"] + ceilings[i + 1]["decode_resize"]) / 2
    rows.append(dict(
        stage=f"first epoch, {r['workers']} worker(s)", examples_per_s=r["examples_per_s"],
        ceiling_per_s=ceil, vs_ceiling=common.ratio(r["examples_per_s"], ceil),
        vs_target=common.ratio(r["examples_per_s"], TARGET),
        cpu_ms_per_example=r["cpu_ms_per_example"],
        cores_busy=r["examples_per_s"] * r["cpu_ms_per_example"] / 1e3,
        faults_per_example=r["faults_per_example"], disk_kb_per_example=r["disk_kb_per_example"],
        rss_mb_5k=mb(r["rss_5k"]), rss_mb_end=mb(r["rss_end"]), peak_mb=mb(r["peak"]),
        worker_rss_mb_5k=mb(max(r["rss_workers_5k"], default=0)),
        worker_rss_mb_end=mb(max(r["rss_workers_end"], default=0)),
        worker_peak_mb=mb(max(r["peak_workers"], default=0)), load=r["load"]))
  for i, c in enumerate(ceilings):
    when = "before the first run" if i == 0 else f"after the {runs[i - 1]['workers']}-worker run"
    rows.append(dict(stage=f"ceiling {i} ({when}): decode + resize(224) x {c['processes']}",
                     examples_per_s=c["decode_resize"], cpu_ms_per_example=c["decode_resize_cpu_ms"],
                     faults_per_example=c["decode_resize_faults"], load=c["load"]))
    rows.append(dict(stage=f"ceiling {i}: PNG decode alone x {c['processes']}",
                     examples_per_s=c["decode"], cpu_ms_per_example=c["decode_cpu_ms"],
                     load=c["load"]))
  common.report(
      f"input pipeline at scale: {args.n} phantom records at {args.size} px (ArrayRecord) "
      "-> 224 px",
      rows, args,
      notes=[f"Build: {t_build:.0f} s (0 when reused), {mb(du):.0f} MB on disk ({args.distinct} "
             "distinct pictures; every record stores and decodes its own PNG). Page cache before "
             f"each run: {args.page_cache} ({[round(r['page_cache_s']) for r in runs]} s); "
             f"read_threads: {args.read_threads if args.read_threads is not None else 'default'}"
             f" ({input_pipeline.READ_THREADS} for streamed data with 0 workers, else 0).",
             f"One pass of {args.n} examples per row, batch {bs}, tasks {', '.join(TASKS)}; "
             f"RSS (MB) after {runs[0]['check_at']} examples and at the end, peaks (VmHWM); "
             "worker_*: the largest worker; the trace (examples, MB of the process and its "
             f"workers) of each run: {[r['trace'] for r in runs]}. TensorFlow imported by "
             f"the main process: {[r['tf_in_main'] for r in runs]}. Every process runs with "
             f"the trainer's malloc settings (host_allocator): {env is not None}.",
             f"Target {TARGET:.0f} examples/s; vs_ceiling: against the mean of the decode + "
             "resize ceilings measured just before and after that run (one process per core, "
             f"{args.ceiling_s:g} s per stage, glibc's heap kept: `_keep_heap`). CPU ms: user + "
             "system of the process and its workers per example; the ceilings': CPU per image "
             "in each process; cores_busy: examples/s x CPU s per example (of "
             f"{os.cpu_count()}); faults: minor page faults per example; disk_kb: read from "
             "storage (not the page cache) per example."],
      extra=dict(runs=runs, ceilings=ceilings, build_s=t_build, disk_bytes=du))


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
  parser.add_argument("--page_cache", choices=("warm", "cold", "as_is"), default="warm",
                      help="the dataset's files in the page cache before each run (--scale)")
  parser.add_argument("--read_threads", type=int, default=None,
                      help="the pipeline's read_threads (--scale; default: its own)")
  parser.add_argument("--ceiling_s", type=float, default=10.0,
                      help="seconds per stage of each ceiling measurement")
  parser.add_argument("--stream_once", metavar="DIR", help=argparse.SUPPRESS)
  parser.add_argument("--ceiling_once", metavar="DIR", help=argparse.SUPPRESS)
  parser.add_argument("--start_at", type=float, default=0.0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.ceiling_once:
    print(json.dumps(ceiling_once(args.ceiling_once, args.ceiling_s, args.start_at)))
    return
  if args.stream_once:
    print(json.dumps(stream_once(args.stream_once, args.n, int(args.workers), args.batch_size,
                                 args.read_threads)))
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
    ops_image.resize(np.zeros((8, 8, 1), np.uint8), 4, antialias=True)  # import TF first
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
