"""python -m big_vision_cxr.evaluate: a trained checkpoint scored on its evals and on external sets."""
import json
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from big_vision_cxr import config as config_lib
from big_vision_cxr import errors
from big_vision_cxr import evaluate
from big_vision_cxr import train
from big_vision_cxr.evaluators import common
from big_vision_cxr.models import paligemma as pg
from big_vision_cxr.pp import ops_text

REPO = pathlib.Path(__file__).resolve().parents[1]
EXTERNAL = '{"source": "phantom", "n": 12, "size": 64, "seed": 5}'


def _tiny_demo(datasets, tasks, split):
  """configs/cxr_mix.py:demo shrunk to a 1-layer model and 2 steps on `datasets`."""
  config = config_lib.load_config(f"{REPO / 'configs' / 'cxr_mix.py'}:demo")
  config.model.img = dict(image_size=32, patch_size=8, width=24, depth=1, mlp_dim=32, num_heads=2)
  config.model.llm = dict(width=32, depth=1, mlp_dim=48, num_heads=2, head_dim=16)
  config.model_init = ""
  config.input.datasets = datasets
  config.input.tasks = tasks
  config.input.pp_image = "decode|resize(32)|value_range(-1, 1)"
  config.input.batch_size = 4
  config.total_steps, config.ckpt_steps, config.log_training_steps = 2, 0, 1
  config.evals = {t: dict(common.TASK_EVALS[t], task=t, split=split, batch_size=32, log_steps=0)
                  for t in tasks}
  config.evals.detection.pred_kw.max_decode_len = 12
  return config


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
  """(workdir, the printed training output) of 2 steps on 48 phantom images."""
  workdir = tmp_path_factory.mktemp("phantom_run")
  config = _tiny_demo({"phantom": dict(source="phantom", n=48, size=64, seed=0)},
                      ("diagnosis", "detection"), "test")
  summary = train.train(config, workdir)
  return workdir, summary


def _rows(table, eval_set):
  return [r for r in table["rows"] if r["set"] == eval_set]


def test_evaluate_reproduces_the_training_table_and_scores_an_external_set(phantom_run, capsys):
  workdir, summary = phantom_run
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert (workdir / "final_metrics.md").read_text().startswith("| eval set |")
  assert evaluate.main(["--workdir", str(workdir), "--eval", f"ext={EXTERNAL}"]) == 0
  printed = capsys.readouterr().out
  assert "phantom/test" in printed and "ext " in printed and "diagnosis     accuracy" in printed
  out = workdir / "eval-2"
  result = json.loads((out / "results.json").read_text())  # strict JSON: undefined is null
  table = result["table"]
  # Stored with the results: which patients the run shared with its evaluated data (none here).
  assert result["shared_patients"] and all(
      r["dropped_patients"] == 0 and r["policy"] == "error"
      for reports in result["shared_patients"].values() for r in reports)
  # The training run's eval set: the same records, the same numbers, the same intervals.
  by_key = lambda rows: {(r["task"], r["metric"], r["source"]): r for r in rows}
  trained, again = by_key(final["table"]), by_key(_rows(table, "phantom/test"))
  assert trained.keys() == again.keys() and len(trained) == 8
  for key, row in trained.items():
    for field in ("model", "trivial", "ci95_low", "ci95_high", "n", "patients"):
      assert again[key][field] == pytest.approx(row[field], nan_ok=True), (key, field)
  assert trained[("diagnosis", "accuracy", "phantom")]["model"] == summary["eval"]["diagnosis/accuracy"]
  # The external set: all 12 images (every split of it), a row per headline metric.
  ext = _rows(table, "ext")
  assert {(r["task"], r["n"]) for r in ext} == {("diagnosis", 12), ("detection", 12)}
  assert [r["metric"] for r in ext if r["task"] == "diagnosis"] == [
      "accuracy", "auc", "sensitivity", "specificity", "ece"]
  for r in ext:
    assert r["source"] == "ext" and 1 <= r["patients"] <= 12
    if r["model"] is not None and r["ci95_low"] is not None:
      assert r["ci95_low"] <= r["model"] + 1e-9 and r["model"] <= r["ci95_high"] + 1e-9
  assert result["pp_image"] == "decode|resize(32)|value_range(-1, 1)"
  assert result["evals"]["ext/diagnosis"]["datasets"] == {"ext": json.loads(EXTERNAL)}
  names = {p.name for p in out.iterdir()}
  assert {"results.json", "results.md", "records", "training_loss.png", "roc_ext_diagnosis.png",
          "calibration_ext_diagnosis.png", "pr_ext_detection.png"} <= names
  assert len((out / "records" / "ext.diagnosis.jsonl").read_text().splitlines()) == 12
  assert "| ext | diagnosis | auc |" in (out / "results.md").read_text()


def test_config_evals_name_their_own_datasets_whole_or_a_split():
  tok = ops_text.default_tokenizer()
  cfg = pg.get_config("tiny")
  cfg.llm.vocab_size = tok.vocab_size
  ext = dict(source="phantom", n=20, size=48, seed=3)
  config = ml_collections.ConfigDict(dict(
      input=dict(datasets={"train_ph": dict(source="phantom", n=8, size=48)}, text_len=48,
                 pp_image="decode|resize(32)|value_range(-1, 1)"),
      evals=dict(
          whole=dict(common.TASK_EVALS["diagnosis"], task="diagnosis", datasets={"ext": ext}),
          part=dict(common.TASK_EVALS["diagnosis"], task="diagnosis", datasets={"ext": dict(ext, split="test")}),
          mixed=dict(common.TASK_EVALS["diagnosis"], task="diagnosis", split="train", set="both",
                     datasets={"ext": ext, "other": dict(source="phantom", n=8, size=48, seed=4)}))))
  evals = common.from_config(config, pg.Model(**cfg), tok, None, image_size=32)
  images = lambda ev: [g["image_id"] for _, gts in ev._batches() for g in gts]  # pylint: disable=protected-access
  whole, part, mixed = evals["whole"][0], evals["part"][0], evals["mixed"][0]
  assert sorted(images(whole)) == [f"phantom-s3-{i:07d}" for i in range(20)]
  assert whole.eval_set == "ext/all" and part.eval_set == "ext/test" and mixed.eval_set == "both"
  assert 0 < len(images(part)) < 20 and set(images(part)) < set(images(whole))
  sources = {g["source"] for _, gts in mixed._batches() for g in gts}  # pylint: disable=protected-access
  assert sources == {"ext", "other"}
  with pytest.raises(common.EvalError, match="needs a split|give the split"):
    common.from_config(ml_collections.ConfigDict(dict(input=config.input, evals=dict(
        x=dict(common.TASK_EVALS["diagnosis"], task="diagnosis")))), pg.Model(**cfg), tok, None)


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --workdir"),
    (["--workdir", "/nonexistent/run"], "not a training workdir"),
    (["--workdir", "W", "--eval", "nih"], "expected NAME=DATASET"),
    (["--workdir", "W", "--eval", "a.b=tbx11k:x"], "expected NAME=DATASET"),
    (["--workdir", "W", "--eval", "x=tbx11k:a", "--eval", "x=tbx11k:b"], "--eval x: given twice"),
    (["--workdir", "W", "--n_boot", "0"], "--n_boot must be positive"),
    (["--workdir", "W", "--shared_patients", "keep"], "invalid choice: 'keep'"),
    (["--workdir", "RUN", "--eval", "x={bad"], "--eval x: not valid JSON"),
    (["--workdir", "RUN", "--eval", 'x={"path": "a.csv"}'], "--eval x: a dataset config needs a 'source'"),
    (["--workdir", "RUN", "--eval", "x=nosuch:/data"], "--eval x: unknown source 'nosuch'"),
    (["--workdir", "RUN", "--eval", 'x={"source": "tbx11k", "path": "d", "split": 1}'], "split must be a string"),
    (["--workdir", "RUN", "--eval", 'x={"datasets": {"a.b": {"source": "tbx11k"}}}'], "dataset name 'a.b'"),
    (["--workdir", "RUN", "--eval", "x=/data/m.csv"], "expected a JSON dataset config or SOURCE:PATH"),
    (["--workdir", "RUN", "--tasks", "diagnosis,bogus"], "--tasks: unknown tasks ['bogus']"),
    (["--workdir", "RUN", "--eval", "x=manifest:/nonexistent/m.csv"], "/nonexistent/m.csv"),
    (["--workdir", "RUN", "--step", "7"], "7"),
    (["--workdir", "RUN", "--out", "FILE"], "is a file, not a folder"),
])
def test_bad_arguments_are_one_error_line(phantom_run, tmp_path, capsys, argv, message):
  workdir, _ = phantom_run
  (tmp_path / "file").write_text("x")
  subs = {"RUN": str(workdir), "FILE": str(tmp_path / "file")}
  argv = [subs.get(a, a) for a in argv]
  assert errors.cli_main(evaluate.main, argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
  assert not (workdir / "eval-2" / "records" / "x.diagnosis.jsonl").exists()


def test_the_module_reports_errors_without_a_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "big_vision_cxr.evaluate", "--workdir", str(tmp_path)],
                        capture_output=True, text=True, cwd=REPO, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"error: --workdir {tmp_path}: not a training workdir (no config.json)."


def test_external_validation_on_the_shared_data(tbx11k_dir, nih_dir, tmp_path, capsys):
  """Trained on TBX11K (TB only), scored on its val split, on NIH normals and on both."""
  config = _tiny_demo({"tbx11k": dict(source="tbx11k", path=str(tbx11k_dir))},
                      ("diagnosis", "detection"), "val")
  train.train(config, tmp_path / "run")
  capsys.readouterr()
  nih = f"nih_cxr14:{nih_dir / 'manifest.csv'}"
  both = json.dumps({"datasets": {
      "tbx11k": {"source": "tbx11k", "path": str(tbx11k_dir), "split": "val"},
      "nih": {"source": "manifest", "preset": "nih_cxr14", "path": str(nih_dir / "manifest.csv")}}})
  assert evaluate.main(["--workdir", str(tmp_path / "run"), "--eval", f"nih={nih}",
                        "--eval", f"external={both}", "--out", str(tmp_path / "ev")]) == 0
  printed = capsys.readouterr().out
  table = json.loads((tmp_path / "ev" / "results.json").read_text())["table"]
  n_nih = len((nih_dir / "manifest.csv").read_text().strip().splitlines()) - 1
  for eval_set in ("tbx11k/val", "nih", "external"):
    assert eval_set in printed and _rows(table, eval_set)
  val = {(r["task"], r["metric"]): r for r in _rows(table, "tbx11k/val")}
  assert val[("diagnosis", "accuracy")]["n"] == 100 and val[("diagnosis", "accuracy")]["source"] == "tbx11k"
  assert val[("diagnosis", "specificity")]["model"] is None  # TB only: no specificity
  nih_rows = {(r["task"], r["metric"]): r for r in _rows(table, "nih")}
  acc = nih_rows[("diagnosis", "accuracy")]
  assert acc["n"] == n_nih and 0 < acc["patients"] <= n_nih and acc["source"] == "nih"
  assert nih_rows[("diagnosis", "sensitivity")]["model"] is None  # normals only
  assert nih_rows[("detection", "mean_loc/AP50")]["model"] is None  # no lesions: AP undefined
  empty = nih_rows[("detection", "empty_correct")]  # ... but a box on a normal counts
  assert empty["n"] == n_nih and empty["model"] is not None
  assert acc["ci95_low"] <= acc["model"] <= acc["ci95_high"]
  # The mix: pooled rows say so, and each source has its own rows; sensitivity comes
  # from TBX11K only and specificity from NIH only.
  ext = _rows(table, "external")
  pooled = {r["metric"]: r for r in ext if r["task"] == "diagnosis" and r["source"] == "pooled*"}
  assert pooled["accuracy"]["n"] == 100 + n_nih and pooled["auc"]["model"] is not None
  per_source = {(r["source"], r["metric"]): r for r in ext if r["task"] == "diagnosis"}
  assert per_source[("tbx11k", "sensitivity")]["model"] == pooled["sensitivity"]["model"]
  assert per_source[("nih", "specificity")]["model"] == pooled["specificity"]["model"]
  assert per_source[("nih", "accuracy")]["n"] == n_nih
  assert {r["source"] for r in ext if r["task"] == "detection"} == {"pooled*", "tbx11k", "nih"}
  assert "external: rows marked pooled* pool the sources nih, tbx11k" in printed
  assert all(np.isfinite(r["ci95_low"]) for r in ext if r["model"] is not None and r["source"] != "pooled*"
             and r["metric"] in ("accuracy", "mean_loc/AP50") and r["n"] > 1)
