"""Masks <-> seg tokens through the shipped demo VQ-VAE, and the VQ-VAE trainer."""
import jax
import numpy as np
import pytest

from big_vision_cxr import loc_codec, seg_codec, train_vqvae
from big_vision_cxr.models import vqvae


@pytest.fixture(scope="module")
def codec():
  return seg_codec.SegCodec.from_npz(seg_codec.DEMO_VQVAE)


def test_shipped_asset_is_small_and_in_official_layout():
  assert seg_codec.DEMO_VQVAE.stat().st_size < 2 * 1024 * 1024
  with np.load(seg_codec.DEMO_VQVAE, allow_pickle=False) as f:
    assert f["_vq_vae._embedding"].shape[0] == 128 and "decoder.12.weight" in f.files


def test_round_trip_on_held_out_phantom_masks(codec):
  """Lung and lesion masks of phantoms never seen in training (other seed, sizes)."""
  recs = train_vqvae.phantom_records(12, seed=4242, size=256) + train_vqvae.phantom_records(4, seed=99, size=384)
  miou, n = train_vqvae.mean_iou(codec, recs)
  assert n >= 30
  assert miou >= 0.85


def test_tokens_then_decode_matches_manual_path(codec):
  mask = np.zeros((120, 200), np.uint8)
  yy, xx = np.mgrid[:120, :200]
  mask[((yy - 60) / 40) ** 2 + ((xx - 90) / 60) ** 2 < 1] = 1
  box = np.array([[20 / 120, 30 / 200, 100 / 120, 150 / 200]])
  seg = codec.encode(mask[None], box)
  assert seg.shape == (1, 16) and seg.dtype == np.int32 and 0 <= seg.min() and seg.max() < 128
  text = codec.mask_to_tokens(mask[None], box)[0]
  parsed = loc_codec.parse_objects(text + " active tb", require_seg=True).objects[0]
  assert np.array_equal(parsed.seg_ids, seg[0])
  out = codec.decode(parsed.seg_ids[None], parsed.box[None], 120, 200)[0]
  assert out.shape == (120, 200) and out.dtype == bool
  assert (out & (mask > 0)).sum() / (out | (mask > 0)).sum() > 0.85
  y1, x1, y2, x2 = np.floor(parsed.box * [120, 200, 120, 200]).astype(int)  # big_vision's int()
  assert (y1, x1, y2, x2) == (19, 29, 99, 149)  # loc bins 170, 153, 853, 767
  inside = np.zeros_like(out)
  inside[y1:y2, x1:x2] = True
  assert out.any() and not (out & ~inside).any()  # nothing outside the decoded box


def test_crop_resize_is_antialiased_bilinear():
  rng = np.random.default_rng(0)
  mask = (rng.uniform(size=(90, 70)) > 0.6).astype(np.uint8)
  crop = seg_codec.crop_resize(mask, [0.1, 0.2, 0.9, 0.8])
  y1, x1, y2, x2 = seg_codec.encode_box_px([0.1, 0.2, 0.9, 0.8], 90, 70)
  ref = jax.image.resize(mask[y1:y2, x1:x2].astype(np.float32), (64, 64), "linear", antialias=True)
  np.testing.assert_allclose(crop, np.asarray(ref), atol=1e-5)


def test_paste_equals_resize_then_paste():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 64, 64)).astype(np.float32)
  boxes = np.array([[5, 7, 45, 30], [0, 0, 100, 90]], np.int32)  # one shrinks, one grows
  out = np.asarray(seg_codec._paste(logits, boxes, height=100, width=90))
  for k, (y1, x1, y2, x2) in enumerate(boxes):
    ref = np.zeros((100, 90), bool)
    ref[y1:y2, x1:x2] = np.asarray(jax.image.resize(logits[k], (y2 - y1, x2 - x1), "linear", antialias=True)) > 0
    assert (out[k] != ref).mean() < 0.002  # only float ties at the threshold may differ


def test_bad_inputs_raise_named_errors(codec):
  with pytest.raises(seg_codec.SegCodecError, match="2 masks/seg rows but 1 boxes"):
    codec.encode(np.zeros((2, 8, 8), np.uint8), [[0, 0, 1, 1]])
  with pytest.raises(seg_codec.SegCodecError, match="normalised"):
    codec.encode(np.zeros((1, 8, 8), np.uint8), [[0, 0, 8, 8]])
  with pytest.raises(seg_codec.SegCodecError, match="seg ids"):
    codec.decode([[200] * 16], [[0, 0, 1, 1]], 8, 8)
  assert codec.encode(np.zeros((0, 8, 8), np.uint8), np.zeros((0, 4))).shape == (0, 16)
  assert codec.decode(np.zeros((0, 16)), np.zeros((0, 4)), 8, 9).shape == (0, 8, 9)
  assert isinstance(seg_codec.from_config({"npz": str(seg_codec.DEMO_VQVAE)}), seg_codec.SegCodec)
  with pytest.raises(seg_codec.SegCodecError, match="npz"):
    seg_codec.from_config({"other": 1})


def test_train_vqvae_tiny_run_writes_loadable_checkpoint(tmp_path, capsys):
  out = tmp_path / "vq.npz"
  args = train_vqvae.parse_args([
      "--out", str(out), "--num_images", "6", "--image_size", "96", "--steps", "30", "--batch_size", "8",
      "--enc_widths", "4", "4", "8", "8", "--code_dim", "8", "--dec_width", "16", "--eval_images", "2",
      "--log_every", "10", "--restart_every", "10"])
  summary = train_vqvae.train(args)
  assert summary["n_masks"] >= 12 and 0.0 <= summary["miou"] <= 1.0
  model, _ = vqvae.load_npz(out)
  assert model.cfg.enc_widths == (4, 4, 8, 8) and model.cfg.code_dim == 8
  log = capsys.readouterr().out
  first, last = (float(l.split(" rec ")[1].split()[0]) for l in (log.splitlines()[1], log.splitlines()[3]))
  assert last < first  # the reconstruction loss goes down


def test_train_vqvae_reads_dataset_configs_train_split_only():
  args = train_vqvae.parse_args(["--out", "unused.npz", "--jitters", "1",
                                 "--source", 'dataset:{"source": "phantom", "n": 40, "size": 48}'])
  crops, n_masks = train_vqvae.load_source(args, np.random.default_rng(0))
  from big_vision_cxr.data import phantom, splits
  recs = splits.apply(phantom.dataset(40, size=48))
  train = [r for r in recs if r.split == "train"]
  assert 0 < len(train) < 40
  assert n_masks == len(crops) == sum(len(train_vqvae.instance_masks(r)[0]) for r in train)
  with pytest.raises(ValueError, match="JSON dataset config"):
    train_vqvae.load_source(train_vqvae.parse_args(["--out", "x", "--source", "dataset:{bad"]), None)
