"""Malformed predictions: the evaluators' CLI and compute_metrics name the record and field.

Each case is a predictions file whose line 1 is a valid record and line 2 the
bad one (or a file that is bad as a whole). The CLI must print exactly one
`error: FILE:LINE: field ...` line and exit 2; in-process records get the same
check (schema.py), named by their index.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from big_vision_cxr.evaluators import coco, common
from big_vision_cxr.registry import EVALUATORS

NAN, INF = float("nan"), float("inf")
_DELETE = object()
_RLE = coco.mask_to_rle(np.pad(np.ones((4, 4), bool), 3))  # 10x10
VALID = {
    "diagnosis": dict(image_id="d", task="diagnosis", label="tb", prediction="tuberculosis", p_tb=0.9),
    "vqa": dict(image_id="v", task="vqa", question="answer en is there tuberculosis?", question_type="closed",
                answer="yes", prediction="yes"),
    "report": dict(image_id="r", task="report", reference="no active disease", prediction="no disease"),
    "detection": dict(image_id="b", task="detection", height=100, width=100,
                      gt=dict(bbox=[[0.1, 0.1, 0.3, 0.3]], label=["active tb"]), prediction="(see objects)",
                      objects=[dict(bbox=[0.1, 0.1, 0.3, 0.3], label="active tb", scores={"mean_loc": 0.9})],
                      n_invalid=0),
    "segmentation": dict(image_id="s", task="segmentation", height=10, width=10,
                         gt=dict(bbox=[[0.3, 0.3, 0.7, 0.7]], label=["active tb"], mask_rle=[_RLE]),
                         prediction="(see objects)",
                         objects=[dict(bbox=[0.3, 0.3, 0.7, 0.7], label="active tb", scores={"mean_loc": 0.9},
                                       mask_rle=_RLE)], n_invalid=0),
    "perplexity": dict(image_id="p", task="report", loglik=-2.0, n_tokens=4),
}


def _bad(kind, change):
  """VALID[kind] changed by `change(record)` (which edits it in place)."""
  rec = copy.deepcopy(VALID[kind])
  change(rec)
  return rec


def _set(path, value):
  """change(record): sets (or with _DELETE removes) the field at `path` of keys and indices."""
  def change(rec):
    *parents, last = path
    for key in parents:
      rec = rec[key]
    if value is _DELETE:
      del rec[last]
    else:
      rec[last] = value
  return change


# (case, evaluator type, record of line 2 (or the whole file as bytes), what the error names after FILE:).
RECORD_CASES = [
    ("label_wrong_type", "diagnosis", _bad("diagnosis", _set(["label"], 1)), ":2: field label"),
    ("label_unknown", "diagnosis", _bad("diagnosis", _set(["label"], "tuberculosis")), ":2: field label"),
    ("prediction_missing", "diagnosis", _bad("diagnosis", _set(["prediction"], _DELETE)),
     ":2: lacks field prediction"),
    ("p_tb_string", "diagnosis", _bad("diagnosis", _set(["p_tb"], "0.9")), ":2: field p_tb"),
    ("p_tb_nan", "diagnosis", _bad("diagnosis", _set(["p_tb"], NAN)), ":2: field p_tb"),
    ("p_tb_above_one", "diagnosis", _bad("diagnosis", _set(["p_tb"], 1.5)), ":2: field p_tb"),
    ("question_type_unknown", "vqa", _bad("vqa", _set(["question_type"], "yes/no")), ":2: field question_type"),
    ("answer_not_string", "vqa", _bad("vqa", _set(["answer"], ["yes"])), ":2: field answer"),
    ("reference_missing", "report", _bad("report", _set(["reference"], _DELETE)), ":2: lacks field reference"),
    ("height_string", "detection", _bad("detection", _set(["height"], "100")), ":2: field height"),
    ("height_zero", "detection", _bad("detection", _set(["height"], 0)), ":2: field height"),
    ("width_zero", "detection", _bad("detection", _set(["width"], 0)), ":2: field width"),
    ("width_negative", "segmentation", _bad("segmentation", _set(["width"], -10)), ":2: field width"),
    ("gt_missing", "detection", _bad("detection", _set(["gt"], _DELETE)), ":2: lacks field gt"),
    ("gt_bbox_three_numbers", "detection", _bad("detection", _set(["gt", "bbox", 0], [0.1, 0.1, 0.3])),
     ":2: field gt.bbox[0]"),
    ("gt_labels_not_one_per_box", "detection", _bad("detection", _set(["gt", "label"], ["a", "b"])),
     ":2: field gt.label"),
    ("bbox_strings", "detection", _bad("detection", _set(["objects", 0, "bbox"], ["0.1", "0.1", "0.3", "0.3"])),
     ":2: field objects[0].bbox"),
    ("bbox_non_finite", "detection", _bad("detection", _set(["objects", 0, "bbox"], [0.1, 0.1, INF, 0.3])),
     ":2: field objects[0].bbox"),
    ("objects_not_a_list", "detection", _bad("detection", _set(["objects"], {"bbox": [0, 0, 1, 1]})),
     ":2: field objects"),
    ("objects_not_dicts", "detection", _bad("detection", _set(["objects"], [[0.1, 0.1, 0.3, 0.3]])),
     ":2: field objects[0]"),
    ("object_lacks_bbox", "detection", _bad("detection", _set(["objects", 0, "bbox"], _DELETE)),
     ":2: lacks field objects[0].bbox"),
    ("score_nan", "detection", _bad("detection", _set(["objects", 0, "scores", "mean_loc"], NAN)),
     ":2: field objects[0].scores.mean_loc"),
    ("n_invalid_negative", "detection", _bad("detection", _set(["n_invalid"], -1)), ":2: field n_invalid"),
    ("neither_prediction_nor_objects", "detection",
     {k: v for k, v in VALID["detection"].items() if k not in ("prediction", "objects")}, ":2: lacks field prediction"),
    ("mask_rle_not_rle", "segmentation", _bad("segmentation", _set(["gt", "mask_rle", 0], {"counts": "x"})),
     ":2: field gt.mask_rle[0]"),
    ("mask_rle_counts_short", "segmentation",
     _bad("segmentation", _set(["gt", "mask_rle", 0], dict(_RLE, counts=_RLE["counts"][:-1]))),
     ":2: field gt.mask_rle[0].counts"),
    ("mask_rle_wrong_size", "segmentation",
     _bad("segmentation", _set(["objects", 0, "mask_rle"], coco.mask_to_rle(np.zeros((20, 20), bool)))),
     ":2: field objects[0].mask_rle.size"),
    ("gt_masks_not_one_per_box", "segmentation", _bad("segmentation", _set(["gt", "mask_rle"], [])),
     ":2: field gt.mask_rle"),
    ("object_without_mask_or_seg_ids", "segmentation",
     _bad("segmentation", _set(["objects", 0, "mask_rle"], _DELETE)), ":2: field objects[0]"),
    ("seg_ids_too_few", "segmentation",
     _bad("segmentation", lambda r: r["objects"][0].update(mask_rle=None, seg_ids=[1, 2, 3])),
     ":2: field objects[0].seg_ids"),
    ("loglik_string", "perplexity", _bad("perplexity", _set(["loglik"], "-2.0")), ":2: field loglik"),
    ("loglik_nan", "perplexity", _bad("perplexity", _set(["loglik"], NAN)), ":2: field loglik"),
    ("n_tokens_zero", "perplexity", _bad("perplexity", _set(["n_tokens"], 0)), ":2: field n_tokens"),
    ("task_unknown", "perplexity", _bad("perplexity", _set(["task"], "classification")), ":2: field task"),
    ("task_not_the_type", "detection", dict(VALID["diagnosis"]), ":2: field task"),
]
FILE_CASES = [
    ("empty_file", "diagnosis", b"", ": no records"),
    ("only_blank_lines", "vqa", b"\n  \n", ": no records"),
    ("not_json", "report", b"not json", ":2: not valid JSON"),
    ("not_an_object", "report", b"[1, 2]", ":2: each line must be a JSON object"),
    ("not_utf8", "report", b'{"reference": "caf\xe9", "prediction": "x"}', ":2: not UTF-8 text (byte 0xe9"),
]


def _write(path, kind, bad):
  """Line 1 a valid record, line 2 `bad`; bad bytes that are blank: the whole file."""
  if isinstance(bad, bytes) and not bad.strip():
    path.write_bytes(bad)
  else:
    line2 = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
    path.write_bytes(json.dumps(VALID[kind]).encode() + b"\n" + line2 + b"\n")


def _cli(*argv):
  return subprocess.run([sys.executable, "-m", "big_vision_cxr.evaluators", *argv], capture_output=True, text=True,
                        timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("case,kind,bad,names", RECORD_CASES + FILE_CASES,
                         ids=[c[0] for c in RECORD_CASES + FILE_CASES])
def test_cli_refuses_bad_predictions(tmp_path, case, kind, bad, names):
  path = tmp_path / f"{case}.jsonl"
  _write(path, kind, bad)
  proc = _cli("--type", kind, "--predictions", str(path))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  (line,) = proc.stderr.splitlines()
  assert line.startswith("error: ") and f"{path}{names}" in line, line


@pytest.mark.parametrize("case,kind,bad,names", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_compute_metrics_refuses_bad_records(case, kind, bad, names):
  field = names.split(": ", 1)[1]
  with pytest.raises(common.EvalError) as e:
    EVALUATORS.get(kind).compute_metrics([VALID[kind], bad])
  assert str(e.value).startswith(f"{kind} record 1 (image_id={bad['image_id']!r}): {field}"), (case, str(e.value))


def test_valid_records_pass():
  for kind, rec in VALID.items():
    assert EVALUATORS.get(kind).compute_metrics([rec, rec]), kind


class _NanScorePredictor:
  """Answers 'tuberculosis' and scores every candidate NaN (as a diverged model would)."""

  def generate(self, params, images, prefixes):
    return [dict(text="tuberculosis") for _ in prefixes]

  def score(self, params, images, prefixes, suffixes):
    return np.full(len(prefixes), NAN)


def test_evaluator_run_refuses_its_own_nan_p_tb():
  batch = {"image": np.zeros((1, 4, 4, 3), np.float32)}
  gts = [dict(image_id="i0", task="diagnosis", prefix="answer en what is the diagnosis?", label="tb")]
  ev = EVALUATORS.get("diagnosis")(_NanScorePredictor(), [(batch, gts)])
  with pytest.raises(common.EvalError, match=r"^diagnosis record 0 \(image_id='i0'\): field p_tb: must be a number "
                                             r"in \[0, 1\], got nan\.$"):
    ev.run(None)


def test_compute_metrics_refuses_a_record_that_is_no_object():
  with pytest.raises(common.EvalError, match=r"^report record 1: must be a JSON object, got \['x'\]\.$"):
    EVALUATORS.get("report").compute_metrics([VALID["report"], ["x"]])


OPTION_CASES = [
    ("unknown_type", ["--type", "classification"], "--type: Unknown evaluator 'classification'"),
    ("unknown_score_rule", ["--type", "detection", "--score_rule", "best"], "unknown score_rule 'best'"),
    ("option_not_taken", ["--type", "detection", "--vqvae", "v.npz"], "detection metrics take only ['score_rule']"),
    ("missing_file", ["--type", "detection", "--predictions", "nowhere.jsonl"], "cannot read predictions file"),
]


@pytest.mark.parametrize("case,argv,names", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_cli_refuses_bad_options(tmp_path, case, argv, names):
  path = tmp_path / "p.jsonl"
  _write(path, "detection", VALID["detection"])
  proc = _cli(*argv, *([] if "--predictions" in argv else ["--predictions", str(path)]))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, (case, proc.stderr)
  (line,) = proc.stderr.splitlines()
  assert line.startswith("error: ") and names in line, line
