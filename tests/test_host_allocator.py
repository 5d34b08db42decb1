"""host_allocator: freed large blocks stay in the process (no page faults on reuse), the
opt-out keeps glibc's defaults, and every training/inference CLI tunes first."""
import ast
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from big_vision_cxr import host_allocator

REPO = pathlib.Path(__file__).resolve().parents[1]
CLIS = ["train", "evaluate", "predict"]

# Per thread (main and a new one): malloc + touch + free 256 MiB once, then count the
# minor faults of doing it again (RUSAGE_THREAD: this thread's faults only).
_PROBE = """
import ctypes, json, resource, sys, threading
from big_vision_cxr import host_allocator
applied = host_allocator.tune()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = {}
def reuse(name, size=256 << 20):
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults[name] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
reuse("main")
thread = threading.Thread(target=reuse, args=("thread",))
thread.start()
thread.join()
print(json.dumps(dict(applied=applied, **faults)))
"""

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt settings are glibc's")


def _probe(opt_out):
  env = dict(os.environ)
  env.pop(host_allocator.OPT_OUT, None)
  if opt_out:
    env[host_allocator.OPT_OUT] = "default"
  out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True,
                       text=True, check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_reuse_faults_nothing():
  got = _probe(opt_out=False)
  assert got["applied"]
  # 256 MiB is 65536 small pages (128 huge ones): a handful of faults is Python's own.
  assert got["main"] < 50 and got["thread"] < 50, got


@glibc_only
def test_opt_out_keeps_glibc_defaults():
  got = _probe(opt_out=True)
  assert not got["applied"]
  # glibc's default mmaps the block and unmaps it on free: it faults in again.
  assert got["main"] >= 100 and got["thread"] >= 100, got


def test_opt_out_applies_nothing():
  assert host_allocator.tune({host_allocator.OPT_OUT: "default"}) is False


@pytest.mark.parametrize("module", CLIS)
def test_cli_tunes_first(module):
  tree = ast.parse((REPO / "big_vision_cxr" / f"{module}.py").read_text())
  main_blocks = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) ==
                 "__name__ == '__main__'"]
  assert len(main_blocks) == 1
  assert ast.unparse(main_blocks[0].body[0]) == "host_allocator.tune()"
