"""Trains the segmentation VQ-VAE on instance-mask crops.

  python -m big_vision_cxr.train_vqvae --out big_vision_cxr/assets/vqvae_cxr_demo.npz

Data: `--source phantom` (default) takes the lung masks (one per side) and the
TB lesion masks of phantom radiographs; `--source npz:PATH` takes `masks`
[n, H, W] (> 0 is foreground) and optional `boxes` [n, 4] normalised (else the
mask extents) from a plain .npz; `--source 'dataset:{"source": "manifest",
"path": ...}'` reads any dataset config of `config.input.datasets` (manifest with
masks, tfds, ...) and uses the object masks of its patient-level train split.
Each mask is cropped to its box, jittered a little, and resized to 64x64
(`seg_codec.crop_resize`, the same op that makes the tokens).

Loss: MSE of the decoder output against the crop mapped to [-1, 1], plus the
codebook loss |sg(z) - e|^2 and beta * the commitment loss |z - sg(e)|^2
(straight-through gradients). Codes unused during `--restart_every` steps are
restarted at random encoder outputs of the current batch. The checkpoint is
written atomically in the official vae-oid.npz PyTorch key layout.
"""
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_vision_cxr import errors, loc_codec, seg_codec
from big_vision_cxr.data import phantom, records, splits
from big_vision_cxr.models import vqvae


class VQVAETrainError(errors.Error):
  """A train_vqvae argument, source or run that cannot be used."""


def instance_masks(record):
  """A record's lung masks (one per side, from meta) and object masks -> (masks, boxes)."""
  masks = []
  lung_map = record.meta.get("lung_mask") if record.meta else None
  if lung_map is not None:
    masks += [(lung_map == code).astype(np.uint8) for code in (1, 2) if (lung_map == code).any()]
  if record.objects is not None and record.objects.mask is not None:
    masks += [m for m in record.objects.mask if m.any()]
  if not masks:
    return np.zeros((0,) + record.image.shape, np.uint8), np.zeros((0, 4), np.float32)
  masks = np.stack(masks)
  return masks, records.boxes_from_masks(masks)


def crops_from_masks(masks, boxes, rng, jitters=1, jitter=0.06):
  """[n, H, W] masks and boxes -> [n * jitters, 64, 64] crops; the first of each is unjittered."""
  out = []
  for mask, box in zip(masks, boxes):
    size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    for j in range(jitters):
      b = box if j == 0 else np.clip(box + rng.uniform(-jitter, jitter, 4) * size, 0, 1)
      if b[2] - b[0] > 1e-3 and b[3] - b[1] > 1e-3:
        out.append(seg_codec.crop_resize(mask, b))
  return np.stack(out) if out else np.zeros((0, vqvae.MASK_SIZE, vqvae.MASK_SIZE), np.float32)


def crops_from_records(recs, rng, jitters=1):
  """Source records (any reader) -> (crops [m, 64, 64], number of masks)."""
  crops, n_masks = [np.zeros((0, vqvae.MASK_SIZE, vqvae.MASK_SIZE), np.float32)], 0
  for r in recs:
    masks, boxes = instance_masks(r)
    n_masks += len(masks)
    crops.append(crops_from_masks(masks, boxes, rng, jitters))
  return np.concatenate(crops), n_masks


def phantom_records(n, seed, size):
  """Phantom radiographs with many lesions (TB-heavy label mix), difficulties in [0, 1]."""
  rng = np.random.default_rng(seed)
  return [phantom.generate(i, seed=seed, size=size, difficulty=float(rng.uniform(0, 1)),
                           label_probs=(0.8, 0.2, 0.0)) for i in range(n)]


def load_source(args, rng):
  if args.source == "phantom":
    return crops_from_records(phantom_records(args.num_images, args.seed, args.image_size), rng, args.jitters)
  if args.source.startswith("npz:"):
    path = args.source[4:]
    with np.load(path, allow_pickle=False) as f:
      if "masks" not in f.files:
        raise VQVAETrainError(f"{path}: needs an array 'masks' [n, H, W]; has {f.files}.")
      masks = f["masks"]
      if masks.ndim != 3:
        raise VQVAETrainError(f"{path}: 'masks' must be [n, H, W], got shape {masks.shape}.")
      boxes = f["boxes"] if "boxes" in f.files else records.boxes_from_masks(masks > 0)
    return crops_from_masks(masks, boxes, rng, args.jitters), len(masks)
  if args.source.startswith("dataset:"):
    from big_vision_cxr import input_pipeline  # pylint: disable=import-outside-toplevel
    try:
      cfg = json.loads(args.source[len("dataset:"):])
    except json.JSONDecodeError as e:
      raise VQVAETrainError(f"--source dataset:JSON needs a JSON dataset config, got {args.source!r} ({e.msg}).") from e
    recs, _ = input_pipeline.load_records("vqvae", cfg)
    recs = splits.apply([dataclasses.replace(r) for r in recs], seed=args.split_seed)
    return crops_from_records([r for r in recs if r.split == "train"], rng, args.jitters)
  raise VQVAETrainError(f"--source must be 'phantom', 'npz:PATH' or 'dataset:JSON', got {args.source!r}.")


def make_train_step(model, tx, beta):
  def loss_fn(params, crops):
    recon, z, codes, idx = model.apply({"params": params}, crops)
    rec = jnp.mean((recon - (2.0 * crops - 1.0)) ** 2)
    codebook = jnp.mean((jax.lax.stop_gradient(z) - codes) ** 2)
    commit = jnp.mean((z - jax.lax.stop_gradient(codes)) ** 2)
    return rec + codebook + beta * commit, (rec, idx, z)

  @jax.jit
  def step(params, opt_state, crops):
    (loss, (rec, idx, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, crops)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, rec, idx, z
  return step


def mean_iou(codec, recs):
  """(mean IoU, count) of the full-resolution round trip mask -> tokens -> mask.

  The decoder gets the box back from its loc tokens, as at evaluation.
  """
  ious = []
  for r in recs:
    masks, boxes = instance_masks(r)
    if not len(masks):
      continue
    seg = codec.encode(masks, boxes)
    boxes_from_tokens = loc_codec.loc_ids_to_box(loc_codec.box_to_loc_ids(boxes))
    out = codec.decode(seg, boxes_from_tokens, *masks.shape[1:])
    gt = masks > 0
    inter = (out & gt).sum((1, 2))
    union = (out | gt).sum((1, 2))
    ious += list(inter / np.maximum(union, 1))
  return float(np.mean(ious)), len(ious)


def train(args):
  rng = np.random.default_rng(args.seed)
  t0 = time.time()
  crops, n_masks = load_source(args, rng)
  print(f"data: {n_masks} masks -> {len(crops)} crops in {time.time() - t0:.1f}s", flush=True)
  if not len(crops):
    raise VQVAETrainError(f"--source {args.source}: no masks to train on.")
  cfg = vqvae.Config(enc_widths=tuple(args.enc_widths), enc_res_width=args.enc_widths[-1],
                     code_dim=args.code_dim, dec_width=args.dec_width, dec_res_width=args.dec_width)
  model, params = vqvae.init(cfg, seed=args.seed)
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(200, args.steps // 10), args.steps, args.lr * 0.05)
  tx = optax.adam(sched)
  opt_state = tx.init(params)
  step = make_train_step(model, tx, args.beta)
  usage = np.zeros(cfg.codebook_size, np.int64)
  t1 = time.time()
  for i in range(1, args.steps + 1):
    batch = crops[rng.integers(0, len(crops), args.batch_size)]
    flip = rng.uniform(size=len(batch)) < 0.5
    batch = np.where(flip[:, None, None], batch[:, :, ::-1], batch)
    params, opt_state, loss, rec, idx, z = step(params, opt_state, batch)
    if not np.isfinite(float(loss)):
      raise VQVAETrainError(f"loss is {float(loss)} at step {i} (--lr {args.lr}); stopping "
                            f"without writing {args.out}. Lower --lr.")
    usage += np.bincount(np.asarray(idx).reshape(-1), minlength=cfg.codebook_size)
    if i % args.log_every == 0 or i == args.steps:
      print(f"step {i}/{args.steps} loss {float(loss):.4f} rec {float(rec):.4f} "
            f"codes used {int((usage > 0).sum())} ({time.time() - t1:.0f}s)", flush=True)
    if i % args.restart_every == 0 and i < args.steps * 0.8:
      dead = np.nonzero(usage == 0)[0]
      if len(dead):
        pool = np.asarray(z).reshape(-1, cfg.code_dim)
        codebook = np.array(params["codebook"])
        codebook[dead] = pool[rng.integers(0, len(pool), len(dead))]
        params = {**params, "codebook": jnp.asarray(codebook)}
      usage[:] = 0
  train_s = time.time() - t1
  vqvae.save_npz(params, args.out)
  codec = seg_codec.SegCodec.from_npz(args.out)
  held_out = phantom_records(args.eval_images, args.seed + 1000, args.image_size)
  miou, n_eval = mean_iou(codec, held_out)
  print(f"saved {args.out}; training {train_s:.0f}s on {n_masks} masks ({len(crops)} crops); "
        f"held-out phantom mIoU {miou:.4f} on {n_eval} masks", flush=True)
  return dict(train_s=train_s, n_masks=n_masks, n_crops=len(crops), miou=miou, n_eval=n_eval)


def parse_args(argv=None):
  p = errors.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--source", default="phantom")
  p.add_argument("--split_seed", type=int, default=0, help="dataset: patient split seed (train split used)")
  p.add_argument("--num_images", type=int, default=400)
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--jitters", type=int, default=3)
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--beta", type=float, default=0.25)
  p.add_argument("--restart_every", type=int, default=100)
  p.add_argument("--enc_widths", type=int, nargs=4, default=[16, 32, 64, 64])
  p.add_argument("--code_dim", type=int, default=32)
  p.add_argument("--dec_width", type=int, default=64)
  p.add_argument("--eval_images", type=int, default=40)
  p.add_argument("--log_every", type=int, default=250)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name in ("num_images", "image_size", "steps", "batch_size", "restart_every", "code_dim",
               "dec_width", "eval_images", "log_every"):
    if getattr(args, name) < 1:
      raise VQVAETrainError(f"--{name} must be >= 1, got {getattr(args, name)}.")
  if args.jitters < 0 or min(args.enc_widths) < 1:
    raise VQVAETrainError(f"--jitters must be >= 0 and --enc_widths >= 1, got {args.jitters} and "
                          f"{args.enc_widths}.")
  for name in ("lr", "beta"):
    if not np.isfinite(getattr(args, name)) or getattr(args, name) <= 0:
      raise VQVAETrainError(f"--{name} must be a positive finite number, got {getattr(args, name)}.")
  return args


def run(argv):
  train(parse_args(argv))
  return 0


def main(argv=None):
  return errors.cli_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
