"""host_allocator: with its tunables freed large blocks stay in the process (no page
faults on reuse, main thread or not); the CLIs restart once with them, keeping argv, pid,
stderr and exit code; BVCXR_MALLOC=default and a user's GLIBC_TUNABLES are respected."""
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

# Per thread (main and a new one): malloc + touch + free 256 MiB once, then count the
# minor faults of doing it again (RUSAGE_THREAD: this thread's faults only).
_REUSE = """
import ctypes, json, resource, threading
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
print(json.dumps(faults))
"""
# Started before the CLI module by every interpreter start: logs the pid and tunables.
_SITECUSTOMIZE = """
import json, os
with open(os.environ["START_LOG"], "a") as f:
  f.write(json.dumps([os.getpid(), os.environ.get("GLIBC_TUNABLES")]) + "\\n")
"""

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc tunables")


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_allocator.OPT_OUT)}
  return dict(env, **extra)


def _reuse_faults(env):
  out = subprocess.run([sys.executable, "-c", _REUSE], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  return json.loads(out.stdout)


@glibc_only
def test_tunables_keep_freed_blocks():
  got = _reuse_faults(host_allocator.environment(_clean_env()))
  # 256 MiB is 65536 small pages (128 huge ones): a handful of faults would be Python's own.
  assert got["main"] < 50 and got["thread"] < 50, got


@glibc_only
def test_glibc_defaults_fault_again():  # What the tunables fix: the probe does see it.
  got = _reuse_faults(_clean_env())
  assert got["main"] >= 100 and got["thread"] >= 100, got


def test_environment_respects_opt_out_and_user_tunables():
  assert host_allocator.environment(_clean_env(**{host_allocator.OPT_OUT: "default"})) is None
  assert host_allocator.environment(_clean_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")) is None


def _run_cli(tmp_path, **extra):
  (tmp_path / "sitecustomize.py").write_text(_SITECUSTOMIZE)
  log = tmp_path / "starts.jsonl"
  env = _clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), START_LOG=str(log),
                   JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)
  out = subprocess.run([sys.executable, "-m", "big_vision_cxr.predict", "--bogus"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  return out, [json.loads(line) for line in log.read_text().splitlines()]


@glibc_only
def test_cli_restarts_once_with_tunables(tmp_path):
  out, starts = _run_cli(tmp_path)
  assert [tunables for _, tunables in starts] == [None, host_allocator.TUNABLES]
  assert starts[0][0] == starts[1][0]  # exec: the same process
  assert out.returncode == 2 and out.stderr.count("error:") == 1, out.stderr


def test_cli_opt_out_does_not_restart(tmp_path):
  out, starts = _run_cli(tmp_path, **{host_allocator.OPT_OUT: "default"})
  assert [tunables for _, tunables in starts] == [None]
  assert out.returncode == 2 and out.stderr.count("error:") == 1, out.stderr


@pytest.mark.parametrize("module", ["train", "evaluate", "predict"])
def test_cli_restarts_first(module):
  tree = ast.parse((REPO / "big_vision_cxr" / f"{module}.py").read_text())
  main_blocks = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) ==
                 "__name__ == '__main__'"]
  assert len(main_blocks) == 1
  assert ast.unparse(main_blocks[0].body[0]) == "host_allocator.reexec()"
