"""predict: inputs listed and validated, outputs (JSON, RLE, overlay) right, bad files named."""
import json

import numpy as np
import pytest

from big_vision_cxr import predict


def _touch(path, data=b"x"):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


# ---------------------------------------------------------------- inputs


def test_folder_lists_images_and_dicom_without_suffix_skips_others(tmp_path):
  a = _touch(tmp_path / "b.png")
  b = _touch(tmp_path / "sub" / "a.DCM")
  c = _touch(tmp_path / "sub" / "IM0001")
  _touch(tmp_path / "notes.txt")
  _touch(tmp_path / ".hidden" / "x.png")
  inputs = predict.collect_inputs(tmp_path)
  assert sorted(inputs.files) == sorted([a, b, c])
  assert [p.name for p, _ in inputs.skipped] == ["notes.txt"]


def test_empty_folder_and_missing_path_are_named(tmp_path):
  _touch(tmp_path / "readme.md")
  with pytest.raises(predict.PredictError, match=r"holds no image files.*skipped 1"):
    predict.collect_inputs(tmp_path)
  with pytest.raises(predict.PredictError, match="nope.png does not exist"):
    predict.collect_inputs(tmp_path / "nope.png")


def test_csv_and_jsonl_manifests_resolve_relative_paths(tmp_path):
  (tmp_path / "m.csv").write_text("image,label\nimgs/x.png,tb\n/abs/y.png,normal\n")
  assert predict.collect_inputs(tmp_path / "m.csv").files == [tmp_path / "imgs/x.png",
                                                              tmp_path.__class__("/abs/y.png")]
  (tmp_path / "m.jsonl").write_text('{"path": "z.dcm"}\n\n{"path": "w.png"}\n')
  assert predict.collect_inputs(tmp_path / "m.jsonl").files == [tmp_path / "z.dcm", tmp_path / "w.png"]


@pytest.mark.parametrize("name,text,match", [
    ("m.csv", "file,label\nx.png,tb\n", r"needs one of the columns"),
    ("m.csv", "image\n\n", r"lists no images"),
    ("m.jsonl", '{"path": "a.png"}\nnot json\n', r"m.jsonl, line 2: not JSON"),
    ("m.jsonl", '{"file": "a.png"}\n', r"line 1: needs one of the keys"),
    ("m.csv", "image,x\n,1\n", r"line 2: empty image path"),
])
def test_bad_manifests_are_named(tmp_path, name, text, match):
  (tmp_path / name).write_text(text)
  with pytest.raises(predict.PredictError, match=match):
    predict.collect_inputs(tmp_path / name)


def test_unique_ids():
  assert predict.unique_ids(["a/x.png", "b/x.dcm", "c/y.png", "d/x.jpg"]) == ["x", "x_1", "y", "x_2"]


# ---------------------------------------------------------------- outputs


def test_rle_round_trip_and_box_entry():
  mask = np.zeros((37, 53), bool)
  mask[3:20, 10:40] = True
  mask[30, 50] = True
  rle = predict.mask_to_rle(mask)
  assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
  json.dumps(rle)
  np.testing.assert_array_equal(predict.rle_to_mask(rle), mask)
  entry = predict.box_entry(np.float32([0.1, 0.2, 0.5, 1.0]), "active tb", 0.75, 200, 300)
  assert entry["bbox_pixels"] == [20.0, 60.0, 100.0, 300.0]
  assert entry["label"] == "active tb" and entry["score"] == 0.75
