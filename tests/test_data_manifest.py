"""Manifests: an Excel BOM, inference image lists (CSV/JSONL), path containment, clear errors."""
import json

import numpy as np
import pytest
from PIL import Image

from big_vision_cxr.data import manifest


def _png(path, shape=(40, 40)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.zeros(shape, np.uint8)).save(path)
  return path


def test_training_manifest_reads_a_csv_with_a_byte_order_mark(tmp_path):
  _png(tmp_path / "a.png")
  path = tmp_path / "m.csv"
  path.write_bytes("image,patient_id,label\r\na.png,p1,normal\r\n".encode("utf-8-sig"))
  recs, skips = manifest.read(path, on_error="raise")
  assert [(r.patient_id, r.label) for r in recs] == [("p1", "normal")] and not len(skips)


def test_image_paths_csv_with_bom_is_relative_to_the_manifest(tmp_path):
  path = tmp_path / "in" / "list.csv"
  path.parent.mkdir()
  path.write_bytes("path,note\nx/a.png,first\nb.dcm,second\n".encode("utf-8-sig"))
  assert manifest.image_paths(path) == [tmp_path / "in" / "x" / "a.png", tmp_path / "in" / "b.dcm"]


@pytest.mark.parametrize("key", manifest.IMAGE_KEYS)
def test_image_paths_jsonl_keys(tmp_path, key):
  path = tmp_path / "list.jsonl"
  path.write_text(json.dumps({key: "a.png", "other": 1}) + "\n\n" + json.dumps({key: "b.png"}) + "\n")
  assert manifest.image_paths(path) == [tmp_path / "a.png", tmp_path / "b.png"]


@pytest.mark.parametrize("value", ["../x.png", "/etc/passwd", "a/../../x.png"])
def test_image_paths_refuse_escaping_paths_naming_file_line_value(tmp_path, value):
  path = tmp_path / "list.csv"
  path.write_text(f"image\nok.png\n{value}\n")
  with pytest.raises(manifest.ManifestError, match=rf"list.csv:3: image '{value}'.*escapes"):
    manifest.image_paths(path)


def test_image_paths_errors(tmp_path):
  csv_path = tmp_path / "list.csv"
  csv_path.write_text("file\na.png\n")
  with pytest.raises(manifest.ManifestError, match=r"list.csv:2: needs one of .*'image', 'path', "
                                                   r"'image_path'.*has \['file'\]"):
    manifest.image_paths(csv_path)
  csv_path.write_text("image,label\n,tb\n")
  with pytest.raises(manifest.ManifestError, match="list.csv:2: image '' is not an image path"):
    manifest.image_paths(csv_path)
  jsonl = tmp_path / "list.jsonl"
  jsonl.write_text('{"image": "a.png"}\n{broken\n')
  with pytest.raises(manifest.ManifestError, match="list.jsonl:2: invalid JSON"):
    manifest.image_paths(jsonl)
  jsonl.write_text('{"image": 3}\n')
  with pytest.raises(manifest.ManifestError, match="list.jsonl:1: image 3 is not an image path"):
    manifest.image_paths(jsonl)
  latin = tmp_path / "latin.csv"
  latin.write_bytes("image\nr\xe9sum\xe9.png\n".encode("latin-1"))
  with pytest.raises(manifest.ManifestError, match="latin.csv: not UTF-8"):
    manifest.image_paths(latin)
  with pytest.raises(manifest.ManifestError, match="must be .csv, .tsv or .jsonl"):
    manifest.image_paths(_png(tmp_path / "a.png"))


def test_manifest_missing_patient_id_column_is_no_usable_rows_naming_it(tmp_path):
  _png(tmp_path / "a.png")
  path = tmp_path / "m.csv"
  path.write_text("image,label\na.png,normal\nb.png,tb\n")
  with pytest.raises(manifest.ManifestError, match=r"manifest .*m.csv: no usable rows: 2 skipped, "
                                                   r"first: .*m.csv:2: missing column 'patient_id'"):
    manifest.read(path)


@pytest.mark.parametrize("text", ["image,patient_id,label\n", "", "\ufeff"])
def test_manifest_without_rows_is_an_error(tmp_path, text):
  path = tmp_path / "m.csv"
  path.write_text(text, encoding="utf-8")
  with pytest.raises(manifest.ManifestError, match="m.csv: no rows"):
    manifest.read(path)


def test_manifest_duplicate_image_id_names_both_lines_before_reading_images(tmp_path, monkeypatch):
  path = tmp_path / "m.csv"
  path.write_text("image,patient_id,label\na.png,p1,normal\nb.png,p2,normal\na.dcm,p3,tb\n")
  monkeypatch.setattr(manifest.images, "read_image", lambda *a, **k: pytest.fail("read an image"))
  with pytest.raises(manifest.ManifestError, match=r"m.csv:4: image_id 'a' is also line 2's"):
    manifest.read(path)


def test_manifest_csv_field_over_the_csv_limit_is_a_manifest_error_naming_the_line(tmp_path):
  path = tmp_path / "m.csv"
  path.write_text(f"image,patient_id,label,report\na.png,p1,normal,\nb.png,p2,normal,{'x' * 200_000}\n")
  with pytest.raises(manifest.ManifestError, match=r"m.csv:3: not readable as CSV .*field limit"):
    manifest.read(path)
