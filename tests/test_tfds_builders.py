"""TFDS cxr_tb: builds per source, reads back equal elsewhere, bad input counted in metadata."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
from big_vision_cxr.data import phantom, records, tfds_source  # pylint: disable=g-import-not-at-top
from tfds_builders import cxr_tb  # pylint: disable=g-import-not-at-top


def build(tmp_path, config, manual_dir=None):
  builder = cxr_tb.CxrTb(config=config, data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None))
  return builder


def examples(builder):
  sources = {s: builder.as_data_source(s) for s in sorted(builder.info.splits)}
  return {s: [src[i] for i in range(len(src))] for s, src in sources.items()}


def assert_same(a, b):
  assert type(a) is type(b) or isinstance(a, np.ndarray)
  if isinstance(a, dict):
    assert a.keys() == b.keys()
    for k in a:
      assert_same(a[k], b[k])
  else:
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def phantom_built(tmp_path_factory):
  return build(tmp_path_factory.mktemp("ph"), "phantom_small")


def test_phantom_build_reads_back_equal_elsewhere(phantom_built):
  again = tfds.builder_from_directory(phantom_built.data_dir)
  assert again.info.features.keys() == phantom_built.info.features.keys()
  ours, theirs = examples(phantom_built), examples(again)
  assert sum(len(v) for v in ours.values()) == 48 and ours.keys() == theirs.keys()
  for split in ours:
    assert len(ours[split]) == len(theirs[split])
    for x, y in zip(ours[split], theirs[split]):
      assert_same(x, y)
  assert again.info.metadata["skipped"]["count"] == 0 and again.info.metadata["records"] == 48


def test_phantom_examples_round_trip_to_records(phantom_built):
  recs = tfds_source.read(phantom_built.data_dir, stream=False)
  assert len(recs) == 48
  originals = {r.image_id: r for r in phantom.dataset(48, size=64)}
  patients = {}
  for rec in recs:
    orig = originals[rec.image_id]
    np.testing.assert_array_equal(rec.image, orig.image)
    np.testing.assert_array_equal(rec.objects.mask, orig.objects.mask)
    np.testing.assert_allclose(rec.objects.bbox, orig.objects.bbox, atol=1e-6)
    assert (rec.label, rec.objects.label, rec.objects.lung, rec.objects.zone, rec.objects.kind) == (
        orig.label, orig.objects.label, orig.objects.lung, orig.objects.zone, orig.objects.kind)
    assert rec.meta["findings"] == orig.meta["findings"]
    assert patients.setdefault(rec.patient_id, rec.split) == rec.split  # patient-level splits


@pytest.mark.slow
def test_real_tbx11k_builds_with_boxes_where_boxes_csv_says(tmp_path, tbx11k_dir):
  builder = build(tmp_path, "tbx11k", manual_dir=tbx11k_dir)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 150, "val": 100}
  meta = builder.info.metadata["skipped"]
  assert meta["count"] == 0 and meta["absent_count"] == 8400 - 250
  rows = list(csv.DictReader(open(tbx11k_dir / "boxes.csv")))
  want = {}
  for row in rows:
    want.setdefault(row["image"].split("/")[-1][:-4], []).append(
        (row["split"], [float(row[k]) for k in ("ymin_512", "xmin_512", "ymax_512", "xmax_512")]))
  n_boxes = 0
  for split, exs in examples(builder).items():
    for ex in exs:
      image_id = ex["image_id"].decode()
      assert ex["image"].shape == (512, 512, 1)
      boxes = np.asarray(ex["objects"]["bbox"], np.float32).reshape(-1, 4) * 512
      assert len(boxes) == len(want[image_id])  # counts equal to the XML
      assert boxes.min() >= 0 and boxes.max() <= 512
      for s, box in want[image_id]:
        assert s == split
        assert np.abs(boxes - box).max(axis=1).min() < 0.02
      n_boxes += len(boxes)
  assert n_boxes == 390


def test_nih_normals_build_through_the_manifest(tmp_path, nih_dir):
  manual = tmp_path / "nih"
  manual.mkdir()
  rows = list(csv.DictReader(open(nih_dir / "manifest.csv")))[:5]
  (manual / "images").mkdir()
  for row in rows:
    shutil.copy(nih_dir / row["image"], manual / row["image"])
  with open(manual / "manifest.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=rows[0].keys())
    w.writeheader()
    w.writerows(rows)
  builder = build(tmp_path, "nih_cxr14", manual_dir=manual)
  exs = [e for split in examples(builder).values() for e in split]
  assert len(exs) == 5 and {int(e["label"]) for e in exs} == {records.LABELS.index("normal")}
  assert all(e["image"].shape == (1024, 1024, 1) and len(e["objects"]["label"]) == 0 for e in exs)


def test_bad_inputs_are_skipped_named_and_counted(tmp_path):
  from test_data_images import write_dicom  # pylint: disable=import-outside-toplevel
  manual = tmp_path / "m"
  manual.mkdir()
  Image.fromarray(np.full((32, 32), 100, np.uint8)).save(manual / "good.png")
  (manual / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n-garbage-")
  write_dicom(manual / "nopix.dcm", np.zeros((8, 8), np.uint16), pixel_data=False)
  rows = [dict(image="good.png", patient_id="1", label="normal"),
          dict(image="corrupt.png", patient_id="2", label="normal"),
          dict(image="nopix.dcm", patient_id="3", label="normal"),
          dict(image="gone.png", patient_id="4", label="normal"),
          dict(image="good.png", patient_id="5", label="tb", image_id="g5",
               boxes=json.dumps([{"label": "active tb", "bbox": [0, 0, 40, 10]}]))]
  with open(manual / "manifest.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["image", "patient_id", "label", "image_id", "boxes"])
    w.writeheader()
    w.writerows(rows)
  builder = build(tmp_path, "manifest", manual_dir=manual)
  assert sum(i.num_examples for i in builder.info.splits.values()) == 1
  skipped = tfds.builder_from_directory(builder.data_dir).info.metadata["skipped"]
  assert skipped["count"] == 4
  reasons = " | ".join(i["reason"] for i in skipped["items"])
  for name in ("corrupt.png", "nopix.dcm", "gone.png", "outside the 32x32 image"):
    assert name in reasons


def test_build_cli_and_pipeline_source(phantom_built, tmp_path, capsys):
  from tfds_builders import build as build_cli  # pylint: disable=import-outside-toplevel
  from big_vision_cxr import input_pipeline  # pylint: disable=import-outside-toplevel
  build_cli.main(["--config", "phantom_small", "--data_dir", str(tmp_path)])
  assert "train=39, val=5, test=4; skipped 0" in capsys.readouterr().out
  cfg = dict(datasets={"t": dict(source="tfds", name=str(phantom_built.data_dir))}, tasks=("diagnosis",))
  units = input_pipeline.curated_units(cfg, split="val")
  assert len(units["diagnosis"]) == phantom_built.info.splits["val"].num_examples
  assert {e.source for e in units["diagnosis"]} == {"t"}  # the dataset's name, not the stored one


def test_build_cli_says_a_partial_copy_is_fine(tmp_path, capsys):
  from test_data_readers import fake_tbx11k  # pylint: disable=import-outside-toplevel
  code, out, errs = run_build(capsys, "--config", "tbx11k", "--manual_dir", str(fake_tbx11k(tmp_path)),
                              "--data_dir", str(tmp_path / "tfds"))
  assert code == 0 and not errs
  assert ("train=3; skipped 3; 1 images the source lists are not in this copy (a partial copy is "
          "fine: only the images present are built)") in out


def test_bad_tbx11k_files_are_counted_in_metadata(tmp_path):
  from test_data_readers import fake_tbx11k  # pylint: disable=import-outside-toplevel
  builder = build(tmp_path, "tbx11k", manual_dir=fake_tbx11k(tmp_path))
  assert builder.info.splits["train"].num_examples == 3
  skipped = builder.info.metadata["skipped"]
  assert skipped["count"] == 3 and skipped["absent_count"] == 1
  assert sorted(i["path"] for i in skipped["items"]) == [
      "imgs/tb/corrupt.png", "imgs/tb/noxml.png", "imgs/tb/outside.png"]


def run_build(capsys, *argv):
  """(exit code, stdout, the stderr lines that start with 'error:') of the build CLI."""
  from tfds_builders import build as build_cli  # pylint: disable=import-outside-toplevel
  code = build_cli.main(list(argv))
  out, err = capsys.readouterr()
  assert "Traceback" not in err
  return code, out, [l for l in err.splitlines() if l.startswith("error:")]


def manifest_dir(tmp_path, text, encoding="utf-8"):
  manual = tmp_path / "m"
  manual.mkdir()
  for name in ("a.png", "b.png"):
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(manual / name)
  (manual / "manifest.csv").write_text(text, encoding=encoding)
  return manual


def test_build_cli_bom_manifest_yields_its_rows(tmp_path, capsys):
  manual = manifest_dir(tmp_path, "image,patient_id,label\na.png,p1,normal\nb.png,p2,tb\n",
                        encoding="utf-8-sig")
  assert (manual / "manifest.csv").read_bytes().startswith(b"\xef\xbb\xbf")
  code, out, errs = run_build(capsys, "--config", "manifest", "--manual_dir", str(manual),
                              "--data_dir", str(tmp_path / "tfds"))
  assert code == 0 and not errs and "skipped 0" in out
  built = tfds.builder_from_directory(str(next((tmp_path / "tfds").glob("cxr_tb/manifest/*"))))
  assert sum(i.num_examples for i in built.info.splits.values()) == 2


def test_build_cli_manifest_missing_patient_id_is_one_error_line(tmp_path, capsys):
  manual = manifest_dir(tmp_path, "image,label\na.png,normal\nb.png,tb\n")
  code, out, errs = run_build(capsys, "--config", "manifest", "--manual_dir", str(manual),
                              "--data_dir", str(tmp_path / "tfds"))
  assert code == 2 and len(errs) == 1 and "built" not in out
  assert "manifest.csv: no usable rows: 2 skipped, first: " in errs[0]
  assert "missing column 'patient_id'" in errs[0]
  assert not list((tmp_path / "tfds").glob("cxr_tb/manifest/*"))  # nothing left as if built


def test_build_cli_header_only_manifest_is_one_error_line(tmp_path, capsys):
  manual = manifest_dir(tmp_path, "image,patient_id,label\n")
  code, _, errs = run_build(capsys, "--config", "manifest", "--manual_dir", str(manual),
                            "--data_dir", str(tmp_path / "tfds"))
  assert code == 2 and len(errs) == 1 and "manifest.csv: no rows" in errs[0]


def test_build_cli_tbx11k_all_absent_is_one_error_line(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = tmp_path / "TBX11K"
  for d in ("lists", "imgs/tb", "imgs/health"):
    (root / d).mkdir(parents=True)
  (root / "lists/TBX11K_train.txt").write_text("tb/tb0001.png\nhealth/h0001.png\n")
  (root / "lists/TBX11K_val.txt").write_text("health/h0002.png\n")
  proc = subprocess.run([sys.executable, "-m", "tfds_builders.build", "--config", "tbx11k",
                         "--manual_dir", str(tmp_path), "--data_dir", str(tmp_path / "tfds")],
                        capture_output=True, text=True, cwd=cxr_tb.__file__.rsplit("/", 2)[0],
                        check=False)
  errs = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errs) == 1 and "Traceback" not in proc.stderr
  assert "split 'train' has no usable image: of the 2 in TBX11K_train.txt" in errs[0]
  assert "2 absent (first imgs/tb/tb0001.png)" in errs[0]


def test_build_cli_duplicate_image_id_fails_before_any_image_is_read(tmp_path, capsys, monkeypatch):
  from big_vision_cxr.data import images  # pylint: disable=import-outside-toplevel
  manual = manifest_dir(tmp_path, "image,patient_id,label\na.png,p1,normal\nb.png,p2,tb\n"
                                  "a.dcm,p3,normal\n")
  read = []
  monkeypatch.setattr(images, "read_image", lambda *a, **k: read.append(a))
  code, _, errs = run_build(capsys, "--config", "manifest", "--manual_dir", str(manual),
                            "--data_dir", str(tmp_path / "tfds"))
  assert code == 2 and len(errs) == 1 and not read
  assert "manifest.csv:4: image_id 'a' is also line 2's" in errs[0]


def test_duplicate_keys_fail_before_any_example_is_written(tmp_path, monkeypatch):
  recs = phantom.dataset(3, size=32)
  recs[2].image_id = recs[0].image_id
  monkeypatch.setattr(cxr_tb.CxrTb, "_read", lambda self, dl: (recs, cxr_tb.images.Skips("t")))
  written = []
  monkeypatch.setattr(cxr_tb, "record_to_example", lambda rec: written.append(rec))
  with pytest.raises(cxr_tb.BuildError, match=rf"two examples of key 'phantom/{recs[0].image_id}'"):
    build(tmp_path, "manifest", manual_dir=tmp_path)
  assert not written


def test_build_cli_dicom_ds_bad_fields_are_skipped_naming_file_and_field(tmp_path, capsys):
  from test_data_images import write_dicom_with  # pylint: disable=import-outside-toplevel
  manual = manifest_dir(tmp_path, "")
  ramp = (np.arange(64 * 32).reshape(64, 32) % 4096).astype(np.uint16)
  fields = ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept")
  rows = ["image,patient_id,label", "a.png,p0,normal"]
  for k, field in enumerate(fields):
    write_dicom_with(manual / f"bad_{field}.dcm", ramp, field, "abc")
    rows.append(f"bad_{field}.dcm,p{k + 1},normal")
  write_dicom_with(manual / "good.dcm", ramp, "WindowCenter", "2048")
  rows.append("good.dcm,p9,normal")
  (manual / "manifest.csv").write_text("\n".join(rows) + "\n")
  code, out, errs = run_build(capsys, "--config", "manifest", "--manual_dir", str(manual),
                              "--data_dir", str(tmp_path / "tfds"))
  assert code == 0 and not errs and "skipped 4" in out
  built = tfds.builder_from_directory(str(next((tmp_path / "tfds").glob("cxr_tb/manifest/*"))))
  assert sum(i.num_examples for i in built.info.splits.values()) == 2
  reasons = {i["path"].rsplit(":", 1)[1]: i["reason"] for i in built.info.metadata["skipped"]["items"]}
  for k, field in enumerate(fields):
    assert f"bad_{field}.dcm: DICOM {field} 'abc' is not a finite number" in reasons[str(k + 3)]


def test_build_cli_needs_an_existing_manual_dir(tmp_path, capsys):
  code, _, errs = run_build(capsys, "--config", "tbx11k")
  assert code == 2 and errs == ["error: python -m tfds_builders.build: --config tbx11k needs "
                                "--manual_dir (see --help)"]
  code, _, errs = run_build(capsys, "--config", "manifest", "--manual_dir", str(tmp_path / "none"))
  assert code == 2 and len(errs) == 1 and "none: no such folder" in errs[0]


def test_tfds_source_missing_dataset_or_split_is_a_clear_error(phantom_built, tmp_path):
  with pytest.raises(tfds_source.TfdsSourceError, match="'cxr_tb/phantom' .* is not built"):
    tfds_source.read("cxr_tb/phantom", data_dir=str(tmp_path))
  with pytest.raises(tfds_source.TfdsSourceError, match=r"no split 'tset'; it has \['test', 'train', 'val'\]"):
    tfds_source.read(phantom_built.data_dir, split="tset")


def test_empty_build_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setattr(cxr_tb.CxrTb, "_read", lambda self, dl: ([], cxr_tb.images.Skips("t")))
  with pytest.raises(cxr_tb.BuildError, match="cxr_tb/manifest: no records to build"):
    build(tmp_path, "manifest", manual_dir=tmp_path)
