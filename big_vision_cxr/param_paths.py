"""Parameter paths ('llm/layers/attn/q_einsum/w') and (regex, value) rule lists over them.

The optimizer (schedules, lr/wd multipliers, LoRA targets) and the sharding
rules both name parameters this way; the first rule whose regex matches the
whole path wins.
"""
import re

import jax

from big_vision_cxr import errors


class RuleError(errors.Error):
  """A (regex, value) rule list that cannot be used; names the config field."""


def tree_names(tree):
  """Flat list of ('a/b/c', leaf) in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [("/".join(_key_str(k) for k in path), leaf) for path, leaf in leaves]


def _key_str(key):
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_map_with_names(fn, tree):
  """Like jax.tree.map, but `fn(name, leaf)`."""
  treedef = jax.tree_util.tree_structure(tree)
  return jax.tree_util.tree_unflatten(treedef, [fn(n, x) for n, x in tree_names(tree)])


def compile_rules(rules, what, error=RuleError):
  """[(regex, value)] -> [(compiled regex, value)]; `error` names `what` on a bad entry."""
  out = []
  for item in rules:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
      raise error(f"{what}: each entry must be (regex, value), got {item!r}.")
    pattern, value = item
    try:
      out.append((re.compile(pattern), value))
    except re.error as e:
      raise error(f"{what}: bad regex {pattern!r}: {e}") from e
  return out


def first_match(name, compiled):
  """(True, value) of the first rule matching all of `name`, else (False, None)."""
  for rx, value in compiled:
    if rx.fullmatch(name):
      return True, value
  return False, None
