"""The settings a model was trained with travel with its checkpoints; the programs stand side by side."""
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from big_vision_cxr import config as config_lib
from big_vision_cxr import inference
from big_vision_cxr import predict
from big_vision_cxr import run_settings
from big_vision_cxr import train
from big_vision_cxr.data import phantom

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "big_vision_cxr"


def _imported_after(statement):
  """The big_vision_cxr/tfds_builders modules a fresh interpreter holds after `statement`."""
  code = (f"import sys; {statement}; print(','.join(sorted(m for m in sys.modules "
          f"if m.startswith(('big_vision_cxr', 'tfds_builders')))))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  return set(out.stdout.strip().split(","))


@pytest.mark.parametrize("module", ["predict", "serving", "convert", "inference"])
def test_running_a_model_never_imports_the_trainer(module):
  loaded = _imported_after(f"import big_vision_cxr.{module}")
  assert f"big_vision_cxr.{module}" in loaded
  assert "big_vision_cxr.train" not in loaded


def test_the_package_never_imports_tfds_builders():
  modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts)
                   for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
  loaded = _imported_after("; ".join(f"import {m}" for m in modules))
  assert {m for m in loaded if m.startswith("tfds_builders")} == set()
  imports = re.compile(r"^\s*(from|import)\s+tfds_builders\b", re.M)
  for path in PACKAGE.rglob("*.py"):  # not even lazily, inside a function
    assert not imports.search(path.read_text()), path


def _manifest_dataset(folder, n=24):
  """Phantom radiographs whose lesions are labelled 'active tb' / 'uncertain tb' (not the phantom's names)."""
  rows = []
  for rec in phantom.dataset(n, seed=3, size=64):
    path = folder / f"{rec.image_id}.png"
    Image.fromarray(rec.image).save(path)
    names = {"latent tb": "uncertain tb"}
    boxes = [dict(label=names.get(l, l), bbox=[float(v) for v in b])
             for b, l in zip(rec.objects.bbox, rec.objects.label)]
    rows.append(dict(image=path.name, patient_id=rec.patient_id, label=rec.label,
                     boxes=json.dumps(boxes)))
  with open(folder / "manifest.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return folder / "manifest.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """2 steps of configs/cxr_mix.py:demo (shrunk) on the manifest dataset; the workdir."""
  folder = tmp_path_factory.mktemp("run")
  (folder / "data").mkdir()
  manifest = _manifest_dataset(folder / "data")
  config = config_lib.load_config(f"{REPO / 'configs' / 'cxr_mix.py'}:demo")
  config.model.img = dict(image_size=32, patch_size=8, width=24, depth=1, mlp_dim=32, num_heads=2)
  config.model.llm = dict(width=32, depth=1, mlp_dim=48, num_heads=2, head_dim=16)
  config.model_init = ""
  config.input.datasets = {"hospital": dict(source="manifest", path=str(manifest),
                                            box_units="normalized")}
  config.input.pp_image = "decode|resize(32, antialias=True)|value_range(-1, 1)"
  config.input.batch_size = 4
  config.total_steps, config.ckpt_steps, config.log_training_steps = 2, 0, 1
  config.evals = {}
  train.train(config, folder / "workdir")
  return folder / "workdir"


def test_training_stores_its_resolved_settings(trained):
  config, resolved = run_settings.read(trained)
  assert resolved["class_names"] == ["active tb", "uncertain tb"]
  assert resolved["prompts"]["detection"] == "detect active tb ; uncertain tb"
  assert resolved["pp_image"] == "decode|resize(32, antialias=True)|value_range(-1, 1)"
  assert resolved["variant"] == "demo" and resolved["image_size"] == 32
  assert resolved["vqvae"]["sha256"] == run_settings.sha256(REPO / "big_vision_cxr" / "assets" /
                                                            "vqvae_cxr_demo.npz")
  assert config.model.llm.depth == 1 and config.input.batch_size == 4


def test_predict_prompts_exactly_what_training_used_without_a_config(trained, tmp_path):
  image = tmp_path / "in" / "x.png"
  image.parent.mkdir()
  Image.fromarray(phantom.generate(5, size=80).image).save(image)
  argv = ["--checkpoint", str(trained), "--input", str(image), "--out", str(tmp_path / "out"),
          "--tasks", "detection,segmentation", "--max_decode_len", "4", "--no_overlay",
          "--no_progress"]
  assert predict.main(argv) == 0
  result = json.loads((tmp_path / "out" / "x.json").read_text())
  assert sorted(result["generated"]) == ["detect active tb ; uncertain tb",
                                         "segment active tb ; uncertain tb"]
  assert result["model"]["pp_image"] == "decode|resize(32, antialias=True)|value_range(-1, 1)"
  loaded = inference.load(trained, with_vqvae=False)
  np.testing.assert_array_equal(  # the antialiased resize training used, not the default
      loaded.model_input(phantom.generate(5, size=80).image),
      inference.ops_image.model_input_fn(loaded.pp_image, 32)(phantom.generate(5, size=80).image))


def test_contradicting_the_stored_settings_is_an_error_naming_both(trained, tmp_path, capsys):
  base = ["--checkpoint", str(trained), "--input", str(tmp_path), "--out", str(tmp_path / "o")]
  Image.fromarray(phantom.generate(1, size=64).image).save(tmp_path / "a.png")
  assert predict.main(base + ["--classes", "active tb;latent tb"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "['active tb', 'uncertain tb']" in err
  assert "['active tb', 'latent tb']" in err
  other = tmp_path / "other_vqvae.npz"
  other.write_bytes(b"not the same file")
  assert predict.main(base + ["--vqvae", str(other)]) == 2
  err = capsys.readouterr().err
  assert f"vqvae {other}" in err and "vqvae_cxr_demo.npz" in err
  config, _ = run_settings.read(trained)
  assert inference.load(trained, config=config, with_vqvae=False).class_names == (
      "active tb", "uncertain tb")  # the run's own config agrees with itself
  config.input.pp_image = "decode|resize(32)|value_range(-1, 1)"
  with pytest.raises(run_settings.SettingsError, match=r"config.input.pp_image: .*antialias=True"):
    inference.load(trained, config=config)
  demo = config_lib.load_config(f"{REPO / 'configs' / 'cxr_mix.py'}:demo")
  with pytest.raises(run_settings.SettingsError, match=r"config.model: .*'depth': 1"):
    inference.load(trained, config=demo)


def test_resuming_with_other_class_names_is_refused(trained, tmp_path):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  config, _ = run_settings.read(workdir)
  config.input.class_names = ("active tb",)
  config.total_steps = 3
  with pytest.raises(run_settings.SettingsError, match=r"resuming: class_names.*'uncertain tb'"):
    train.train(config, workdir)


def test_hf_export_of_a_workdir_records_the_training_data_and_settings(trained, tmp_path):
  from big_vision_cxr import serving  # pylint: disable=g-import-not-at-top
  assert serving.main(["--checkpoint", str(trained), "--out", str(tmp_path / "hf")]) == 0
  provenance = json.loads((tmp_path / "hf" / "big_vision_cxr_provenance.json").read_text())
  assert provenance["class_names"] == ["active tb", "uncertain tb"]
  datasets = provenance["training_config"]["input"]["datasets"]
  assert list(datasets) == ["hospital"] and datasets["hospital"]["source"] == "manifest"
  assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o644
