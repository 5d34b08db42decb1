"""pp builder and ops: parsing, big_vision image semantics, PaliGemma text layout."""
import io

import numpy as np
import pytest
from PIL import Image

from big_vision_cxr.pp import builder, ops_image, ops_text
from big_vision_cxr.registry import PP_OPS


@pytest.fixture(scope="module")
def tok():
  return ops_text.default_tokenizer()


def test_parse_literals_and_errors():
  assert builder.parse("decode|resize(224, antialias=True)|value_range(-1, 1)") == [
      ("decode", (), {}), ("resize", (224,), {"antialias": True}), ("value_range", (-1, 1), {})]
  with pytest.raises(builder.PPError, match="literals"):
    builder.parse("resize(__import__('os'))")
  with pytest.raises(builder.PPError, match="Unknown preprocessing op 'nope'"):
    builder.get_preprocess_fn("decode|nope(1)")
  with pytest.raises(builder.PPError, match="resize"):
    builder.get_preprocess_fn("resize(1, 2, 3, 4, 5, 6)")
  assert {"decode", "resize", "value_range", "tokenize_train", "tokenize_eval", "keep"} <= set(PP_OPS.names())


def test_image_ops_match_tf_semantics():
  import tensorflow as tf
  grey = np.random.default_rng(0).integers(0, 256, (50, 70), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(grey).save(buf, format="PNG")
  out = builder.get_preprocess_fn("decode|resize(32, antialias=True)|value_range(-1, 1)")(
      {"image": buf.getvalue()})["image"]
  ref = tf.image.resize(np.repeat(grey[..., None], 3, -1), (32, 32), antialias=True).numpy()
  ref = np.clip(np.round(ref), 0, 255).astype(np.uint8).astype(np.float32) / 255 * 2 - 1
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, atol=1e-6)
  assert out.min() >= -1 and out.max() <= 1
  rgb = ops_image.resize(np.stack([grey, grey // 2, grey // 3], -1), (20, 10))
  assert rgb.shape == (20, 10, 3) and rgb.dtype == np.uint8


def test_tokenize_train_layout(tok):
  fn = builder.get_preprocess_fn("tokenize_train(24)", tokenizer=tok)
  out = fn({"prefix": "answer en is there tuberculosis?", "suffix": "yes"})
  pre = tok.encode("answer en is there tuberculosis?")
  suf = tok.encode("yes")
  n = 1 + len(pre) + 1 + len(suf) + 1
  text = out["text"]
  assert text.shape == (25,) and text.dtype == np.int32
  assert text[0] == tok.bos_id and list(text[1:1 + len(pre)]) == pre
  assert text[1 + len(pre)] == tok.sep_id and text[n - 1] == tok.eos_id
  np.testing.assert_array_equal(out["mask_ar"], [0] * (len(pre) + 2) + [1] * (25 - len(pre) - 2))
  np.testing.assert_array_equal(out["mask_loss"], [0] * (len(pre) + 2) + [1] * (len(suf) + 1) + [0] * (25 - n))
  assert np.all(text[n:] == 0)


def test_tokenize_truncates_plainly_and_eval_variant(tok):
  out = builder.get_preprocess_fn("tokenize_train(6)", tokenizer=tok)(
      {"prefix": "caption en", "suffix": "the lungs are clear. no evidence of tuberculosis."})
  assert out["text"].shape == (7,) and tok.eos_id not in out["text"]
  ev = builder.get_preprocess_fn("tokenize_eval(12)", tokenizer=tok)({"prefix": "caption en", "suffix": ""})
  k = 1 + len(tok.encode("caption en")) + 1
  assert ev["text"].shape == (12,) and ev["text"][k - 1] == tok.sep_id and np.all(ev["text"][k:] == 0)
  np.testing.assert_array_equal(ev["mask_input"], [1] * k + [0] * (12 - k))
  np.testing.assert_array_equal(ev["mask_ar"], [0] * k + [1] * (12 - k))
  assert "mask_loss" not in ev
