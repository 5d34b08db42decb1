"""The notebooks run end to end on CPU with tiny settings, so they cannot rot.

Parameters are injected papermill-style: a cell after the one tagged `parameters`.
"""
import os
import pathlib
import re
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_notebook(name, params, tmp_path, timeout=600):
  """Executes notebooks/NAME with `params` injected; returns the executed notebook."""
  nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ()))
  source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO)}})
  old = dict(os.environ)
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  nbformat.write(nb, tmp_path / name)  # kept for debugging a failure
  return nb


def _text(nb):
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _has_png(cell):
  return any("image/png" in o.get("data", {}) for o in cell.outputs)


@pytest.mark.slow
def test_finetune_notebook_trains_evaluates_and_draws(tmp_path):
  evals = {"diagnosis": dict(type="diagnosis", pred_kw=dict(max_decode_len=8), task="diagnosis",
                             split="test", batch_size=8, log_steps=0)}
  workdir = tmp_path / "workdir"
  nb = run_notebook("finetune_tpu.ipynb", dict(
      INSTALL=False, WORKDIR=str(workdir), VIS_TASKS=("diagnosis", "detection"),
      OVERRIDES={"total_steps": 2, "ckpt_steps": 2, "input.batch_size": 4,
                 "input.datasets": {"phantom": dict(source="phantom", n=24, size=64, difficulty=0.0, seed=0)},
                 "input.tasks": ("diagnosis", "detection"), "evals": evals,
                 "table_metrics": {"diagnosis": ("accuracy",)}}), tmp_path)
  assert (workdir / "checkpoints" / "2").is_dir()
  text = _text(nb)
  assert "step 2" in text and "diagnosis/accuracy" in text
  assert "predicted:" in text and "probability_tb" in text
  assert _has_png(nb.cells[-1])
  # It installs this repository from REPO (a checkout or a git URL), no placeholder to edit.
  source = "\n".join(c.source for c in nb.cells)
  assert "YOUR_ORG" not in source and 'REPO = "."' in source


@pytest.mark.slow
def test_inference_notebook_predicts_and_matches_transformers(tmp_path):
  from bench.predict_bench import random_assets
  random_assets(tmp_path, "demo")
  nb = run_notebook("inference.ipynb", dict(  # OUT left at its default
      CHECKPOINT=str(tmp_path / "model.npz"), CONFIG=None, MODEL_VARIANT="demo",
      VQVAE=str(tmp_path / "vqvae.npz"), TASKS=("diagnosis", "detection"),
      PROMPTS=("caption en",), EXPORT_HF=True), tmp_path)
  text = _text(nb)
  out = pathlib.Path(re.search(r"outputs in (.*)", text).group(1))
  try:
    assert REPO not in out.parents  # a temporary folder, never the repository
    assert not (REPO / "predictions").exists()  # the old default
    assert "predicted 3 image(s), 0 failed" in text
    assert sorted(p.name for p in out.glob("phantom_*")) == [
        f"phantom_{i}.{ext}" for i in range(3) for ext in ("json", "png")]
    assert "consistency" in text
    # The notebook asserts equality; here: on a detection answer, and a long one.
    assert "transformers:" in text and "prompt 'detect " in text
    assert int(re.search(r"same (\d+) greedy tokens", text).group(1)) >= 20
    assert (out / "hf_export" / "model.safetensors").is_file()
    assert any(_has_png(c) for c in nb.cells if c.cell_type == "code")
  finally:
    shutil.rmtree(out, ignore_errors=True)
