"""The per-image source record every reader yields, and its validation.

One `SourceRecord` per radiograph, whatever the source (phantom, TBX11K, a
hospital manifest). Curation (`data/curation.py`) turns records into the five
tasks' examples; nothing downstream looks at a source's own format.

Conventions:
- `image` is uint8 [H, W] (one grey channel).
- boxes are float32 [n, 4], normalised (y_min, x_min, y_max, x_max) in [0, 1].
- `lung` is the PATIENT's side ('left' | 'right'). On a PA film the patient's
  left is on the image's right.
- `zone` is 'upper' | 'middle' | 'lower' (thirds of the lung height).
"""
import dataclasses
from typing import Any

import numpy as np

from big_vision_cxr import errors

LABELS = ("tb", "normal", "sick_non_tb")
CLASS_NAMES = ("active tb", "latent tb", "uncertain tb")
LUNGS = ("left", "right")
ZONES = ("upper", "middle", "lower")
KINDS = ("cavity", "consolidation", "nodular opacity", "calcified nodule")
QA_TYPES = ("closed", "open")


class RecordError(errors.Error):
  """A source record breaks the contract; the message names the image and field."""


@dataclasses.dataclass
class Objects:
  """Lesions of one image. Per-object lists may hold None where unknown."""
  bbox: np.ndarray  # [n, 4] float32, normalised y_min, x_min, y_max, x_max
  label: list  # [n] class names from CLASS_NAMES
  mask: np.ndarray | None = None  # [n, H, W] uint8 in {0, 1}, or None
  lung: list | None = None  # [n] 'left' | 'right' | None (patient side)
  zone: list | None = None  # [n] 'upper' | 'middle' | 'lower' | None
  kind: list | None = None  # [n] one of KINDS | None

  def __len__(self):
    return len(self.label)

  @classmethod
  def empty(cls, height=None, width=None):
    mask = None if height is None else np.zeros((0, height, width), np.uint8)
    return cls(np.zeros((0, 4), np.float32), [], mask, [], [], [])


@dataclasses.dataclass
class SourceRecord:
  image_id: str
  patient_id: str
  source: str
  image: np.ndarray  # [H, W] uint8
  label: str  # one of LABELS
  objects: Objects
  report: str | None = None
  qa: list = dataclasses.field(default_factory=list)  # dict(question, answer, type)
  split: str | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _fail(record, field, msg):
  name = getattr(record, "image_id", "?")
  raise RecordError(f"record {name!r} ({getattr(record, 'source', '?')}): field {field}: {msg}")


def validate(record: SourceRecord) -> SourceRecord:
  """Checks every field against the contract; returns the record or raises RecordError."""
  for field in ("image_id", "patient_id", "source"):
    value = getattr(record, field)
    if not isinstance(value, str) or not value:
      _fail(record, field, f"must be a non-empty string, got {value!r}")
  image = record.image
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
    _fail(record, "image", f"must be uint8 [H, W], got {getattr(image, 'dtype', type(image))} "
          f"{getattr(image, 'shape', '')}")
  if min(image.shape) < 1:
    _fail(record, "image", f"empty image {image.shape}")
  if record.label not in LABELS:
    _fail(record, "label", f"{record.label!r} not in {LABELS}")
  objs = record.objects
  bbox = np.asarray(objs.bbox)
  n = len(objs.label)
  if bbox.dtype != np.float32 or bbox.shape != (n, 4):
    _fail(record, "objects.bbox", f"must be float32 [{n}, 4], got {bbox.dtype} {bbox.shape}")
  if n:
    if not np.all(np.isfinite(bbox)) or bbox.min() < 0 or bbox.max() > 1:
      _fail(record, "objects.bbox", f"values must lie in [0, 1], got {bbox.tolist()}")
    if np.any(bbox[:, 2] < bbox[:, 0]) or np.any(bbox[:, 3] < bbox[:, 1]):
      _fail(record, "objects.bbox", f"needs y_min <= y_max and x_min <= x_max: {bbox.tolist()}")
  for name in objs.label:
    if name not in CLASS_NAMES:
      _fail(record, "objects.label", f"{name!r} not in {CLASS_NAMES}")
  if objs.mask is not None:
    m = objs.mask
    if not isinstance(m, np.ndarray) or m.dtype != np.uint8 or m.shape != (n, *image.shape):
      _fail(record, "objects.mask", f"must be uint8 [{n}, {image.shape[0]}, {image.shape[1]}], "
            f"got {getattr(m, 'dtype', type(m))} {getattr(m, 'shape', '')}")
    if m.size and m.max() > 1:
      _fail(record, "objects.mask", "values must be 0 or 1")
  for field, allowed in (("lung", LUNGS), ("zone", ZONES), ("kind", KINDS)):
    values = getattr(objs, field)
    if values is None:
      continue
    if len(values) != n:
      _fail(record, f"objects.{field}", f"has {len(values)} entries for {n} objects")
    for v in values:
      if v is not None and v not in allowed:
        _fail(record, f"objects.{field}", f"{v!r} not in {allowed}")
  if record.label != "tb" and any(l != "uncertain tb" for l in objs.label):
    _fail(record, "objects", f"label {record.label!r} with TB lesions {objs.label}")
  if record.report is not None and not isinstance(record.report, str):
    _fail(record, "report", f"must be a string or None, got {type(record.report).__name__}")
  for i, qa in enumerate(record.qa):
    if not isinstance(qa, dict) or set(qa) != {"question", "answer", "type"}:
      _fail(record, f"qa[{i}]", f"must be dict(question, answer, type), got {qa!r}")
    if qa["type"] not in QA_TYPES:
      _fail(record, f"qa[{i}].type", f"{qa['type']!r} not in {QA_TYPES}")
  if record.split is not None and record.split not in ("train", "val", "test"):
    _fail(record, "split", f"{record.split!r} not in ('train', 'val', 'test')")
  return record


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
  """[n, H, W] binary masks -> [n, 4] normalised boxes of their extents (pixel edges)."""
  n, h, w = masks.shape
  out = np.zeros((n, 4), np.float32)
  for i in range(n):
    ys, xs = np.nonzero(masks[i])
    if len(ys):
      out[i] = (ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w)
  return out


def lung_and_zone(bbox, lung_top=0.1, lung_bottom=0.8):
  """Patient side and zone of a normalised box when a source gives neither.

  Heuristic for real PA films without lung masks: the box centre on the image's
  right half is the patient's left; zones are thirds of [lung_top, lung_bottom].
  """
  cy, cx = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
  lung = "left" if cx >= 0.5 else "right"
  third = (lung_bottom - lung_top) / 3
  zone = "upper" if cy < lung_top + third else "middle" if cy < lung_top + 2 * third else "lower"
  return lung, zone
