"""evaluators/coco.py: the one mask RLE of the project and the COCO box helpers."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_lib

from big_vision_cxr.evaluators import coco, common


@pytest.mark.parametrize("shape", [(7, 9), (1, 1), (64, 48)])
def test_rle_round_trip_through_json(shape):
  rng = np.random.default_rng(sum(shape))
  for mask in (np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) < 0.3):
    rle = coco.mask_to_rle(mask)
    assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
    back = coco.rle_to_mask(json.loads(json.dumps(rle)))
    assert back.dtype == bool and np.array_equal(back, mask)


def test_rle_is_pycocotools_column_major_form():
  mask = np.zeros((3, 4), bool)
  mask[0, 1] = True  # column-major: 3 zeros (column 0), then 1 one, then 8 zeros
  rle = coco.mask_to_rle(mask)
  want = mask_lib.encode(np.asfortranarray(mask.astype(np.uint8)))
  assert rle == {"size": [3, 4], "counts": want["counts"].decode("ascii")}
  assert mask_lib.decode(want)[0, 1] == 1


@pytest.mark.parametrize("bad", [{"counts": "x"}, {"size": [2, 2]}, {"size": [2, 2], "counts": 5}, None])
def test_rle_to_mask_rejects_what_is_no_rle(bad):
  with pytest.raises(common.EvalError, match="not a COCO RLE"):
    coco.rle_to_mask(bad)


def test_xywh_and_gt_boxes():
  assert coco.xywh([0.1, 0.2, 0.5, 0.6], 100, 200) == pytest.approx([40, 10, 80, 40])
  assert coco.gt_boxes({}) == {"bbox": [], "label": []}
  g = {"objects": {"bbox": np.array([[0.1, 0.2, 0.3, 0.4]], np.float32), "label": ["active tb"]}}
  (box,) = coco.gt_boxes(g)["bbox"]
  assert isinstance(box, list) and box == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_coco_ap_of_masks_takes_the_json_rle():
  mask = np.zeros((10, 10), bool)
  mask[2:6, 2:6] = True
  ann = dict(label="active tb", bbox=coco.xywh([0.2, 0.2, 0.6, 0.6], 10, 10), segmentation=coco.mask_to_rle(mask))
  m = coco.coco_ap([dict(height=10, width=10, gts=[ann], preds=[dict(ann, score=0.9)])], "segm")
  assert m["AP"] == pytest.approx(1.0) and m["agnostic/AP50"] == pytest.approx(1.0)
  assert m["class/active tb/AP75"] == pytest.approx(1.0)


def test_score_rules_and_scores():
  rec = dict(objects=[dict(bbox=[0, 0, 1, 1], label="x", scores={"mean_loc": 0.3})])
  assert coco.score_rules([rec], coco.DEFAULT_SCORE_RULE) == ("mean_loc", "ones")
  assert coco.score_rules([dict(prediction="")], "mean_loc") == ("ones",)
  assert coco.score_of(rec["objects"][0], "ones", 0) == 1.0
  with pytest.raises(common.EvalError, match="no score for rule 'min_loc'"):
    coco.score_of(rec["objects"][0], "min_loc", 0)
