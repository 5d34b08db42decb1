"""Reads a built TFDS `cxr_tb` dataset back into source records (the 'tfds' source).

    recs = tfds_source.read("cxr_tb/phantom", data_dir=None, split=None)

The features are those `tfds_builders/cxr_tb.py` writes (docs/DATA.md, section 5):
ClassLabels back to names, '' back to None, a 1x1 mask where `masks_known` is
False back to no masks, `findings` JSON back to a dict. tensorflow_datasets is
imported only when a dataset is read. A dataset that is not built and an
unknown split are a `TfdsSourceError`.
"""
import json
import pathlib

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr.data import images, records
from big_vision_cxr.registry import DATA_SOURCES


class TfdsSourceError(errors.Error):
  """A built dataset that cannot be read as asked; the message names it."""


def _str(v):
  return v.decode() if isinstance(v, bytes) else str(v)


def example_to_record(ex, split=None):
  """A decoded TFDS example (numpy) -> SourceRecord."""
  objs = ex["objects"]
  n = len(objs["label"])
  opt = lambda values: [(_str(v) or None) for v in values]
  mask = np.stack([m[..., 0] for m in objs["mask"]]).astype(np.uint8) if ex["masks_known"] and n else (
      np.zeros((0, *ex["image"].shape[:2]), np.uint8) if ex["masks_known"] else None)
  return records.validate(records.SourceRecord(
      image_id=_str(ex["image_id"]), patient_id=_str(ex["patient_id"]), source=_str(ex["source"]),
      image=np.asarray(ex["image"][..., 0], np.uint8), label=records.LABELS[int(ex["label"])],
      objects=records.Objects(
          bbox=np.asarray(objs["bbox"], np.float32).reshape(-1, 4),
          label=[records.CLASS_NAMES[int(l)] for l in objs["label"]], mask=mask,
          lung=opt(objs["lung"]), zone=opt(objs["zone"]), kind=opt(objs["kind"])),
      report=_str(ex["report"]) or None,
      qa=[dict(question=_str(q), answer=_str(a), type=_str(t))
          for q, a, t in zip(ex["qa"]["question"], ex["qa"]["answer"], ex["qa"]["type"])],
      split=split, meta=dict(findings=json.loads(_str(ex["findings"])))))


def read(name, data_dir=None, split=None):
  """Every example of a built `cxr_tb/<config>` (or a dataset directory) as records;
  each keeps the split it was stored under."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(name)
  not_built = (f"tfds dataset {name!r} (data_dir {data_dir}) is not built (build it with "
               f"python -m tfds_builders.build)")
  try:
    builder = (tfds.builder_from_directory(str(path)) if path.is_dir()
               else tfds.builder(name, data_dir=data_dir))
  except (tfds.core.registered.DatasetNotFoundError, OSError) as e:
    raise TfdsSourceError(f"{not_built}: {type(e).__name__}") from e
  if not builder.info.splits:
    raise TfdsSourceError(f"{not_built}: it has no splits")
  if split and split not in builder.info.splits:
    raise TfdsSourceError(f"tfds dataset {name!r} has no split {split!r}; it has "
                          f"{sorted(builder.info.splits)}")
  out = []
  for s in ([split] if split else list(builder.info.splits)):
    for ex in tfds.as_numpy(builder.as_dataset(split=s, shuffle_files=False)):
      out.append(example_to_record(ex, split=s))
  return out


@DATA_SOURCES.register("tfds")
def from_config(name, cfg):
  """(records, skips) of dict(source='tfds', name='cxr_tb/<config>' or a dataset folder,
  data_dir=None, tfds_split=None (every split))."""
  return read(cfg["name"], data_dir=cfg.get("data_dir"), split=cfg.get("tfds_split")), images.Skips(name)
