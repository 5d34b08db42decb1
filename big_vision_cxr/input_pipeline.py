"""Task/dataset mixture, per-host sharding and a resumable iterator (grain, numpy).

    it = input_pipeline.training(config.input, batch_size=8, seed=0, tokenizer=tok)
    batch = next(it)        # image [B,H,W,3] f32, text/mask_ar/mask_loss [B,L] i32, task_id [B]
    state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes exactly

Design (the config shape is in docs/DATA.md):
- Every dataset in `config.datasets` is read into source records, named and
  split by patient (`data/datasets.py`: `source_name`, `patient_id_prefix`,
  `split_map`): in memory, or, for a TFDS ArrayRecord build, as an index of
  entries without pixels that are read one at a time (`data/tfds_source.py`).
  From the records' summaries alone (`curation.summary`, `task_counts`) the
  requested split's examples are laid out in mixture units, (record, k) pairs
  (`data/stream.py`): one unit per task (`mix_by='task'`, the paper's
  p_t ∝ 1/N_t) or per (dataset, task) (`mix_by='dataset_task'`). A record is
  curated into its one example when drawn.
- Unit weights: 'inverse_size' (∝ 1/N), 'proportional' (∝ N), 'uniform', or a
  dict {unit: weight}; normalised to probabilities.
- Global example g draws its unit from a counter-based RNG (splitmix64 of
  (seed, g)); inside a unit, examples follow a permutation per epoch seeded by
  (seed, unit name, epoch). Every process draws the whole global batch
  (batch_size * P examples) and keeps those with g % P == p, so all hosts walk
  the same global sequence and share one state:
  {'next_example': g, 'unit_counts': {unit: examples drawn}}.
- grain runs it: a MapDataset whose i-th element is this process's i-th example
  (fetch, curate, image pp, tokenise), batched; in training, `num_workers` > 0 does
  that in worker processes (ending with the trainer), each a slice of the batches, the
  order unchanged; evaluation maps in the calling process. `read_threads` > 0 makes
  that many batches at once in each process that maps; by default (None) READ_THREADS
  for streamed data with 0 workers (PNG decoding releases the GIL: one process then
  uses more than one core, and a record read from storage does not stop it), else none
  (in workers they cost more CPU than they save when the data is in the page cache:
  docs/RESULTS.md, issue 13).
  A record that cannot be read is logged and replaced by its unit's next example.
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
  path inference uses too: all but a trailing `value_range` per example (cached
  once per image for in-memory sources with `cache_images`; streamed sources
  keep nothing), the `value_range` per batch in this process.
  Training text goes through `tokenize_train(text_len)`; evaluation batches
  carry no text (evaluators prompt with the ground truths' prefixes).
"""
import collections
import ctypes
import logging
import math
import os
import signal

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr.data import curation, datasets, patients, phantom, prompts, splits
from big_vision_cxr.data import stream, tfds_source

TASK_IDS = {t: i for i, t in enumerate(prompts.TASKS)}
DEFAULTS = dict(
    split="train", split_seed=0, split_fractions=splits.DEFAULT_FRACTIONS, tasks=prompts.TASKS,
    mix_by="task", weights="inverse_size", class_names=None,
    pp_image=None, text_len=64, seg_from_boxes=False,
    seg_codec=None, cache_images=True, object_tasks_positives_only=False, shared_patients="error",
    num_workers=0, read_threads=None, prefetch=None)
OBJECT_TASKS = ("detection", "segmentation")
READ_THREADS = 2  # batches made at once in the trainer's process: streamed data, 0 workers


class InputError(errors.Error):
  """The input config is invalid or yields no examples; the message says which field."""


def _plain(cfg):
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _get(config, key):
  config = _plain(config)
  return config[key] if key in config else DEFAULTS[key]


uniform = stream.uniform  # counter-based uniform in [0, 1) for (seed, index)


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


def _summary(rec):
  return rec.meta["summary"] if "summary" in rec.meta else curation.summary(rec)


def _fetch(rec, masks=True):
  """The full record of an index entry (a streamed stub is read from disk)."""
  return tfds_source.fetch(rec, masks) if rec.image is None else rec


def _plan(config, split, tasks, class_names, train_config, positives_only):
  """(records, seg_from_boxes [n] bool, OrderedDict {unit: stream.Unit}) of `split`, from
  the records' summaries (nothing curated or read yet)."""
  cfgs = _datasets(config)
  tasks = tuple(tasks or _get(config, "tasks"))
  unknown = set(tasks) - set(prompts.TASKS)
  if unknown:
    raise InputError(f"config.tasks has unknown tasks {sorted(unknown)}; known: {prompts.TASKS}")
  mix_by = _get(config, "mix_by")
  if mix_by not in ("task", "dataset_task"):
    raise InputError(f"config.mix_by must be 'task' or 'dataset_task', got {mix_by!r}")
  loaded, _ = _records(config, split, train_config)
  recs, from_boxes, picks = [], [], collections.OrderedDict()
  if mix_by == "task":
    for task in tasks:
      picks[task] = (task, [], [])
  for name, dataset_recs in loaded.items():
    seg_from_boxes = _plain(cfgs[name]).get("seg_from_boxes", _get(config, "seg_from_boxes"))
    for rec in dataset_recs:
      if rec.split != split:
        continue
      counts = curation.task_counts(_summary(rec), tasks, seg_from_boxes=seg_from_boxes,
                                    positives_only=positives_only)
      for task, n in zip(tasks, counts):
        if n:
          unit = picks.setdefault(task if mix_by == "task" else f"{name}/{task}", (task, [], []))
          unit[1].extend([len(recs)] * n)
          unit[2].extend(range(n))
      recs.append(rec)
      from_boxes.append(bool(seg_from_boxes))
  units = collections.OrderedDict((u, stream.Unit(*v)) for u, v in picks.items())
  return recs, np.asarray(from_boxes, bool), units


def _examples(config, plan, *, seg_codec, class_names, image_size, tokenizer=None, keep=None):
  recs, from_boxes, units = plan
  units = collections.OrderedDict((u, v) for u, v in units.items() if keep is None or u in keep)
  return stream.Examples(
      recs, units, fetch=_fetch, class_names=class_names, seg_codec=seg_codec,
      seg_from_boxes=from_boxes, pp_image=_get(config, "pp_image"), image_size=image_size,
      tokenizer=tokenizer, text_len=_get(config, "text_len"),
      cache=_get(config, "cache_images"))


def curated_units(config, *, split, seg_codec=None, tasks=None, class_names=None,
                  train_config=None):
  """OrderedDict {unit name: [curation.Example]} of `split` (see the module doc), all
  curated in memory; `train_config`: as in `evaluation`."""
  names = _class_names(config, class_names)
  plan = _plan(config, split, tasks, names, train_config, positives_only=False)
  make = _examples(config, plan, seg_codec=seg_codec, class_names=names, image_size=None)
  return collections.OrderedDict(
      (u, [make.example(r, unit.task, k, _fetch(plan[0][r])) for r, k in zip(unit.rec, unit.k)])
      for u, unit in make.units.items())


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


def _worker_init(worker_index, worker_count):
  """In each grain worker: one TensorFlow thread should a pp_image use tf.image.resize
  (antialias, other methods; the default resize is numpy and imports no TensorFlow; the
  workers are the parallelism), and end with the trainer, even when it is SIGKILLed (Linux)."""
  del worker_index, worker_count
  os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
  os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    logging.warning("grain workers will outlive a killed trainer (no prctl on this system)")


def _grain(dataset, config, streamed, workers):
  """A grain MapDataset -> an iterator; with `workers` > 0 the map runs in that many
  worker processes (each a slice of the batches, output in order). Each process that
  maps makes config.read_threads batches at once (None: READ_THREADS if `streamed` and
  there are no workers, else 0), buffering config.prefetch of them (None: 2 per
  thread)."""
  import grain  # pylint: disable=import-outside-toplevel
  threads, prefetch = _get(config, "read_threads"), _get(config, "prefetch")
  threads = (READ_THREADS if streamed and not workers else 0) if threads is None else int(threads)
  prefetch = 2 * threads if prefetch is None else int(prefetch)
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  if workers > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults here)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=_worker_init)
  return iter(ds)


class TrainIterator:
  """Endless per-process batches; `get_state()` / `set_state()` resume exactly."""

  def __init__(self, examples, probs, config, *, batch_size, seed, process_index, process_count):
    if not 0 <= process_index < process_count:
      raise InputError(f"process_index {process_index} outside [0, {process_count})")
    if batch_size < 1:
      raise InputError(f"batch_size must be >= 1, got {batch_size}")
    self.examples, self.config = examples, config
    self.names = list(examples.names)
    self.units = {u: stream.Curated(unit, examples) for u, unit in examples.units.items()}
    self.probs = {u: probs[u] for u in self.names}
    self.batch_size, self.seed = batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.truncated = collections.Counter()  # per task, per example drawn
    self._it = None
    self.set_state({"next_example": 0, "unit_counts": {u: 0 for u in self.names}})

  def get_state(self):
    return {"next_example": self._g, "unit_counts": dict(zip(self.names, self._seq.counts(self._g)))}

  def set_state(self, state):
    counts = dict(state["unit_counts"])
    if set(counts) != set(self.names):
      raise InputError(f"iterator state has units {sorted(counts)}, this mixture has {sorted(self.names)}")
    self._g = int(state["next_example"])
    self._restart([int(counts[u]) for u in self.names])

  def _restart(self, counts):
    """A sequence starting at the current example; the grain iterator is made on use."""
    self.close()
    self._seq = stream.Sequence([self.probs[u] for u in self.names], seed=self.seed,
                                start=self._g, counts=counts)
    self.examples.start(self._seq, seed=self.seed, process_index=self.process_index,
                        process_count=self.process_count)

  def close(self):
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None

  def draw(self):
    """The next global example, made here: (global index, unit, curation.Example)."""
    if self._it is not None:
      self._restart(self._seq.counts(self._g))
    g = self._g
    unit, ex = self.examples.draw(g)
    self._g += 1
    return g, unit, ex

  def next_examples(self):
    """This process's `batch_size` examples of the next global batch."""
    drawn = [self.draw() for _ in range(self.batch_size * self.process_count)]
    return [ex for g, _, ex in drawn if g % self.process_count == self.process_index]

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      if self._g != self._seq.start:
        self._restart(self._seq.counts(self._g))
      import grain  # pylint: disable=import-outside-toplevel
      self._it = _grain(grain.MapDataset.range(1 << 40).map(self.examples.train).batch(
          self.batch_size, batch_fn=stream.stack_train), self.config, self.examples.streamed,
          workers=int(_get(self.config, "num_workers")))
    batch = next(self._it)
    self._g += self.batch_size * self.process_count
    for task_id, cut in zip(batch["task_id"], batch.pop("truncated")):
      task = prompts.TASKS[task_id]
      self.truncated[task] += int(cut)  # the suffix ran past text_len + 1: EOS (and more) cut
      if cut and self.truncated[task] == 1:
        logging.warning("text_len=%d truncates %s examples; raise text_len",
                        _get(self.config, "text_len"), task)
    return {**batch, "image": self.examples.model_input.finish(batch["image"])}


def training(config, *, batch_size, seed, tokenizer, process_index=0, process_count=1,
             seg_codec=None, class_names=None, image_size=None):
  """The training iterator of `config` (an ml_collections ConfigDict or dict).

  seg_codec: the VQ-VAE codec (default: from config.seg_codec, None = the demo one).
  class_names: override `class_names(config)`. image_size: the model's, checked
  against pp_image's output (None: not checked; the default pp then gives 224).
  """
  seg_codec = _seg_codec(config, seg_codec)
  names = _class_names(config, class_names)
  plan = _plan(config, _get(config, "split"), None, names, None,
               positives_only=_get(config, "object_tasks_positives_only"))
  probs = mixture_weights({u: len(v) for u, v in plan[2].items()}, _get(config, "weights"))
  logging.info("mixture: %s", {u: (len(plan[2][u]), round(p, 4)) for u, p in probs.items()})
  make = _examples(config, plan, seg_codec=seg_codec, class_names=names, image_size=image_size,
                   tokenizer=tokenizer, keep=probs)
  return TrainIterator(make, probs, config, batch_size=batch_size, seed=seed,
                       process_index=process_index, process_count=process_count)


def evaluation(config, *, task, split, batch_size, seg_codec=None, process_index=0,
               process_count=1, class_names=None, image_size=None, train_config=None):
  """Yields (batch, ground_truths) over every `task` example of `split`, in order.

  The batch holds 'image' [B, size, size, 3] f32 and 'valid' [B] bool; evaluators
  prompt with the ground truths' prefixes. Process p
  takes examples p, p + P, ...; every process yields the same number of batches
  (multi-host jit needs it), padded by repeating an example with valid=False;
  `ground_truths` lists only the valid rows, which come first. Examples are made in
  this process (config.read_threads at once; num_workers is for training): worker
  processes would start afresh for every call, seconds each, and an eval's time is
  the model's decoding. seg_codec, class_names, image_size: as in `training`.
  train_config: the input config the evaluated model was trained on (when it is not
  `config`): patients of its training split found in `split` are an error, or left out
  (shared_patients).
  """
  if task not in prompts.TASKS:
    raise InputError(f"unknown task {task!r}; known: {prompts.TASKS}")
  seg_codec = _seg_codec(dict(_plain(config), tasks=(task,)), seg_codec)
  names = _class_names(config, class_names)
  plan = _plan(config, split, (task,), names, train_config, positives_only=False)
  everything = [(r, task, k) for unit in plan[2].values() for r, k in zip(unit.rec, unit.k)]
  if not everything:
    logging.warning("evaluation: no %s examples in split %r", task, split)
    return
  mine = everything[process_index::process_count]
  n_batches = math.ceil(math.ceil(len(everything) / process_count) / batch_size)
  items, valid = [], []
  for b in range(n_batches):
    chunk = mine[b * batch_size:(b + 1) * batch_size]
    valid.append(np.arange(batch_size) < len(chunk))
    items += [(*e, True) for e in chunk] + [(*(chunk or everything)[-1], False)] * (batch_size - len(chunk))
  make = _examples(config, plan, seg_codec=seg_codec, class_names=names, image_size=image_size)
  import grain  # pylint: disable=import-outside-toplevel
  batches = _grain(grain.MapDataset.source(items).map(make.get).batch(
      batch_size, batch_fn=stream.stack_eval), config, make.streamed, workers=0)
  for b in range(n_batches):
    images, gts = next(batches)
    yield {"image": make.model_input.finish(images), "valid": valid[b]}, gts
