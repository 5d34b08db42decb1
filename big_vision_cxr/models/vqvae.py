"""The segmentation VQ-VAE of PaliGemma (big_vision's `vae-oid.npz` architecture).

A 64x64 mask in [0, 1] -> 4x4 grid of codebook indices (16 `<seg>` tokens) -> a
64x64 mask logit map (threshold > 0). Encoder: 4 stride-2 "SAME" convs (ReLU),
2 residual blocks, a stride-1 conv to the codebook width. Decoder: 1x1 conv
(ReLU), 2 residual blocks, 4 transposed convs k4 s2 (PyTorch padding 1, ReLU)
halving the width, a 1x1 conv to 1 channel.

Checkpoints use the official PyTorch key layout (`encoder.0.weight` OIHW,
`decoder.4.weight` (in, out, kh, kw) for transposed convs, `_vq_vae._embedding`
[K, D]), so `load_npz` reads both `vae-oid.npz` and the files `train_vqvae`
writes, and takes every width and kernel size from the shapes.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_cxr import atomic
from big_vision_cxr.errors import CheckpointError

GRID = 4  # 64 / 2**4
MASK_SIZE = 64


class VQVAEFileError(CheckpointError):
  """A VQ-VAE checkpoint file is missing a key or has a wrong shape."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Widths and kernel sizes; the defaults are a small demo model."""
  enc_widths: tuple = (16, 32, 64, 64)  # the 4 stride-2 convs
  enc_kernel: int = 4
  enc_res_width: int = 64  # hidden width of the encoder residual blocks
  enc_out_kernel: int = 1
  codebook_size: int = 128
  code_dim: int = 32
  dec_width: int = 64  # decoder.0 output; the transposed convs give w, w/2, w/4, w/8
  dec_res_width: int = 64


class ResBlock(nn.Module):
  """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))), PyTorch padding 1, 1, 0."""
  hidden: int

  @nn.compact
  def __call__(self, x):  # [B, h, w, C]
    y = nn.relu(nn.Conv(self.hidden, (3, 3), padding=1, name="Conv_0")(x))
    y = nn.relu(nn.Conv(self.hidden, (3, 3), padding=1, name="Conv_1")(y))
    return x + nn.Conv(x.shape[-1], (1, 1), padding=0, name="Conv_2")(y)


class Encoder(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x):  # [B, 64, 64, 1] in [-1, 1]
    k = self.cfg.enc_kernel
    for i, width in enumerate(self.cfg.enc_widths):
      x = nn.relu(nn.Conv(width, (k, k), strides=2, padding="SAME", name=f"Conv_{i}")(x))
    for i in range(2):
      x = ResBlock(self.cfg.enc_res_width, name=f"ResBlock_{i}")(x)
    k = self.cfg.enc_out_kernel
    return nn.Conv(self.cfg.code_dim, (k, k), padding="SAME", name="Conv_4")(x)  # [B, 4, 4, D]


class Decoder(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, z):  # [B, 4, 4, D]
    width = self.cfg.dec_width
    x = nn.relu(nn.Conv(width, (1, 1), padding=0, name="Conv_0")(z))
    for i in range(2):
      x = ResBlock(self.cfg.dec_res_width, name=f"ResBlock_{i}")(x)
    for i in range(4):
      # Explicit padding 2 with a transposed kernel == torch ConvTranspose2d(k=4, s=2, p=1).
      x = nn.relu(nn.ConvTranspose(width, (4, 4), strides=(2, 2), padding=2, transpose_kernel=True,
                                   name=f"ConvTranspose_{i}")(x))
      width //= 2
    return nn.Conv(1, (1, 1), padding=0, name="Conv_1")(x)[..., 0]  # [B, 64, 64]


class Model(nn.Module):
  """params: {'encoder': ..., 'decoder': ..., 'codebook': [K, D]}."""
  cfg: Config = Config()

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)
    self.codebook = self.param("codebook", nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                               (self.cfg.codebook_size, self.cfg.code_dim))

  def encode_continuous(self, masks):
    """[B, 64, 64] in [0, 1] -> encoder output [B, 4, 4, D]."""
    return self.encoder(2.0 * (masks[..., None] - 0.5))

  def quantize(self, z):
    """[B, 4, 4, D] -> (indices [B, 16] int32, codes [B, 4, 4, D])."""
    flat = z.reshape(z.shape[0], -1, z.shape[-1])  # [B, 16, D]
    dist = (jnp.sum(flat ** 2, -1, keepdims=True) - 2 * jnp.einsum("bnd,kd->bnk", flat, self.codebook)
            + jnp.sum(self.codebook ** 2, -1))  # [B, 16, K]
    idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    return idx, self.codebook[idx].reshape(z.shape)

  def encode(self, masks):
    """[B, 64, 64] in [0, 1] -> codebook indices [B, 16] (4x4 row-major)."""
    return self.quantize(self.encode_continuous(masks))[0]

  def decode(self, indices):
    """[B, 16] indices -> mask logits [B, 64, 64] (mask where > 0)."""
    codes = self.codebook[indices].reshape(indices.shape[0], GRID, GRID, -1)
    return self.decoder(codes)

  def __call__(self, masks):
    """Training forward: (reconstruction [B,64,64], z [B,4,4,D], codes, indices [B,16])."""
    z = self.encode_continuous(masks)
    idx, codes = self.quantize(z)
    straight_through = z + jax.lax.stop_gradient(codes - z)
    return self.decoder(straight_through), z, codes, idx


def param_shapes(model):
  """The param tree as ShapeDtypeStructs; an eager flax init takes tens of seconds on a busy CPU."""
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, MASK_SIZE, MASK_SIZE)))["params"],
                        jax.random.PRNGKey(0))


def init(cfg: Config, seed=0):
  model = Model(cfg)
  return model, model.init(jax.random.PRNGKey(seed), jnp.zeros((1, MASK_SIZE, MASK_SIZE)))["params"]


# --- Official PyTorch key layout <-> our params --------------------------------

def _key_map():
  """(torch prefix, path in our params, is_transposed_conv) for every conv."""
  def res(prefix, path):
    return [(f"{prefix}.net.{t}", path + (f"Conv_{i}",), False) for i, t in enumerate((0, 2, 4))]
  out = [(f"encoder.{t}", ("encoder", f"Conv_{i}"), False) for i, t in enumerate((0, 2, 4, 6))]
  out += res("encoder.8", ("encoder", "ResBlock_0")) + res("encoder.9", ("encoder", "ResBlock_1"))
  out += [("encoder.10", ("encoder", "Conv_4"), False), ("decoder.0", ("decoder", "Conv_0"), False)]
  out += res("decoder.2", ("decoder", "ResBlock_0")) + res("decoder.3", ("decoder", "ResBlock_1"))
  out += [(f"decoder.{t}", ("decoder", f"ConvTranspose_{i}"), True) for i, t in enumerate((4, 6, 8, 10))]
  return out + [("decoder.12", ("decoder", "Conv_1"), False)]


CODEBOOK_KEY = "_vq_vae._embedding"


def to_torch_layout(params):
  """Our params -> flat dict with the official PyTorch keys and layouts."""
  flat = {CODEBOOK_KEY: np.asarray(params["codebook"], np.float32)}
  for prefix, path, _ in _key_map():
    node = params
    for p in path:
      node = node[p]
    # Both conv (OIHW) and transposed conv ((in, out, kh, kw) read as HWIO of the
    # transposed kernel) invert the same (2, 3, 1, 0) transpose.
    flat[f"{prefix}.weight"] = np.transpose(np.asarray(node["kernel"], np.float32), (3, 2, 0, 1))
    flat[f"{prefix}.bias"] = np.asarray(node["bias"], np.float32)
  return flat


def _config_from_shapes(arrays, path):
  def shape(key):
    if key not in arrays:
      raise VQVAEFileError(f"{path}: missing key {key!r} (expected the vae-oid.npz PyTorch layout).")
    return arrays[key].shape
  enc = [shape(f"encoder.{t}.weight") for t in (0, 2, 4, 6)]
  if any(len(s) != 4 for s in enc) or len({s[2:] for s in enc}) != 1 or enc[0][1] != 1:
    raise VQVAEFileError(f"{path}: encoder convs must be OIHW with one input channel and equal "
                         f"kernels, got {enc}.")
  cb = shape(CODEBOOK_KEY)
  if len(cb) != 2:
    raise VQVAEFileError(f"{path}: {CODEBOOK_KEY} must be [codebook_size, dim], got {cb}.")
  return Config(
      enc_widths=tuple(int(s[0]) for s in enc), enc_kernel=int(enc[0][2]),
      enc_res_width=int(shape("encoder.8.net.0.weight")[0]),
      enc_out_kernel=int(shape("encoder.10.weight")[2]),
      codebook_size=int(cb[0]), code_dim=int(cb[1]),
      dec_width=int(shape("decoder.0.weight")[0]),
      dec_res_width=int(shape("decoder.2.net.0.weight")[0]))


def load_npz(path):
  """vae-oid.npz (or our own checkpoint) -> (Model, params). Never unpickles."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise VQVAEFileError(f"{path}: cannot read as a .npz of plain arrays ({e}).") from e
  cfg = _config_from_shapes(arrays, path)
  model = Model(cfg)
  template = param_shapes(model)
  params = {"codebook": arrays[CODEBOOK_KEY].astype(np.float32), "encoder": {}, "decoder": {}}
  for prefix, tree_path, _ in _key_map():
    node_t, node = template, params
    for p in tree_path:
      node_t = node_t[p]
      node = node.setdefault(p, {})
    for name, layout in (("weight", (2, 3, 1, 0)), ("bias", None)):
      key = f"{prefix}.{name}"
      if key not in arrays:
        raise VQVAEFileError(f"{path}: missing key {key!r}.")
      value = arrays[key].astype(np.float32)
      value = np.transpose(value, layout) if layout else value
      want = node_t["kernel" if layout else "bias"].shape
      if value.shape != tuple(want):
        raise VQVAEFileError(f"{path}: {key} has shape {arrays[key].shape}, which does not fit the "
                             f"architecture read from the other shapes (want {want} after OIHW->HWIO).")
      node["kernel" if layout else "bias"] = value
  return model, jax.tree.map(jnp.asarray, params)


def save_npz(params, path):
  """Writes params in the official PyTorch key layout, atomically."""
  with atomic.target(path) as tmp, open(tmp, "wb") as f:
    np.savez_compressed(f, **to_torch_layout(params))
