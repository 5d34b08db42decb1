"""General pp ops on dicts: keep, drop, copy."""
from big_vision_cxr.registry import PP_OPS


@PP_OPS.register("keep")
def get_keep(*keys):
  return lambda data: {k: v for k, v in data.items() if k in keys}


@PP_OPS.register("drop")
def get_drop(*keys):
  return lambda data: {k: v for k, v in data.items() if k not in keys}


@PP_OPS.register("copy")
def get_copy(inkey, outkey):
  return lambda data: {**data, outkey: data[inkey]}
