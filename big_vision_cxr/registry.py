"""The project's registries: data sources, preprocessing ops and evaluators.

Each registry knows the modules that fill it and imports them on first use, so
`EVALUATORS.get("diagnosis")` works without the caller importing anything. Models
need no registry: config.model_name is a module name (models/common.py).
"""
import importlib


class Registry:
  """Maps names to objects; a lookup of an unknown name lists the known ones."""

  def __init__(self, kind, modules=()):
    self.kind = kind
    self._modules = tuple(modules)
    self._entries = {}
    self._imported = False

  def register(self, name):
    def decorator(obj):
      if name in self._entries and self._entries[name] is not obj:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._entries[name] = obj
      return obj
    return decorator

  def _import_modules(self):
    if not self._imported:
      self._imported = True
      for module in self._modules:
        importlib.import_module(module)

  def get(self, name):
    self._import_modules()
    if name not in self._entries:
      raise KeyError(f"Unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}.")
    return self._entries[name]

  def names(self):
    self._import_modules()
    return sorted(self._entries)


DATA_SOURCES = Registry("data source", modules=(
    "big_vision_cxr.data.phantom",
    "big_vision_cxr.data.tbx11k",
    "big_vision_cxr.data.manifest",
    "big_vision_cxr.data.tfds_source",
    "big_vision_cxr.data.voc",
))
PP_OPS = Registry("preprocessing op", modules=(
    "big_vision_cxr.pp.ops_image",
    "big_vision_cxr.pp.ops_text",
))
EVALUATORS = Registry("evaluator", modules=(
    "big_vision_cxr.evaluators.diagnosis",
    "big_vision_cxr.evaluators.vqa",
    "big_vision_cxr.evaluators.report",
    "big_vision_cxr.evaluators.detection",
    "big_vision_cxr.evaluators.segmentation",
    "big_vision_cxr.evaluators.perplexity",
))
