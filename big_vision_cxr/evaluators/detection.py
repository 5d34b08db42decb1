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
share of malformed objects among all objects the model emitted.
"""
from big_vision_cxr.evaluators import coco
from big_vision_cxr.evaluators import common
from big_vision_cxr.registry import EVALUATORS


def _metrics(records, score_rule=coco.DEFAULT_SCORE_RULE):
  parsed = [coco.predicted_objects(r) for r in records]
  n_valid = sum(len(objs) for objs, _ in parsed)
  n_invalid = sum(n for _, n in parsed)
  out = {"n_images": float(len(records)), "n_gt": 0.0, "n_pred": float(n_valid),
         "invalid_rate": n_invalid / max(1, n_valid + n_invalid)}
  for rule in coco.score_rules(records, score_rule):
    images = []
    for i, (r, (objs, _)) in enumerate(zip(records, parsed)):
      gt = r["gt"]
      h, w = r["height"], r["width"]
      gts = [dict(label=l, bbox=coco.xywh(b, h, w)) for b, l in zip(gt["bbox"], gt["label"])]
      preds = [dict(label=o["label"], bbox=coco.xywh(o["bbox"], h, w), score=coco.score_of(o, rule, i))
               for o in objs]
      images.append(dict(height=h, width=w, gts=gts, preds=preds))
    out["n_gt"] = float(sum(len(im["gts"]) for im in images))
    out.update({f"{rule}/{k}": v for k, v in coco.coco_ap(images, "bbox").items()})
  return out


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
