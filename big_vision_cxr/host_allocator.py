"""glibc malloc settings that keep XLA:CPU's step buffers in the process.

XLA:CPU mallocs a step's temporaries (~1.7 GB at bench_100m, batch 2) and frees them
after the step. By default glibc serves blocks over 32 MiB with mmap, and threads other
than the main one from their own arenas, whose large blocks are mmapped too; free
returns those pages to the kernel, so every step faults them in again and the kernel
zeroes them (~393k minor faults per step). `tune` turns that off with `mallopt`, which
acts at run time (no re-exec, unlike the GLIBC_TUNABLES environment variable):
  M_MMAP_MAX 0        large blocks come from the heap, not from mmap;
  M_TRIM_THRESHOLD -1 the heap is never trimmed (freed memory is reused, not returned);
  M_ARENA_MAX 1       every thread allocates from the main heap (a thread arena would
                      still mmap blocks larger than its 64 MiB heap).
The process keeps its peak heap until it exits. The command-line entry points call
`tune` first; set BVCXR_MALLOC=default to keep glibc's defaults.
"""
import ctypes
import os
import platform
import sys

OPT_OUT = "BVCXR_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))


def tune(environ=None):
  """Applies SETTINGS on glibc unless opted out; True if all were applied."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "") == "default":
    return False
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all([mallopt(param, value) == 1 for param, value in SETTINGS])
