"""TBX11K reader (the release layout: imgs/, annotations/xml/, lists/).

    records = tbx11k.read("/data/TBX11K", splits=("train", "val"))

- Splits come from the official lists `{lists}_train.txt` / `{lists}_val.txt`
  (`lists='TBX11K'` or `'all'`); entries are `tb/tb0005.png`, `health/...`,
  `sick/...`. Folders: tb -> 'tb', health -> 'normal', sick -> 'sick_non_tb'
  (`categories` picks which; the `extra` datasets are not read).
- Classes: ActiveTuberculosis -> 'active tb', ObsoletePulmonaryTuberculosis ->
  'latent tb', PulmonaryTuberculosis -> 'uncertain tb'.
- Boxes: the XML `<size>` is the ORIGINAL radiograph size and the coordinates
  are in that pixel space, while the released PNGs are 512x512. We normalise by
  the XML size (x / width, y / height): continuous pixel-edge coordinates, the
  same as scaling to 512 without the authors' `-1` shift (their
  `make_json_anno.py` subtracts 1 after scaling; at 512 px that moves a box by
  0.2% of the image, below the loc-token bin of 1/1023). Boxes up to 1% past an
  edge are clipped (annotation rounding); a box further outside, or empty,
  skips the image with a logged, counted reason naming the XML file. The XML
  is parsed by `voc.objects_from_xml` (size limit, no DOCTYPE/entities).
- TBX11K has no patient ids: each image is its own patient (image stem).
- A partial copy is fine: listed images not in it are counted in
  `skips.absent` (one log line, no error). A split whose list names images but
  gives no record (all absent, skipped or outside `categories`) is a
  `TBX11KError` saying why, and so is one image id listed twice (checked
  before any image is read).
"""
import logging
import pathlib

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr.data import images, records, voc
from big_vision_cxr.registry import DATA_SOURCES

SOURCE = "tbx11k"
CLASS_MAP = {
    "ActiveTuberculosis": "active tb",
    "ObsoletePulmonaryTuberculosis": "latent tb",
    "PulmonaryTuberculosis": "uncertain tb",
}
FOLDER_LABELS = {"tb": "tb", "health": "normal", "sick": "sick_non_tb"}


class TBX11KError(errors.Error):
  """The TBX11K folder or one of its files is malformed; the message names it."""


def find_root(path):
  """Accepts the TBX11K folder itself or a folder holding `TBX11K/`."""
  path = pathlib.Path(path)
  for cand in (path, path / "TBX11K"):
    if (cand / "lists").is_dir() and (cand / "imgs").is_dir():
      return cand
  raise TBX11KError(f"{path} is not a TBX11K release folder (needs lists/ and imgs/)")


def read_list(root, lists, split):
  path = root / "lists" / f"{lists}_{split}.txt"
  if not path.is_file():
    raise TBX11KError(f"split list not found: {path}")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise TBX11KError(f"{path}: not UTF-8 text ({e})") from e
  return [l.strip() for l in text.splitlines() if l.strip()]


def _record(root, split, entry, load_images):
  """The SourceRecord of one listed image (raises on bad files)."""
  folder, stem = entry.split("/")[0], pathlib.Path(entry).stem
  rel = f"imgs/{entry}"
  label = FOLDER_LABELS[folder]
  if label == "tb":
    xml = root / "annotations" / "xml" / f"{stem}.xml"
    if not xml.is_file():
      raise TBX11KError(f"{xml}: annotation missing for TB image {rel}")
    objs, difficult, _ = voc.objects_from_xml(xml, CLASS_MAP, error=TBX11KError)
    if not len(objs):
      raise TBX11KError(f"{xml}: TB image without boxes")
  else:
    objs, difficult = records.Objects.empty(), []
  image = images.read_image(rel, root=root) if load_images else np.zeros((1, 1), np.uint8)
  return records.validate(records.SourceRecord(
      image_id=stem, patient_id=stem, source=SOURCE, image=image, label=label, objects=objs,
      split=split, meta=dict(path=rel, difficult=difficult)))


def _empty_split_error(root, lists, split, entries, categories, absent, skipped):
  """Why `split` gave no record: its entries outside `categories`, absent, skipped."""
  rels = {f"imgs/{e}" for e in entries}
  other = sum(e.split("/")[0] not in categories for e in entries)
  absent = [p for p in absent if p in rels]
  skipped = [f"{p}: {r}" for p, r in skipped if p in rels]
  first = lambda items: f" (first {items[0]})" if items else ""
  return TBX11KError(
      f"{root}: split {split!r} has no usable image: of the {len(entries)} in {lists}_{split}.txt, "
      f"{other} are outside categories {tuple(categories)}, {len(absent)} absent{first(absent)}, "
      f"{len(skipped)} skipped{first(skipped)}")


def read(path, *, splits=("train", "val"), lists="TBX11K", categories=("tb", "health", "sick"),
         skips=None, on_error="skip", load_images=True, workers=None):
  """(records, skips): one SourceRecord per listed image present under `path`.

  Images are decoded by `workers` threads (PNG decoding releases the GIL); the
  order follows the lists.
  """
  root = find_root(path)
  unknown = set(categories) - set(FOLDER_LABELS)
  if unknown:
    raise TBX11KError(f"unknown categories {sorted(unknown)}; known: {sorted(FOLDER_LABELS)}")
  skips = skips if skips is not None else images.Skips(SOURCE)
  first_skip = len(skips)
  listed, todo, absent = {}, [], []
  for split in splits:
    listed[split] = read_list(root, lists, split)
    for entry in listed[split]:
      if entry.split("/")[0] not in categories:
        continue
      rel = f"imgs/{entry}"
      try:
        present = images.safe_path(root, rel, must_exist=False).is_file()
      except images.DataPathError as e:
        if on_error == "raise":
          raise
        skips.add(rel, e)
        continue
      if present:
        todo.append((split, entry))
      else:
        absent.append(rel)
  voc.check_unique_ids([(entry, f"{split}:{entry}") for split, entry in todo], TBX11KError)
  results = images.map_ordered(lambda item: _record(root, *item, load_images), todo, workers)
  out = skips.collect([f"imgs/{entry}" for _, entry in todo], results,
                      (TBX11KError, images.ImageError, images.DataPathError, records.RecordError),
                      on_error)
  if absent:
    skips.absent += absent
    logging.info("%s: %s holds %d of the %d images its lists name: a partial copy, fine; "
                 "the other %d are left out", SOURCE, root, len(todo), len(todo) + len(absent),
                 len(absent))
  for split, entries in listed.items():
    if entries and not any(r.split == split for r in out):
      raise _empty_split_error(root, lists, split, entries, categories, absent,
                               skips.items[first_skip:])
  if not out:
    raise TBX11KError(f"{root}: the lists {lists}_{{{','.join(splits)}}}.txt name no image")
  return out, skips


@DATA_SOURCES.register("tbx11k")
def from_config(name, cfg):
  """(records, skips) of dict(source='tbx11k', path=..., splits=('train', 'val'),
  lists='TBX11K', categories=('tb', 'health', 'sick'))."""
  return read(cfg["path"], splits=tuple(cfg.get("splits", ("train", "val"))),
              lists=cfg.get("lists", "TBX11K"),
              categories=tuple(cfg.get("categories", ("tb", "health", "sick"))),
              skips=images.Skips(name))
