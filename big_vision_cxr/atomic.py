"""Atomic file writes: a temporary file in the same folder, then os.replace.

A reader sees the old file or the new one, never a half-written one; a crash
leaves at most a `.tmp-*` file behind. The temporary name is short (a long but
legal target name still works) and an existing symlink at the target is
replaced, not followed. Files get mode 0644 less the umask, as open() gives.
"""
import contextlib
import os
import pathlib
import tempfile

from big_vision_cxr import errors


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def target(path):
  """Yields a temporary path to write; on success it becomes `path`."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def write_bytes(path, data):
  with target(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_text(path, text):
  write_bytes(path, text.encode("utf-8"))


def writable_dir(path, what):
  """Makes folder `path` and checks it takes files; an errors.Error names `what` otherwise."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise errors.Error(f"{what} {path} is a file, not a folder.")
  try:
    path.mkdir(parents=True, exist_ok=True)
    write_text(path / ".write_check", "")
    (path / ".write_check").unlink()
  except OSError as e:
    raise errors.Error(f"{what} {path} is not writable: {e.strerror or e}.") from e
  return path
