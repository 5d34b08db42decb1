"""The configured datasets (config.input.datasets) as named, split source records.

    recs, skips = datasets.load("nih", dict(source="manifest", preset="nih_cxr14", path=...))
    by_name = datasets.split_all(config.input.datasets, seed=0, fractions=(0.8, 0.1, 0.1))

- `load` reads one dataset with the source its `source` names
  (`registry.DATA_SOURCES`), once per (name, config). Every record's `source`
  becomes the dataset's `source_name` (default: its name in config.datasets), so
  per-source metrics keep datasets apart whatever their source type; datasets
  pool under one name only when given the same `source_name`. Every patient id
  gets the dataset's `patient_id_prefix` (default ''), to tell apart patients of
  two datasets whose ids collide (data/patients.py compares ids as strings).
- `split_all`: copies of each dataset's records with their split: the source's
  given split renamed by the dataset's `split_map` (e.g. {'val': 'test'}; to
  None: re-split by patient hash), then `splits.apply`. A (source, image_id)
  given twice is an error (the pipeline caches images by it; evaluation records
  are identified by it).
"""
import dataclasses
import json
import logging

from big_vision_cxr import errors
from big_vision_cxr.data import splits
from big_vision_cxr.registry import DATA_SOURCES

_RECORDS = {}


class DatasetError(errors.Error):
  """A dataset config cannot be read as given; the message names the dataset."""


def _plain(cfg):
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def load(name, cfg):
  """(records, skips) of the dataset `name` with config `cfg`, cached (module doc)."""
  cfg = _plain(cfg)
  key = (name, json.dumps(cfg, sort_keys=True, default=str))
  if key in _RECORDS:
    return _RECORDS[key]
  try:
    source = DATA_SOURCES.get(cfg.get("source"))
  except KeyError as e:
    raise DatasetError(f"dataset {name!r}: {e.args[0]}") from None
  source_name, prefix = cfg.get("source_name", name), cfg.get("patient_id_prefix", "")
  if not isinstance(source_name, str) or not source_name or "/" in source_name:
    raise DatasetError(f"dataset {name!r}: source_name {source_name!r} must be a non-empty "
                       "string without '/'")
  if not isinstance(prefix, str):
    raise DatasetError(f"dataset {name!r}: patient_id_prefix must be a string, got {prefix!r}")
  recs, skips = source(name, cfg)
  for r in recs:
    r.source, r.patient_id = source_name, prefix + r.patient_id
  if len(skips):
    logging.warning("dataset %s: %d files skipped: %s", name, len(skips), skips.summary()["items"][:5])
  _RECORDS[key] = recs, skips
  return recs, skips


def split_all(datasets, *, seed, fractions):
  """{dataset name (sorted): copies of its records with their split} (module doc)."""
  datasets = _plain(datasets)
  out, seen = {}, {}
  for name in sorted(datasets):
    split_map = _plain(datasets[name]).get("split_map", {})
    recs = [dataclasses.replace(r, split=split_map.get(r.split, r.split))
            for r in load(name, datasets[name])[0]]
    out[name] = splits.apply(recs, seed=seed, fractions=tuple(fractions))
    for r in recs:
      key = (r.source, r.image_id)
      if key in seen:
        raise DatasetError(f"image id {r.image_id!r} of source {r.source!r} is given twice "
                           f"(datasets {seen[key]!r} and {name!r}); a source's image ids must "
                           "be unique")
      seen[key] = name
  return out
