"""Evaluators on fixed prediction files (tests/data) with hand-computed numbers.

tests/data/README.md describes each file; the expected values are derived in
the comments here and in docs/EVALUATION.md.
"""
import contextlib
import io
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import coco as coco_lib
from pycocotools import cocoeval

from big_vision_cxr import confidence, errors, loc_codec
from big_vision_cxr.evaluators import __main__ as cli
from big_vision_cxr.evaluators import coco, common, detection, diagnosis, perplexity, report, segmentation, vqa

DATA = pathlib.Path(__file__).parent / "data"


def _load(name):
  return common.read_jsonl(DATA / f"preds_{name}.jsonl")


def test_diagnosis_fixed_file():
  m = diagnosis.Evaluator.compute_metrics(_load("diagnosis"))
  # 10 images: 4 TB, 4 normal, 2 sick non-TB; correct answers 1,2,4,5,6,8,9.
  assert m["accuracy"] == pytest.approx(0.7)
  assert m["sensitivity"] == pytest.approx(3 / 4)  # 'Tuberculosis.' normalises to the answer
  assert m["specificity"] == pytest.approx(5 / 6)
  assert m["binary_accuracy"] == pytest.approx(0.8)
  assert m["invalid_rate"] == 0.0
  # Positives .95 .80 .40 .70 beat 6+6+4+5 of the 6 negatives: 21/24.
  assert m["auc"] == pytest.approx(21 / 24)
  # Sensitivity >= 0.9 needs all 4 positives: t = 0.40; negatives below: .10 .30 .05 .20.
  assert m["who_threshold"] == pytest.approx(0.40)
  assert m["who_specificity"] == pytest.approx(4 / 6)
  assert m["who_tpp_met"] == 0.0
  for k in ("accuracy", "sensitivity", "specificity", "auc"):
    assert m[f"{k}_ci95_low"] <= m[k] <= m[f"{k}_ci95_high"]
  again = diagnosis.Evaluator.compute_metrics(_load("diagnosis"))  # seeded bootstrap
  assert json.dumps(m) == json.dumps(again)
  # Mixed sources are also reported per source.
  assert m["by_source/tbx11k/accuracy"] == pytest.approx(4 / 6)
  assert m["by_source/nih/specificity"] == pytest.approx(3 / 4)
  assert math.isnan(m["by_source/nih/sensitivity"])


def test_auc_and_who_point_edge_cases():
  assert diagnosis.auc([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
  assert diagnosis.auc([1, 0], [0.9, 0.1]) == 1.0
  t, sens, spec = diagnosis.who_operating_point([1] * 10 + [0] * 10, list(np.linspace(1, 0.55, 10)) + [0.5] * 10)
  assert t == pytest.approx(0.6) and sens == pytest.approx(0.9) and spec == 1.0


def test_vqa_fixed_file():
  m = vqa.Evaluator.compute_metrics(_load("vqa"))
  assert m["closed/accuracy"] == pytest.approx(3 / 4)  # 'Yes' for 'no' is the one miss
  assert m["open/exact_match"] == pytest.approx(1 / 3)
  # F1: both/both 1, 3/2 0, 'upper zone'/'upper' 2*(1/2*1)/(3/2) = 2/3.
  assert m["open/token_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
  assert m["all/exact_match"] == pytest.approx(4 / 7)
  assert m["question/answer en is the left lung affected?/exact_match"] == 0.0


def test_report_fixed_file():
  recs = _load("report")
  m = report.Evaluator.compute_metrics(recs)
  bp = math.exp(1 - 10 / 9)  # 9 hypothesis words for 10 reference words
  assert m["bleu1"] == pytest.approx(100 * bp, abs=1e-3)  # all 9 unigrams match (lower-cased)
  assert m["bleu2"] == pytest.approx(100 * bp * (6 / 7) ** (1 / 2), abs=1e-3)  # 'no disease' is no ref bigram
  assert m["bleu4"] == pytest.approx(100 * bp * (6 / 7) ** (1 / 4), abs=1e-3)
  assert m["rougeL"] == pytest.approx(100 * (1 + 0.8) / 2)  # LCS 2 of 3: P 1, R 2/3, F 0.8
  fmean = 10 * (2 / 3) / (2 / 3 + 9)
  meteor = ((1 - 0.5 / 7 ** 3) + fmean * (1 - 0.5)) / 2  # 1 chunk of 7; 2 chunks of 2
  assert m["meteor"] == pytest.approx(100 * meteor, abs=1e-3)


def _coco_direct(records, iou_type="bbox", use_cats=1):
  """pycocotools run on our records in a separate, plain construction."""
  cats = sorted({l for r in records for l in r["gt"]["label"]})
  gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": c} for i, c in enumerate(cats)]}
  dts = []
  for k, r in enumerate(records):
    h, w = r["height"], r["width"]
    gt["images"].append({"id": k + 1, "height": h, "width": w})
    for j, ((y1, x1, y2, x2), l) in enumerate(zip(r["gt"]["bbox"], r["gt"]["label"])):
      ann = {"id": len(gt["annotations"]) + 1, "image_id": k + 1, "iscrowd": 0,
             "category_id": cats.index(l) + 1, "area": (x2 - x1) * w * (y2 - y1) * h,
             "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h]}
      if iou_type == "segm":
        ann["segmentation"] = r["gt"]["mask_rle"][j]
        ann["area"] = float(coco.rle_to_mask(ann["segmentation"]).sum())
      gt["annotations"].append(ann)
    for o in r["objects"]:
      y1, x1, y2, x2 = o["bbox"]
      dts.append({"image_id": k + 1, "category_id": cats.index(o["label"]) + 1,
                  "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h], "score": o["scores"]["mean_loc"]})
      if iou_type == "segm":
        dts[-1]["segmentation"] = o["mask_rle"]
  with contextlib.redirect_stdout(io.StringIO()):
    cgt = coco_lib.COCO()
    cgt.dataset = gt
    cgt.createIndex()
    ev = cocoeval.COCOeval(cgt, cgt.loadRes(dts), iou_type)
    ev.params.useCats = use_cats
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats[:3]


def test_detection_fixed_file_hand_and_pycocotools():
  recs = _load("detection")
  m = detection.Evaluator.compute_metrics(recs)
  # Active TB: GT in a and b. Scores rank a-TP .9, b .8 (IoU 0.625), a-FP .2.
  # IoU <= 0.6 thresholds (3 of 10): AP 1. Above: TP, FP, FP -> 51/101.
  ap_active = (3 + 7 * 51 / 101) / 10
  assert m["mean_loc/class/active tb/AP"] == pytest.approx(ap_active, abs=1e-6)
  assert m["mean_loc/class/active tb/AP50"] == pytest.approx(1.0)
  assert m["mean_loc/class/latent tb/AP"] == pytest.approx(1.0)
  assert m["mean_loc/AP"] == pytest.approx((ap_active + 1) / 2, abs=1e-6)
  assert m["mean_loc/AP75"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-6)
  # All-ones scores: ties keep output order, a's FP first: FP, TP, TP(/FP) ->
  # 2/3 at IoU <= 0.6, 51 * 0.5 / 101 above.
  ones_active = (3 * 2 / 3 + 7 * 0.5 * 51 / 101) / 10
  assert m["ones/class/active tb/AP"] == pytest.approx(ones_active, abs=1e-6)
  assert m["ones/AP50"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)
  # A model that ranks its good boxes higher gets a higher AP than all-ones.
  assert m["mean_loc/AP"] > m["ones/AP"] and m["mean_loc/agnostic/AP"] > m["ones/agnostic/AP"]
  assert m["invalid_rate"] == pytest.approx(1 / 5) and m["n_gt"] == 3 and m["n_pred"] == 4
  ap, ap50, ap75 = _coco_direct(recs)
  assert (m["mean_loc/AP"], m["mean_loc/AP50"], m["mean_loc/AP75"]) == pytest.approx((ap, ap50, ap75))
  ap, ap50, ap75 = _coco_direct(recs, use_cats=0)
  assert (m["mean_loc/agnostic/AP"], m["mean_loc/agnostic/AP75"]) == pytest.approx((ap, ap75))
  assert m["mean_loc/agnostic/AP75"] == pytest.approx(56 / 101, abs=1e-6)  # TP FP TP FP, 3 GT


def test_detection_from_text_and_empty_cases():
  recs = [dict(image_id="x", source="s", height=50, width=80, gt=dict(bbox=[[0.1, 0.1, 0.5, 0.5]], label=["active tb"]),
               prediction=loc_codec.format_objects([[0.1, 0.1, 0.5, 0.5]], ["active tb"]) + " ; <loc0001>")]
  m = detection.Evaluator.compute_metrics(recs)
  assert m["ones/AP"] == pytest.approx(1.0) and "mean_loc/AP" not in m
  assert m["invalid_rate"] == pytest.approx(0.5)
  # A right box with a name that is no ground-truth class counts class-agnostically only.
  recs[0]["prediction"] = loc_codec.format_objects([[0.1, 0.1, 0.5, 0.5]], ["pneumonia"])
  m = detection.Evaluator.compute_metrics(recs)
  assert m["ones/AP50"] == 0.0 and m["ones/agnostic/AP50"] == pytest.approx(1.0)
  recs[0]["prediction"] = ""
  assert detection.Evaluator.compute_metrics(recs)["ones/AP50"] == 0.0
  recs[0]["gt"] = dict(bbox=[], label=[])
  assert math.isnan(detection.Evaluator.compute_metrics(recs)["ones/AP"])
  with pytest.raises(common.EvalError, match="lacks"):
    detection.Evaluator.compute_metrics([dict(image_id="y", prediction="")])


def test_segmentation_fixed_file():
  m = segmentation.Evaluator.compute_metrics(_load("segmentation"))
  # s1: GT 4x4 vs predicted 4x6: IoU 16/24, Dice 32/40; s3: false mask; s4: missed;
  # s2 (both empty) is left out of miou/dice and is the one correct empty image of two.
  assert m["miou"] == pytest.approx((16 / 24) / 3)
  assert m["dice"] == pytest.approx(0.8 / 3)
  assert m["empty_correct"] == pytest.approx(0.5)
  # Active TB: the s1 mask matches at IoU 0.50..0.65 (4 of 10); latent TB never.
  assert m["mean_loc/class/active tb/AP"] == pytest.approx(0.4)
  assert m["mean_loc/class/latent tb/AP"] == 0.0
  assert m["mean_loc/AP50"] == pytest.approx(0.5) and m["mean_loc/AP75"] == 0.0
  assert m["invalid_rate"] == pytest.approx(1 / 3)
  assert (m["mean_loc/AP"], m["mean_loc/AP50"], m["mean_loc/AP75"]) == pytest.approx(
      tuple(_coco_direct(_load("segmentation"), "segm")))


def test_segmentation_names_the_record_of_a_malformed_mask():
  recs = _load("segmentation")
  recs[3]["gt"]["mask_rle"][0] = {"counts": "x"}
  with pytest.raises(common.EvalError, match=r"preds_segmentation.jsonl:4: field gt.mask_rle\[0\]: must be a COCO RLE"):
    segmentation.Evaluator.compute_metrics(recs)
  with pytest.raises(common.EvalError, match=r"segmentation record 3 \(image_id='s4'\): field gt.mask_rle\[0\]"):
    segmentation.Evaluator.compute_metrics(list(recs))


def test_perplexity_fixed_file():
  m = perplexity.Evaluator.compute_metrics(_load("perplexity"))
  assert m["nll_per_token"] == pytest.approx(6 / 10)
  assert m["perplexity"] == pytest.approx(math.exp(0.6))
  assert m["task/vqa/perplexity"] == pytest.approx(math.e)


def test_cli_writes_json(tmp_path, capsys):
  out = tmp_path / "m.json"
  assert cli.main(["--type", "vqa", "--predictions", str(DATA / "preds_vqa.jsonl"), "--json", str(out)]) == 0
  assert json.loads(out.read_text())["closed/accuracy"] == pytest.approx(0.75)
  assert "closed/accuracy" in capsys.readouterr().out
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": 1}\nnot json\n')
  assert errors.cli_main(cli.main, ["--type", "vqa", "--predictions", str(bad)]) == 2
  assert "bad.jsonl:2" in capsys.readouterr().err


def test_cli_as_a_module_reports_errors_without_a_traceback():
  proc = subprocess.run([sys.executable, "-m", "big_vision_cxr.evaluators", "--type", "vqa",
                         "--predictions", str(DATA / "preds_vqa.jsonl"), "--score_rule", "ones"],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert "error: vqa metrics take no options, got ['score_rule']." in proc.stderr
  assert "Traceback" not in proc.stderr


class _FakeTokenizer:
  eos_id = 1

  def loc_id(self, i):
    return 1000 + i

  def seg_id(self, j):
    return 3000 + j

  def encode(self, text, eos=False):
    return [ord(c) for c in text] + ([1] if eos else [])

  def decode(self, ids, stop_at_eos=True):
    return "".join(f"<loc{i - 1000:04d}>" if 1000 <= i < 2024 else chr(i) for i in ids)


class _FakePredictor:
  """Emits fixed token outputs with chosen log-probs; scores answers by a table."""

  def __init__(self, outputs, answer_logliks=None):
    self.tokenizer = _FakeTokenizer()
    self.outputs, self.answer_logliks = outputs, answer_logliks or {}

  def generate(self, params, images, prefixes):
    return [self.outputs[int(images[i, 0, 0, 0])] for i in range(len(prefixes))]

  def score(self, params, images, prefixes, suffixes):
    return np.array([self.answer_logliks[(int(images[i, 0, 0, 0]), s)] for i, s in enumerate(suffixes)])


def _output(boxes, name, logprob):
  tok = _FakeTokenizer()
  ids = [tok.loc_id(int(v)) for v in loc_codec.box_to_loc_ids(boxes).reshape(-1)]
  ids += [ord(c) for c in " " + name] + [tok.eos_id]
  return dict(text=tok.decode(ids), tokens=ids, token_logprobs=[logprob] * len(ids))


def test_detection_evaluator_runs_predictor_and_ranks_by_token_logprobs(tmp_path):
  # Image 0: a confident correct box; image 1: an unsure wrong box.
  outputs = [_output([0.1, 0.1, 0.4, 0.4], "active tb", -0.1), _output([0.6, 0.6, 0.9, 0.9], "active tb", -2.0)]
  gt = lambda i, box: dict(image_id=f"i{i}", source="s", task="detection", prefix="detect active tb ; latent tb",
                           height=64, width=64, objects=dict(bbox=[box], label=["active tb"]))
  batch = {"image": np.stack([np.full((4, 4, 3), i, np.float32) for i in range(2)] + [np.zeros((4, 4, 3))])}
  data = iter([(batch, [gt(0, [0.1, 0.1, 0.4, 0.4]), gt(1, [0.1, 0.6, 0.3, 0.9])])])  # one-shot, padded
  ev = detection.Evaluator(_FakePredictor(outputs), data, outfile=str(tmp_path / "p.jsonl"))
  m1, m2 = ev.run(None), ev.run(None)
  assert m1 == m2  # the one-shot iterator was kept
  recs = common.read_jsonl(tmp_path / "p.jsonl")
  assert recs[0]["objects"][0]["scores"]["mean_loc"] == pytest.approx(math.exp(-0.1))
  assert m1["mean_loc/AP50"] == pytest.approx(0.5, abs=0.01)  # 1 of 2 GT found first
  assert m1["n_pred"] == 2


def test_diagnosis_evaluator_softmax_over_candidates():
  table = {(0, "tuberculosis"): -0.5, (0, "normal"): -2.0, (0, "abnormal, not tuberculosis"): -3.0,
           (1, "tuberculosis"): -4.0, (1, "normal"): -0.2, (1, "abnormal, not tuberculosis"): -3.0}
  outputs = [dict(text="tuberculosis"), dict(text="normal")]
  batch = {"image": np.stack([np.full((4, 4, 3), i, np.float32) for i in range(2)])}
  gts = [dict(image_id=f"i{i}", source="s", prefix="answer en what is the diagnosis?", label=l)
         for i, l in enumerate(["tb", "normal"])]
  ev = diagnosis.Evaluator(_FakePredictor(outputs, table), [(batch, gts)])
  recs = ev.predict(None)
  p0 = np.exp([-0.5, -2.0, -3.0])
  assert recs[0]["p_tb"] == pytest.approx(p0[0] / p0.sum())
  m = ev.compute_metrics(recs)
  assert m["accuracy"] == 1.0 and m["auc"] == 1.0


def test_box_score_rules():
  tok = _FakeTokenizer()
  out = _output([0.1, 0.1, 0.4, 0.4], "active tb", 0.0)
  out["token_logprobs"] = [-1.0, -2.0, -3.0, -0.5] + [-0.1] * 10 + [0.0]
  parsed = loc_codec.parse_token_ids(out["tokens"], tok)
  assert confidence.box_scores(parsed, out["token_logprobs"], "mean_loc")[0] == pytest.approx(math.exp(-1.625))
  assert confidence.box_scores(parsed, out["token_logprobs"], "first_loc")[0] == pytest.approx(math.exp(-1.0))
  assert confidence.box_scores(parsed, out["token_logprobs"], "min_loc")[0] == pytest.approx(math.exp(-3.0))
  assert confidence.box_scores(parsed, out["token_logprobs"], "ones")[0] == 1.0
  assert confidence.label_probabilities([[0.0, math.log(3)]]) == pytest.approx(np.array([[0.25, 0.75]]))
  with pytest.raises(confidence.ConfidenceError, match="unknown"):
    confidence.box_scores(parsed, out["token_logprobs"], "max")


@pytest.mark.slow
def test_every_evaluator_runs_on_the_real_pipeline_and_predictor():
  """Contract check: input_pipeline.evaluation -> Predictor -> records -> metrics, tiny random model."""
  import jax
  from big_vision_cxr import decode, input_pipeline, seg_codec
  from big_vision_cxr.models import paligemma as pg
  from big_vision_cxr.pp import ops_text
  from big_vision_cxr.registry import EVALUATORS
  tok = ops_text.default_tokenizer()
  model_cfg = pg.get_config("tiny")
  model_cfg.llm.vocab_size = tok.vocab_size
  model = pg.Model(**model_cfg)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), np.ones((1, 4), np.int32),
                      np.ones((1, 4), np.int32))["params"]
  predictor = decode.Predictor(model, tok, max_decode_len=24)
  codec = seg_codec.SegCodec.from_npz(seg_codec.DEMO_VQVAE)
  cfg = dict(datasets={"ph": dict(source="phantom", n=40, size=48)}, pp_image="decode|resize(32)|value_range(-1, 1)",
             text_len=48)
  for kind, task, kw in [("diagnosis", "diagnosis", {}), ("vqa", "vqa", {}), ("report", "report", {}),
                         ("detection", "detection", {}), ("segmentation", "segmentation", {"seg_codec": codec}),
                         ("perplexity", "report", {})]:
    data = itertools.islice(input_pipeline.evaluation(cfg, task=task, split="test", batch_size=4,
                                                      seg_codec=codec), 2)
    ev = EVALUATORS.get(kind)(predictor, data, **kw)
    records = ev.predict(params)
    assert records and all(r["image_id"] for r in records)
    json.dumps(records, default=common._json_default)  # records are JSON-serialisable
    metrics = ev.compute_metrics(json.loads(json.dumps(records, default=common._json_default)))
    assert metrics and all(isinstance(v, float) for v in metrics.values()), kind
