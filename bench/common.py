"""Helpers shared by the bench scripts: arguments, hardware, timing, memory, output.

Every bench: `python -m bench.NAME [--quick] [--json PATH]`, prints a table with
absolute numbers and ratios against a reference measured in the same run, names
the hardware, and says whether the machine was busy (load average) while measuring.
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time


def arg_parser(description):
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help="small sizes, finishes within a minute")
  parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
  return parser


def hardware():
  """Names the machine: CPU model, core count, accelerator if jax sees one, load."""
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  info = dict(cpu=cpu, cores=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2))
  try:
    import jax  # pylint: disable=import-outside-toplevel
    info["jax_devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  except Exception:  # No jax, or no backend: the CPU line still names the machine.
    pass
  return info


def busy_note(info):
  """A sentence saying how loaded the machine was (the 2-core box is shared)."""
  load = os.getloadavg()[0]
  if load > 0.5 * (info.get("cores") or 1):
    return (f"NOTE: machine was shared/busy while measuring (1-min load {load:.1f} on "
            f"{info.get('cores')} cores); absolute numbers are pessimistic, ratios less affected.")
  return f"Machine load while measuring: {load:.1f} (1-min average) on {info.get('cores')} cores."


def time_fn(fn, repeats=5, warmup=1, min_time_s=0.0):
  """Median wall seconds of fn() (fn must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times, start = [], time.perf_counter()
  while len(times) < repeats or time.perf_counter() - start < min_time_s:
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _reset_high_water_mark():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return _high_water_mark() is not None
  except OSError:
    return False


def status_bytes(pid, key):
  """A /proc/PID/status field in bytes (Linux: VmRSS now, VmHWM its peak), or None."""
  with open(f"/proc/{pid}/status") as f:
    return next((int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":")), None)


def _high_water_mark():
  """The kernel's peak RSS of this process since the last reset (bytes), or None."""
  return status_bytes("self", "VmHWM")


def _rss_bytes():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
  """Context manager: peak process RSS growth (bytes) above the level at entry.

  Exact on Linux: the kernel's high-water mark (VmHWM) is reset at entry (writing 5 to
  /proc/self/clear_refs) and read at exit, so no short-lived peak is missed. Elsewhere it
  samples /proc/self/statm from a thread every `interval_s`. Works for any framework (JAX
  on CPU, PyTorch CPU) since both allocate in this process. Memory already held at entry
  (e.g. weights) is not counted. Not reentrant.
  """

  def __init__(self, interval_s=0.002):
    self.interval_s = interval_s
    self.peak_bytes = 0

  def __enter__(self):
    self._base = _rss_bytes()
    self._peak = self._base
    self._stop = threading.Event()
    self._thread = None
    if not _reset_high_water_mark():
      self._thread = threading.Thread(target=self._sample, daemon=True)
      self._thread.start()
    return self

  def _sample(self):
    while not self._stop.is_set():
      self._peak = max(self._peak, _rss_bytes())
      time.sleep(self.interval_s)

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is None:
      self._peak = _high_water_mark()
    else:
      self._thread.join()
    self._peak = max(self._peak, _rss_bytes())
    self.peak_bytes = self._peak - self._base
    return False


def format_table(rows, columns=None):
  """Plain-text table of a list of dicts (floats to 4 significant digits)."""
  columns = columns or list(dict.fromkeys(k for r in rows for k in r))
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return "" if v is None else str(v)
  cells = [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def ratio(ours, ref):
  return float(ours) / float(ref) if ref else float("nan")


def write_json(path, payload):
  """Writes `payload` as JSON atomically (temp file + rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_bench_")
  with os.fdopen(fd, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def report(title, rows, args, columns=None, notes=(), extra=None):
  """Prints the table with hardware and notes; writes --json if asked."""
  info = hardware()
  notes = [busy_note(info)] + list(notes)
  print(f"\n== {title} ==")
  print(f"Hardware: {info['cpu']} ({info['cores']} cores)" +
        (f", jax: {info['jax_devices']}" if "jax_devices" in info else ""))
  print(format_table(rows, columns))
  for note in notes:
    print(note)
  if args.json:
    write_json(args.json, dict(title=title, hardware=info, quick=bool(args.quick), rows=rows,
                               notes=notes, **(extra or {})))
    print(f"Wrote {args.json}")


def interleaved(fns, repeats, warmup=1, pause=0.0):
  """Median seconds of each fn, calling them in turn (fn0, fn1, ..., fn0, ...) `repeats`
  times after `warmup` calls each, so that a busy machine slows every side alike.
  `pause` seconds of sleep before each timed call let the previous side's threads go
  idle (OpenMP and XLA's pools spin a while after their work) outside anyone's time."""
  for fn in fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      time.sleep(pause)
      t = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - t)
  return [statistics.median(t) for t in times]
