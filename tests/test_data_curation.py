"""Curation: the exact five-task strings, answers consistent with the findings, ordering."""
import numpy as np
import pytest

from big_vision_cxr import loc_codec
from big_vision_cxr.data import curation, phantom, prompts, records


class FakeCodec:
  """The SegCodec API: masks [n, H, W], boxes [n, 4] -> ids [n, 16] (mask area mod 128)."""

  def __init__(self):
    self.calls = 0

  def encode(self, masks, boxes):
    self.calls += 1
    assert masks.ndim == 3 and len(masks) == len(boxes)
    return np.stack([np.full(16, int(m.sum()) % 128) for m in masks]).astype(np.int32)


def record(label="tb", boxes=(), names=(), lung=None, zone=None, kind=None, mask=False, **kw):
  bbox = np.asarray(boxes, np.float32).reshape(-1, 4)
  masks = curation.box_masks(bbox, 100, 100) if mask else None
  objs = records.Objects(bbox, list(names), masks, lung, zone, kind)
  return records.validate(records.SourceRecord("img", "pat", "test", np.zeros((100, 100), np.uint8),
                                               label, objs, **kw))


def by_prefix(examples):
  return {e.prefix: e for e in examples}


def test_prompt_strings_are_the_agreed_ones():
  assert prompts.DIAGNOSIS_PREFIX == "answer en what is the diagnosis?"
  assert prompts.DIAGNOSIS_ANSWERS == {"tb": "tuberculosis", "normal": "normal",
                                       "sick_non_tb": "abnormal, not tuberculosis"}
  assert prompts.CLOSED_QUESTIONS == (
      "answer en is there tuberculosis?", "answer en is the left lung affected?",
      "answer en is the right lung affected?", "answer en is there a cavity?")
  assert prompts.OPEN_QUESTIONS == (
      "answer en which lung is affected?", "answer en how many lesions are there?",
      "answer en which zone is most affected?")
  assert prompts.REPORT_PREFIX == "caption en"
  assert prompts.detect_prefix(["latent tb", "active tb"]) == "detect active tb ; latent tb"
  assert prompts.segment_prefix(["latent tb", "active tb"]) == "segment active tb ; latent tb"


def test_normal_record():
  exs = curation.curate(record("normal"), class_names=phantom.CLASS_NAMES, seg_codec=FakeCodec())
  qa = by_prefix(e for e in exs if e.task == "vqa")
  assert {k: v.suffix for k, v in qa.items()} == {
      prompts.Q_TB: "no", prompts.Q_LEFT: "no", prompts.Q_RIGHT: "no", prompts.Q_CAVITY: "no",
      prompts.Q_WHICH_LUNG: "none", prompts.Q_HOW_MANY: "0", prompts.Q_WHICH_ZONE: "none"}
  tasks = {e.task: e for e in exs}
  assert tasks["diagnosis"].suffix == "normal"
  assert tasks["detection"].suffix == "" and tasks["segmentation"].suffix == ""
  assert tasks["report"].suffix == "the lungs are clear. no evidence of tuberculosis."


def test_tb_answers_follow_patient_sides_and_sorting():
  # Box on the image's right half = the patient's LEFT lung (PA film); no lung/zone given.
  rec = record(boxes=[[0.5, 0.6, 0.6, 0.8], [0.15, 0.55, 0.3, 0.75], [0.2, 0.1, 0.3, 0.3]],
               names=["active tb", "latent tb", "active tb"], mask=True)
  codec = FakeCodec()
  exs = curation.curate(rec, class_names=["latent tb", "active tb"], seg_codec=codec)
  qa = {e.prefix: e.suffix for e in exs if e.task == "vqa"}
  assert qa[prompts.Q_LEFT] == "yes" and qa[prompts.Q_RIGHT] == "yes"
  assert qa[prompts.Q_WHICH_LUNG] == "both" and qa[prompts.Q_HOW_MANY] == "3"
  assert qa[prompts.Q_WHICH_ZONE] == "upper"  # centres at y 0.225, 0.25 (upper) and 0.55
  assert prompts.Q_CAVITY not in qa  # kinds unknown: not asked
  det = next(e for e in exs if e.task == "detection")
  assert det.prefix == "detect active tb ; latent tb"
  parsed = loc_codec.parse_objects(det.suffix).objects
  assert [o.name for o in parsed] == ["latent tb", "active tb", "active tb"]  # by (y_min, x_min)
  assert det.suffix.startswith("<loc0153><loc0563><loc0307><loc0767> latent tb ; ")
  np.testing.assert_allclose([o.box for o in parsed], det.objects.bbox, atol=0.5 / 1023)
  seg = next(e for e in exs if e.task == "segmentation")
  assert codec.calls == 1 and seg.prefix == "segment active tb ; latent tb"
  parsed = loc_codec.parse_objects(seg.suffix, require_seg=True).objects
  assert len(parsed) == 3 and all(len(o.seg_ids) == 16 for o in parsed)
  areas = [int(m.sum()) % 128 for m in seg.objects.mask]
  assert [int(o.seg_ids[0]) for o in parsed] == areas


def test_phantom_vqa_matches_its_findings():
  for rec in phantom.dataset(40, size=48):
    qa = {e.prefix: e.suffix for e in curation.curate(rec, class_names=phantom.CLASS_NAMES,
                                                       tasks=("vqa",))}
    lungs = set(rec.objects.lung) | ({rec.meta["findings"]["effusion"]} if rec.meta["findings"] else set())
    assert qa[prompts.Q_LEFT] == ("yes" if "left" in lungs else "no")
    assert qa[prompts.Q_CAVITY] == ("yes" if "cavity" in rec.objects.kind else "no")
    if rec.label != "sick_non_tb":
      assert qa[prompts.Q_HOW_MANY] == str(len(rec.objects))
    assert qa[prompts.Q_TB] == ("yes" if rec.label == "tb" else "no")


def test_reports_templated_deterministic_or_given():
  rec = record(boxes=[[0.1, 0.1, 0.2, 0.2], [0.15, 0.2, 0.25, 0.3], [0.6, 0.6, 0.7, 0.7]],
               names=["active tb", "active tb", "latent tb"], lung=["right", "right", "left"],
               zone=["upper", "upper", "lower"], kind=["cavity", "cavity", "calcified nodule"])
  want = ("right lung: two cavities in the upper zone. left lung: calcified nodule in the lower zone. "
          "findings consistent with active and latent tuberculosis.")
  assert curation.template_report(rec) == want
  given = record("normal", report="  Heart size NORMAL. Lungs clear. ")
  rep = curation.curate(given, class_names=["active tb"], tasks=("report",))[0]
  assert rep.suffix == rep.report == "heart size normal. lungs clear."
  eff = record("sick_non_tb", meta={"findings": {"effusion": "left"}})
  assert curation.template_report(eff) == "left pleural effusion. no evidence of tuberculosis."


def test_unknown_lesions_and_missing_codec():
  unknown = record("tb")  # TB label without boxes: lesion tasks and location questions skipped
  exs = curation.curate(unknown, class_names=["active tb"])
  assert {e.task for e in exs} == {"diagnosis", "vqa", "report"}
  assert [e.prefix for e in exs if e.task == "vqa"] == [prompts.Q_TB]
  boxed = record(boxes=[[0.1, 0.1, 0.3, 0.3]], names=["active tb"])
  with pytest.raises(curation.CurationError, match="seg_codec"):
    curation.curate(boxed, class_names=["active tb"], tasks=("segmentation",), seg_codec=None,
                    seg_from_boxes=True)
  assert curation.curate(boxed, class_names=["active tb"], tasks=("segmentation",), seg_codec=FakeCodec()) == []
  weak = curation.curate(boxed, class_names=["active tb"], tasks=("segmentation",),
                         seg_codec=FakeCodec(), seg_from_boxes=True)
  assert weak[0].objects.mask.sum() == 20 * 20


def test_record_qa_is_appended_and_ground_truth_kept():
  rec = record("normal", qa=[dict(question="Is the heart enlarged?", answer="No", type="closed")])
  exs = curation.curate(rec, class_names=["active tb"], tasks=("vqa",))
  assert (exs[-1].prefix, exs[-1].suffix, exs[-1].question_type) == (
      "answer en is the heart enlarged?", "no", "closed")
  gt = exs[0].ground_truth()
  assert gt["image_id"] == "img" and gt["patient_id"] == "pat" and gt["label"] == "normal"
  assert gt["height"] == gt["width"] == 100


@pytest.mark.parametrize("seg_from_boxes", [False, True])
@pytest.mark.parametrize("positives_only", [False, True])
def test_task_counts_from_the_summary_match_curate(seg_from_boxes, positives_only):
  recs = phantom.dataset(12, size=48) + [
      record("tb"), record("normal"), record("sick_non_tb"),
      record("sick_non_tb", meta=dict(findings=dict(effusion="left"))),
      record("tb", boxes=[(0.1, 0.1, 0.3, 0.3)], names=["active tb"]),  # boxes, no masks
      record("tb", boxes=[(0.1, 0.6, 0.3, 0.9)], names=["latent tb"], mask=True,
             qa=[dict(question="is it old?", answer="Yes", type="closed")])]
  for rec in recs:
    exs = curation.curate(rec, class_names=("active tb",), seg_codec=FakeCodec(),
                          seg_from_boxes=seg_from_boxes)
    if positives_only:
      exs = [e for e in exs if e.task not in ("detection", "segmentation") or len(e.objects)]
    s = curation.summary(rec)
    assert curation.task_counts(s, prompts.TASKS, seg_from_boxes=seg_from_boxes,
                                positives_only=positives_only) == \
        [sum(e.task == t for e in exs) for t in prompts.TASKS], rec.image_id
    assert curation.classes(s) == sorted(set(rec.objects.label))
    for t in prompts.TASKS:  # `example` is curate's k-th of the task
      mine = [e for e in exs if e.task == t]
      for k, e in enumerate(mine):
        got = curation.example(rec, t, k, class_names=("active tb",), seg_codec=FakeCodec(),
                               seg_from_boxes=seg_from_boxes)
        assert (got.prefix, got.suffix) == (e.prefix, e.suffix)
