"""Lesion detection: COCO AP, AP50, AP75 (pycocotools), per class and class-agnostic.

Record: {image_id, source, height, width,
  gt: {bbox: [[y_min, x_min, y_max, x_max], ...] normalised, label: [str, ...]},
  prediction: str (model output),
  objects: [{bbox, label, scores: {rule: float}}] (optional, parsed valid objects),
  n_invalid: int (optional)}.

Without `objects` the prediction text is parsed (`loc_codec.parse_objects`) and
only the all-ones score rule is available. Each metric comes twice: under the
chosen `score_rule` (default 'mean_loc', see confidence.py) and under 'ones'
(every box scores 1, PaliGemma-CXR's rule; ties then rank in output order).
Keys: '<rule>/AP', '<rule>/AP50', '<rule>/AP75' (mean over classes with ground
truth), '<rule>/agnostic/...' (all boxes in one class),
'<rule>/class/<name>/...'. AP is COCO's: 101-point interpolated precision,
maxDets=100, area 'all'; AP averages IoU 0.50:0.05:0.95. Predicted names that
are no ground-truth class count only class-agnostically. invalid_rate is the
share of malformed objects among all objects the model emitted; empty_correct
(when some image has no lesion) the share of images without ground-truth lesions
where the model drew no box (what a set of normals, where AP is undefined, measures).
"""
import numpy as np

from big_vision_cxr.evaluators import coco
from big_vision_cxr.evaluators import common
from big_vision_cxr.registry import EVALUATORS


def images(records, parsed, rule):
  """`coco.Matches`' images: each record's gt and predicted boxes in pixels, scored by `rule`."""
  out = []
  for i, (r, (objs, _)) in enumerate(zip(records, parsed)):
    gt = r["gt"]
    h, w = r["height"], r["width"]
    gts = [dict(label=l, bbox=coco.xywh(b, h, w)) for b, l in zip(gt["bbox"], gt["label"])]
    preds = [dict(label=o["label"], bbox=coco.xywh(o["bbox"], h, w), score=coco.score_of(o, rule, i))
             for o in objs]
    out.append(dict(height=h, width=w, gts=gts, preds=preds))
  return out


def sampler(records, score_rule=coco.DEFAULT_SCORE_RULE):
  """fn(indices) -> the metrics of records[indices]; boxes parsed and matched once."""
  parsed = [coco.predicted_objects(r) for r in records]
  n_valid = np.array([len(objs) for objs, _ in parsed], np.int64)
  n_invalid = np.array([n for _, n in parsed], np.int64)
  n_gt = np.array([len(r["gt"]["bbox"]) for r in records], np.int64)
  matches = {rule: coco.Matches(images(records, parsed, rule), "bbox")
             for rule in coco.score_rules(records, score_rule)}

  def metrics(i):
    i = np.asarray(i, int)
    valid, invalid = int(n_valid[i].sum()), int(n_invalid[i].sum())
    empty = n_gt[i] == 0
    out = {"n_images": float(len(i)), "n_gt": float(n_gt[i].sum()), "n_pred": float(valid),
           "invalid_rate": invalid / max(1, valid + invalid)}
    if empty.any():
      out["empty_correct"] = float(np.mean(n_valid[i][empty] == 0))
    for rule, m in matches.items():
      out.update({f"{rule}/{k}": v for k, v in m.ap(i).items()})
    return out
  return metrics


def pr_curves(records, score_rule=coco.DEFAULT_SCORE_RULE):
  """{rule: `coco.Matches.curves`}: precision-recall at IoU 0.5 under each reported score rule."""
  parsed = [coco.predicted_objects(r) for r in records]
  return {rule: coco.Matches(images(records, parsed, rule), "bbox").curves()
          for rule in coco.score_rules(records, score_rule)}


def _metrics(records, score_rule=coco.DEFAULT_SCORE_RULE):
  return sampler(records, score_rule)(np.arange(len(records)))


@EVALUATORS.register("detection")
class Evaluator(common.Evaluator):
  """Greedy-decodes, parses the token ids and scores each box by every rule."""
  name = "detection"
  options = ("score_rule",)

  def predict_batch(self, params, batch, gts):
    outs = common.generate(self.predictor, params, batch, gts)
    records = []
    for g, o in zip(gts, outs):
      objs, n_invalid = coco.objects_with_scores(o, self.predictor.tokenizer)
      records.append(dict(common.base_record(g), height=g["height"], width=g["width"], gt=coco.gt_boxes(g),
                          prediction=o["text"], objects=objs, n_invalid=n_invalid))
    return records

  metric_fn = staticmethod(_metrics)
  sampler_fn = staticmethod(sampler)
