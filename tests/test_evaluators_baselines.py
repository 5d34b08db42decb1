"""evaluators/baselines.py: majority answers, and the trivial column of the results table, on hand-built records."""
import math
import types

import pytest

from big_vision_cxr.evaluators import baselines, detection, diagnosis, table, vqa

DIAG = "answer en what is the diagnosis?"
IS_TB, SIDE = "answer en is there tuberculosis?", "answer en which side?"


def _ex(task, prefix, suffix):
  return types.SimpleNamespace(task=task, prefix=prefix, suffix=suffix)


UNITS = {
    "diagnosis": [_ex("diagnosis", DIAG, s) for s in ["tuberculosis"] * 3 + ["normal"] * 2],
    # Per prompt 'no' (2 of 3) and 'left' (2 of 2); over the task 'left' and 'no' tie 2:2.
    "vqa": [_ex("vqa", IS_TB, s) for s in ("no", "no", "yes")] + [_ex("vqa", SIDE, "left")] * 2,
}


def test_majority_answers_per_prompt_and_per_task():
  m = baselines.majority_answers(UNITS)
  assert m[("diagnosis", DIAG)] == "tuberculosis" and m[("diagnosis", None)] == "tuberculosis"
  assert m[("vqa", IS_TB)] == "no" and m[("vqa", SIDE)] == "left"
  assert m[("vqa", None)] == "no"  # a tie goes to the answer seen first
  assert baselines.majority_answers({}) == {}


def _diag(label, prediction, p_tb):
  return dict(image_id=label + prediction, prefix=DIAG, label=label, prediction=prediction, p_tb=p_tb)


def test_trivial_records_replace_only_the_prediction():
  majority = baselines.majority_answers(UNITS)
  recs = [_diag("tb", "normal", 0.2), dict(prefix="answer en unseen?", question="q", prediction="x")]
  out = baselines.trivial_records(recs, "diagnosis", majority)
  assert out[0] == dict(recs[0], prediction="tuberculosis", p_tb=0.5)
  assert out[1] == dict(recs[1], prediction="tuberculosis")  # unseen prompt: the task's answer
  assert recs[0]["prediction"] == "normal"  # the input is left as it was
  (det,) = baselines.trivial_records([dict(prediction="<loc0001>", objects=[{}], n_invalid=2)], "detection", {})
  assert det == dict(prediction="", objects=[], n_invalid=0)
  assert baselines.trivial_records([dict(prefix=IS_TB)], "vqa", {})[0]["prediction"] == ""


def test_results_table_puts_the_trivial_baseline_beside_the_model():
  majority = baselines.majority_answers(UNITS)
  diag = [_diag("tb", "tuberculosis", 0.9), _diag("normal", "normal", 0.2), _diag("normal", "tuberculosis", 0.6),
          _diag("tb", "normal", 0.4)]
  vq = [dict(prefix=IS_TB, question=IS_TB, question_type="closed", answer=a, prediction=p)
        for a, p in (("no", "no"), ("yes", "yes"), ("yes", "no"))]
  vq.append(dict(prefix=SIDE, question=SIDE, question_type="open", answer="right", prediction="right"))
  det = [dict(image_id="d", height=10, width=10, gt=dict(bbox=[[0.1, 0.1, 0.5, 0.5]], label=["active tb"]),
              prediction="", objects=[dict(bbox=[0.1, 0.1, 0.5, 0.5], label="active tb", scores={})], n_invalid=0)]
  evaluators = {"diag": (diagnosis.Evaluator(None, []), 0), "vqa": (vqa.Evaluator(None, []), 0),
                "det": (detection.Evaluator(None, [], score_rule="ones"), 0),
                "unrun": (vqa.Evaluator(None, []), 0)}
  records = {"diag": diag, "vqa": vq, "det": det}
  results = {}
  for name in records:
    ev = evaluators[name][0]
    results.update({f"{name}/{k}": v for k, v in ev.compute_metrics(records[name], **ev.metric_kw).items()})
  out = table.results_table(
      evaluators, records, results, majority, n_boot=20,
      table_metrics_cfg={"diag": ("accuracy", "auc", "no_such_metric"), "vqa": ("closed/accuracy", "all/exact_match"),
                         "det": ("ones/AP50",), "unrun": ("closed/accuracy",)})
  rows = {(r["task"], r["metric"]): (r["model"], r["trivial"]) for r in out["rows"]}
  # Diagnosis: the model gets 2 of 4 right, AUC 3/4 (0.9 and 0.4 against 0.2 and 0.6);
  # always 'tuberculosis' gets the 2 TB images, and P(tb) = 0.5 everywhere gives AUC 0.5.
  # VQA: the model 2 of 3 closed, 3 of 4 in all; always 'no' / 'left': 1 of 3 and 1 of 4.
  # Detection: the right box gives AP50 1, no boxes give 0.
  want = {("diagnosis", "accuracy"): (0.5, 0.5), ("diagnosis", "auc"): (0.75, 0.5),
          ("vqa", "closed/accuracy"): (2 / 3, 1 / 3), ("vqa", "all/exact_match"): (0.75, 0.25),
          ("detection", "ones/AP50"): (1.0, 0.0)}
  for key, (model, trivial) in want.items():
    assert rows[key] == (pytest.approx(model), pytest.approx(trivial)), key
  assert all(math.isnan(v) for v in rows[("diagnosis", "no_such_metric")])
  assert [r["metric"] for r in out["rows"] if r["task"] == "diagnosis"] == [
      "accuracy", "auc", "no_such_metric", "sensitivity", "specificity", "ece"]
  assert {r["eval"] for r in out["rows"]} == {"diag", "vqa", "det"}  # 'unrun' has no records
