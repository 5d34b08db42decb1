"""What the detection and segmentation evaluators share: COCO AP, boxes, masks, scored objects.

- Boxes: records hold normalised (y_min, x_min, y_max, x_max); `xywh` gives COCO's
  pixel [x, y, w, h].
- Masks: `mask_to_rle` / `rle_to_mask` convert a bool [H, W] mask to and from the
  JSON form of a COCO RLE, dict(size=[H, W], counts=str) (column-major, as
  pycocotools writes it); records, predict.py's outputs and visualize read this one form.
- `coco_ap`: pycocotools AP, AP50, AP75 per class, class mean and class-agnostic;
  `Matches` keeps the per-image matching so that resamples (bootstrap) only accumulate.
- Objects: a record's predicted objects (stored, or parsed from its text) and
  their score under a rule of confidence.py.
"""
import contextlib
import io

import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
from pycocotools import mask as mask_lib

from big_vision_cxr import confidence, loc_codec
from big_vision_cxr.evaluators import common

DEFAULT_SCORE_RULE = "mean_loc"


def xywh(box, height, width):
  """Normalised (y_min, x_min, y_max, x_max) -> COCO pixel [x, y, w, h]."""
  y1, x1, y2, x2 = (float(v) for v in box)
  return [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height]


def mask_to_rle(mask):
  """Bool [H, W] -> COCO RLE dict(size=[H, W], counts=str)."""
  rle = mask_lib.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _pycocotools_rle(rle):
  """The JSON form -> pycocotools' (counts as bytes)."""
  return {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}


def rle_to_mask(rle):
  """COCO RLE dict(size, counts) (as `mask_to_rle` writes it) -> bool [H, W]."""
  try:
    return mask_lib.decode(_pycocotools_rle(rle)).astype(bool)
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    raise common.EvalError(f"a mask is not a COCO RLE {{size, counts}}: {e}.") from e


IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # pycocotools' (AP averages them; AP50 is the first)
RECALL = np.linspace(0.0, 1.0, 101)  # pycocotools' recall thresholds (101-point interpolation)


def _ap_from_precision(precision):
  """precision [T, R, K] slice -> (AP, AP50, AP75); nan when the class has no ground truth."""
  def mean(p):
    p = p[p > -1]
    return float(p.mean()) if p.size else float("nan")
  return mean(precision), mean(precision[0]), mean(precision[5])


class Matches:
  """pycocotools' per-image matching of `images`, done once; AP of any resample of them.

  images = [dict(height, width, gts=[ann], preds=[ann])]: a gt ann is dict(label,
  bbox xywh[, segmentation: `mask_to_rle`'s dict]); a pred ann adds score. Matching
  an image's detections to its ground truth (COCOeval.evaluate) does not depend on
  the other images, so `precision(indices)` runs pycocotools' own `accumulate` on
  the stored per-image matches of `images[indices]` (repeats allowed: a bootstrap
  resample). Area 'all' and maxDets 100 only (the other ranges are never read).
  """

  def __init__(self, images, iou_type="bbox"):
    self.names = sorted({g["label"] for im in images for g in im["gts"]})
    cat = {n: i + 1 for i, n in enumerate(self.names)}
    # [n_images, K] ground-truth counts per class (the no-detection case needs them).
    self._n_gt = np.array([[sum(g["label"] == n for g in im["gts"]) for n in self.names]
                           for im in images], np.int64).reshape(len(images), len(self.names))
    gt, dts = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in cat.items()]}, []
    for k, im in enumerate(images):
      image_id = k + 1
      gt["images"].append({"id": image_id, "height": int(im["height"]), "width": int(im["width"])})
      for g in im["gts"]:
        ann = {"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": cat[g["label"]],
               "bbox": g["bbox"], "iscrowd": 0, "area": float(g["bbox"][2] * g["bbox"][3])}
        if iou_type == "segm":
          ann["segmentation"] = _pycocotools_rle(g["segmentation"])
          ann["area"] = float(mask_lib.area(ann["segmentation"]))
        gt["annotations"].append(ann)
      for p in im["preds"]:
        # A class with no ground truth gets id 0: ignored per class, counted class-agnostically.
        d = {"image_id": image_id, "category_id": cat.get(p["label"], 0), "bbox": p["bbox"],
             "score": float(p["score"])}
        if iou_type == "segm":
          d["segmentation"] = _pycocotools_rle(p["segmentation"])
        dts.append(d)
    # Class-agnostic: every box in one category. (pycocotools' useCats=0 would still
    # drop detections whose category has no ground truth.)
    agnostic_gt = dict(gt, categories=[{"id": 1, "name": "lesion"}],
                       annotations=[dict(a, category_id=1) for a in gt["annotations"]])
    self._evals = {}  # prefix -> (COCOeval, per-image matches [K][n_images]), None without detections
    for prefix, gt_dict, dets in (("", gt, dts), ("agnostic/", agnostic_gt, [dict(d, category_id=1) for d in dts])):
      if not (dets and self.names):
        self._evals[prefix] = None
        continue
      with contextlib.redirect_stdout(io.StringIO()):
        cgt = coco_lib.COCO()
        cgt.dataset = gt_dict
        cgt.createIndex()
        ev = cocoeval.COCOeval(cgt, cgt.loadRes([dict(d) for d in dets]), iou_type)
        params = ev.params
        params.areaRng, params.areaRngLbl, params.maxDets = params.areaRng[:1], ["all"], [100]
        ev.evaluate()
      n = len(images)
      self._evals[prefix] = ev, [ev.evalImgs[k * n:(k + 1) * n] for k in range(len(ev.params.catIds))]

  def precision(self, indices=None):
    """{'': [T, R, K], 'agnostic/': [T, R, 1]} interpolated precision of images[indices]
    (default all), at IoU thresholds 0.50:0.05:0.95 and `RECALL`; -1 where a class has
    no ground truth among them."""
    indices = np.arange(len(self._n_gt)) if indices is None else np.asarray(indices)
    has_gt = self._n_gt[indices].sum(0) > 0
    out = {}
    for prefix, stored in self._evals.items():
      k = len(self.names) if not prefix else 1
      if stored is None:  # no detections: precision 0 where there is ground truth
        gt_k = has_gt if not prefix else has_gt.any(keepdims=True)
        shape = (len(IOU_THRESHOLDS), len(RECALL), k)
        out[prefix] = np.broadcast_to(np.where(gt_k, 0.0, -1.0), shape).copy()
        continue
      ev, per_image = stored
      ev.evalImgs = [e for image_evals in per_image for e in (image_evals[i] for i in indices)]
      # pylint: disable-next=protected-access
      ev.params.imgIds = ev._paramsEval.imgIds = list(range(len(indices)))
      with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
      out[prefix] = ev.eval["precision"][:, :, :, 0, 0]
    return out

  def ap(self, indices=None):
    """{'AP', 'AP50', 'AP75', 'agnostic/...', 'class/<name>/...'} of images[indices]."""
    if not self.names:
      return {k: float("nan") for k in ("AP", "AP50", "AP75", "agnostic/AP", "agnostic/AP50", "agnostic/AP75")}
    out = {}
    for prefix, precision in self.precision(indices).items():
      ap, ap50, ap75 = _ap_from_precision(precision)
      out.update({f"{prefix}AP": ap, f"{prefix}AP50": ap50, f"{prefix}AP75": ap75})
      if not prefix:
        for k, n in enumerate(self.names):
          ap, ap50, ap75 = _ap_from_precision(precision[:, :, k])
          out.update({f"class/{n}/AP": ap, f"class/{n}/AP50": ap50, f"class/{n}/AP75": ap75})
    return out


  def curves(self):
    """{'agnostic' | class name: precision at `RECALL`} at IoU 0.5 (nan: no ground truth)."""
    precision = self.precision()
    out = {"agnostic": precision["agnostic/"][0, :, 0]}
    out.update({n: precision[""][0, :, k] for k, n in enumerate(self.names)})
    return {k: np.where(v < 0, np.nan, v) for k, v in out.items()}


def coco_ap(images, iou_type="bbox"):
  """COCO AP of images (as `Matches` takes them): {'AP', 'AP50', 'AP75', 'agnostic/...',
  'class/<name>/...'}."""
  return Matches(images, iou_type).ap()


def predicted_objects(record, *, require_seg=False):
  """A record's predicted objects ([dict(bbox, label, scores, ...)], n_invalid)."""
  if record.get("objects") is not None:
    return record["objects"], record.get("n_invalid") or 0
  parsed = loc_codec.parse_objects(record["prediction"], require_seg=require_seg)
  objs = [dict(bbox=o.box.tolist(), label=o.name, seg_ids=None if o.seg_ids is None else o.seg_ids.tolist(),
               scores={}) for o in parsed.objects]
  return objs, parsed.n_invalid


def score_of(obj, rule, index):
  if rule == "ones":
    return 1.0
  scores = obj.get("scores") or {}
  if rule not in scores:
    raise common.EvalError(f"record {index}: an object has no score for rule {rule!r} "
                           f"(has {sorted(scores)}); write records with scores or use score_rule='ones'.")
  return float(scores[rule])


def score_rules(records, score_rule):
  """The rules to report: the chosen one (if every object has scores) and 'ones'."""
  if score_rule not in confidence.BOX_SCORE_RULES:
    raise common.EvalError(f"unknown score_rule {score_rule!r}; known: {list(confidence.BOX_SCORE_RULES)}.")
  has_scores = all(o.get("scores") for r in records for o in (r.get("objects") or []))
  has_objects = all(r.get("objects") is not None for r in records)
  return ("ones",) if score_rule == "ones" or not (has_scores and has_objects) else (score_rule, "ones")


def objects_with_scores(output, tokenizer):
  """A `Predictor.generate` output -> ([dict(bbox, label, seg_ids, scores)], n_invalid)."""
  parsed = loc_codec.parse_token_ids(output["tokens"], tokenizer)
  scores = {rule: confidence.box_scores(parsed, output["token_logprobs"], rule)
            for rule in confidence.BOX_SCORE_RULES if rule != "ones"}
  objs = [dict(bbox=o.box.tolist(), label=o.name, seg_ids=None if o.seg_ids is None else o.seg_ids.tolist(),
               scores={rule: float(s[k]) for rule, s in scores.items()})
          for k, o in enumerate(parsed.objects)]
  return objs, parsed.n_invalid


def gt_boxes(g):
  """A ground truth's objects -> the record's gt dict(bbox=[[4 floats]...], label=[...])."""
  objs = g.get("objects") or {"bbox": [], "label": []}
  return dict(bbox=np.asarray(objs["bbox"], np.float64).reshape(-1, 4).tolist(), label=list(objs["label"]))
