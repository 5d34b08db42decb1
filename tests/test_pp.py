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
  assert {"decode", "resize", "value_range", "tokenize_train"} <= set(PP_OPS.names())


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


def test_tokenize_truncates_plainly_and_layout_pads(tok):
  out = builder.get_preprocess_fn("tokenize_train(6)", tokenizer=tok)(
      {"prefix": "caption en", "suffix": "the lungs are clear. no evidence of tuberculosis."})
  assert out["text"].shape == (7,) and tok.eos_id not in out["text"]
  prefix = (tok.bos_id, *tok.encode("caption en"))
  text, mask_ar, mask = ops_text.layout(prefix, tok.sep_id, (), 12)
  k = len(prefix) + 1
  assert text.shape == (12,) and text[k - 1] == tok.sep_id and np.all(text[k:] == 0)
  np.testing.assert_array_equal(mask_ar, [0] * k + [1] * (12 - k))
  np.testing.assert_array_equal(mask, [0] * 12)


def _grey(seed=0, shape=(90, 70)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_model_input_default_is_decode_resize_value_range():
  image = _grey()
  want = ops_image.value_range(ops_image.resize(ops_image.to_rgb(image), 48), -1.0, 1.0)
  got = ops_image.model_input_fn(None, 48)(image)
  assert got.shape == (48, 48, 3) and got.dtype == np.float32 and got.tobytes() == want.tobytes()
  assert ops_image.model_input_fn("", 48)(image).tobytes() == want.tobytes()
  assert ops_image.model_input_fn(None).pp_image == "decode|resize(224)|value_range(-1, 1)"
  explicit = builder.get_preprocess_fn("decode|resize(48)|value_range(-1, 1)")({"image": image})["image"]
  assert explicit.tobytes() == want.tobytes()


def test_model_input_stages_cache_grey_once_and_batch_like_one_image():
  fn = ops_image.model_input_fn("decode|resize(32, antialias=True)|value_range(0, 1)", 32)
  images = [_grey(i) for i in range(3)]
  stored = [fn.stored(im) for im in images]
  assert all(s.shape == (32, 32, 1) and s.dtype == np.uint8 for s in stored)
  batch = fn.finish(np.stack(stored))
  assert batch.shape == (3, 32, 32, 3) and batch.min() >= 0 and batch.max() <= 1
  for im, row in zip(images, batch):
    assert fn(im).tobytes() == np.ascontiguousarray(row).tobytes()
  no_range = ops_image.model_input_fn("decode|resize(32)", 32)(images[0])
  assert no_range.dtype == np.float32 and no_range.max() > 1  # cast, not rescaled


def test_model_input_refuses_the_wrong_shape():
  with pytest.raises(builder.PPError, match=r"\(64, 64, 3\)"):
    ops_image.model_input_fn("decode|resize(32)|value_range(-1, 1)", 64)(_grey())
  with pytest.raises(builder.PPError, match="shape"):
    ops_image.model_input_fn("value_range(-1, 1)", None)(_grey())  # [H, W]: no channels
  assert ops_image.model_input_fn("decode|resize(16)", None)(_grey()).shape == (16, 16, 3)


def _tf_resize(image, size, **kw):
  """The reference: tf.image.resize, then big_vision's round/clip/cast for uint8."""
  import tensorflow as tf
  out = tf.image.resize(image, size, **kw).numpy()
  if image.dtype == np.uint8:
    out = np.clip(np.round(out), 0, 255)
  return out.astype(image.dtype)


def test_numpy_bilinear_is_bit_identical_to_tf():
  import tensorflow as tf
  rng = np.random.default_rng(0)
  shapes = [((512, 512), (224, 224)), ((224, 224), (224, 224)), ((1, 1), (5, 3)), ((7, 3), (1, 1)),
            ((300, 451), (224, 224)), ((50, 70), (224, 96)), ((2048, 1700), (224, 224))]
  shapes += [(tuple(rng.integers(1, 600, 2)), tuple(rng.integers(1, 300, 2))) for _ in range(60)]
  for i, (in_shape, size) in enumerate(shapes):
    channels = (1, 3)[i % 2]
    image = rng.integers(0, 256, (*in_shape, channels), dtype=np.uint8)
    raw = ops_image._bilinear(image, size)  # pylint: disable=protected-access
    assert np.array_equal(raw, tf.image.resize(image, size).numpy()), (in_shape, size, channels)
    got = ops_image.resize(image, size)
    assert got.dtype == np.uint8 and np.array_equal(got, _tf_resize(image, size)), (in_shape, size)
    floats = rng.normal(100, 80, (*in_shape, channels)).astype(np.float32)
    got = ops_image.resize(floats, size)
    assert np.array_equal(got, _tf_resize(floats, size)), (in_shape, size)


def test_resize_grey_view_and_dispatch():
  import tensorflow as tf
  grey = _grey(1, (300, 200))
  view = ops_image.to_rgb(grey)  # [H, W, 3] with channel stride 0: resized as one channel
  got = ops_image.resize(view, 64)
  assert got.shape == (64, 64, 3) and got.strides[-1] == 0
  assert np.array_equal(got, _tf_resize(np.repeat(grey[..., None], 3, -1), (64, 64)))
  # Everything but bilinear without antialias on uint8/float32 stays tf.image.resize.
  for kw in (dict(antialias=True), dict(method="nearest"), dict(method="bicubic")):
    assert np.array_equal(ops_image.resize(view, (40, 30), **kw),
                          _tf_resize(np.repeat(grey[..., None], 3, -1), (40, 30), **kw)), kw
  doubles = grey[..., None].astype(np.float64) / 7
  assert np.array_equal(ops_image.resize(doubles, 50),
                        tf.image.resize(doubles, (50, 50)).numpy().astype(np.float64))


def test_value_range_of_replicated_grey_equals_the_copy():
  batch = np.random.default_rng(2).integers(0, 256, (3, 9, 7, 1), dtype=np.uint8)
  view = np.broadcast_to(batch, (3, 9, 7, 3))  # channel stride 0, as ModelInput.finish gives
  got = ops_image.value_range(view, -1.0, 1.0)
  want = ops_image.value_range(np.ascontiguousarray(view), -1.0, 1.0)
  assert got.dtype == np.float32 and got.flags.c_contiguous and got.tobytes() == want.tobytes()
