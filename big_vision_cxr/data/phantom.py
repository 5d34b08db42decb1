"""A synthetic chest radiograph phantom with TB-like lesions and exact masks.

`generate(index, seed=0, size=256)` is deterministic per (seed, index, size,
difficulty). The picture: dark background, body outline, two dark lungs with a
diaphragm dome, spine/mediastinum, heart (on the patient's left = image right),
ribs, blur and noise. Labels:
- 'tb': 'active tb' lesions (fluffy consolidation, cavity with a dark lumen, or a
  cluster of soft nodular opacities) and/or 'latent tb' (1-3 small, very dense
  calcified nodules), biased to the upper zones;
- 'normal': no lesion;
- 'sick_non_tb': a pleural effusion at one lung base (no TB object).
Every lesion comes with its exact mask, box, patient side, zone and kind.
`meta['lung_mask']` is uint8 [H, W]: 0 outside, 1 patient-right lung (image
left), 2 patient-left lung (image right). `meta['findings']` holds 'effusion'.

Images come in groups of four indices sharing 1-4 patients, so a patient can
have several images (follow-ups keep the patient's label and anatomy):
patient-level splits matter. `difficulty` in [0, 1] shrinks lesions, lowers
their contrast and adds noise; 0 is easy enough for a tiny model at 64 px.
"""
import numpy as np
from scipy import ndimage

from big_vision_cxr.data import images, records
from big_vision_cxr.registry import DATA_SOURCES

SOURCE = "phantom"
CLASS_NAMES = ("active tb", "latent tb")
LABEL_PROBS = (0.5, 0.35, 0.15)  # tb, normal, sick_non_tb
ZONE_PROBS = (0.6, 0.25, 0.15)  # upper, middle, lower for TB lesions
_GROUP = 4


def _rng(*keys):
  return np.random.default_rng([int(k) for k in keys])


def patient_of(index, seed=0):
  """(patient_id, patient_number_in_group) for an image index."""
  group = index // _GROUP
  rng = _rng(seed, 1, group)
  n_patients = int(rng.choice([4, 3, 2], p=[0.5, 0.3, 0.2]))
  pattern = sorted(list(range(n_patients)) + list(rng.integers(0, n_patients, _GROUP - n_patients)))
  k = int(pattern[index % _GROUP])
  return f"phantom-s{seed}-p{group:06d}-{k}", (group, k)


def _ellipse(yy, xx, cy, cx, ry, rx):
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0


def _anatomy(p, yy, xx):
  """Returns (image float [H,W], lung label map uint8 [H,W], lung extents per side)."""
  img = np.full(yy.shape, 0.04, np.float32)
  body = _ellipse(yy, xx, 0.58, 0.5, 0.62, p["body_w"])
  img[body] = 0.52
  lung_map = np.zeros(yy.shape, np.uint8)
  heart = _ellipse(yy, xx, p["heart_y"], 0.5 + p["heart_dx"], p["heart_r"] * 0.85, p["heart_r"])
  extents = {}
  for side, sign, code in (("right", -1, 1), ("left", 1, 2)):
    cx = 0.5 + sign * p["lung_dx"]
    cy, ry, rx = p["lung_cy"], p["lung_ry"], p["lung_rx"]
    # A dome-shaped base: the lung ends lower laterally than medially.
    dome = cy + 0.62 * ry + 0.3 * ry * np.clip(np.abs(xx - 0.5) / (p["lung_dx"] + rx), 0, 1)
    lung = _ellipse(yy, xx, cy, cx, ry, rx) & (yy < dome) & (np.abs(xx - 0.5) > 0.06)
    if side == "left":
      lung &= ~heart
    lung_map[lung] = code
    ys = np.nonzero(lung.any(axis=1))[0]
    extents[side] = (ys.min() / yy.shape[0], (ys.max() + 1) / yy.shape[0])
  lungs = lung_map > 0
  img[lungs] = 0.16
  img[(np.abs(xx - 0.5) < 0.055) & body] = 0.72  # spine / mediastinum
  img[heart] = np.maximum(img[heart], 0.66)
  ribs = np.zeros(yy.shape, bool)
  d = np.abs(xx - 0.5)
  for k in range(9):
    curve = p["lung_cy"] - p["lung_ry"] + 0.02 + k * p["rib_gap"] - 0.3 * d + 1.4 * d ** 2
    ribs |= np.abs(yy - curve) < 0.011
  img[ribs & lungs] += 0.11
  clavicle = np.abs(yy - (0.16 + 0.12 * (d - 0.12) ** 2 * 4)) < 0.012
  img[clavicle & body & (d > 0.05) & (d < 0.3)] += 0.15
  return img, lung_map, extents


def _zone_band(extent, zone, yy):
  top, bottom = extent
  third = (bottom - top) / 3
  k = records.ZONES.index(zone)
  return (yy >= top + k * third) & (yy < top + (k + 1) * third)


def _lesion(kind, rng, yy, xx, cy, cx, scale, size):
  """(shape mask bool [H,W], intensity float [H,W]) for one lesion centred at (cy, cx)."""
  r2 = (yy - cy) ** 2 + (xx - cx) ** 2
  if kind == "consolidation":
    r = rng.uniform(0.06, 0.085) * scale
    noise = ndimage.gaussian_filter(rng.standard_normal(yy.shape), sigma=max(1.0, 0.02 * size))
    noise /= noise.std() + 1e-6
    shape = np.sqrt(r2) / r + 0.25 * noise < 1.0
    texture = 0.8 + 0.2 * np.clip(noise, -2, 2)
    return shape, shape * texture
  if kind == "cavity":
    r = rng.uniform(0.05, 0.07) * scale
    shape = r2 < r ** 2
    lumen = r2 < (0.55 * r) ** 2
    return shape, np.where(lumen, -0.35, 1.0) * shape
  if kind == "nodular opacity":
    shape = np.zeros(yy.shape, bool)
    for _ in range(rng.integers(3, 6)):
      a, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.045 * scale)
      r = rng.uniform(0.018, 0.026) * scale
      shape |= (yy - cy - rad * np.sin(a)) ** 2 + (xx - cx - rad * np.cos(a)) ** 2 < r ** 2
    return shape, 0.75 * shape
  if kind == "calcified nodule":
    shape = np.zeros(yy.shape, bool)
    for j in range(rng.integers(1, 4)):
      a, rad = rng.uniform(0, 2 * np.pi), 0.0 if j == 0 else rng.uniform(0.02, 0.035) * scale
      r = rng.uniform(0.02, 0.028) * scale
      shape |= (yy - cy - rad * np.sin(a)) ** 2 + (xx - cx - rad * np.cos(a)) ** 2 < r ** 2
    return shape, 1.6 * shape
  raise ValueError(f"unknown lesion kind {kind!r}")


def generate(index: int, *, seed: int = 0, size: int = 256, difficulty: float = 0.3,
             label_probs=LABEL_PROBS) -> records.SourceRecord:
  """One deterministic phantom radiograph with its record (see the module doc)."""
  if not 0.0 <= difficulty <= 1.0:
    raise ValueError(f"difficulty must lie in [0, 1], got {difficulty}")
  if size < 32:
    raise ValueError(f"size must be >= 32 pixels, got {size}")
  patient_id, (group, k) = patient_of(index, seed)
  prng = _rng(seed, 2, group, k)
  p = dict(
      body_w=prng.uniform(0.40, 0.46), lung_cy=prng.uniform(0.43, 0.47),
      lung_ry=prng.uniform(0.27, 0.31), lung_rx=prng.uniform(0.13, 0.16),
      lung_dx=prng.uniform(0.175, 0.195), heart_y=prng.uniform(0.62, 0.66),
      heart_dx=prng.uniform(0.04, 0.07), heart_r=prng.uniform(0.11, 0.14),
      rib_gap=prng.uniform(0.055, 0.065))
  label = str(prng.choice(records.LABELS, p=label_probs))
  tb_classes = [("active tb",), ("latent tb",), ("active tb", "latent tb")][
      prng.choice(3, p=[0.6, 0.25, 0.15])]
  rng = _rng(seed, 3, index, size)
  ys = (np.arange(size) + 0.5) / size
  yy, xx = np.meshgrid(ys, ys, indexing="ij")
  img, lung_map, extents = _anatomy(p, yy, xx)
  img = ndimage.gaussian_filter(img, sigma=0.006 * size)
  contrast = 0.42 - 0.3 * difficulty
  scale = 1.3 - 0.6 * difficulty
  masks, labels, lungs, zones, kinds, centres = [], [], [], [], [], []
  findings = {}
  lesion_img = np.zeros_like(img)
  if label == "tb":
    plan = []
    for cls in tb_classes:
      plan += [cls] * int(rng.integers(1, 3))  # 1-2 lesions per class
    for cls in plan:
      kind = (str(rng.choice(["consolidation", "cavity", "nodular opacity"], p=[0.45, 0.3, 0.25]))
              if cls == "active tb" else "calcified nodule")
      for _ in range(20):  # rejection sampling: inside a lung, away from other lesions
        side = str(rng.choice(records.LUNGS))
        zone = str(rng.choice(records.ZONES, p=ZONE_PROBS))
        lung = lung_map == (2 if side == "left" else 1)
        cand = np.argwhere(lung & _zone_band(extents[side], zone, yy))
        if not len(cand):
          continue
        cy, cx = (cand[rng.integers(len(cand))] + 0.5) / size
        if any(np.hypot(cy - a, cx - b) < 0.16 * scale for a, b in centres):
          continue
        shape, inten = _lesion(kind, rng, yy, xx, cy, cx, scale, size)
        shape &= lung
        if shape.sum() < max(6, 0.0006 * size * size):
          continue
        lesion_img += inten * shape * contrast
        masks.append(shape.astype(np.uint8))
        labels.append(cls)
        lungs.append(side)
        zones.append(zone)
        kinds.append(kind)
        centres.append((cy, cx))
        break
    if not masks:  # never a 'tb' image without a lesion
      label = "normal"
  elif label == "sick_non_tb":
    side = str(rng.choice(records.LUNGS))
    lung = lung_map == (2 if side == "left" else 1)
    top, bottom = extents[side]
    level = bottom - rng.uniform(0.25, 0.4) * (bottom - top)
    meniscus = level - 0.6 * np.abs(xx - 0.5 - (0.2 if side == "left" else -0.2)) ** 2
    fluid = lung & (yy > meniscus)
    lesion_img += fluid * (contrast + 0.1)
    findings["effusion"] = side
  img = img + ndimage.gaussian_filter(lesion_img, sigma=0.003 * size)
  img += rng.normal(0, 0.015 + 0.05 * difficulty, img.shape)
  img = img * rng.uniform(0.9, 1.1) + rng.uniform(-0.03, 0.03)
  image = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
  n = len(masks)
  mask = np.stack(masks) if n else np.zeros((0, size, size), np.uint8)
  order = sorted(range(n), key=lambda i: tuple(records.boxes_from_masks(mask[i:i + 1])[0][:2]))
  mask = mask[order]
  objects = records.Objects(
      bbox=records.boxes_from_masks(mask), label=[labels[i] for i in order], mask=mask,
      lung=[lungs[i] for i in order], zone=[zones[i] for i in order],
      kind=[kinds[i] for i in order])
  return records.validate(records.SourceRecord(
      image_id=f"phantom-s{seed}-{index:07d}", patient_id=patient_id, source=SOURCE,
      image=image, label=label, objects=objects,
      meta=dict(lung_mask=lung_map, findings=findings, difficulty=difficulty)))


def dataset(n: int, *, seed: int = 0, size: int = 256, difficulty: float = 0.3, start: int = 0,
            label_probs=LABEL_PROBS):
  """The records of indices [start, start + n), as a list."""
  return [generate(i, seed=seed, size=size, difficulty=difficulty, label_probs=label_probs)
          for i in range(start, start + n)]


@DATA_SOURCES.register("phantom")
def from_config(name, cfg):
  """(records, skips) of dict(source='phantom', n=500, seed=0, size=256, difficulty=0.3)."""
  recs = dataset(cfg.get("n", 500), seed=cfg.get("seed", 0), size=cfg.get("size", 256),
                 difficulty=cfg.get("difficulty", 0.3))
  return recs, images.Skips(name)
