"""VQ-VAE: the vae-oid.npz PyTorch layout loads and matches torch numerically."""
import jax
import numpy as np
import pytest
import torch

from big_vision_cxr.models import vqvae


class _TorchRes(torch.nn.Module):
  def __init__(self, channels, hidden):
    super().__init__()
    self.net = torch.nn.Sequential(
        torch.nn.Conv2d(channels, hidden, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(hidden, hidden, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(hidden, channels, 1))

  def forward(self, x):
    return x + self.net(x)


class _TorchQuantizer(torch.nn.Module):
  def __init__(self, k, d):
    super().__init__()
    self._embedding = torch.nn.Parameter(torch.randn(k, d))


class _TorchVQVAE(torch.nn.Module):
  """A PyTorch model whose state_dict keys are exactly vae-oid.npz's."""

  def __init__(self, enc_widths, res_width, dim, dec_width, k=128):
    super().__init__()
    layers, cin = [], 1
    for w in enc_widths:
      layers += [torch.nn.Conv2d(cin, w, 4, stride=2, padding=1), torch.nn.ReLU()]
      cin = w
    layers += [_TorchRes(cin, res_width), _TorchRes(cin, res_width), torch.nn.Conv2d(cin, dim, 1)]
    self.encoder = torch.nn.Sequential(*layers)
    self._vq_vae = _TorchQuantizer(k, dim)
    layers, w = [torch.nn.Conv2d(dim, dec_width, 1), torch.nn.ReLU(),
                 _TorchRes(dec_width, dec_width), _TorchRes(dec_width, dec_width)], dec_width
    for i in range(4):
      w_out = dec_width >> i
      layers += [torch.nn.ConvTranspose2d(w, w_out, 4, stride=2, padding=1), torch.nn.ReLU()]
      w = w_out
    layers.append(torch.nn.Conv2d(w, 1, 1))
    self.decoder = torch.nn.Sequential(*layers)


def _write(model, path):
  np.savez(path, **{k: v.detach().numpy() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module")
def official_layout(tmp_path_factory):
  """Random weights in vae-oid.npz's key names and shapes.

  Decoder widths (128 -> 128, 64, 32, 16 -> 1) are in big_vision's code; the
  codebook (128, 512) follows third-party ports; the encoder widths are ours
  (the official ones are only in the file, which the loader reads them from).
  """
  torch.manual_seed(0)
  model = _TorchVQVAE(enc_widths=(32, 64, 128, 128), res_width=128, dim=512, dec_width=128)
  path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
  _write(model, path)
  return model, path


def test_official_layout_loads_and_matches_torch(official_layout):
  torch_model, path = official_layout
  model, params = vqvae.load_npz(path)
  assert model.cfg.code_dim == 512 and model.cfg.codebook_size == 128 and model.cfg.dec_width == 128
  assert model.cfg.enc_widths == (32, 64, 128, 128) and model.cfg.enc_kernel == 4
  rng = np.random.default_rng(0)
  masks = (rng.uniform(size=(3, 64, 64)) > 0.5).astype(np.float32)
  z = np.asarray(model.apply({"params": params}, masks, method=model.encode_continuous))
  with torch.no_grad():
    z_ref = torch_model.encoder(torch.from_numpy(2 * (masks[:, None] - 0.5))).numpy()
  np.testing.assert_allclose(z, z_ref.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)

  idx = np.asarray(model.apply({"params": params}, masks, method=model.encode))
  assert idx.shape == (3, 16) and idx.dtype == np.int32
  emb = torch_model._vq_vae._embedding.detach()
  flat = torch.from_numpy(z_ref.transpose(0, 2, 3, 1).reshape(-1, 512))
  assert np.array_equal(idx.reshape(-1), torch.cdist(flat, emb).argmin(-1).numpy())

  logits = np.asarray(model.apply({"params": params}, idx, method=model.decode))
  assert logits.shape == (3, 64, 64)
  with torch.no_grad():
    codes = emb[torch.from_numpy(idx.astype(np.int64))].reshape(3, 4, 4, 512).permute(0, 3, 1, 2)
    ref = torch_model.decoder(codes)[:, 0].numpy()
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_transposed_conv_matches_torch():
  """Our mapping of a torch ConvTranspose2d(k=4, s=2, p=1) weight, alone."""
  import flax.linen as nn
  torch.manual_seed(1)
  conv = torch.nn.ConvTranspose2d(5, 3, 4, stride=2, padding=1)
  x = np.random.default_rng(1).normal(size=(2, 5, 7, 6)).astype(np.float32)
  with torch.no_grad():
    ref = conv(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  layer = nn.ConvTranspose(3, (4, 4), strides=(2, 2), padding=2, transpose_kernel=True)
  kernel = np.transpose(conv.weight.detach().numpy(), (2, 3, 1, 0))
  out = layer.apply({"params": {"kernel": kernel, "bias": conv.bias.detach().numpy()}},
                    x.transpose(0, 2, 3, 1))
  assert out.shape == (2, 14, 12, 3)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_keeps_official_keys(tmp_path):
  model = vqvae.Model(vqvae.Config(enc_widths=(4, 4, 8, 8), enc_res_width=8, code_dim=8, dec_width=16,
                                   dec_res_width=16))
  rng = np.random.default_rng(3)  # random values without flax's (slow to compile) initialisers
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), vqvae.param_shapes(model))
  path = tmp_path / "ours.npz"
  vqvae.save_npz(params, path)
  with np.load(path, allow_pickle=False) as f:
    keys = set(f.files)
  assert {"_vq_vae._embedding", "encoder.0.weight", "encoder.9.net.4.bias", "decoder.10.weight",
          "decoder.12.bias"} <= keys
  model2, params2 = vqvae.load_npz(path)
  assert model2.cfg == model.cfg
  masks = np.random.default_rng(0).uniform(size=(2, 64, 64)).astype(np.float32)
  a = model.apply({"params": params}, masks)[0]
  b = model2.apply({"params": params2}, masks)[0]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert not list(tmp_path.glob("*.tmp*"))


def test_bad_files_give_clear_errors(tmp_path, official_layout):
  _, path = official_layout
  with np.load(path) as f:
    arrays = dict(f)
  missing = dict(arrays)
  del missing["decoder.6.weight"]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(vqvae.VQVAEFileError, match="decoder.6.weight"):
    vqvae.load_npz(tmp_path / "missing.npz")
  wrong = dict(arrays)
  wrong["decoder.12.weight"] = np.zeros((1, 8, 1, 1), np.float32)
  np.savez(tmp_path / "wrong.npz", **wrong)
  with pytest.raises(vqvae.VQVAEFileError, match="decoder.12.weight has shape"):
    vqvae.load_npz(tmp_path / "wrong.npz")
  np.savez(tmp_path / "pickled.npz", **{"_vq_vae._embedding": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(vqvae.VQVAEFileError, match="pickled.npz"):
    vqvae.load_npz(tmp_path / "pickled.npz")
