"""evaluators/table.py: the patient bootstrap, the results table, and the samplers it resamples with."""
import math
import pathlib
import time

import numpy as np
import pytest

from big_vision_cxr.evaluators import baselines, common, detection, diagnosis, table
from big_vision_cxr.registry import EVALUATORS

DATA = pathlib.Path(__file__).parent / "data"
DIAG = "answer en what is the diagnosis?"


def _diag(n, *, per_patient=1, source="s", correct_every=(7, 10)):
  """n diagnosis records, half TB; records k with k % 10 < 7 answered right (accuracy 0.7)."""
  recs = []
  for k in range(n):
    label = "tb" if k % 2 else "normal"
    right = k // per_patient % correct_every[1] < correct_every[0]
    answer = {"tb": "tuberculosis", "normal": "normal"}[label]
    recs.append(dict(image_id=f"{source}{k}", patient_id=f"{source}p{k // per_patient}", source=source,
                     prefix=DIAG, label=label, prediction=answer if right else "abnormal, not tuberculosis",
                     p_tb=(0.8 if label == "tb" else 0.3) if right else 0.5))
  return recs


def _interval(recs, key="accuracy", seed=0, n_boot=300):
  return table.bootstrap(diagnosis.Evaluator.sampler(recs), recs, [key], n_boot=n_boot, seed=seed)[None][key]


def test_bootstrap_contains_the_estimate_shrinks_with_n_and_is_seeded():
  widths = []
  for n in (20, 80, 320):
    recs = _diag(n)
    point = diagnosis.Evaluator.compute_metrics(recs)["accuracy"]
    low, high = _interval(recs)
    assert point == pytest.approx(0.7) and low <= point <= high
    widths.append(high - low)
  assert widths[0] > widths[1] > widths[2] > 0
  recs = _diag(80)
  assert _interval(recs, seed=0) == _interval(recs, seed=0)
  assert _interval(recs, seed=0) != _interval(recs, seed=1)


def test_bootstrap_resamples_patients_not_images():
  # The same 80 images, as 80 patients or as 20 patients with 4 images each (answered
  # alike): images of one patient are not independent, so the interval is wider.
  alone, grouped = _diag(80), _diag(80, per_patient=4)
  assert [len(g) for g in table.patient_groups(grouped).values()] == [20]
  low_a, high_a = _interval(alone)
  low_g, high_g = _interval(grouped)
  assert high_g - low_g > 1.3 * (high_a - low_a)
  # Without patient ids each image is its own patient.
  bare = [{k: v for k, v in r.items() if k != "patient_id"} for r in grouped]
  assert len(table.patient_groups(bare)["s"]) == 80
  low_b, high_b = _interval(bare)
  assert high_b - low_b < 0.8 * (high_g - low_g)


def test_bootstrap_keeps_each_source_and_gives_per_source_intervals():
  recs = _diag(40, source="a") + _diag(60, source="b", correct_every=(10, 10))
  out = table.bootstrap(diagnosis.Evaluator.sampler(recs), recs, ["accuracy", "auc"], n_boot=200)
  assert sorted(out, key=str) == sorted([None, "a", "b"], key=str)
  assert out["b"]["accuracy"] == (1.0, 1.0)  # source b is always right, whatever is drawn
  low, high = out["a"]["accuracy"]
  assert low < 0.7 < high
  assert out[None]["accuracy"][0] > low  # pooled with b: higher, and b's share never varies


@pytest.mark.parametrize("kind", ["diagnosis", "vqa", "report", "detection", "segmentation", "perplexity"])
def test_sampler_is_compute_metrics_on_the_resampled_records(kind):
  """One code path: the bootstrap's fn(indices) equals the evaluator's metrics of those records."""
  recs = common.read_jsonl(DATA / f"preds_{kind}.jsonl")
  rng = np.random.default_rng(0)
  sample = EVALUATORS.get(kind).sampler(recs)
  for _ in range(5):
    idx = rng.integers(0, len(recs), len(recs))
    got = sample(idx)
    want = EVALUATORS.get(kind).compute_metrics([recs[i] for i in idx])
    want = {k: v for k, v in want.items() if not k.startswith("by_source/") and "_ci95_" not in k}
    shared = set(got) & set(want)
    assert set(want) - shared == set()
    assert set(got) - shared <= {k for k in got if k.startswith(("mean_loc/class/", "ones/class/"))
                                 and math.isnan(got[k])}  # a class none of the drawn records has
    for k in shared:
      assert got[k] == pytest.approx(want[k], nan_ok=True, rel=1e-12), k
  everything = sample(np.arange(len(recs)))
  full = EVALUATORS.get(kind).compute_metrics(recs)
  assert all(everything[k] == pytest.approx(full[k], nan_ok=True, rel=0) for k in everything)


def _det(k, source):
  """A detection record whose one box is found (k even) or missed."""
  box = [0.1, 0.1, 0.5, 0.5]
  objs = [dict(bbox=box, label="active tb", scores=dict(mean_loc=0.9))] if k % 2 == 0 else []
  return dict(image_id=f"{source}{k}", patient_id=f"{source}{k}", source=source, height=20, width=20,
              gt=dict(bbox=[box], label=["active tb"]), prediction="", objects=objs, n_invalid=0)


def test_results_table_rows_per_set_task_and_source():
  diag = _diag(20, source="tbx11k") + _diag(10, source="nih")
  det = [_det(k, "phantom") for k in range(6)]
  evaluators = {"ext/diag": (diagnosis.Evaluator(None, [], task="diagnosis", eval_set="ext"), 0),
                "det": (detection.Evaluator(None, [], eval_set="phantom/test"), 0)}
  records = {"ext/diag": diag, "det": det}
  results = {}
  for name, (ev, _) in evaluators.items():
    results.update({f"{name}/{k}": v for k, v in ev.compute_metrics(records[name], **ev.metric_kw).items()})
  majority = {("diagnosis", DIAG): "tuberculosis"}
  out = table.results_table(evaluators, records, results, majority,
                            table_metrics_cfg={"det": ["ones/AP50"]}, n_boot=100)
  rows = out["rows"]
  diag_rows = [r for r in rows if r["set"] == "ext"]
  assert [(r["source"], r["metric"]) for r in diag_rows[:5]] == [
      ("pooled*", m) for m in ("accuracy", "auc", "sensitivity", "specificity", "ece")]
  assert {r["source"] for r in diag_rows} == {"pooled*", "nih", "tbx11k"}
  pooled = diag_rows[0]
  assert (pooled["n"], pooled["patients"]) == (30, 30) and pooled["model"] == pytest.approx(0.7)
  assert pooled["ci95_low"] <= 0.7 <= pooled["ci95_high"]
  assert pooled["trivial"] == pytest.approx(0.5)  # always 'tuberculosis': the TB half
  nih = next(r for r in diag_rows if r["source"] == "nih" and r["metric"] == "accuracy")
  assert (nih["n"], nih["model"]) == (10, results["ext/diag/by_source/nih/accuracy"])
  # Detection: the configured metric first, then the headline ones; one source, no pooled rows.
  assert [(r["metric"], r["source"]) for r in rows if r["set"] == "phantom/test"] == [
      ("ones/AP50", "phantom"), ("mean_loc/AP50", "phantom"), ("empty_correct", "phantom")]
  det_row = next(r for r in rows if r["metric"] == "mean_loc/AP50")
  assert det_row["model"] == pytest.approx(51 / 101) and det_row["trivial"] == 0.0  # recall 0.5
  assert len(out["notes"]) == 1 and "nih, tbx11k" in out["notes"][0]
  text = table.to_text(out)
  assert "diagnosis     accuracy" in text and "pooled*" in text
  assert f"{pooled['ci95_low']:.3f}, {pooled['ci95_high']:.3f}]" in text
  assert text.splitlines()[0].split() == ["eval", "set", "task", "metric", "source", "n", "patients",
                                          "model", "95%", "CI", "trivial"]
  md = table.to_markdown(out)
  assert md.startswith("| eval set | task |") and "| ext | diagnosis | accuracy | pooled\\* | 30 | 30 |" in md
  # Without the training answers only detection has a trivial value, and a note says so.
  out = table.results_table(evaluators, records, results, None, n_boot=10)
  assert all(math.isnan(r["trivial"]) for r in out["rows"] if r["task"] == "diagnosis")
  assert "no training answers" in out["notes"][-1]


def test_majority_answers_round_trip_json():
  majority = {("diagnosis", DIAG): "normal", ("diagnosis", None): "normal"}
  assert baselines.from_json(baselines.to_json(majority)) == majority


def test_bootstrap_time_on_demo_sized_records():
  """1000 resamples of 308 detection records (two score rules): seconds, not minutes."""
  recs = [_det(k, "phantom") for k in range(308)]
  sample = detection.Evaluator.sampler(recs)
  t0 = time.perf_counter()
  out = table.bootstrap(sample, recs, ["mean_loc/AP50", "ones/AP50"], n_boot=100)
  assert time.perf_counter() - t0 < 20  # ~1 s idle on the 2-core box (docs/EVALUATION.md)
  assert out[None]["mean_loc/AP50"][0] < 51 / 101 < out[None]["mean_loc/AP50"][1]
