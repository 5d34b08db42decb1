"""Source readers: real TBX11K boxes vs boxes.csv, NIH through the manifest, bad input, splits."""
import collections
import csv
import json

import numpy as np
import pytest
from PIL import Image

from big_vision_cxr.data import images, manifest, phantom, splits, tbx11k


def test_tbx11k_boxes_match_boxes_csv_and_xml(tbx11k_dir):
  recs, skips = tbx11k.read(tbx11k_dir, load_images=False)
  assert len(recs) == 250 and len(skips) == 0
  assert collections.Counter(r.split for r in recs) == {"train": 150, "val": 100}
  assert len(skips.absent) == 8400 - 250  # listed in TBX11K_{train,val} but not staged
  by_id = {r.image_id: r for r in recs}
  rows = list(csv.DictReader(open(tbx11k_dir / "boxes.csv")))
  assert sum(len(r.objects) for r in recs) == len(rows) == 390
  per_image = collections.Counter(row["image"].split("/")[-1][:-4] for row in rows)
  for row in rows:
    rec = by_id[row["image"].split("/")[-1][:-4]]
    assert rec.split == row["split"]
    assert len(rec.objects) == per_image[rec.image_id]  # counts equal to the XML
    want = np.array([float(row[k]) for k in ("ymin_512", "xmin_512", "ymax_512", "xmax_512")])
    got = rec.objects.bbox * 512
    assert np.abs(got - want).max(axis=1).min() < 0.01  # within 0.01 px on the 512 PNG
    name = tbx11k.CLASS_MAP[row["label"]]
    assert name in rec.objects.label
  for rec in recs:
    assert rec.label == "tb" and rec.objects.bbox.min() >= 0 and rec.objects.bbox.max() <= 1
  official = {l.strip().split("/")[1][:-4] for l in open(tbx11k_dir / "TBX11K/lists/TBX11K_val.txt")}
  assert {r.image_id for r in recs if r.split == "val"} <= official


def test_tbx11k_images_are_512_grey(tbx11k_dir):
  recs, _ = tbx11k.read(tbx11k_dir, splits=("val",))
  assert len(recs) == 100
  assert all(r.image.shape == (512, 512) and r.image.dtype == np.uint8 for r in recs)


def _voc_xml(width, height, boxes):
  objs = "".join(
      f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
      f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for name, x0, y0, x1, y1 in boxes)
  return f"<annotation><size><width>{width}</width><height>{height}</height></size>{objs}</annotation>"


def fake_tbx11k(tmp_path):
  """A TBX11K-layout folder of phantom PNGs: 2 good TB, 1 healthy, 3 bad, 1 listed but absent."""
  root = tmp_path / "TBX11K"
  for d in ("lists", "imgs/tb", "imgs/health", "annotations/xml"):
    (root / d).mkdir(parents=True)
  for i, stem in enumerate(["tb0001", "tb0002", "outside", "noxml"]):
    Image.fromarray(phantom.generate(i, size=64).image).save(root / f"imgs/tb/{stem}.png")
  xml = root / "annotations/xml"
  (xml / "tb0001.xml").write_text(_voc_xml(2000, 1000, [("ActiveTuberculosis", 200, 100, 600, 400)]))
  (xml / "tb0002.xml").write_text(_voc_xml(1000, 1000, [("ObsoletePulmonaryTuberculosis", 100, 100, 300, 200),
                                                        ("ActiveTuberculosis", 500, 50, 900, 450)]))
  (xml / "outside.xml").write_text(_voc_xml(100, 100, [("ActiveTuberculosis", 10, 10, 150, 50)]))
  (root / "imgs/tb/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  (xml / "corrupt.xml").write_text(_voc_xml(100, 100, [("ActiveTuberculosis", 10, 10, 50, 50)]))
  Image.fromarray(np.full((64, 64), 90, np.uint8)).save(root / "imgs/health/h1.png")
  names = ["tb/tb0001.png", "tb/tb0002.png", "tb/outside.png", "tb/corrupt.png", "tb/noxml.png",
           "health/h1.png", "tb/absent.png"]
  (root / "lists/TBX11K_train.txt").write_text("\n".join(names) + "\n")
  (root / "lists/TBX11K_val.txt").write_text("")
  return tmp_path


def test_tbx11k_layout_boxes_and_bad_input(tmp_path, caplog):
  with caplog.at_level("INFO"):
    recs, skips = tbx11k.read(fake_tbx11k(tmp_path))
  assert "holds 6 of the 7 images its lists name: a partial copy, fine; the other 1 are left out" in caplog.text
  recs = {r.image_id: r for r in recs}
  assert sorted(recs) == ["h1", "tb0001", "tb0002"]
  assert recs["h1"].label == "normal" and len(recs["h1"].objects) == 0
  np.testing.assert_allclose(recs["tb0001"].objects.bbox, [[0.1, 0.1, 0.4, 0.3]])  # / XML size
  assert recs["tb0002"].objects.label == ["latent tb", "active tb"]
  reasons = dict(skips.items)
  assert len(skips) == 3 and skips.absent == ["imgs/tb/absent.png"]
  assert "outside.xml" in reasons["imgs/tb/outside.png"] and "outside" in reasons["imgs/tb/outside.png"]
  assert "corrupt.png" in reasons["imgs/tb/corrupt.png"]
  assert "annotation missing" in reasons["imgs/tb/noxml.png"]
  with pytest.raises(tbx11k.TBX11KError, match="outside.xml"):
    tbx11k.read(tmp_path, on_error="raise")


def test_nih_normals_through_the_manifest(nih_dir):
  recs, skips = manifest.read(nih_dir / "manifest.csv", **manifest.NIH_CXR14, load_images=False)
  assert len(recs) == 117 and len(skips) == 0
  assert {r.label for r in recs} == {"normal"} and len({r.patient_id for r in recs}) == 117
  few, _ = manifest.read(nih_dir / "manifest.csv", **manifest.NIH_CXR14)
  assert few[0].image.shape == (1024, 1024) and few[0].source == "nih_cxr14"


def test_manifest_masks_boxes_qa_and_bad_rows(tmp_path):
  img = np.zeros((40, 50), np.uint8)
  Image.fromarray(img).save(tmp_path / "a.png")
  m = np.zeros((40, 50), np.uint8)
  m[2:6, 3:9] = 255
  m[20:30, 30:40] = 255  # two components -> two objects
  Image.fromarray(m).save(tmp_path / "a_mask.png")
  rows = [
      dict(image="a.png", patient_id="p1", label="tb", masks=[{"label": "active tb", "path": "a_mask.png"}],
           qa=[{"question": "is there a cavity?", "answer": "No", "type": "closed"}], report="Old TB."),
      dict(image="a.png", patient_id="p2", label="tb", image_id="a2",
           boxes=[{"label": "latent tb", "bbox": [4, 5, 20, 25], "lung": "left"}]),
      dict(image="missing.png", patient_id="p3", label="normal"),
      dict(image="../../etc/passwd", patient_id="p4", label="normal"),
      dict(image="a.png", patient_id="p5", label="pneumonia", image_id="a5"),
      dict(image="a.png", patient_id="p6", label="tb", image_id="a6",
           boxes=[{"label": "active tb", "bbox": [0, 0, 60, 10]}]),
  ]
  path = tmp_path / "m.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
  recs, skips = manifest.read(path)
  assert [r.patient_id for r in recs] == ["p1", "p2"]
  a, b = recs
  assert len(a.objects) == 2 and a.objects.mask.shape == (2, 40, 50)
  np.testing.assert_allclose(a.objects.bbox[0], [2 / 40, 3 / 50, 6 / 40, 9 / 50])
  assert a.qa == [dict(question="is there a cavity?", answer="No", type="closed")] and a.report == "Old TB."
  np.testing.assert_allclose(b.objects.bbox[0], [4 / 40, 5 / 50, 20 / 40, 25 / 50], rtol=1e-6)
  assert b.objects.lung == ["left"] and b.image_id == "a2"
  reasons = [r for _, r in skips.items]
  assert len(skips) == 5
  assert "not found" in reasons[0] and "missing.png" in reasons[0]
  assert "escapes the dataset root" in reasons[1]
  assert "'pneumonia'" in reasons[2]
  assert "outside the 50x40 image" in reasons[3]
  assert "invalid JSON" in reasons[4] and ":7" in skips.items[4][0]
  with pytest.raises(images.DataPathError, match="missing.png"):
    manifest.read(path, on_error="raise")


def test_patient_splits_deterministic_disjoint_and_conflicts():
  recs = phantom.dataset(60, size=32)
  a = splits.apply(phantom.dataset(60, size=32), seed=5)
  b = splits.apply(list(reversed(recs)), seed=5)
  assert {r.image_id: r.split for r in a} == {r.image_id: r.split for r in b}
  splits.check_disjoint(a)
  by_patient = collections.defaultdict(set)
  for r in a:
    by_patient[r.patient_id].add(r.split)
  assert all(len(s) == 1 for s in by_patient.values())
  counts = collections.Counter(splits.assign(f"p{i}", 0) for i in range(20000))
  for split, frac in zip(splits.SPLITS, splits.DEFAULT_FRACTIONS):
    assert abs(counts[split] / 20000 - frac) < 0.015
  bad = phantom.dataset(2, size=32)
  bad[1].patient_id = bad[0].patient_id
  bad[0].split, bad[1].split = "train", "val"
  with pytest.raises(splits.SplitError, match=bad[0].patient_id):
    splits.apply(bad)


def test_tbx11k_split_with_all_images_absent_is_an_error_saying_why(tmp_path):
  root = fake_tbx11k(tmp_path) / "TBX11K"
  (root / "lists/TBX11K_val.txt").write_text("tb/gone1.png\nhealth/gone2.png\nextra/x/n1.png\n")
  with pytest.raises(tbx11k.TBX11KError, match=r"split 'val' has no usable image: of the 3 in "
                     r"TBX11K_val.txt, 1 are outside categories .*, 2 absent \(first imgs/tb/gone1.png\), "
                     r"0 skipped"):
    tbx11k.read(tmp_path)


def test_tbx11k_split_with_all_images_skipped_names_the_first_reason(tmp_path):
  root = fake_tbx11k(tmp_path) / "TBX11K"
  (root / "imgs/health/bad.png").write_bytes(b"not a png")
  (root / "lists/TBX11K_val.txt").write_text("health/bad.png\n")
  with pytest.raises(tbx11k.TBX11KError, match=r"split 'val' .* 0 absent, 1 skipped "
                                               r"\(first imgs/health/bad.png: .*bad.png"):
    tbx11k.read(tmp_path)


def test_tbx11k_lists_naming_no_image_are_an_error(tmp_path):
  root = fake_tbx11k(tmp_path) / "TBX11K"
  (root / "lists/TBX11K_train.txt").write_text("")
  with pytest.raises(tbx11k.TBX11KError, match=r"the lists TBX11K_\{train,val\}.txt name no image"):
    tbx11k.read(tmp_path)
  with pytest.raises(tbx11k.TBX11KError, match=r"unknown categories \['healthy'\]"):
    tbx11k.read(tmp_path, categories=("healthy",))


def test_tbx11k_image_listed_twice_is_an_error_before_any_image_is_read(tmp_path, monkeypatch):
  root = fake_tbx11k(tmp_path) / "TBX11K"
  (root / "lists/TBX11K_val.txt").write_text("health/h1.png\n")
  monkeypatch.setattr(images, "read_image", lambda *a, **k: pytest.fail("read an image"))
  with pytest.raises(tbx11k.TBX11KError, match=r"image id 'h1' is given twice: train:health/h1.png "
                                               r"and val:health/h1.png"):
    tbx11k.read(tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_tbx11k_non_finite_xml_number_is_skipped_naming_the_xml(tmp_path, value):
  root = fake_tbx11k(tmp_path) / "TBX11K"
  (root / "annotations/xml/tb0001.xml").write_text(
      _voc_xml(2000, 1000, [("ActiveTuberculosis", 200, 100, value, 400)]))
  recs, skips = tbx11k.read(tmp_path)
  assert "tb0001" not in {r.image_id for r in recs}
  assert "tb0001.xml: a non-finite number" in dict(skips.items)["imgs/tb/tb0001.png"]
