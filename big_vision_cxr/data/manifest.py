"""Generic CSV / JSONL manifest reader, for hospital data (format in docs/DATA.md).

One row per image. Canonical fields (rename with `columns={field: column}`):
  image       path relative to the manifest's folder (or `root`); required
  patient_id  required (splits are by patient)
  label       'tb' | 'normal' | 'sick_non_tb' after `label_map`; required
  image_id    optional, default: the image path without its suffix
  split       optional 'train' | 'val' | 'test' (honoured; see splits.py)
  report      optional free text
  boxes       optional JSON list of {"label", "bbox": [y_min, x_min, y_max, x_max],
              optional "lung", "zone", "kind"}; `box_units` 'pixels' (edges, in the
              image file's pixels) or 'normalized'
  masks       optional JSON list of {"label", "path"}: binary mask images the size
              of the image; every 8-connected component is one object (its box is
              the component's extent). Masks win over boxes when both are given.
  qa          optional JSON list of {"question", "answer", "type": closed|open}
In CSV the JSON fields are JSON strings; in JSONL they may be JSON values.
Bad rows raise `ManifestError` naming file, line and field, or with
on_error='skip' are logged and counted in `skips`. A manifest without rows
or without a usable row, and two rows of one image_id (found before any image
is read), are a `ManifestError`.

Files are read as UTF-8, with or without the byte-order mark Excel writes.

`NIH_CXR14` maps the NIH ChestX-ray14 normals' manifest.csv:
    manifest.read(path, **manifest.NIH_CXR14)

`image_paths(path)` reads an inference manifest: only the image column (`image`,
`path` or `image_path`), with the same path rules.
"""
import csv
import json
import pathlib

import numpy as np
from scipy import ndimage

from big_vision_cxr import errors
from big_vision_cxr.data import images, records
from big_vision_cxr.registry import DATA_SOURCES

FIELDS = ("image", "patient_id", "label", "image_id", "split", "report", "boxes", "masks", "qa")
REQUIRED = ("image", "patient_id", "label")
NIH_CXR14 = dict(columns={"label": "finding_labels"}, label_map={"No Finding": "normal"},
                 source="nih_cxr14")
MAX_MANIFEST_BYTES = 512 << 20
MAX_FIELD_CHARS = 1 << 20
IMAGE_KEYS = ("image", "path", "image_path")  # image_paths: the first one present


class ManifestError(errors.Error):
  """A manifest or one of its rows is malformed; the message names file, line and field."""


def _rows(path):
  """(line number, dict or a bad JSONL line's ManifestError) per row of a CSV, TSV or JSONL."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ManifestError(f"manifest not found: {path}")
  if path.stat().st_size > MAX_MANIFEST_BYTES:
    raise ManifestError(f"{path}: over {MAX_MANIFEST_BYTES} bytes")
  suffix = path.suffix.lower()
  if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
    raise ManifestError(f"{path}: manifest must be .csv, .tsv or .jsonl")
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        try:
          for row in reader:
            yield reader.line_num, row
        except csv.Error as e:  # e.g. a field over csv.field_size_limit()
          raise ManifestError(f"{path}:{reader.line_num + 1}: not readable as CSV ({e})") from e
        return
      for i, line in enumerate(f, 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            yield i, ManifestError(f"{path}:{i}: invalid JSON ({e})")
            continue
          yield i, row if isinstance(row, dict) else ManifestError(f"{path}:{i}: not a JSON object")
  except UnicodeDecodeError as e:
    raise ManifestError(f"{path}: not UTF-8 text ({e})") from e


def _image_id(image_id, image):
  """A row's image_id: its own, else the image path without its suffix."""
  return str(image_id or pathlib.PurePosixPath(str(image)).with_suffix(""))


def _check_unique_ids(path, rows, columns):
  """ManifestError naming both lines when two rows give one image_id."""
  seen = {}
  for line, row in rows:
    if not isinstance(row, dict) or row.get(columns["image"]) in (None, ""):
      continue  # the row fails on its own
    try:
      image_id = _image_id(row.get(columns["image_id"]), row[columns["image"]])
    except ValueError:  # no file name in the path: the row fails on its own
      continue
    if image_id in seen:
      raise ManifestError(f"{path}:{line}: image_id {image_id!r} is also line {seen[image_id]}'s; "
                          f"give the rows distinct image_id values (or list each image once)")
    seen[image_id] = line


def _json_field(value, where):
  if value is None or value == "":
    return []
  if isinstance(value, str):
    if len(value) > MAX_FIELD_CHARS:
      raise ManifestError(f"{where}: over {MAX_FIELD_CHARS} characters")
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise ManifestError(f"{where}: invalid JSON ({e})") from e
  if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
    raise ManifestError(f"{where}: must be a JSON list of objects")
  return value


def _class(name, where):
  if name not in records.CLASS_NAMES:
    raise ManifestError(f"{where}: class {name!r} not in {records.CLASS_NAMES}")
  return name


def objects_from_masks(mask_specs, root, shape, where):
  """One object per 8-connected component of each class mask."""
  masks, labels = [], []
  for k, spec in enumerate(mask_specs):
    name = _class(spec.get("label"), f"{where}.masks[{k}].label")
    m = images.read_image(spec.get("path", ""), root=root)
    if m.shape != shape:
      raise ManifestError(f"{where}.masks[{k}]: mask {spec.get('path')} is {m.shape}, image is {shape}")
    comps, n = ndimage.label(m > 0, structure=np.ones((3, 3)))
    for c in range(1, n + 1):
      masks.append((comps == c).astype(np.uint8))
      labels.append(name)
  mask = np.stack(masks) if masks else np.zeros((0, *shape), np.uint8)
  n = len(labels)
  return records.Objects(records.boxes_from_masks(mask), labels, mask, [None] * n, [None] * n, [None] * n)


def objects_from_boxes(box_specs, shape, units, where):
  h, w = shape
  boxes, labels, attrs = [], [], {"lung": [], "zone": [], "kind": []}
  for k, spec in enumerate(box_specs):
    name = _class(spec.get("label"), f"{where}.boxes[{k}].label")
    try:
      box = np.asarray(spec["bbox"], np.float64).reshape(4)
    except (KeyError, ValueError, TypeError) as e:
      raise ManifestError(f"{where}.boxes[{k}].bbox: need 4 numbers y_min, x_min, y_max, x_max ({e})") from e
    if units == "pixels":
      box = box / [h, w, h, w]
    if not np.all(np.isfinite(box)) or box.min() < 0 or box.max() > 1 or box[2] <= box[0] or box[3] <= box[1]:
      raise ManifestError(f"{where}.boxes[{k}].bbox: {spec['bbox']} is empty or outside the {w}x{h} image")
    boxes.append(box)
    labels.append(name)
    for key in attrs:
      attrs[key].append(spec.get(key))
  return records.Objects(np.asarray(boxes, np.float32).reshape(-1, 4), labels, None, **attrs)


def read(path, *, root=None, columns=None, label_map=None, box_units="pixels", source="manifest",
         skips=None, on_error="skip", load_images=True, workers=None):
  """(records, skips) for every row of the manifest at `path`, in row order.

  Rows are read by `workers` threads (image decoding releases the GIL).
  """
  path = pathlib.Path(path)
  root = pathlib.Path(root) if root is not None else path.parent
  columns = {**{f: f for f in FIELDS}, **(columns or {})}
  unknown = set(columns) - set(FIELDS)
  if unknown:
    raise ManifestError(f"columns maps unknown fields {sorted(unknown)}; fields: {FIELDS}")
  if box_units not in ("pixels", "normalized"):
    raise ManifestError(f"box_units must be 'pixels' or 'normalized', got {box_units!r}")
  label_map = label_map or {}
  skips = skips if skips is not None else images.Skips(source)
  out = []
  def record(item):
    line, row = item
    where = f"{path}:{line}"
    if isinstance(row, ManifestError):
      raise row
    get = lambda f: row.get(columns[f])
    for f in REQUIRED:
      if columns[f] not in row:
        raise ManifestError(f"{where}: missing column {columns[f]!r} (field {f!r}); the row has "
                            f"{sorted(map(str, row))}")
      if get(f) in (None, ""):
        raise ManifestError(f"{where}: field {f!r} (column {columns[f]!r}) is empty")
    rel = str(get("image"))
    raw_label = str(get("label"))
    label = label_map.get(raw_label, raw_label)
    if label not in records.LABELS:
      raise ManifestError(f"{where}: label {raw_label!r} is not one of {records.LABELS} "
                          f"(map it with label_map)")
    image = images.read_image(rel, root=root) if load_images else np.zeros((1, 1), np.uint8)
    shape = image.shape if load_images else images.image_shape(rel, root=root)
    mask_specs = _json_field(get("masks"), f"{where}: masks")
    box_specs = _json_field(get("boxes"), f"{where}: boxes")
    if mask_specs and load_images:
      objs = objects_from_masks(mask_specs, root, shape, where)
    elif box_specs:
      objs = objects_from_boxes(box_specs, shape, box_units, where)
    else:
      objs = records.Objects.empty(*image.shape)
    qa = [dict(question=str(q.get("question", "")), answer=str(q.get("answer", "")),
               type=str(q.get("type", ""))) for q in _json_field(get("qa"), f"{where}: qa")]
    return records.validate(records.SourceRecord(
        image_id=_image_id(get("image_id"), rel),
        patient_id=str(get("patient_id")), source=source, image=image, label=label,
        objects=objs, report=get("report") or None, qa=qa, split=get("split") or None,
        meta=dict(path=rel, line=line)))

  rows = list(_rows(path))
  if not rows:
    raise ManifestError(f"manifest {path}: no rows")
  _check_unique_ids(path, rows, columns)
  first_skip = len(skips)
  out = skips.collect([f"{path}:{line}" for line, _ in rows], images.map_ordered(record, rows, workers),
                      (ManifestError, images.ImageError, images.DataPathError, records.RecordError),
                      on_error)
  if not out:
    raise ManifestError(f"manifest {path}: no usable rows: {len(rows)} skipped, first: "
                        f"{skips.items[first_skip][1]}")
  return out, skips


def image_paths(path):
  """The images an inference manifest (CSV, TSV or JSONL) lists, in row order.

  Each row names its image under the first of IMAGE_KEYS present; paths are
  relative to the manifest's folder and may not leave it. A missing file is
  not an error here (the caller reports it when reading).
  """
  path = pathlib.Path(path)
  out = []
  for line, row in _rows(path):
    if isinstance(row, ManifestError):
      raise row
    key = next((k for k in IMAGE_KEYS if k in row), None)
    if key is None:
      raise ManifestError(f"{path}:{line}: needs one of the columns/keys {IMAGE_KEYS}, "
                          f"has {sorted(map(str, row))}")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
      raise ManifestError(f"{path}:{line}: {key} {value!r} is not an image path")
    try:
      out.append(images.safe_path(path.parent, value, must_exist=False))
    except images.DataPathError as e:
      raise ManifestError(f"{path}:{line}: {key} {value!r}: {e}") from e
  return out


def image_boxes(path, box_units="pixels"):
  """{image path: records.Objects} from the `boxes` field of an inference manifest's rows.

  Rows without the field are left out, and so are rows whose image cannot be
  measured (the caller names those when reading); a bad box is a ManifestError
  naming line and field. Paths as in `image_paths`.
  """
  path = pathlib.Path(path)
  out = {}
  for line, row in _rows(path):
    if isinstance(row, ManifestError) or "boxes" not in row:
      continue
    where = f"{path}:{line}"
    specs = _json_field(row["boxes"], f"{where}: boxes")
    image = row[next(k for k in IMAGE_KEYS if k in row)]
    try:
      shape = images.image_shape(image, root=path.parent) if specs else (1, 1)
    except (errors.Error, OSError):
      continue
    out[images.safe_path(path.parent, image, must_exist=False)] = objects_from_boxes(
        specs, shape, box_units, where)
  return out


@DATA_SOURCES.register("manifest")
def from_config(name, cfg):
  """(records, skips) of dict(source='manifest', path=..., preset='nih_cxr14'?, and
  `read`'s columns, label_map, box_units, root). The pipeline names the records'
  source after the dataset (data/datasets.py)."""
  kwargs = dict(NIH_CXR14) if cfg.get("preset") == "nih_cxr14" else {}
  for k in ("columns", "label_map", "box_units", "root"):
    if k in cfg:
      kwargs[k] = cfg[k]
  return read(cfg["path"], skips=images.Skips(name), **kwargs)
