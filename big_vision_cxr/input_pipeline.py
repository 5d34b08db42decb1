"""Task/dataset mixture, per-host sharding and a resumable iterator (numpy).

    it = input_pipeline.training(config.input, batch_size=8, seed=0, tokenizer=tok)
    batch = next(it)        # image [B,H,W,3] f32, text/mask_ar/mask_loss [B,L] i32, task_id [B]
    state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes exactly

Design (the config shape is in docs/DATA.md):
- Every dataset in `config.datasets` is read into source records, named and
  split by patient (`data/datasets.py`: `source_name`, `patient_id_prefix`,
  `split_map`), and the requested split is curated into the tasks' examples
  (`data/curation.py`). Examples are grouped into mixture units: one
  per task (`mix_by='task'`, the paper's p_t ∝ 1/N_t) or one per (dataset,
  task) (`mix_by='dataset_task'`).
- Unit weights: 'inverse_size' (∝ 1/N), 'proportional' (∝ N), 'uniform', or a
  dict {unit: weight}; normalised to probabilities.
- Global example g draws its unit from a counter-based RNG (splitmix64 of
  (seed, g)); inside a unit, examples follow a permutation per epoch seeded by
  (seed, unit name, epoch). Every process draws the whole global batch
  (batch_size * P examples) and keeps those with g % P == p, so all hosts walk
  the same global sequence and share one state:
  {'next_example': g, 'unit_counts': {unit: examples drawn}}.
- `object_tasks_positives_only=True` keeps (in training only) just the
  detection/segmentation examples with at least one object.
- Datasets are read by the source their `source` names (`registry.DATA_SOURCES`);
  a record's `source` is its dataset's name (or `source_name`).
- A patient in two datasets, or in a trained run's training split and the
  evaluated split (`train_config`), is an error or left out
  (`shared_patients`; data/patients.py); `patient_overlap` reports it.
- Class names (detect/segment prompts): config.class_names, else those present
  in the datasets (`class_names(config)`); an explicit `class_names=` argument
  wins (a stored run evaluated later is prompted exactly as it was trained).
- Images go through `pp.ops_image.model_input_fn(pp_image, image_size)`, the
  path inference uses too: all but a trailing `value_range` once per image,
  cached in memory (uint8, grey stored once), the `value_range` per batch.
  Training text goes through `tokenize_train(text_len)`; evaluation batches
  carry no text (evaluators prompt with the ground truths' prefixes).
"""
import collections
import hashlib
import logging
import math

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr import tokenizer as tokenizer_lib
from big_vision_cxr.data import curation, datasets, patients, phantom, prompts, splits
from big_vision_cxr.pp import builder, ops_image

TASK_IDS = {t: i for i, t in enumerate(prompts.TASKS)}
DEFAULTS = dict(
    split="train", split_seed=0, split_fractions=splits.DEFAULT_FRACTIONS, tasks=prompts.TASKS,
    mix_by="task", weights="inverse_size", class_names=None,
    pp_image=None, text_len=64, seg_from_boxes=False,
    seg_codec=None, cache_images=True, object_tasks_positives_only=False, shared_patients="error")
OBJECT_TASKS = ("detection", "segmentation")
_M64 = (1 << 64) - 1


class InputError(errors.Error):
  """The input config is invalid or yields no examples; the message says which field."""


def _plain(cfg):
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _get(config, key):
  config = _plain(config)
  return config[key] if key in config else DEFAULTS[key]


def _mix64(x):
  x = (x + 0x9E3779B97F4A7C15) & _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def uniform(seed, index):
  """Counter-based uniform in [0, 1) for (seed, index)."""
  return _mix64(_mix64(seed & _M64) ^ index) / 2.0 ** 64


def _name_hash(name):
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


load_records = datasets.load  # (name, dataset config) -> (records, skips), cached


def _datasets(config):
  cfgs = _plain(config["datasets"]) if "datasets" in _plain(config) else {}
  if not cfgs:
    raise InputError("config.datasets is empty: name at least one dataset")
  return cfgs


def class_names(config):
  """The detect/segment class names of `config`: config.class_names (sorted) if set, else
  the classes present in its datasets' records (every split), else the phantom's."""
  given = _get(config, "class_names")
  if given:
    return tuple(sorted(given))
  cfgs = _datasets(config)
  names = sorted({l for name in sorted(cfgs) for r in load_records(name, cfgs[name])[0]
                  for l in r.objects.label})
  return tuple(names) or phantom.CLASS_NAMES


def _class_names(config, given):
  return tuple(sorted(given)) if given else class_names(config)


def _seg_codec(config, seg_codec):
  """`seg_codec`, else config.seg_codec (None: the shipped demo VQ-VAE) when segmenting."""
  if "segmentation" not in tuple(_get(config, "tasks")) or seg_codec is not None:
    return seg_codec
  from big_vision_cxr import seg_codec as seg_codec_lib  # pylint: disable=import-outside-toplevel
  return seg_codec_lib.from_config(_get(config, "seg_codec"))


def _split_records(config):
  return datasets.split_all(_datasets(config), seed=_get(config, "split_seed"),
                            fractions=_get(config, "split_fractions"))


def _records(config, split=None, train_config=None):
  """({dataset: split records}, overlap report), the shared patients handled."""
  train, train_split = None, None
  if train_config is not None:
    if split is None:
      raise InputError("train_config needs the evaluated split")
    train_split = _get(train_config, "split")
    train = {n: [r for r in recs if r.split == train_split]
             for n, recs in _split_records(train_config).items()}
  return patients.resolve(_split_records(config), policy=_get(config, "shared_patients"),
                          train=train, split=split, train_split=train_split)


def patient_overlap(config, *, split=None, train_config=None):
  """The patients `config` shares across its datasets and, given `train_config` (the
  trained run's input config) and the evaluated `split`, with train_config's training
  split, as `patients.resolve`'s JSON-able report (what shared_patients='drop' leaves
  out); raises SharedPatientsError under shared_patients='error' when there are any."""
  return _records(config, split, train_config)[1]


def curated_units(config, *, split, seg_codec=None, tasks=None, class_names=None,
                  train_config=None):
  """OrderedDict {unit name: [curation.Example]} of `split` (see the module doc);
  `train_config`: as in `evaluation`."""
  cfgs = _datasets(config)
  tasks = tuple(tasks or _get(config, "tasks"))
  unknown = set(tasks) - set(prompts.TASKS)
  if unknown:
    raise InputError(f"config.tasks has unknown tasks {sorted(unknown)}; known: {prompts.TASKS}")
  mix_by = _get(config, "mix_by")
  if mix_by not in ("task", "dataset_task"):
    raise InputError(f"config.mix_by must be 'task' or 'dataset_task', got {mix_by!r}")
  loaded, _ = _records(config, split, train_config)
  names = _class_names(config, class_names)
  units = collections.OrderedDict()
  if mix_by == "task":
    for task in tasks:
      units[task] = []
  for name, recs in loaded.items():
    seg_from_boxes = _plain(cfgs[name]).get("seg_from_boxes", _get(config, "seg_from_boxes"))
    for rec in recs:
      if rec.split != split:
        continue
      for ex in curation.curate(rec, class_names=names, tasks=tasks, seg_codec=seg_codec,
                                seg_from_boxes=seg_from_boxes):
        units.setdefault(ex.task if mix_by == "task" else f"{name}/{ex.task}", []).append(ex)
  return units


def mixture_weights(sizes, weights):
  """{unit: size} and a weights spec -> {unit: probability} (empty units dropped)."""
  sizes = {u: n for u, n in sizes.items() if n > 0}
  if not sizes:
    raise InputError("no examples in any mixture unit (check the datasets, split and tasks)")
  if isinstance(weights, str):
    if weights == "inverse_size":
      raw = {u: 1.0 / n for u, n in sizes.items()}
    elif weights == "proportional":
      raw = {u: float(n) for u, n in sizes.items()}
    elif weights == "uniform":
      raw = {u: 1.0 for u in sizes}
    else:
      raise InputError(f"config.weights {weights!r}: use inverse_size | proportional | uniform | dict")
  else:
    weights = _plain(weights)
    missing = sorted(set(sizes) - set(weights))
    if missing:
      raise InputError(f"config.weights has no weight for units {missing} (units: {sorted(sizes)})")
    raw = {u: float(weights[u]) for u in sizes}
    if any(w < 0 for w in raw.values()):
      raise InputError(f"config.weights must be non-negative, got {raw}")
  total = sum(raw.values())
  if total <= 0:
    raise InputError(f"config.weights sum to zero: {raw}")
  return {u: w / total for u, w in raw.items() if w > 0}


class _Images:
  """Model inputs of examples (`ops_image.model_input_fn`), first stage cached in memory."""

  def __init__(self, config, image_size):
    self.model_input = ops_image.model_input_fn(_get(config, "pp_image"), image_size)
    self.cache = {} if _get(config, "cache_images") else None

  def stored(self, ex):
    key = (ex.source, ex.image_id)
    if self.cache is not None and key in self.cache:
      return self.cache[key]
    out = self.model_input.stored(ex.image)
    if self.cache is not None:
      self.cache[key] = out
    return out

  def batch(self, exs):
    """float32 [B, size, size, 3]."""
    return self.model_input.finish(np.stack([self.stored(ex) for ex in exs]))


class _Processor:
  """Training batches: images and `tokenize_train` text, both cached per example."""

  def __init__(self, config, tokenizer, image_size):
    self.images = _Images(config, image_size)
    text_len = _get(config, "text_len")
    self.text_fn = builder.get_preprocess_fn(f"tokenize_train({text_len})", tokenizer=tokenizer)
    self.text_len = text_len
    self.truncated = collections.Counter()  # per task, counted once per example when cached
    self.text_cache = {} if _get(config, "cache_images") else None

  def text(self, ex):
    """(text, mask_ar, mask_loss) of one example."""
    key = id(ex)
    if self.text_cache is not None and key in self.text_cache:
      return self.text_cache[key]
    out = self.text_fn({"prefix": ex.prefix, "suffix": ex.suffix})
    out = (out["text"], out["mask_ar"], out["mask_loss"])
    if out[0][-1] not in (tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID):
      self.truncated[ex.task] += 1  # the suffix ran past text_len + 1: EOS (and more) cut
      if self.truncated[ex.task] == 1:
        logging.warning("text_len=%d truncates %s examples (first: %r); raise text_len",
                        self.text_len, ex.task, ex.image_id)
    if self.text_cache is not None:
      self.text_cache[key] = out
    return out

  def batch(self, exs):
    texts = [self.text(e) for e in exs]
    return {"image": self.images.batch(exs), "text": np.stack([t[0] for t in texts]),
            "mask_ar": np.stack([t[1] for t in texts]), "mask_loss": np.stack([t[2] for t in texts])}


class TrainIterator:
  """Endless per-process batches; `get_state()` / `set_state()` resume exactly."""

  def __init__(self, units, probs, processor, *, batch_size, seed, process_index, process_count):
    if not 0 <= process_index < process_count:
      raise InputError(f"process_index {process_index} outside [0, {process_count})")
    if batch_size < 1:
      raise InputError(f"batch_size must be >= 1, got {batch_size}")
    self.names = [u for u in units if u in probs]
    self.units = {u: units[u] for u in self.names}
    self.probs = {u: probs[u] for u in self.names}
    self._cum = np.cumsum([probs[u] for u in self.names])
    self._cum[-1] = 1.0
    self.processor = processor
    self.batch_size, self.seed = batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self._perms = {}
    self.set_state({"next_example": 0, "unit_counts": {u: 0 for u in self.names}})

  def get_state(self):
    return {"next_example": self._g, "unit_counts": dict(self._counts)}

  def set_state(self, state):
    counts = dict(state["unit_counts"])
    if set(counts) != set(self.names):
      raise InputError(f"iterator state has units {sorted(counts)}, this mixture has {sorted(self.names)}")
    self._g, self._counts = int(state["next_example"]), {u: int(counts[u]) for u in self.names}

  def _perm(self, unit, epoch):
    key = (unit, epoch)
    if key not in self._perms:
      self._perms = {k: v for k, v in self._perms.items() if k[0] != unit}
      rng = np.random.default_rng([self.seed & _M64, _name_hash(unit), epoch])
      self._perms[key] = rng.permutation(len(self.units[unit]))
    return self._perms[key]

  def draw(self):
    """The next global example: (global index, unit, example)."""
    g = self._g
    unit = self.names[min(int(np.searchsorted(self._cum, uniform(self.seed, g), side="right")),
                          len(self.names) - 1)]
    k = self._counts[unit]
    epoch, pos = divmod(k, len(self.units[unit]))
    self._g, self._counts[unit] = g + 1, k + 1
    return g, unit, self.units[unit][self._perm(unit, epoch)[pos]]

  def next_examples(self):
    """This process's `batch_size` examples of the next global batch."""
    drawn = [self.draw() for _ in range(self.batch_size * self.process_count)]
    return [ex for g, _, ex in drawn if g % self.process_count == self.process_index]

  def __iter__(self):
    return self

  def __next__(self):
    exs = self.next_examples()
    return {**self.processor.batch(exs),
            "task_id": np.asarray([TASK_IDS[e.task] for e in exs], np.int32)}


def positives_only(units):
  """`units` without the detection/segmentation examples that have no object.

  A training-only option (`object_tasks_positives_only=True`): with many normal images
  a small model trained from scratch learns to answer "no object" and never emits a
  box. Evaluation keeps every image, normals included (any box there is a false positive).
  """
  return collections.OrderedDict(
      (u, [ex for ex in exs if ex.task not in OBJECT_TASKS or len(ex.objects.bbox)])
      for u, exs in units.items())


def training(config, *, batch_size, seed, tokenizer, process_index=0, process_count=1,
             seg_codec=None, class_names=None, image_size=None):
  """The training iterator of `config` (an ml_collections ConfigDict or dict).

  seg_codec: the VQ-VAE codec (default: from config.seg_codec, None = the demo one).
  class_names: override `class_names(config)`. image_size: the model's, checked
  against pp_image's output (None: not checked; the default pp then gives 224).
  """
  seg_codec = _seg_codec(config, seg_codec)
  units = curated_units(config, split=_get(config, "split"), seg_codec=seg_codec,
                        class_names=class_names)
  if _get(config, "object_tasks_positives_only"):
    units = positives_only(units)
  probs = mixture_weights({u: len(v) for u, v in units.items()}, _get(config, "weights"))
  logging.info("mixture: %s", {u: (len(units[u]), round(p, 4)) for u, p in probs.items()})
  return TrainIterator(units, probs, _Processor(config, tokenizer, image_size),
                       batch_size=batch_size, seed=seed, process_index=process_index,
                       process_count=process_count)


def evaluation(config, *, task, split, batch_size, seg_codec=None, process_index=0,
               process_count=1, class_names=None, image_size=None, train_config=None):
  """Yields (batch, ground_truths) over every `task` example of `split`, in order.

  The batch holds 'image' [B, size, size, 3] f32 and 'valid' [B] bool; evaluators
  prompt with the ground truths' prefixes. Process p
  takes examples p, p + P, ...; every process yields the same number of batches
  (multi-host jit needs it), padded by repeating an example with valid=False;
  `ground_truths` lists only the valid rows, which come first. seg_codec,
  class_names, image_size: as in `training`. train_config: the input config the
  evaluated model was trained on (when it is not `config`): patients of its
  training split found in `split` are an error, or left out (shared_patients).
  """
  if task not in prompts.TASKS:
    raise InputError(f"unknown task {task!r}; known: {prompts.TASKS}")
  seg_codec = _seg_codec(dict(_plain(config), tasks=(task,)), seg_codec)
  units = curated_units(config, split=split, seg_codec=seg_codec, tasks=(task,),
                        class_names=class_names, train_config=train_config)
  everything = [ex for unit in units.values() for ex in unit]
  if not everything:
    logging.warning("evaluation: no %s examples in split %r", task, split)
    return
  exs = everything[process_index::process_count]
  n_batches = math.ceil(math.ceil(len(everything) / process_count) / batch_size)
  images = _Images(config, image_size)
  for b in range(n_batches):
    chunk = exs[b * batch_size:(b + 1) * batch_size]
    valid = np.arange(batch_size) < len(chunk)
    chunk = chunk + [(chunk or everything)[-1]] * (batch_size - len(chunk))
    yield ({"image": images.batch(chunk), "valid": valid},
           [e.ground_truth() for e, v in zip(chunk, valid) if v])
