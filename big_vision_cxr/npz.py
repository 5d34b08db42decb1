"""big_vision .npz checkpoints: flat '/'-joined keys, bfloat16 stored as 2-byte void.

Reading never unpickles (`allow_pickle=False`); every problem raises `CheckpointError`
naming the file and the key. Writing is atomic (big_vision_cxr/atomic.py).
"""
import os
import re
import zipfile

import ml_dtypes
import numpy as np

from big_vision_cxr import atomic
from big_vision_cxr.errors import CheckpointError


def flatten(tree, prefix=""):
  """Nested dicts -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unflatten(flat, source="checkpoint"):
  """{'a/b/c': leaf} -> nested dicts; a name that is both a leaf and a folder is an error."""
  tree = {}
  for name in sorted(flat):
    node = tree
    *parents, leaf = name.split("/")
    for i, part in enumerate(parents):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise CheckpointError(f"{source}: key {'/'.join(parents[:i + 1])!r} is both an array "
                              f"and the parent of {name!r}.")
    if leaf in node:
      raise CheckpointError(f"{source}: key {name!r} is both an array and a folder.")
    node[leaf] = flat[name]
  return tree


def split_spec(spec):
  """'file.npz:img' -> ('file.npz', 'img'); 'file.npz' -> ('file.npz', None)."""
  match = re.fullmatch(r"(.+?\.npz)(?::([\w/]+))?", str(spec))
  if not match:
    raise CheckpointError(f"{spec!r} is not an .npz checkpoint path (optionally followed by "
                          "':subtree', e.g. 'model.npz:img').")
  return match.group(1), match.group(2)


def _restore_dtype(array):
  if array.dtype.kind == "V" and array.dtype.itemsize == 2:
    return array.view(ml_dtypes.bfloat16)
  return array


def load_npz(path, keep=None):
  """Reads an .npz into {flat_key: np.ndarray}, bfloat16 restored from 'V2'.
  `keep(key) -> bool` reads only some arrays (e.g. one sub-tree of a big file)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file {path!r} does not exist.")
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f"{path!r} is not an .npz archive (not a zip file).")
  flat = {}
  try:
    with np.load(path, allow_pickle=False) as archive:
      for key in archive.files:
        if keep is not None and not keep(key):
          continue
        try:
          flat[key] = _restore_dtype(archive[key])
        except ValueError as e:
          raise CheckpointError(f"{path!r}: array {key!r} cannot be read without unpickling "
                                f"(object/pickled data is refused): {e}") from None
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise CheckpointError(f"{path!r} is not a readable .npz archive: {e}") from None
  if not flat and keep is None:
    raise CheckpointError(f"{path!r} contains no arrays.")
  return flat


def load_tree(spec):
  """'file.npz[:sub/tree]' -> nested dict of the params (a top-level `params/` or
  `opt/target/` wrapper is removed), restricted to the sub-tree if one is given."""
  path, subtree = split_spec(spec)
  keep = None
  if subtree:  # Read only that sub-tree's arrays, under any of the wrappers.
    prefixes = tuple(w + subtree + "/" for w in ("", "params/", "opt/target/"))
    keep = lambda key: key.startswith(prefixes)
  tree = unflatten(load_npz(path, keep), source=path)
  if "params" in tree:
    tree = tree["params"]
  elif "opt" in tree and "target" in tree["opt"]:
    tree = tree["opt"]["target"]
  if subtree:
    for part in subtree.split("/"):
      if not isinstance(tree, dict) or part not in tree:
        raise CheckpointError(f"{path!r} has no sub-tree {subtree!r}; top-level keys there: "
                              f"{_top_level_names(path)}.")
      tree = tree[part]
  return tree


def _top_level_names(path):
  """First name components of the params in an .npz (wrapper removed), without reading arrays."""
  with np.load(path, allow_pickle=False) as archive:
    names = archive.files
  for wrapper in ("params/", "opt/target/"):
    if any(n.startswith(wrapper) for n in names):
      names = [n[len(wrapper):] for n in names if n.startswith(wrapper)]
      break
  return sorted({n.split("/")[0] for n in names})


def save_npz(params, path, prefix=""):
  """Writes params (nested dict of arrays) as a flat .npz, bfloat16 as 'V2', atomically.
  `prefix='params/'` gives the wrapped layout of full big_vision checkpoints."""
  flat = {}
  for name, value in flatten(params).items():
    array = np.asarray(value)
    if array.dtype == ml_dtypes.bfloat16:
      array = array.view(np.dtype("V2"))
    if array.dtype == object:
      raise CheckpointError(f"param {name!r} is an object array; refusing to save it.")
    flat[prefix + name] = array
  with atomic.target(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **flat)
