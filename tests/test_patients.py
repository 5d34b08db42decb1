"""Patients shared by datasets, or by a run's training split and the evaluated split:
an error naming them, or with shared_patients='drop' left out and reported."""
import pytest
from PIL import Image

from big_vision_cxr import input_pipeline as ip
from big_vision_cxr.data import patients, phantom, splits


def manifest(folder, patient_ids, *, split="", stem="im"):
  """A manifest dataset config: one 32 px phantom image per entry of `patient_ids`."""
  folder.mkdir(parents=True)
  rows = ["image,patient_id,label,split"]
  for i, pid in enumerate(patient_ids):
    rec = phantom.generate(i, size=32)
    Image.fromarray(rec.image).save(folder / f"{stem}{i}.png")
    rows.append(f"{stem}{i}.png,{pid},{rec.label},{split}")
  (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
  return dict(source="manifest", path=str(folder / "manifest.csv"))


def config(datasets, **kw):
  return dict(datasets=datasets, tasks=("diagnosis",), **kw)


def patients_of(cfg, **kw):
  return {s: [(e.source, e.patient_id) for e in ip.curated_units(cfg, split=s, **kw)["diagnosis"]]
          for s in splits.SPLITS}


def test_one_patient_in_two_datasets_is_an_error_naming_it_and_both(tmp_path):
  cfg = config({"a": manifest(tmp_path / "a", ["a0", "a1", "P7", "P7"], split="train"),
                "b": manifest(tmp_path / "b", ["b0", "P7", "b1"], split="test")})
  msg = (r"patient 'P7' is in datasets 'a', 'b': a:im2 \(train\), a:im3 \(train\), b:im1 \(test\); "
         r"1 patients are shared by datasets in all\. patient ids are compared as strings: give each "
         r"dataset its own patient_id_prefix .* else set config.input.shared_patients='drop'")
  with pytest.raises(patients.SharedPatientsError, match=msg):
    ip.curated_units(cfg, split="train")
  with pytest.raises(patients.SharedPatientsError, match=msg):
    ip.patient_overlap(cfg)
  with pytest.raises(patients.SharedPatientsError, match=msg):
    next(ip.evaluation(cfg, task="diagnosis", split="test", batch_size=2))


def test_drop_leaves_the_patient_out_of_both_datasets_and_reports_it(tmp_path, caplog):
  datasets = {"a": manifest(tmp_path / "a", ["a0", "a1", "P7", "P7"], split="train"),
              "b": manifest(tmp_path / "b", ["b0", "P7", "b1"], split="test")}
  cfg = config(datasets, shared_patients="drop")
  with caplog.at_level("WARNING"):
    got = patients_of(cfg)
  assert got == {"train": [("a", "a0"), ("a", "a1")], "val": [], "test": [("b", "b0"), ("b", "b1")]}
  assert "left out 1 patients (3 images) shared by datasets or with training: ['P7']" in caplog.text
  report = ip.patient_overlap(cfg)
  assert report["dropped_patients"] == 1 and report["dropped_images"] == 3
  assert report["across_datasets"] == [dict(patient_id="P7", datasets=["a", "b"], images=[
      dict(dataset="a", image_id="im2", split="train"), dict(dataset="a", image_id="im3", split="train"),
      dict(dataset="b", image_id="im1", split="test")])]
  assert report["across_splits"] == [] and report["policy"] == "drop"
  prefixed = config({n: dict(d, patient_id_prefix=f"{n}:") for n, d in datasets.items()})
  assert ip.patient_overlap(prefixed)["dropped_patients"] == 0  # two different people
  assert ("b", "b:P7") in patients_of(prefixed)["test"]


def test_evaluating_a_run_on_patients_it_trained_on(tmp_path):
  """The NIH case: evaluated with other split settings, patients of training land in test."""
  ids = [f"n{i}" for i in range(40)]
  nih = {"nih": manifest(tmp_path / "nih", ids)}
  trained = config(nih, split_seed=0)
  evaluated = config(nih, split_seed=1, split_fractions=(0.5, 0.0, 0.5))
  seen = {p for p in ids if splits.assign(p, 0) == "train"}
  test = {p for p in ids if splits.assign(p, 1, (0.5, 0.0, 0.5)) == "test"}
  assert seen & test and test - seen
  with pytest.raises(patients.SharedPatientsError, match=r"patient 'n\d+' of the evaluated split "
                     r"'test' \(nih:im\d+ \(test\)\) is in the training split 'train' \(nih:im\d+ "
                     rf"\(train\)\); {len(seen & test)} evaluated patients were trained on in all"):
    next(ip.evaluation(evaluated, task="diagnosis", split="test", batch_size=4, train_config=trained))
  dropping = dict(evaluated, shared_patients="drop")
  gts = [g for _, gt in ip.evaluation(dropping, task="diagnosis", split="test", batch_size=4,
                                      train_config=trained) for g in gt]
  assert {g["patient_id"] for g in gts} == test - seen
  report = ip.patient_overlap(dropping, split="test", train_config=trained)
  assert report["dropped_patients"] == report["dropped_images"] == len(seen & test)
  assert [s["patient_id"] for s in report["across_splits"]] == sorted(seen & test)
  assert (report["split"], report["train_split"]) == ("test", "train")
  assert ip.patient_overlap(trained, split="test", train_config=trained)["dropped_patients"] == 0


def test_policy_and_train_config_are_checked(tmp_path):
  cfg = config({"a": manifest(tmp_path / "a", ["a0"])}, shared_patients="warn")
  with pytest.raises(patients.SharedPatientsError, match=r"shared_patients must be one of \('error', "
                                                         r"'drop'\), got 'warn'"):
    ip.patient_overlap(cfg)
  with pytest.raises(ip.InputError, match="train_config needs the evaluated split"):
    ip.patient_overlap(dict(cfg, shared_patients="error"), train_config=cfg)


def test_phantom_datasets_of_other_seeds_share_no_patient():
  cfg = config({"a": dict(source="phantom", n=40, size=32, seed=0),
                "b": dict(source="phantom", n=40, size=32, seed=1)})
  assert ip.patient_overlap(cfg)["dropped_patients"] == 0
  same = config({"a": cfg["datasets"]["a"], "b": dict(cfg["datasets"]["a"], size=48)})
  with pytest.raises(patients.SharedPatientsError, match="patient 'phantom-s0-p000000-0'"):
    ip.patient_overlap(same)
  report = ip.patient_overlap(dict(same, shared_patients="drop"))
  assert report["dropped_images"] == 80 and all(s["datasets"] == ["a", "b"]
                                                for s in report["across_datasets"])
