"""HF export: transformers loads it and gives the same greedy tokens as our predict path."""
import json

import jax
import numpy as np
import pytest

from big_vision_cxr import decode
from big_vision_cxr import npz
from big_vision_cxr import inference
from big_vision_cxr import serving
from big_vision_cxr.data import phantom
from big_vision_cxr.models import paligemma

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VARIANT = "demo"
PROMPTS = ("caption en", "detect active tb ; latent tb", "answer en is there tuberculosis?")
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Random demo weights (std 1: diverse greedy tokens with clear margins), exported by the CLI."""
  folder = tmp_path_factory.mktemp("serving")
  rng = np.random.default_rng(0)
  shapes = paligemma.param_shapes(paligemma.get_config(VARIANT))
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  npz.save_npz(params, folder / "model.npz")
  assert serving.main(["--checkpoint", str(folder / "model.npz"), "--model_variant", VARIANT,
                       "--out", str(folder / "hf")]) == 0
  processor = transformers.PaliGemmaProcessor.from_pretrained(folder / "hf")
  model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      folder / "hf", attn_implementation="eager").eval()
  loaded = inference.load(folder / "model.npz", model_variant=VARIANT, with_vqvae=False)
  return dict(dir=folder / "hf", processor=processor, model=model, loaded=loaded)


def test_export_files_and_tokenizer_layout(exported):
  names = sorted(p.name for p in exported["dir"].iterdir())
  assert names == ["big_vision_cxr_provenance.json", "config.json", "model.safetensors",
                   "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
  tok, hf = exported["loaded"].tokenizer, exported["processor"].tokenizer
  config = json.loads((exported["dir"] / "config.json").read_text())
  assert exported["processor"].image_token_id == config["image_token_index"] == tok.vocab_size
  assert exported["processor"].image_seq_length == (64 // 8) ** 2
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
  assert hf.convert_tokens_to_ids(["<loc0000>", "<loc1023>", "<seg000>", "<seg127>"]) == [
      tok.loc_id(0), tok.loc_id(1023), tok.seg_id(0), tok.seg_id(127)]
  for text in ["answer en is there tuberculosis?\n", "caption en", "  two  spaces and Zürich 42 😀",
               "<loc0012><loc0100><loc0500><loc1023><seg001><seg127> active tb ; <loc0001> latent tb"]:
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids, text
    assert hf.decode(ids) == tok.decode(ids) == text


def test_transformers_greedy_tokens_equal_ours(exported):
  loaded, processor, model = exported["loaded"], exported["processor"], exported["model"]
  predictor = decode.Predictor(loaded.model, loaded.tokenizer, max_decode_len=NEW_TOKENS)
  distinct = set()
  for i, prompt in enumerate(PROMPTS):
    x = loaded.model_input(phantom.generate(i, size=200).image)  # [64, 64, 3]
    ours = predictor.generate(loaded.params, x[None], [prompt])[0]
    # The same pixels for HF: the image is already at the model's size, so its resize is a no-op.
    rgb = np.round((x + 1) * 127.5).astype(np.uint8)
    inputs = processor(images=[rgb], text=["<image>" + prompt], return_tensors="pt")
    np.testing.assert_allclose(inputs["pixel_values"][0].permute(1, 2, 0).numpy(), x, atol=1e-6)
    with torch.no_grad():
      out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert theirs == ours["tokens"], prompt
    assert processor.decode(theirs, skip_special_tokens=True) == ours["text"]
    distinct |= set(theirs)
  assert len(distinct) > 30  # not a degenerate repeat of one token
  assert any(loaded.tokenizer.loc_id(0) <= t < loaded.tokenizer.seg_id(0) for t in distinct)
