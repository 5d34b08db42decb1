"""Pascal VOC XML boxes: the one XML parser, and a generic VOC folder source ('voc').

    recs, skips = voc.read("/data/tb_voc", class_map={"ActiveTuberculosis": "active tb"})

Parsing (`parse_xml`, `objects_from_xml`; the TBX11K reader uses them too):
- An XML over MAX_XML_BYTES, or one declaring a DOCTYPE or an entity (external
  entities, entity-expansion bombs), is refused before its tree is built.
- `<size>` must be positive and every number finite. Boxes are normalised by the
  XML `<size>` (x / width, y / height: continuous pixel edges); a missing or zero
  `<size>` falls back to the image's own size where the caller gives it. Up to
  EDGE_TOLERANCE past an edge is clipped; further out, or empty, is an error
  naming the file.
- Class names go through `class_map` ({XML name: one of records.CLASS_NAMES, or
  None to drop that class}); a name not in it is an error, or with
  unknown_classes='skip' dropped (listed in the record's meta['unmapped']).

Folder layouts (`layout`; or name them with images_dir / annotations_dir):
    images/[train|val|test/]*.png   + annotations/xml/*.xml  (or annotations/*.xml)
    JPEGImages/*.jpg                + Annotations/*.xml  [+ ImageSets/Main/{train,val,test}.txt]
An image's XML is `<annotations>/<stem>.xml` (or in its split subfolder there).
Split subfolders (`split_dirs`, default SPLIT_DIRS: train, val|valid|validation,
test) and the ImageSets/Main lists give the records' splits; without them splits
are by patient (data/splits.py).
- label: 'tb' when the image keeps a box, else `label_without_boxes` ('normal').
  An image without an XML has no boxes (missing_xml='negative') or is skipped
  (missing_xml='skip').
- image_id: the file stem (two images with one stem are an error, before any
  image is read). patient_id: `patient_id_regex` searched in the file name (the
  group named 'patient', else group 1, else the whole match; no match skips the
  image), else the image id: each image its own patient (say so when reporting).
"""
import collections
import logging
import pathlib
import re
import xml.etree.ElementTree as ET
from xml.parsers import expat

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr.data import images, records, splits
from big_vision_cxr.registry import DATA_SOURCES

EDGE_TOLERANCE = 0.01
MAX_XML_BYTES = 1 << 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
LAYOUTS = (("images", ("annotations/xml", "annotations")), ("JPEGImages", ("Annotations",)))


class VOCError(errors.Error):
  """A VOC folder or XML file is malformed; the message names it."""


def _refuse_declarations(data, path, error):
  """`error` if the XML declares a DOCTYPE or an entity (a VOC file needs neither)."""
  def refuse(*_):
    raise error(f"{path}: DOCTYPE/ENTITY declarations are not allowed in a VOC XML")
  parser = expat.ParserCreate()
  parser.StartDoctypeDeclHandler = refuse
  parser.EntityDeclHandler = refuse
  try:
    parser.Parse(data, True)
  except expat.ExpatError as e:
    raise error(f"{path}: malformed XML: {e}") from e


def parse_xml(path, *, error=VOCError):
  """(width, height, [(class_name, difficult, xmin, ymin, xmax, ymax)]) of a VOC XML;
  width and height are None when `<size>` is missing or zero."""
  path = pathlib.Path(path)
  path = images.safe_path(path.parent, path.name, max_bytes=MAX_XML_BYTES)
  data = path.read_bytes()
  _refuse_declarations(data, path, error)
  try:
    root = ET.fromstring(data)
  except ET.ParseError as e:
    raise error(f"{path}: malformed XML: {e}") from e
  try:
    width, height = (float(root.findtext(f"size/{k}") or 0) for k in ("width", "height"))
    objs = []
    for obj in root.iter("object"):
      box = obj.find("bndbox")
      objs.append((obj.findtext("name").strip(), int(obj.findtext("difficult") or 0),
                   *(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
  except (TypeError, ValueError, AttributeError) as e:
    raise error(f"{path}: missing or non-numeric size/bndbox field ({e})") from e
  if not np.isfinite([width, height, *(v for o in objs for v in o[2:])]).all():
    raise error(f"{path}: a non-finite number in <size> or <bndbox>")
  if width == height == 0:
    return None, None, objs
  if width <= 0 or height <= 0:
    raise error(f"{path}: invalid <size> {width:g}x{height:g}")
  return width, height, objs


def objects_from_xml(path, class_map, *, unknown_classes="error", image_shape=None,
                     error=VOCError):
  """(records.Objects with normalised boxes, per-object 'difficult' flags, the class
  names dropped) of one VOC XML; `image_shape` (H, W) stands in for a missing <size>."""
  width, height, objs = parse_xml(path, error=error)
  if width is None:
    if image_shape is None:
      raise error(f"{path}: no <size> to normalise the boxes by")
    height, width = image_shape
  boxes, labels, difficult, dropped = [], [], [], []
  for name, diff, x0, y0, x1, y1 in objs:
    if name not in class_map and unknown_classes != "skip":
      raise error(f"{path}: unknown class {name!r}; known: {sorted(class_map)}")
    if class_map.get(name) is None:
      dropped.append(name)
      continue
    box = np.array([y0 / height, x0 / width, y1 / height, x1 / width])
    if box.min() < -EDGE_TOLERANCE or box.max() > 1 + EDGE_TOLERANCE:
      raise error(f"{path}: box {name} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the "
                  f"{width:g}x{height:g} image")
    box = np.clip(box, 0, 1)
    if box[2] <= box[0] or box[3] <= box[1]:
      raise error(f"{path}: empty box {name} ({x0:g}, {y0:g}, {x1:g}, {y1:g})")
    boxes.append(box)
    labels.append(class_map[name])
    difficult.append(diff)
  n = len(labels)
  bbox = np.asarray(boxes, np.float32).reshape(-1, 4)
  return records.Objects(bbox, labels, None, [None] * n, [None] * n, [None] * n), difficult, dropped


def layout(root, images_dir=None, annotations_dir=None):
  """(images folder, annotations folder) of a VOC tree: the given ones (relative to
  `root`), else the first of LAYOUTS present."""
  root = pathlib.Path(root)
  if images_dir is None:
    images_dir = next((i for i, _ in LAYOUTS if (root / i).is_dir()), None)
    if images_dir is None:
      raise VOCError(f"{root}: no images/ or JPEGImages/ folder (or set images_dir)")
  if annotations_dir is None:
    known = [a for i, cands in LAYOUTS if i == images_dir for a in cands]
    others = [a for _, cands in LAYOUTS for a in cands if a not in known]
    annotations_dir = next((a for a in known + others if (root / a).is_dir()), None)
    if annotations_dir is None:
      raise VOCError(f"{root}: no annotations/xml/, annotations/ or Annotations/ folder "
                     "(or set annotations_dir)")
  out = [images.safe_path(root, d, must_exist=False) for d in (images_dir, annotations_dir)]
  for d in out:
    if not d.is_dir():
      raise VOCError(f"{root}: no folder {d}")
  return tuple(out)


def list_images(image_root, split_dirs=None):
  """[(path relative to `image_root`, the split its subfolder gives or None)], sorted."""
  split_dirs = SPLIT_DIRS if split_dirs is None else dict(split_dirs)
  out = []
  for p in sorted(image_root.iterdir()):
    if p.name.startswith("."):
      continue
    if p.is_dir():
      if p.name not in split_dirs:
        raise VOCError(f"{p}: an image subfolder that is no split; split_dirs maps folders to "
                       f"splits (or None): {split_dirs}")
      out += [(f"{p.name}/{q.name}", split_dirs[p.name]) for q in sorted(p.iterdir())
              if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES]
    elif p.suffix.lower() in IMAGE_SUFFIXES:
      out.append((p.name, None))
  return out


def image_sets(root):
  """{image stem: split} of ImageSets/Main/{train,val,test}.txt, where present."""
  out = {}
  for split in splits.SPLITS:
    path = pathlib.Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
      continue
    try:
      lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
      raise VOCError(f"{path}: not UTF-8 text ({e})") from e
    for stem in (l.split()[0] for l in lines if l.strip()):
      if out.setdefault(stem, split) != split:
        raise VOCError(f"{path}: {stem!r} is also listed in {out[stem]}.txt")
  return out


def check_unique_ids(entries, error):
  """Raises `error` naming both places when two (file, where) entries share a file stem (the id)."""
  seen = {}
  for rel, where in entries:
    stem = pathlib.PurePosixPath(rel).stem
    if stem in seen:
      raise error(f"image id {stem!r} is given twice: {seen[stem]} and {where} (ids are file stems)")
    seen[stem] = where


def _annotation(ann_root, rel):
  """The XML of the image at `rel`: `<stem>.xml`, else in its split subfolder; or None."""
  rel = pathlib.PurePosixPath(rel)
  for cand in (f"{rel.stem}.xml", f"{rel.parent}/{rel.stem}.xml"):
    path = images.safe_path(ann_root, cand, must_exist=False)
    if path.is_file():
      return path
  return None


def _patient_id(pattern, rel, stem):
  if pattern is None:
    return stem
  name = pathlib.PurePosixPath(rel).name
  m = pattern.search(name)
  pid = m and (m.group("patient") if "patient" in pattern.groupindex else m.group(1 if pattern.groups else 0))
  if not pid:
    raise VOCError(f"{rel}: patient_id_regex {pattern.pattern!r} gives no patient id in {name!r}")
  return pid


def _check_options(class_map, unknown_classes, label_without_boxes, missing_xml, patient_id_regex):
  """The compiled patient_id_regex (or None); VOCError naming a bad option."""
  bad = {k: v for k, v in class_map.items() if v is not None and v not in records.CLASS_NAMES}
  if bad:
    raise VOCError(f"class_map maps to {bad}: use one of {records.CLASS_NAMES} (or None to drop)")
  for option, value, allowed in (("unknown_classes", unknown_classes, ("error", "skip")),
                                 ("label_without_boxes", label_without_boxes, records.LABELS),
                                 ("missing_xml", missing_xml, ("negative", "skip"))):
    if value not in allowed:
      raise VOCError(f"{option} must be one of {allowed}, got {value!r}")
  try:
    return re.compile(patient_id_regex) if patient_id_regex else None
  except re.error as e:
    raise VOCError(f"patient_id_regex {patient_id_regex!r}: {e}") from e


def read(path, *, class_map, unknown_classes="error", label_without_boxes="normal",
         missing_xml="negative", patient_id_regex=None, images_dir=None, annotations_dir=None,
         split_dirs=None, source="voc", skips=None, on_error="skip", load_images=True,
         workers=None):
  """(records, skips): one SourceRecord per image of the VOC tree at `path` (module doc)."""
  root = pathlib.Path(path)
  if not root.is_dir():
    raise VOCError(f"VOC folder not found: {root}")
  class_map = dict(class_map)
  pattern = _check_options(class_map, unknown_classes, label_without_boxes, missing_xml,
                           patient_id_regex)
  image_root, ann_root = layout(root, images_dir, annotations_dir)
  listed = list_images(image_root, split_dirs)
  if not listed:
    raise VOCError(f"{image_root}: no images ({', '.join(IMAGE_SUFFIXES)})")
  check_unique_ids([(rel, rel) for rel, _ in listed], VOCError)
  given = image_sets(root)
  skips = skips if skips is not None else images.Skips(source)

  def record(item):
    rel, split = item
    stem = pathlib.PurePosixPath(rel).stem
    if split and given.get(stem, split) != split:
      raise VOCError(f"{rel}: in folder split {split!r} but listed in ImageSets/Main/{given[stem]}.txt")
    split = split or given.get(stem)
    patient_id = _patient_id(pattern, rel, stem)
    xml = _annotation(ann_root, rel)
    image = images.read_image(rel, root=image_root) if load_images else np.zeros((1, 1), np.uint8)
    if xml is None:
      if missing_xml == "skip":
        raise VOCError(f"{rel}: no annotation {stem}.xml in {ann_root}")
      objs, difficult, dropped = records.Objects.empty(), [], []
    else:
      shape = image.shape if load_images else images.image_shape(rel, root=image_root)
      objs, difficult, dropped = objects_from_xml(xml, class_map, unknown_classes=unknown_classes,
                                                  image_shape=shape)
    return records.validate(records.SourceRecord(
        image_id=stem, patient_id=patient_id, source=source, image=image,
        label="tb" if len(objs) else label_without_boxes, objects=objs, split=split,
        meta=dict(path=rel, xml=xml is not None, difficult=difficult, unmapped=dropped)))

  first_skip = len(skips)
  out = skips.collect([f"{image_root.name}/{rel}" for rel, _ in listed],
                      images.map_ordered(record, listed, workers),
                      (VOCError, images.ImageError, images.DataPathError, records.RecordError),
                      on_error)
  if not out:
    raise VOCError(f"{root}: no usable image: {len(listed)} skipped, first: "
                   f"{skips.items[first_skip][1]}")
  unmapped = collections.Counter(n for r in out for n in r.meta["unmapped"])
  if unmapped:
    logging.warning("%s: boxes of classes without a class_map entry dropped: %s", skips.source,
                    dict(unmapped))
  logging.info("%s: %d images from %s (%d with boxes, %d without an XML), splits %s", skips.source,
               len(out), root, sum(len(r.objects) > 0 for r in out),
               sum(not r.meta["xml"] for r in out), dict(collections.Counter(r.split for r in out)))
  return out, skips


@DATA_SOURCES.register("voc")
def from_config(name, cfg):
  """(records, skips) of dict(source='voc', path=..., class_map={XML name: class or None},
  and `read`'s unknown_classes, label_without_boxes, missing_xml, patient_id_regex,
  images_dir, annotations_dir, split_dirs)."""
  if "class_map" not in cfg:
    raise VOCError(f"dataset {name!r}: source 'voc' needs class_map={{XML class name: one of "
                   f"{records.CLASS_NAMES} or None}}")
  keys = ("unknown_classes", "label_without_boxes", "missing_xml", "patient_id_regex",
          "images_dir", "annotations_dir", "split_dirs")
  return read(cfg["path"], class_map=cfg["class_map"], skips=images.Skips(name),
              **{k: cfg[k] for k in keys if k in cfg})
