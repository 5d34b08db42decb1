"""Builds a preprocessing function from a big_vision-style string.

    fn = get_preprocess_fn("decode|resize(224)|value_range(-1, 1)", tokenizer=tok)
    out = fn({"image": png_bytes, "prefix": "...", "suffix": "..."})

Each `|`-separated op is `name` or `name(args...)` with Python-literal arguments
(parsed with `ast`, never `eval`). `name` is looked up in `registry.PP_OPS`; the
registered factory is called with the arguments and returns `fn(data) -> data`
on a dict of numpy values. Keyword arguments in `context` (e.g. `tokenizer`) are
passed to every factory whose signature names them.
"""
import ast
import inspect

from big_vision_cxr import errors
from big_vision_cxr.registry import PP_OPS


class PPError(errors.Error):
  """A preprocessing string is malformed or names an unknown op."""


def parse(pp_string):
  """'a|b(1, k=2)' -> [('a', (), {}), ('b', (1,), {'k': 2})]."""
  ops = []
  for part in (p.strip() for p in pp_string.split("|")):
    if not part:
      continue
    try:
      node = ast.parse(part, mode="eval").body
    except SyntaxError as e:
      raise PPError(f"cannot parse pp op {part!r}: {e.msg}") from e
    if isinstance(node, ast.Name):
      ops.append((node.id, (), {}))
      continue
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
      raise PPError(f"pp op {part!r} must be `name` or `name(literal args)`")
    try:
      args = tuple(ast.literal_eval(a) for a in node.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError as e:
      raise PPError(f"pp op {part!r}: arguments must be Python literals") from e
    ops.append((node.func.id, args, kwargs))
  return ops


def get_ops(pp_string, **context):
  """The list of op functions of `pp_string` (or of an already parsed op list)."""
  fns = []
  for name, args, kwargs in parse(pp_string) if isinstance(pp_string, str) else pp_string:
    try:
      factory = PP_OPS.get(name)
    except KeyError as e:
      raise PPError(str(e.args[0])) from e
    params = inspect.signature(factory).parameters
    extra = {k: v for k, v in context.items() if k in params and k not in kwargs}
    try:
      fns.append(factory(*args, **kwargs, **extra))
    except TypeError as e:
      raise PPError(f"pp op {name}{args or ''}{kwargs or ''}: {e}") from e
  return fns


def get_preprocess_fn(pp_string, **context):
  """One function applying every op of `pp_string` (or a parsed op list) in order."""
  fns = get_ops(pp_string, **context)

  def _pp(data):
    data = dict(data)
    for fn in fns:
      data = fn(data)
    return data
  return _pp
