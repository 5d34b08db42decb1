"""The prediction-record format of each evaluator type, checked in one place.

`check(kind, record)` raises FieldError naming the first missing or malformed
field as a path ('objects[2].bbox'); `common.validate` runs it on every record
before any metric is computed and adds which record (file:line for records of
`common.read_jsonl`, else the record index). docs/EVALUATION.md documents these
formats. A field marked '?' below is optional: absent or null. Fields not named
(image_id, patient_id, source, prefix, ...) are copied for reference, unchecked.
"""
import math
import numbers

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr import loc_codec
from big_vision_cxr import tokenizer
from big_vision_cxr.data import prompts

QUESTION_TYPES = ("closed", "open")


class FieldError(errors.Error):
  """A field of one record is missing or malformed."""


def _show(value):
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _fail(field, want, value):
  raise FieldError(f"{f'field {field}: ' if field else ''}must be {want}, got {_show(value)}.")


def _is_number(value):
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _text(value, field):
  if not isinstance(value, str):
    _fail(field, "a string", value)


def _one_of(*choices):
  def check(value, field):
    if not isinstance(value, str) or value not in choices:
      _fail(field, f"one of {list(choices)}", value)
  return check


def _finite(value, field):
  if not _is_number(value) or not math.isfinite(value):
    _fail(field, "a finite number", value)


def _loglik(value, field):
  if not _is_number(value) or math.isnan(value) or value == math.inf:
    _fail(field, "a number, not NaN or +inf", value)


def _probability(value, field):
  if not _is_number(value) or not 0 <= value <= 1:
    _fail(field, "a number in [0, 1]", value)


def _integer(minimum):
  def check(value, field):
    if not _is_int(value) or value < minimum:
      _fail(field, f"an integer >= {minimum}", value)
  return check


def _list(item):
  def check(value, field):
    if not isinstance(value, (list, tuple)):
      _fail(field, "a list", value)
    for k, v in enumerate(value):
      item(v, f"{field}[{k}]")
  return check


def _object(spec):
  """A dict whose keys follow spec {name: check}; a name ending in '?' may be absent or null."""
  def check(value, field):
    if not isinstance(value, dict):
      _fail(field, "a JSON object", value)
    for key, item in spec.items():
      name = key.rstrip("?")
      path = f"{field}.{name}" if field else name
      if key.endswith("?") and value.get(name) is None:
        continue
      if name not in value:
        raise FieldError(f"lacks field {path}.")
      item(value[name], path)
  return check


def _box(value, field):
  if (not isinstance(value, (list, tuple)) or len(value) != 4
      or not all(_is_number(v) and math.isfinite(v) for v in value)):
    _fail(field, "[y_min, x_min, y_max, x_max]: 4 finite numbers", value)


def _scores(value, field):
  if not isinstance(value, dict):
    _fail(field, "a JSON object {rule: score}", value)
  for rule, score in value.items():
    _finite(score, f"{field}.{rule}")


def _seg_ids(value, field):
  if (not isinstance(value, (list, tuple)) or len(value) != loc_codec.SEGS_PER_MASK
      or not all(_is_int(v) and 0 <= v < tokenizer.NUM_SEG for v in value)):
    _fail(field, f"{loc_codec.SEGS_PER_MASK} integers in [0, {tokenizer.NUM_SEG})", value)


def _rle_runs(counts):
  """pycocotools' compressed RLE string -> run lengths (as its rleFrString), None if cut short."""
  runs, p = [], 0
  while p < len(counts):
    x, k, more = 0, 0, True
    while more:
      if p == len(counts):
        return None
      c = ord(counts[p]) - 48
      x |= (c & 0x1f) << 5 * k
      more = c & 0x20
      p, k = p + 1, k + 1
      if not more and c & 0x10:
        x |= -1 << 5 * k
    runs.append(x + runs[-2] if len(runs) > 2 else x)
  return runs


def _rle(value, field):
  """COCO RLE {size: [H, W], counts: str} whose runs cover exactly H x W pixels."""
  size = value.get("size") if isinstance(value, dict) else None
  if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(s) and s >= 0 for s in size)
      or not isinstance(value.get("counts"), str)):
    _fail(field, "a COCO RLE {size: [H, W], counts: str}", value)
  h, w = size
  runs = _rle_runs(value["counts"]) if all("0" <= c <= "o" for c in value["counts"]) else None
  if runs is None or any(r < 0 for r in runs) or sum(runs) != h * w:
    _fail(f"{field}.counts", f"a COCO RLE string of {h}x{w} pixels", value["counts"])


def _task(kind):
  def check(value, field):
    if not isinstance(value, str) or value not in prompts.TASKS:
      _fail(field, f"one of {list(prompts.TASKS)}", value)
    if kind != "perplexity" and value != kind:
      raise FieldError(f"field {field}: a {value!r} record cannot be scored as {kind}.")
  return check


_GT = {"bbox": _list(_box), "label": _list(_text)}
_OBJECT = {"bbox": _box, "label": _text, "scores?": _scores}


def _boxes(gt, obj):
  """A detection or segmentation record with `gt` and objects of these formats."""
  return {"height": _integer(1), "width": _integer(1), "gt": _object(gt), "prediction?": _text,
          "objects?": _list(_object(obj)), "n_invalid?": _integer(0)}


FORMATS = {
    "diagnosis": {"label": _one_of(*prompts.DIAGNOSIS_ANSWERS), "prediction": _text, "p_tb?": _probability},
    "vqa": {"question": _text, "question_type": _one_of(*QUESTION_TYPES), "answer": _text,
            "prediction": _text},
    "report": {"reference": _text, "prediction": _text},
    "detection": _boxes(_GT, _OBJECT),
    "segmentation": _boxes({**_GT, "mask_rle": _list(_rle)}, {**_OBJECT, "mask_rle?": _rle, "seg_ids?": _seg_ids}),
    "perplexity": {"loglik": _loglik, "n_tokens": _integer(1)},
}


def _check_boxes(kind, record):
  """What detection and segmentation records need across fields."""
  gt, objects = record["gt"], record.get("objects")
  for key in ("label", "mask_rle") if kind == "segmentation" else ("label",):
    if len(gt[key]) != len(gt["bbox"]):
      raise FieldError(f"field gt.{key}: has {len(gt[key])} entries for {len(gt['bbox'])} gt.bbox.")
  if objects is None and record.get("prediction") is None:
    raise FieldError("lacks field prediction (needed without objects).")
  if kind != "segmentation":
    return
  shape = [record["height"], record["width"]]
  masks = [(f"gt.mask_rle[{k}]", m) for k, m in enumerate(gt["mask_rle"])]
  for k, o in enumerate(objects or ()):
    if o.get("mask_rle") is None and o.get("seg_ids") is None:
      raise FieldError(f"field objects[{k}]: needs mask_rle or seg_ids.")
    if o.get("mask_rle") is not None:
      masks.append((f"objects[{k}].mask_rle", o["mask_rle"]))
  for field, m in masks:
    if list(m["size"]) != shape:
      raise FieldError(f"field {field}.size: must be [height, width] = {shape}, got {list(m['size'])}.")


def check(kind, record):
  """Raises FieldError naming the first field of `record` that `kind`'s format refuses."""
  _object({"task?": _task(kind), **FORMATS[kind]})(record, "")
  if kind in ("detection", "segmentation"):
    _check_boxes(kind, record)
