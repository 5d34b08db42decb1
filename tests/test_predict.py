"""predict: inputs listed and validated, outputs (JSON, RLE, overlay) right, bad files named."""
import json

import numpy as np
import pytest

from big_vision_cxr import errors
from big_vision_cxr import inference
from big_vision_cxr import predict
from big_vision_cxr import visualize
from big_vision_cxr.evaluators import coco


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
  (tmp_path / "m.csv").write_text("\ufeffimage,label\nimgs/x.png,tb\n")  # Excel's BOM
  assert predict.collect_inputs(tmp_path / "m.csv").files == [tmp_path / "imgs/x.png"]
  (tmp_path / "m.jsonl").write_text('{"path": "z.dcm"}\n\n{"path": "w.png"}\n')
  assert predict.collect_inputs(tmp_path / "m.jsonl").files == [tmp_path / "z.dcm", tmp_path / "w.png"]


@pytest.mark.parametrize("name,text,match", [
    ("m.csv", "file,label\nx.png,tb\n", r"m.csv:2: needs one of the columns"),
    ("m.csv", "image\n\n", r"lists no images"),
    ("m.jsonl", '{"path": "a.png"}\nnot json\n', r"m.jsonl:2: invalid JSON"),
    ("m.jsonl", '{"file": "a.png"}\n', r"m.jsonl:1: needs one of the columns/keys"),
    ("m.csv", "image,x\n,1\n", r"m.csv:2: image '' is not an image path"),
])
def test_bad_manifests_are_named(tmp_path, name, text, match):
  (tmp_path / name).write_text(text)
  with pytest.raises(errors.Error, match=match):
    predict.collect_inputs(tmp_path / name)


@pytest.mark.parametrize("name,text,match", [
    ("m.csv", "image\n/etc/passwd\n", r"m.csv:2: image '/etc/passwd': .* escapes"),
    ("m.jsonl", '{"image": "../outside.png"}\n', r"m.jsonl:1: image '../outside.png': .* escapes"),
])
def test_manifest_escape_is_refused_not_read(tmp_path, name, text, match):
  """Paths outside the manifest's folder are refused (predict used to open /etc/passwd)."""
  (tmp_path / "in").mkdir()
  (tmp_path / "outside.png").write_bytes(b"x")
  (tmp_path / "in" / name).write_text(text)
  with pytest.raises(errors.Error, match=match):
    predict.collect_inputs(tmp_path / "in" / name)


def test_output_ids_never_collide():
  assert predict.unique_ids(["a/x.png", "b/x.dcm", "c/y.png", "d/x.jpg"]) == ["x", "x_1", "y", "x_2"]
  # A made-up id never takes another file's real name (it used to overwrite c/x_1's result).
  assert predict.unique_ids(["a/x.png", "b/x.png", "c/x_1.png"]) == ["x", "x_2", "x_1"]
  assert predict.unique_ids(["c/x_1.png", "a/x.png", "b/x.png"]) == ["x_1", "x", "x_2"]


# ---------------------------------------------------------------- outputs


def test_rle_round_trip_and_box_entry():
  mask = np.zeros((37, 53), bool)
  mask[3:20, 10:40] = True
  mask[30, 50] = True
  rle = coco.mask_to_rle(mask)
  assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
  json.dumps(rle)
  np.testing.assert_array_equal(coco.rle_to_mask(rle), mask)
  entry = inference.box_entry(np.float32([0.1, 0.2, 0.5, 1.0]), "active tb", 0.75, 200, 300)
  assert entry["bbox_pixels"] == [20.0, 60.0, 100.0, 300.0]
  assert entry["label"] == "active tb" and entry["score"] == 0.75


# ---------------------------------------------------------------- the model side

import pathlib
import shutil

import jax

from big_vision_cxr import checkpointing
from big_vision_cxr import npz
from big_vision_cxr.data import images as images_lib
from big_vision_cxr.data import phantom
from big_vision_cxr.models import paligemma
from big_vision_cxr.models import vqvae

VARIANT = "demo"  # 64 px images, vocab 2152 = the demo tokenizer's.
DECODE_LEN = 24  # one object with a mask is 4 + 16 + ~3 name tokens


def _save_png(path, image):
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)
  return path


def write_dicom(path, image, monochrome1=False):
  """uint8 [H,W] -> 16-bit DICOM whose window maps back to exactly `image`."""
  import pydicom
  from pydicom.dataset import FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
  stored = (255 - image if monochrome1 else image).astype(np.uint16) * 257  # 0..65535
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = pydicom.Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
  ds.Rows, ds.Columns = image.shape
  ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
  ds.PixelRepresentation = 0
  ds.RescaleSlope, ds.RescaleIntercept = 1, 0
  # DICOM linear window: ((x - (c - 0.5)) / (w - 1) + 0.5) * 255 = x / 257 for these values.
  ds.WindowCenter, ds.WindowWidth = 32768, 65536
  ds.PixelData = stored.tobytes()
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return path


def random_params(shapes, seed, scale=0.05):
  """Random numpy params shaped like `shapes` (fast: no flax init on a busy CPU)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * scale).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A random `demo` PaliGemma (.npz and an orbax workdir) and a random VQ-VAE."""
  folder = tmp_path_factory.mktemp("assets")
  params = random_params(paligemma.param_shapes(paligemma.get_config(VARIANT)), seed=1)
  npz.save_npz(params, folder / "model.npz")
  ckpt = checkpointing.Checkpointer(folder / "workdir", async_save=False)
  ckpt.save(7, {"step": np.int32(7), "params": params, "opt": {"mu": params}})
  ckpt.close()
  vq_shapes = jax.eval_shape(lambda k: vqvae.Model(vqvae.Config()).init(
      k, np.zeros((1, vqvae.MASK_SIZE, vqvae.MASK_SIZE), np.float32))["params"], jax.random.PRNGKey(0))
  vqvae.save_npz(random_params(vq_shapes, seed=2, scale=0.2), folder / "vqvae.npz")
  return dict(npz=folder / "model.npz", workdir=folder / "workdir", vqvae=folder / "vqvae.npz",
              params=params)


@pytest.fixture(scope="module")
def runner(assets):
  loaded = inference.load(assets["npz"], model_variant=VARIANT, vqvae=assets["vqvae"],
                        class_names=phantom.CLASS_NAMES)
  return inference.Runner(loaded, batch_size=4, max_decode_len=DECODE_LEN)


def test_orbax_workdir_and_npz_load_the_same_params(assets):
  params, step = checkpointing.restore_params(assets["workdir"])
  assert step == 7
  flat, want = npz.flatten(params), npz.flatten(assets["params"])
  assert flat.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(flat[k]), want[k], err_msg=k)
  loaded = inference.load(assets["workdir"], model_variant=VARIANT, vqvae=assets["vqvae"])
  assert loaded.provenance["step"] == 7 and loaded.provenance["model_variant"] == VARIANT
  with pytest.raises(errors.CheckpointError, match="no complete checkpoint"):
    checkpointing.restore_params(assets["workdir"].parent)


def _outputs(out_dir):
  """{image_id: result without the fields naming the file} for every JSON in out_dir."""
  out = {}
  for p in sorted(pathlib.Path(out_dir).glob("*.json")):
    d = json.loads(p.read_text())
    out[d["image_id"]] = {k: v for k, v in d.items() if k not in ("image", "image_id")}
  return out


def test_all_tasks_json_and_overlay(runner, tmp_path):
  images = [phantom.generate(i, size=96).image for i in range(3)]
  files = [_save_png(tmp_path / "in" / f"p{i}.png", im) for i, im in enumerate(images)]
  summary = predict.predict_files(runner, files, tmp_path / "out", progress=False)
  assert not summary.failed and len(summary.done) == 3
  res = _outputs(tmp_path / "out")["p1"]
  assert (res["height"], res["width"]) == (96, 96)
  diag = res["diagnosis"]
  assert set(diag["probabilities"]) == {"tb", "normal", "sick_non_tb"}
  assert abs(sum(diag["probabilities"].values()) - 1) < 1e-5
  assert diag["probability_tb"] == diag["probabilities"]["tb"]
  assert diag["label"] == max(diag["probabilities"], key=diag["probabilities"].get)
  from big_vision_cxr.data import prompts
  questions = [q[len("answer en "):] for q in (*prompts.CLOSED_QUESTIONS, *prompts.OPEN_QUESTIONS)]
  assert [a["question"] for a in res["answers"]] == questions
  assert set(res["generated"]) == {prompts.DIAGNOSIS_PREFIX, prompts.REPORT_PREFIX,
                                   *prompts.CLOSED_QUESTIONS, *prompts.OPEN_QUESTIONS,
                                   prompts.detect_prefix(phantom.CLASS_NAMES),
                                   prompts.segment_prefix(phantom.CLASS_NAMES)}
  assert res["report"] == res["generated"][prompts.REPORT_PREFIX]
  assert isinstance(res["boxes"], list) and isinstance(res["masks"], list)
  assert res["model"]["model_variant"] == VARIANT
  assert all(b["drawn"] for b in res["boxes"] + res["masks"]) and res["min_score"] == 0
  # Random weights answer VQA with noise: diagnosis vs lesions is what can always be checked.
  assert {"not_tb_with_lesions", "tb_without_lesions"} & set(res["consistency"]["checked"])
  assert res["consistency"]["agree"] == (not res["consistency"]["flags"])
  assert "ground_truth" not in res
  assert summary.checked == 3 and any("with tasks that disagree" in l for l in summary.lines())
  from PIL import Image
  with Image.open(tmp_path / "out" / "p1.png") as im:
    assert im.width == 96 and im.height > 96  # the header band with the diagnosis


def test_objects_from_generated_tokens(runner):
  """Boxes (normalised and pixels), scores and RLE masks from a crafted generation."""
  tok = runner.loaded.tokenizer
  seg = np.arange(16) * 7 % 128
  text = ("<loc0100><loc0200><loc0500><loc0600>" + "".join(f"<seg{s:03d}>" for s in seg)
          + " active tb ; <loc0000><loc0010><loc1023><loc0020>")  # the second has no name
  tokens = tok.encode(text) + [tok.eos_id]
  logprobs = np.linspace(-0.1, -2.0, len(tokens)).tolist()
  entries, invalid = runner._objects(dict(tokens=tokens, token_logprobs=logprobs), 300, 400, True)
  assert invalid == 1 and len(entries) == 1
  e = entries[0]
  np.testing.assert_allclose(e["bbox"], np.array([100, 200, 500, 600]) / 1023, rtol=1e-6)
  np.testing.assert_allclose(e["bbox_pixels"], np.round([100 / 1023 * 300, 200 / 1023 * 400,
                                                         500 / 1023 * 300, 600 / 1023 * 400], 2))
  assert e["label"] == "active tb" and 0 < e["score"] <= 1
  want = runner.loaded.seg_codec.decode(seg[None], np.array([e["bbox"]]), 300, 400)[0]
  np.testing.assert_array_equal(coco.rle_to_mask(e["rle"]), want)
  assert e["area"] == want.sum()


def test_prompt_only(runner, assets, tmp_path):
  only = inference.Runner(runner.loaded, tasks=(), prompts=("answer en is there a cavity?",),
                        batch_size=4, max_decode_len=DECODE_LEN)
  only.predictor = runner.predictor  # reuse the compiled functions
  path = _save_png(tmp_path / "a.png", phantom.generate(0, size=64).image)
  predict.predict_files(only, [path], tmp_path / "out", progress=False)
  res = _outputs(tmp_path / "out")["a"]
  assert list(res["generated"]) == ["answer en is there a cavity?"]
  assert res["prompts"][0]["text"] == res["generated"]["answer en is there a cavity?"]
  assert "diagnosis" not in res and "boxes" not in res
  with pytest.raises(inference.InferenceError, match="unknown tasks"):
    inference.Runner(runner.loaded, tasks=("diagnosis", "ocr"))


def test_real_png_and_its_dicoms_give_the_same_outputs(runner, tbx11k_dir, nih_dir, tmp_path):
  """The same pixels as PNG, MONOCHROME2 and MONOCHROME1 16-bit DICOM -> identical outputs."""
  src = sorted((tbx11k_dir / "TBX11K" / "imgs" / "tb").glob("*.png"))[0]
  image = images_lib.read_image(src)
  folder = tmp_path / "in"
  folder.mkdir()
  shutil.copy(src, folder / "a_png.png")
  write_dicom(folder / "b_mono2.dcm", image)
  write_dicom(folder / "c_mono1", image, monochrome1=True)  # no suffix, like many PACS exports
  nih = sorted((nih_dir / "images").glob("*.png"))[0]
  shutil.copy(nih, folder / "d_nih.png")
  for name in ("b_mono2.dcm", "c_mono1"):
    np.testing.assert_array_equal(images_lib.read_radiograph(folder / name), image)
  summary = predict.predict_files(runner, sorted(folder.iterdir()), tmp_path / "out", progress=False)
  assert not summary.failed and len(summary.done) == 4
  out = _outputs(tmp_path / "out")
  assert out["a_png"] == out["b_mono2"] == out["c_mono1"]
  assert out["d_nih"]["height"] == 1024 and out["d_nih"]["generated"] != {}


def test_cli_bad_inputs_named_rest_processed_nonzero_exit(assets, tmp_path, monkeypatch, capsys):
  folder = tmp_path / "in"
  good = _save_png(folder / "good.png", phantom.generate(3, size=96).image)
  blob = good.read_bytes()
  (folder / "truncated.png").write_bytes(blob[:len(blob) // 3])
  (folder / "text.png").write_text("this is not an image")
  (folder / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 50)
  _save_png(folder / "one_pixel.png", np.zeros((1, 1), np.uint8))
  _save_png(folder / "huge.png", np.zeros((200, 200), np.uint8))
  (folder / "notes.txt").write_text("skipped, not an error")
  monkeypatch.setattr(images_lib, "MAX_PIXELS", 150 * 150)
  argv = ["--checkpoint", str(assets["npz"]), "--model_variant", VARIANT, "--vqvae", str(assets["vqvae"]),
          "--input", str(folder), "--out", str(tmp_path / "out"), "--tasks", "",
          "--prompt", "caption en", "--max_decode_len", "8", "--no_progress"]
  assert predict.main(argv) == 1
  err = capsys.readouterr().err
  for name, reason in [("truncated.png", "cannot"), ("text.png", "not a readable image"),
                       ("garbage.dcm", "DICOM"), ("one_pixel.png", "smaller than 32 pixels"),
                       ("huge.png", "over the limit of 22500 pixels")]:
    assert any(name in line and reason in line for line in err.splitlines() if line.startswith("error:")), name
    assert any(name in line for line in err.splitlines() if "FAILED" in line), name
  assert "predicted 1 image(s), 5 failed, 1 skipped." in err
  assert "notes.txt" in err
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.json", "good.png"]
  # Nothing to do at all: exit status 2 and the folder named.
  (tmp_path / "empty").mkdir()
  argv[argv.index("--input") + 1] = str(tmp_path / "empty")
  assert predict.main(argv) == 2
  assert "holds no image files" in capsys.readouterr().err


def test_lora_workdir_is_merged_with_the_training_config(assets, tmp_path):
  from big_vision_cxr import config as config_lib
  from big_vision_cxr import optim
  config = config_lib.load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "cxr_mix.py")
                                  + ":demo,lora")
  params = assets["params"]
  lora = optim.lora_init(config.lora, params, jax.random.PRNGKey(3))
  lora = jax.tree.map(lambda x: np.asarray(x) + 0.01, lora)  # B != 0: the merge must show
  ckpt = checkpointing.Checkpointer(tmp_path / "wd", async_save=False)
  ckpt.save(5, {"step": np.int32(5), "params": {**params, "lora": lora}})
  ckpt.close()
  loaded = inference.load(tmp_path / "wd", config=config, vqvae=assets["vqvae"])
  name = "llm~layers~attn~q_einsum~w"
  w = params["llm"]["layers"]["attn"]["q_einsum"]["w"]
  delta = np.einsum("...mr,...rn->...mn", lora[name]["a"], lora[name]["b"]).reshape(w.shape)
  want = w + config.lora.alpha / config.lora.rank * delta
  np.testing.assert_allclose(np.asarray(loaded.params["llm"]["layers"]["attn"]["q_einsum"]["w"]),
                             want, rtol=1e-5, atol=1e-6)
  assert "lora" not in loaded.params
  np.testing.assert_array_equal(np.asarray(loaded.params["img"]["embedding"]["kernel"]),
                                params["img"]["embedding"]["kernel"])
  with pytest.raises(inference.InferenceError, match="LoRA params but no LoRA settings"):
    inference.load(tmp_path / "wd", model_variant=VARIANT, vqvae=assets["vqvae"])
  # `convert export` writes the same merged params as a big_vision .npz.
  from big_vision_cxr import convert
  spec = str(pathlib.Path(__file__).parents[1] / "configs" / "cxr_mix.py") + ":demo,lora"
  assert convert.main(["export", "--workdir", str(tmp_path / "wd"), "--config", spec,
                       "--out", str(tmp_path / "merged.npz")]) == 0
  exported = npz.load_npz(str(tmp_path / "merged.npz"))
  for key, value in npz.flatten(jax.device_get(loaded.params)).items():
    np.testing.assert_array_equal(exported[key], np.asarray(value), err_msg=key)
  assert convert.main(["export", "--workdir", str(tmp_path / "none"), "--config", spec,
                       "--out", str(tmp_path / "x.npz")]) == 1


def test_a_failing_image_in_a_batch_is_isolated(tmp_path):
  """When a batch fails, its images are retried one by one: only the bad one is reported."""
  class FakeRunner:
    batch_size = 3
    calls = []

    def run(self, images):
      self.calls.append(len(images))
      if any(im.max() == 0 for im in images):
        raise FloatingPointError("boom")
      return [dict(height=im.shape[0], width=im.shape[1]) for im in images]

  files = [_save_png(tmp_path / f"{i}.png", np.full((40, 40), 0 if i == 1 else 99, np.uint8))
           for i in range(4)]
  summary = predict.predict_files(FakeRunner(), files, tmp_path / "out", overlay=False, progress=False)
  assert [p.name for p, _ in summary.done] == ["0.png", "2.png", "3.png"]
  assert len(summary.failed) == 1 and "1.png: prediction failed: FloatingPointError: boom" in summary.failed[0][1]
  assert FakeRunner.calls == [3, 1, 1, 1, 1]  # the failed batch of 3, its retries, then the last file


class _EchoRunner:
  """Stands in for inference.Runner: one empty result per image."""
  batch_size = 2

  def run(self, images):
    return [dict(height=im.shape[0], width=im.shape[1]) for im in images]


def test_long_names_and_symlinks_in_the_output_folder(tmp_path):
  """A legal 254-byte output name works (the temporary name is short), and a symlink already
  in the output folder is replaced, never written through."""
  long_png = _save_png(tmp_path / "in" / ("a" * 250 + ".png"), np.full((40, 40), 9, np.uint8))
  other = _save_png(tmp_path / "in" / "b.png", np.full((40, 40), 99, np.uint8))
  out = tmp_path / "out"
  out.mkdir()
  victim = tmp_path / "victim.png"
  victim.write_bytes(b"do not touch")
  (out / "b.png").symlink_to(victim)
  (out / "b.json").symlink_to(victim)
  summary = predict.predict_files(_EchoRunner(), [long_png, other], out, progress=False)
  assert not summary.failed and len(summary.done) == 2
  assert (out / ("a" * 250 + ".json")).is_file() and (out / ("a" * 250 + ".png")).is_file()
  assert victim.read_bytes() == b"do not touch"
  assert not (out / "b.png").is_symlink() and not (out / "b.json").is_symlink()
  assert json.loads((out / "b.json").read_text())["image_id"] == "b"
  assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_config_preprocessing_is_used(runner):
  """With a training config, images go through its pp_image string (here: the same ops)."""
  import dataclasses
  from big_vision_cxr.pp import ops_image
  from big_vision_cxr.pp.builder import PPError
  image = phantom.generate(5, size=100).image
  default = ops_image.model_input_fn("", 64)(image)
  with_pp = dataclasses.replace(runner.loaded, pp_image="decode|resize(64)|value_range(-1, 1)")
  np.testing.assert_array_equal(with_pp.model_input(image), default)
  antialiased = dataclasses.replace(runner.loaded, pp_image="decode|resize(64, antialias=True)|value_range(-1, 1)")
  assert not np.array_equal(antialiased.model_input(image), default)
  wrong = dataclasses.replace(runner.loaded, pp_image="decode|resize(32)|value_range(-1, 1)")
  with pytest.raises(PPError, match="gives images of shape"):
    wrong.model_input(image)


# ---------------------------------------------------------------- min_score, ground truth, consistency

_RESULT = dict(  # what inference.Runner returns for a TB image, hand-built
    height=40, width=40, diagnosis=dict(label="tb", probability_tb=0.9),
    report="left lung: cavity in the upper zone. findings consistent with active tuberculosis.",
    answers=[dict(question="is there tuberculosis?", answer="yes"),
             dict(question="how many lesions are there?", answer="1")],
    boxes=[dict(label="active tb", score=0.8, bbox=[0.2, 0.6, 0.4, 0.8]),  # patient's left
           dict(label="latent tb", score=0.1, bbox=[0.6, 0.1, 0.8, 0.3])])


class _TbRunner:
  batch_size = 2

  def run(self, images):
    return [json.loads(json.dumps(_RESULT)) for _ in images]


def test_min_score_hides_boxes_but_keeps_them_in_the_json():
  result = predict.mark_drawn(json.loads(json.dumps(_RESULT)), 0.5)
  assert [b["drawn"] for b in result["boxes"]] == [True, False] and result["min_score"] == 0.5
  assert [o["score"] for o in predict.overlay_objects(result)] == [0.8]
  result["consistency"] = predict.consistency.check(result, 0.5)
  assert result["consistency"]["agree"]
  lines = predict.header_lines(result)
  assert "not drawn: 1 with score < 0.5" in lines
  assert lines[-1] == f"tasks agree ({len(result['consistency']['checked'])} checks)"
  # At 0 the low box counts: 2 boxes but 1 lesion answered.
  result = predict.mark_drawn(json.loads(json.dumps(_RESULT)), 0.0)
  result["consistency"] = predict.consistency.check(result)
  assert [f["code"] for f in result["consistency"]["flags"]] == ["count_vs_boxes",
                                                                 "report_side_vs_boxes"]
  assert predict.header_lines(result)[-2:] == [
      "disagree: VQA 'how many lesions?' 1 but 2 boxes drawn.",
      "disagree: the report names the patient's left lung (image right) but lesions drawn in "
      "both lungs."]


def _manifest(tmp_path, boxes_column, shape=(40, 80)):
  """m.csv listing PNGs of `shape` with their `boxes` (None: an empty cell)."""
  import csv
  with open(tmp_path / "m.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "boxes"])
    for name, boxes in boxes_column.items():
      _save_png(tmp_path / "imgs" / name, np.full(shape, 99, np.uint8))
      writer.writerow([f"imgs/{name}", "" if boxes is None else json.dumps(boxes)])
  return tmp_path / "m.csv"


def test_manifest_ground_truth_boxes(tmp_path):
  path = _manifest(tmp_path, {"a.png": [dict(label="active tb", bbox=[10, 20, 30, 60])],
                              "b.png": None})
  truth = predict.manifest_ground_truth(path)
  assert truth == {tmp_path / "imgs" / "a.png": [dict(bbox=[0.25, 0.25, 0.75, 0.75], label="active tb")],
                   tmp_path / "imgs" / "b.png": []}  # an empty cell: no lesions
  assert list(truth) == predict.collect_inputs(path).files
  (tmp_path / "n.jsonl").write_text(
      '{"path": "imgs/a.png", "boxes": [{"label": "latent tb", "bbox": [0.1, 0.1, 0.2, 0.3]}]}\n'
      '{"path": "imgs/b.png"}\n')
  truth = predict.manifest_ground_truth(tmp_path / "n.jsonl", "normalized")
  assert truth == {tmp_path / "imgs" / "a.png": [dict(bbox=pytest.approx([0.1, 0.1, 0.2, 0.3]),
                                                      label="latent tb")]}
  (tmp_path / "bad.jsonl").write_text(
      '{"image": "imgs/a.png", "boxes": [{"label": "active tb", "bbox": [0, 0, 50, 90]}]}\n')
  with pytest.raises(errors.Error, match=r"bad.jsonl:1.boxes\[0\].bbox: .* outside the 80x40 image"):
    predict.manifest_ground_truth(tmp_path / "bad.jsonl")


def test_ground_truth_consistency_and_summary_end_to_end(tmp_path):
  path = _manifest(tmp_path, {"a.png": [dict(label="active tb", bbox=[96, 32, 144, 128])],
                              "b.png": None}, shape=(160, 320))
  files = predict.collect_inputs(path).files
  summary = predict.predict_files(_TbRunner(), files, tmp_path / "out", progress=False, min_score=0.5,
                                  ground_truth=predict.manifest_ground_truth(path))
  out = _outputs(tmp_path / "out")
  assert out["a"]["ground_truth"] == dict(boxes=[dict(bbox=pytest.approx([0.6, 0.1, 0.9, 0.4]),
                                                      label="active tb")])
  assert out["b"]["ground_truth"] == dict(boxes=[])
  assert [b["drawn"] for b in out["a"]["boxes"]] == [True, False]
  assert out["a"]["consistency"]["agree"] and summary.checked == 2 and not summary.disagree
  assert "0 of 2 image(s) with tasks that disagree (the JSON's 'consistency')." in summary.lines()
  from PIL import Image
  with Image.open(tmp_path / "out" / "a.png") as im:
    px = np.asarray(im)
  band = px.shape[0] - 160
  left_edge = px[band + 100:band + 140, 32]  # the truth's, dashed
  assert (left_edge == visualize.GT_COLOUR).all(-1).any() and (left_edge == visualize.GT_GAP).all(-1).any()
  summary = predict.predict_files(_TbRunner(), files[:1], tmp_path / "out0", progress=False)
  assert summary.disagree == [(files[0], ["count_vs_boxes", "report_side_vs_boxes"])]
  assert f"  DISAGREE {files[0]}: count_vs_boxes, report_side_vs_boxes" in summary.lines()


def test_cli_checks_min_score_and_ground_truth_before_loading(tmp_path, capsys):
  path = _manifest(tmp_path, {"a.png": [dict(label="active tb", bbox=[30, 20, 10, 60])]})
  argv = ["--checkpoint", str(tmp_path / "missing.npz"), "--model_variant", VARIANT,
          "--input", str(path), "--out", str(tmp_path / "out"), "--no_progress"]
  assert predict.main(argv + ["--min_score", "1.5"]) == 2
  assert "--min_score must be in [0, 1], got 1.5" in capsys.readouterr().err
  assert predict.main(argv) == 2
  assert "m.csv:2.boxes[0].bbox: [30, 20, 10, 60] is empty" in capsys.readouterr().err
