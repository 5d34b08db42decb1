"""glibc malloc settings that keep XLA:CPU's step buffers in the process.

XLA:CPU mallocs a step's temporaries (~1.7 GB at bench_100m, batch 2) and frees them
after the step. By default glibc serves blocks over 32 MiB with mmap, and threads other
than the main one from their own arenas, whose blocks over 64 MiB are mmapped too; free
returns those pages to the kernel, so every step faults them in again and the kernel
zeroes them (~393k minor faults per step). TUNABLES turn that off:
  mmap_max=0         large blocks come from the heap, not from mmap;
  trim_threshold=max the heap is never trimmed (freed memory is reused, not returned);
  arena_max=1        every thread allocates from the main heap.
glibc reads them only at start-up, before any thread has its own arena (`mallopt` after
the imports is too late: a thread started by them keeps its arena, and XLA's threads can
be handed it), so the command-line entry points call `reexec` first: it restarts the
process once, same arguments, with them in GLIBC_TUNABLES. Not done when GLIBC_TUNABLES
is already set (the user's choice, or the restarted process) or BVCXR_MALLOC=default.
The process keeps its peak heap until it exits.
"""
import os
import platform
import sys

OPT_OUT = "BVCXR_MALLOC"
TUNABLES = ":".join(f"glibc.malloc.{k}={v}" for k, v in [
    ("mmap_max", 0), ("trim_threshold", 2**64 - 1), ("arena_max", 1)])
_MIN_GLIBC = (2, 26)  # The first glibc with malloc tunables.


def environment(environ=None):
  """`environ` with TUNABLES added, or None where they do not apply (see the docstring)."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT) == "default" or "GLIBC_TUNABLES" in environ:
    return None
  libc, version = platform.libc_ver()
  if not sys.platform.startswith("linux") or libc != "glibc":
    return None
  if tuple(int(v) for v in version.split(".")[:2]) < _MIN_GLIBC:
    return None
  return dict(environ, GLIBC_TUNABLES=TUNABLES)


def reexec():
  """Restarts this process with TUNABLES (returns only where they do not apply)."""
  env = environment()
  if env is None or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
