"""The generic VOC source: both layouts, class map, label rule, patient ids, XML safety;
the TBX11K subset rearranged as VOC gives the TBX11K reader's boxes."""
import collections
import pathlib

import numpy as np
import pytest
from PIL import Image

from big_vision_cxr import input_pipeline as ip
from big_vision_cxr.data import phantom, tbx11k, voc
from test_data_readers import _voc_xml  # pylint: disable=g-bad-import-order

CLASS_MAP = {"ActiveTuberculosis": "active tb", "ObsoletePulmonaryTuberculosis": "latent tb"}


def voc_tree(root, layout="images"):
  """A VOC tree of 64 px phantom images, 4 images of 3 patients (file names PATIENT_FOLLOWUP):
  00001_000 two TB boxes (train), 00001_001 no XML (train), 00002_000 an XML without
  objects (val), 00003_000 one 'Nodule' box, a class outside CLASS_MAP (val)."""
  root = pathlib.Path(root)
  xmls = {"00001_000": _voc_xml(200, 100, [("ActiveTuberculosis", 20, 10, 60, 40),
                                           ("ObsoletePulmonaryTuberculosis", 120, 50, 180, 90)]),
          "00002_000": _voc_xml(200, 100, []),
          "00003_000": _voc_xml(200, 100, [("Nodule", 10, 10, 30, 30)])}
  split = {"00001_000": "train", "00001_001": "train", "00002_000": "val", "00003_000": "val"}
  if layout == "images":
    img_dir, ann_dir, suffix = root / "images", root / "annotations" / "xml", ".png"
  else:
    img_dir, ann_dir, suffix = root / "JPEGImages", root / "Annotations", ".jpg"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for s in ("train", "val"):
      (root / "ImageSets" / "Main" / f"{s}.txt").write_text(
          "".join(f"{k}\n" for k, v in split.items() if v == s))
  ann_dir.mkdir(parents=True)
  for i, stem in enumerate(split):
    folder = img_dir / split[stem] if layout == "images" else img_dir
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(phantom.generate(i, size=64).image).save(folder / f"{stem}{suffix}")
    if stem in xmls:
      (ann_dir / f"{stem}.xml").write_text(xmls[stem])
  return root


@pytest.mark.parametrize("layout", ["images", "voc"])
def test_both_layouts_give_splits_boxes_labels_and_patients(tmp_path, layout):
  root = voc_tree(tmp_path, layout)
  recs, skips = voc.read(root, class_map=CLASS_MAP, unknown_classes="skip",
                         patient_id_regex=r"^(?P<patient>\d+)_")
  assert len(skips) == 0
  by_id = {r.image_id: r for r in recs}
  assert {i: (r.split, r.label, r.patient_id) for i, r in by_id.items()} == {
      "00001_000": ("train", "tb", "00001"), "00001_001": ("train", "normal", "00001"),
      "00002_000": ("val", "normal", "00002"), "00003_000": ("val", "normal", "00003")}
  tb = by_id["00001_000"]
  np.testing.assert_allclose(tb.objects.bbox, [[0.1, 0.1, 0.4, 0.3], [0.5, 0.6, 0.9, 0.9]])
  assert tb.objects.label == ["active tb", "latent tb"] and tb.image.shape == (64, 64)
  assert by_id["00003_000"].meta["unmapped"] == ["Nodule"] and not by_id["00001_001"].meta["xml"]


def test_class_map_rules_and_label_without_boxes(tmp_path):
  root = voc_tree(tmp_path)
  recs, skips = voc.read(root, class_map=CLASS_MAP)  # 'Nodule' unknown: that image skipped
  assert sorted(r.image_id for r in recs) == ["00001_000", "00001_001", "00002_000"]
  assert len(skips) == 1 and "unknown class 'Nodule'" in skips.items[0][1]
  with pytest.raises(voc.VOCError, match=r"00003_000.xml: unknown class 'Nodule'"):
    voc.read(root, class_map=CLASS_MAP, on_error="raise")
  recs, _ = voc.read(root, class_map={**CLASS_MAP, "Nodule": None}, label_without_boxes="sick_non_tb",
                     missing_xml="skip")
  assert {r.image_id: r.label for r in recs} == {
      "00001_000": "tb", "00002_000": "sick_non_tb", "00003_000": "sick_non_tb"}  # no XML: skipped
  recs, _ = voc.read(root, class_map={**CLASS_MAP, "Nodule": "uncertain tb"})
  assert {r.image_id: r.objects.label for r in recs}["00003_000"] == ["uncertain tb"]


def test_patients_default_to_the_image_and_a_regex_must_match(tmp_path):
  root = voc_tree(tmp_path)
  recs, _ = voc.read(root, class_map=CLASS_MAP, unknown_classes="skip")
  assert all(r.patient_id == r.image_id for r in recs)
  recs, skips = voc.read(root, class_map=CLASS_MAP, unknown_classes="skip",
                         patient_id_regex=r"^0000[12]")  # the whole match; 00003 does not match
  assert sorted(r.patient_id for r in recs) == ["00001", "00001", "00002"]
  assert "gives no patient id in '00003_000.png'" in skips.items[0][1]


def test_missing_xml_size_uses_the_image_size(tmp_path):
  root = voc_tree(tmp_path)
  (root / "annotations/xml/00001_000.xml").write_text(
      _voc_xml(0, 0, [("ActiveTuberculosis", 16, 8, 32, 48)]))
  recs, _ = voc.read(root, class_map=CLASS_MAP, unknown_classes="skip")
  np.testing.assert_allclose({r.image_id: r for r in recs}["00001_000"].objects.bbox,
                             [[8 / 64, 16 / 64, 48 / 64, 32 / 64]])
  with pytest.raises(voc.VOCError, match="no <size> to normalise the boxes by"):
    voc.objects_from_xml(root / "annotations/xml/00001_000.xml", CLASS_MAP)


@pytest.mark.parametrize("text, reason", [
    ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
     "<annotation><size><width>9</width><height>9</height></size><object><name>&x;</name>"
     "</object></annotation>", "DOCTYPE/ENTITY declarations are not allowed"),
    ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l "lol">' + "".join(
        f'<!ENTITY l{i} "{("&l;" if i == 1 else f"&l{i - 1};") * 10}">' for i in range(1, 9))
     + "]><annotation>&l8;</annotation>", "DOCTYPE/ENTITY declarations are not allowed"),
    ("<annotation><size><width>100</width>", "malformed XML"),
    (_voc_xml(100, 100, [("ActiveTuberculosis", 10, 10, "inf", 20)]), "a non-finite number"),
    (_voc_xml(-5, 100, []), "invalid <size> -5x100"),
    (_voc_xml(100, 100, [("ActiveTuberculosis", 10, 10, 150, 20)]), "lies outside the 100x100"),
    (_voc_xml(100, 100, [("ActiveTuberculosis", 30, 10, 30, 20)]), "empty box"),
    ("<annotation>" + " " * voc.MAX_XML_BYTES + "</annotation>", "over the limit"),
])
def test_unsafe_or_invalid_xml_skips_the_image_naming_the_file(tmp_path, text, reason):
  root = voc_tree(tmp_path)
  (root / "annotations/xml/00001_000.xml").write_text(text)
  recs, skips = voc.read(root, class_map=CLASS_MAP, unknown_classes="skip")
  assert "00001_000" not in {r.image_id for r in recs}
  (path, why), = skips.items
  assert path == "images/train/00001_000.png" and "00001_000.xml" in why and reason in why


def test_folder_and_option_errors(tmp_path):
  root = voc_tree(tmp_path)
  with pytest.raises(voc.VOCError, match=r"class_map maps to \{'X': 'tb'\}"):
    voc.read(root, class_map={"X": "tb"})
  with pytest.raises(voc.VOCError, match=r"patient_id_regex '\(': missing \)"):
    voc.read(root, class_map=CLASS_MAP, patient_id_regex="(")
  with pytest.raises(voc.VOCError, match="missing_xml must be one of"):
    voc.read(root, class_map=CLASS_MAP, missing_xml="ignore")
  with pytest.raises(voc.VOCError, match="needs class_map"):
    ip.load_records("v", dict(source="voc", path=str(root)))
  (root / "images/health").mkdir()
  with pytest.raises(voc.VOCError, match="health: an image subfolder that is no split"):
    voc.read(root, class_map=CLASS_MAP)
  (root / "images/health").rmdir()
  Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "images/val/00001_000.png")
  with pytest.raises(voc.VOCError, match="image id '00001_000' is given twice: train/00001_000.png "
                                         "and val/00001_000.png"):
    voc.read(root, class_map=CLASS_MAP)
  with pytest.raises(voc.VOCError, match="no images/ or JPEGImages/ folder"):
    voc.read(tmp_path / "images", class_map=CLASS_MAP)


def test_voc_in_the_pipeline_keeps_the_dataset_name_and_splits(tmp_path):
  cfg = dict(datasets={"clinic": dict(source="voc", path=str(voc_tree(tmp_path)), class_map=CLASS_MAP,
                                      unknown_classes="skip", patient_id_regex=r"^(\d+)_")},
             tasks=("diagnosis", "detection"))
  units = ip.curated_units(cfg, split="train")
  assert {e.source for e in units["diagnosis"]} == {"clinic"}
  assert sorted(e.image_id for e in units["diagnosis"]) == ["00001_000", "00001_001"]
  assert units["detection"][0].prefix == "detect active tb ; latent tb"


@pytest.mark.parametrize("layout", ["images", "voc"])
def test_tbx11k_subset_as_voc_gives_the_tbx11k_readers_boxes(tbx11k_dir, tmp_path, layout):
  want, _ = tbx11k.read(tbx11k_dir, load_images=False)
  src = tbx11k.find_root(tbx11k_dir)
  img_dir, ann_dir = ((tmp_path / "images", tmp_path / "annotations/xml") if layout == "images"
                      else (tmp_path / "JPEGImages", tmp_path / "Annotations"))
  ann_dir.mkdir(parents=True)
  sets = collections.defaultdict(list)
  for r in want:  # symlinks: the same bytes, the VOC layout
    folder = img_dir / r.split if layout == "images" else img_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{r.image_id}.png").symlink_to(src / r.meta["path"])
    (ann_dir / f"{r.image_id}.xml").symlink_to(src / "annotations/xml" / f"{r.image_id}.xml")
    sets[r.split].append(r.image_id)
  if layout == "voc":
    (tmp_path / "ImageSets/Main").mkdir(parents=True)
    for split, ids in sets.items():
      (tmp_path / f"ImageSets/Main/{split}.txt").write_text("\n".join(ids) + "\n")
  got, skips = voc.read(tmp_path, class_map=tbx11k.CLASS_MAP, load_images=False)
  assert len(skips) == 0 and len(got) == len(want) == 250
  got = {r.image_id: r for r in got}
  for r in want:
    g = got[r.image_id]
    assert (g.split, g.label, g.patient_id, g.objects.label) == (r.split, r.label, r.patient_id,
                                                                 r.objects.label)
    np.testing.assert_array_equal(g.objects.bbox, r.objects.bbox)
