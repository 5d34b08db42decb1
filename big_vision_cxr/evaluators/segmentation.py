"""Lesion segmentation: COCO mask AP (pycocotools RLE), mIoU and Dice.

Record: {image_id, source, height, width,
  gt: {bbox: [[y_min, x_min, y_max, x_max], ...] normalised, label: [...],
       mask_rle: [COCO RLE {size: [H, W], counts: str}, ...]},
  prediction: str,
  objects: [{bbox, label, scores: {rule: float}, mask_rle}] (optional),
  n_invalid: int (optional)}.

Without `objects`, the prediction text is parsed (16 seg tokens required) and the
masks are decoded with the VQ-VAE given as `vqvae` (path; default the demo one).
- '<rule>/AP', '/AP50', '/AP75' (+ agnostic and per class): COCO 'segm' AP as in
  detection.py, under the chosen score rule and under 'ones'.
- miou / dice: per image, the union of the predicted masks against the union of
  the ground-truth masks (all classes), averaged over images where either is
  non-empty; empty_correct: share of images without ground-truth lesions where
  the model predicted none (those images are left out of miou and dice).
"""
import numpy as np

from big_vision_cxr.evaluators import coco
from big_vision_cxr.evaluators import common
from big_vision_cxr.registry import EVALUATORS


def _with_masks(records, vqvae):
  """Records whose predicted objects all carry mask_rle (decoding seg tokens if needed)."""
  codec, out = None, []
  for r in records:
    objs, n_invalid = coco.predicted_objects(r, require_seg=True)
    todo = [k for k, o in enumerate(objs) if o.get("mask_rle") is None]
    if todo:
      if codec is None:
        from big_vision_cxr import seg_codec  # pylint: disable=import-outside-toplevel
        codec = seg_codec.from_config(vqvae)
      seg = np.array([objs[k]["seg_ids"] for k in todo], np.int32).reshape(-1, 16)
      masks = codec.decode(seg, np.array([objs[k]["bbox"] for k in todo]), r["height"], r["width"])
      objs = list(objs)
      for k, m in zip(todo, masks):
        objs[k] = dict(objs[k], mask_rle=coco.mask_to_rle(m))
    out.append(dict(r, objects=objs, n_invalid=n_invalid))
  return out


def _union(rles, shape):
  m = np.zeros(shape, bool)
  for rle in rles:
    m |= coco.rle_to_mask(rle)
  return m


def images(records, rule):
  """`coco.Matches`' images (records with masks): gt and predicted boxes and masks, scored by `rule`."""
  out = []
  for i, r in enumerate(records):
    h, w = r["height"], r["width"]
    gt = r["gt"]
    gts = [dict(label=l, bbox=coco.xywh(b, h, w), segmentation=m)
           for b, l, m in zip(gt["bbox"], gt["label"], gt["mask_rle"])]
    preds = [dict(label=o["label"], bbox=coco.xywh(o["bbox"], h, w), segmentation=o["mask_rle"],
                  score=coco.score_of(o, rule, i)) for o in r["objects"]]
    out.append(dict(height=h, width=w, gts=gts, preds=preds))
  return out


def _sampler(records, score_rule=coco.DEFAULT_SCORE_RULE):
  """fn(indices) -> the metrics of records[indices] (records with masks); masks compared once."""
  n_valid = np.array([len(r["objects"]) for r in records], np.int64)
  n_invalid = np.array([r["n_invalid"] for r in records], np.int64)
  iou, dice, empty = (np.full(len(records), np.nan) for _ in range(3))
  for k, r in enumerate(records):
    shape = (r["height"], r["width"])
    g = _union(r["gt"]["mask_rle"], shape)
    p = _union([o["mask_rle"] for o in r["objects"]], shape)
    if not g.any():
      empty[k] = not p.any()
    if g.any() or p.any():
      inter, total = (g & p).sum(), g.sum() + p.sum()
      iou[k], dice[k] = inter / (total - inter), 2 * inter / total
  matches = {rule: coco.Matches(images(records, rule), "segm")
             for rule in coco.score_rules(records, score_rule)}

  def mean(values):
    values = values[~np.isnan(values)]
    return float(np.mean(values)) if len(values) else float("nan")

  def metrics(i):
    i = np.asarray(i, int)
    valid, invalid = int(n_valid[i].sum()), int(n_invalid[i].sum())
    out = {"n_images": float(len(i)), "invalid_rate": invalid / max(1, valid + invalid),
           "miou": mean(iou[i]), "dice": mean(dice[i]), "empty_correct": mean(empty[i])}
    for rule, m in matches.items():
      out.update({f"{rule}/{k}": v for k, v in m.ap(i).items()})
    return out
  return metrics


def _metrics(records, score_rule=coco.DEFAULT_SCORE_RULE):
  return _sampler(records, score_rule)(np.arange(len(records)))


def pr_curves(records, score_rule=coco.DEFAULT_SCORE_RULE, vqvae=None):
  """{rule: `coco.Matches.curves`}: mask precision-recall at IoU 0.5 under each reported score rule."""
  records = _with_masks(records, vqvae)
  return {rule: coco.Matches(images(records, rule), "segm").curves()
          for rule in coco.score_rules(records, score_rule)}


def sampler(records, score_rule=coco.DEFAULT_SCORE_RULE, vqvae=None):
  """fn(indices) -> the metrics of records[indices]; masks decoded and matched once."""
  return _sampler(_with_masks(records, vqvae), score_rule)


@EVALUATORS.register("segmentation")
class Evaluator(common.Evaluator):
  """Greedy-decodes, parses, scores each object, decodes its mask with `seg_codec`.

  seg_codec: a SegCodec, a path or {'npz': path}; None means the demo VQ-VAE, so
  pass the one the training data was encoded with.
  """
  name = "segmentation"
  options = ("score_rule", "vqvae")

  def __init__(self, predictor, data, *, seg_codec=None, **kw):
    super().__init__(predictor, data, **kw)
    from big_vision_cxr import seg_codec as seg_codec_lib  # pylint: disable=import-outside-toplevel
    self.seg_codec = seg_codec if isinstance(seg_codec, seg_codec_lib.SegCodec) else seg_codec_lib.from_config(seg_codec)

  def predict_batch(self, params, batch, gts):
    outs = common.generate(self.predictor, params, batch, gts)
    records = []
    for g, o in zip(gts, outs):
      objs, n_invalid = coco.objects_with_scores(o, self.predictor.tokenizer)
      n_invalid += sum(ob["seg_ids"] is None for ob in objs)
      objs = [ob for ob in objs if ob["seg_ids"] is not None]
      h, w = g["height"], g["width"]
      if objs:
        masks = self.seg_codec.decode(np.array([ob["seg_ids"] for ob in objs]), np.array([ob["bbox"] for ob in objs]), h, w)
        objs = [dict(ob, mask_rle=coco.mask_to_rle(m)) for ob, m in zip(objs, masks)]
      gt = coco.gt_boxes(g)
      gt_masks = (g.get("objects") or {}).get("mask")
      gt["mask_rle"] = [coco.mask_to_rle(m > 0) for m in (gt_masks if gt_masks is not None else [])]
      records.append(dict(common.base_record(g), height=h, width=w, gt=gt, prediction=o["text"],
                          objects=objs, n_invalid=n_invalid))
    return records

  sampler_fn = staticmethod(sampler)

  @staticmethod
  def metrics(records, score_rule=coco.DEFAULT_SCORE_RULE, vqvae=None):
    records = _with_masks(records, vqvae)
    return {**_metrics(records, score_rule), **common.by_source(records, _metrics, score_rule=score_rule)}
