"""consistency: each rule on hand-built predict results, agreeing and contradicting."""
import json
import pathlib

import pytest

from big_vision_cxr import consistency
from big_vision_cxr.data import prompts

# A box centred in the image's right half is in the PATIENT's left lung.
PATIENT_LEFT = [0.3, 0.6, 0.5, 0.8]
PATIENT_RIGHT = [0.3, 0.2, 0.5, 0.4]
CLEAR = "the lungs are clear. no evidence of tuberculosis."


def _result(diagnosis=None, report=None, boxes=None, masks=None, **qa):
  """A predict result; qa: tb, left, right, which, count -> the VQA answers."""
  questions = dict(tb=prompts.Q_TB, left=prompts.Q_LEFT, right=prompts.Q_RIGHT,
                   which=prompts.Q_WHICH_LUNG, count=prompts.Q_HOW_MANY)
  out = dict(height=100, width=100)
  if diagnosis:
    out["diagnosis"] = dict(label=diagnosis)
  if report is not None:
    out["report"] = report
  if qa:
    out["answers"] = [dict(question=questions[k][len("answer en "):], answer=v)
                      for k, v in qa.items()]
  for key, value in (("boxes", boxes), ("masks", masks)):
    if value is not None:
      out[key] = [dict(label="active tb", score=s, bbox=b) for b, s in value]
  return out


BOX = (PATIENT_LEFT, 0.8)
CASES = [
    # (code, result, disagree)
    ("diagnosis_vs_vqa_tb", _result("tb", tb="yes"), False),
    ("diagnosis_vs_vqa_tb", _result("tb", tb="no"), True),
    ("diagnosis_vs_vqa_tb", _result("normal", tb="yes"), True),
    ("diagnosis_vs_vqa_tb", _result("sick_non_tb", tb="no"), False),
    ("diagnosis_vs_report", _result("normal", CLEAR), False),
    ("diagnosis_vs_report", _result("sick_non_tb", "abnormal findings, not typical of tuberculosis."), False),
    ("diagnosis_vs_report", _result("normal", "findings consistent with active tuberculosis."), True),
    ("diagnosis_vs_report", _result("tb", CLEAR), True),
    ("diagnosis_vs_report", _result("tb", "left lung: cavity. findings consistent with tuberculosis."), False),
    ("not_tb_with_lesions", _result("normal", boxes=[]), False),
    ("not_tb_with_lesions", _result("normal", boxes=[BOX]), True),
    ("not_tb_with_lesions", _result("sick_non_tb", boxes=[], masks=[BOX]), True),
    ("tb_without_lesions", _result("tb", boxes=[BOX]), False),
    ("tb_without_lesions", _result("tb", boxes=[]), True),
    ("vqa_tb_vs_count", _result(tb="yes", count="2"), False),
    ("vqa_tb_vs_count", _result(tb="yes", count="0"), True),
    ("vqa_tb_vs_count", _result(tb="no", count="0"), False),
    ("vqa_tb_vs_count", _result(tb="no", count="1"), True),
    ("count_vs_boxes", _result(count="2", boxes=[BOX, (PATIENT_RIGHT, 0.5)]), False),
    ("count_vs_boxes", _result(count="1", boxes=[BOX, (PATIENT_RIGHT, 0.5)]), True),
    ("count_vs_boxes", _result(count="0", masks=[BOX]), True),
    ("left_lung_vs_boxes", _result(left="yes", boxes=[(PATIENT_LEFT, 0.9)]), False),
    ("left_lung_vs_boxes", _result(left="yes", boxes=[(PATIENT_RIGHT, 0.9)]), True),  # image left
    ("left_lung_vs_boxes", _result(left="no", boxes=[(PATIENT_LEFT, 0.9)]), True),
    ("right_lung_vs_boxes", _result(right="yes", boxes=[(PATIENT_RIGHT, 0.9)]), False),
    ("right_lung_vs_boxes", _result(right="yes", boxes=[(PATIENT_LEFT, 0.9)]), True),
    ("right_lung_vs_boxes", _result(right="no", boxes=[]), False),
    ("which_lung_vs_boxes", _result(which="both", boxes=[(PATIENT_LEFT, 0.9), (PATIENT_RIGHT, 0.9)]), False),
    ("which_lung_vs_boxes", _result(which="none", boxes=[]), False),
    ("which_lung_vs_boxes", _result(which="left", boxes=[(PATIENT_RIGHT, 0.9)]), True),
    ("which_lung_vs_boxes", _result(which="none", boxes=[BOX]), True),
    ("which_lung_vs_closed", _result(which="left", left="yes", right="no"), False),
    ("which_lung_vs_closed", _result(which="both", left="yes", right="yes"), False),
    ("which_lung_vs_closed", _result(which="left", left="no", right="yes"), True),
    ("which_lung_vs_closed", _result(which="none", left="yes", right="no"), True),
    ("report_side_vs_boxes", _result(report="left lung: cavity in the upper zone.", boxes=[BOX]), False),
    ("report_side_vs_boxes", _result(report="left lung: cavity in the upper zone.",
                                     boxes=[(PATIENT_RIGHT, 0.9)]), True),
    ("report_side_vs_boxes", _result(report="right lung: nodule. left lung: cavity.",
                                     boxes=[(PATIENT_LEFT, 0.9)]), True),
]


@pytest.mark.parametrize("code,result,disagree", CASES,
                         ids=[f"{c}-{'flag' if d else 'agree'}-{i}" for i, (c, _, d) in enumerate(CASES)])
def test_rule(code, result, disagree):
  block = consistency.check(result)
  assert code in block["checked"]
  flagged = {f["code"]: f["message"] for f in block["flags"]}
  assert (code in flagged) == disagree, block
  assert block["agree"] == (not block["flags"])
  if disagree:
    assert flagged[code].endswith(".") and len(flagged[code]) < 200


def test_every_rule_is_exercised_both_ways():
  assert {(c, d) for c, _, d in CASES} == {(c, d) for c in consistency.RULES for d in (False, True)}


def test_rules_without_their_inputs_are_not_checked():
  assert consistency.check({}) == dict(agree=True, checked=[], flags=[])
  block = consistency.check(_result("tb", tb="maybe", count="several", which="upper"))
  assert block["checked"] == []  # unreadable answers, no detection: nothing to compare
  assert "tb_without_lesions" not in consistency.check(_result("tb"))["checked"]


def test_min_score_decides_which_lesions_count():
  result = _result("normal", which="none", count="0", boxes=[(PATIENT_LEFT, 0.1)])
  assert {f["code"] for f in consistency.check(result)["flags"]} == {
      "not_tb_with_lesions", "which_lung_vs_boxes", "count_vs_boxes"}
  assert consistency.check(result, min_score=0.3)["agree"]
  tb = consistency.check(_result("tb", boxes=[(PATIENT_LEFT, 0.1)]), min_score=0.3)
  assert tb["flags"] == [dict(code="tb_without_lesions", message="diagnosis 'tuberculosis' "
                              "but no lesion drawn (score >= 0.3).")]


def test_messages_name_the_patients_side():
  block = consistency.check(_result(left="yes", boxes=[(PATIENT_RIGHT, 0.9)]))
  assert block["flags"][0]["message"] == (
      "VQA 'is the left lung affected?' yes but no lesion drawn in the patient's left lung "
      "(image right).")
  block = consistency.check(_result(which="right", boxes=[(PATIENT_LEFT, 0.9), (PATIENT_RIGHT, 0.9)]))
  assert block["flags"][0]["message"] == (
      "VQA 'which lung is affected?' right but lesions drawn in both lungs.")


def test_report_tb_and_sides():
  assert consistency.report_tb(CLEAR) is False
  assert consistency.report_tb("findings consistent with latent tuberculosis.") is True
  assert consistency.report_tb("right pleural effusion.") is None
  assert consistency.report_sides("right lung: two nodules. left lung: cavity.") == {"left", "right"}
  assert consistency.report_sides("right pleural effusion.") == set()


def test_free_vqa_prompts_count():
  result = dict(diagnosis=dict(label="normal"),
                prompts=[dict(prompt="answer en is there tuberculosis? ", text="Yes", objects=[])])
  assert [f["code"] for f in consistency.check(result)["flags"]] == ["diagnosis_vs_vqa_tb"]


def test_shipped_example_output():
  """docs/examples' demo prediction: all agree but the lesion count (1 answered, 2 boxed)."""
  path = pathlib.Path(__file__).parents[1] / "docs" / "examples" / "predicted_phantom_100000.json"
  block = consistency.check(json.loads(path.read_text()))
  assert set(block["checked"]) == set(consistency.RULES) - {"not_tb_with_lesions"}
  assert [f["code"] for f in block["flags"]] == ["count_vs_boxes"]
