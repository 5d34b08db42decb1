"""The shipped tiny pt model (big_vision_cxr/assets/cxr_demo_pt.npz) that `:demo` fine-tunes.

It was trained on phantom seed 1; these images are seed 0 (other patients), so the checks
are on unseen radiographs. They guard the asset and the whole box path (model, decoding,
loc parsing): a model that ignored the image would put its boxes in the same place on every
radiograph, and its IoU with the right image's lesions would equal that with a wrong image's.
"""
import pathlib

import jax
import numpy as np

from big_vision_cxr import config as config_lib
from big_vision_cxr import inference
from big_vision_cxr.data import phantom
from big_vision_cxr.models import paligemma

REPO = pathlib.Path(__file__).resolve().parents[1]


def _iou(a, b):
  """IoU of two (y_min, x_min, y_max, x_max) boxes."""
  h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = h * w
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _best_iou(pred_boxes, gt_boxes):
  """Mean over ground-truth boxes of the best IoU with any predicted box."""
  return float(np.mean([max([_iou(g, p) for p in pred_boxes] or [0.0]) for g in gt_boxes]))


def test_demo_config_loads_the_shipped_pt_model_with_the_demo_shapes():
  config = config_lib.load_config(f"{REPO / 'configs' / 'cxr_mix.py'}:demo")
  assert pathlib.Path(config.model_init).is_file()
  model_cfg = paligemma.get_config(config.model.variant)
  shapes = paligemma.param_shapes(model_cfg)
  params = paligemma.load(shapes, config.model_init, model_cfg)  # checks every name and shape
  sizes = [np.size(x) for x in jax.tree.leaves(params)]
  assert sum(sizes) == sum(np.prod(s.shape) for s in jax.tree.leaves(shapes))
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(params))


def test_shipped_pt_model_finds_lesions_on_unseen_radiographs():
  config = config_lib.load_config(f"{REPO / 'configs' / 'cxr_mix.py'}:demo")
  loaded = inference.load(config.model_init, config=config, with_vqvae=False)
  records = [r for r in phantom.dataset(96, seed=0, size=128, difficulty=0.0, start=9000)
             if r.label == "tb"][:32]
  runner = inference.Runner(loaded, tasks=("detection",), batch_size=16, max_decode_len=48)
  results = runner.run([r.image for r in records])
  preds = [[np.asarray(b["bbox"]) for b in res["boxes"]] for res in results]
  gts = [r.objects.bbox for r in records]
  assert sum(map(len, preds)) >= len(records)  # it answers with boxes
  own = np.mean([_best_iou(p, g) for p, g in zip(preds, gts)])
  # The same boxes scored against the next image's lesions: what image-blind boxes would get.
  shifted = np.mean([_best_iou(p, g) for p, g in zip(preds, gts[1:] + gts[:1])])
  hits = np.mean([_best_iou(p, g[:1]) >= 0.5 for p, g in zip(preds, gts)])
  print(f"mean best IoU {own:.3f} (shifted {shifted:.3f}); first lesion found {hits:.2f}")
  assert own > shifted + 0.1, (own, shifted)
  assert hits >= 0.2, hits
