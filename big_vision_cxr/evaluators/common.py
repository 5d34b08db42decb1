"""Evaluator base, prediction-record files, shared statistics, and the factory of config.evals.

Every evaluator has a pure `compute_metrics(records, **kw) -> dict[str, float]`
on prediction records (one JSON object per line in a predictions file, formats
in docs/EVALUATION.md, checked by `validate` with schema.py before any metric)
and a class that makes those records with a `decode.Predictor` on eval batches,
so the same numbers come out inside training (`from_config`) and standalone
(`python -m big_vision_cxr.evaluators`, __main__.py). `Evaluator.sampler` gives
the same metrics of any resample of the records (the results table's bootstrap).
"""
import collections
import itertools
import json
import math

import numpy as np

from big_vision_cxr import atomic
from big_vision_cxr import errors
from big_vision_cxr.evaluators import schema
from big_vision_cxr.registry import EVALUATORS


class EvalError(errors.Error):
  """A prediction record or evaluator argument is malformed."""


class Records(list):
  """Records read from a file: `where[i]` is 'path:line' of record i."""

  def __init__(self, records, where):
    super().__init__(records)
    self.where = where


def read_jsonl(path):
  """A predictions file -> Records; errors name the file and line.

  The records' fields are checked later, by `validate`, which names the line.
  """
  records, where = [], []
  try:
    with open(path, "rb") as f:
      for n, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
          raise EvalError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}).") from e
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, too deep
          raise EvalError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)}).") from e
        if not isinstance(rec, dict):
          raise EvalError(f"{path}:{n}: each line must be a JSON object, got {type(rec).__name__}.")
        records.append(rec)
        where.append(f"{path}:{n}")
  except OSError as e:
    raise EvalError(f"cannot read predictions file {path}: {e.strerror}.") from e
  if not records:
    raise EvalError(f"{path}: no records (the file is empty or blank).")
  return Records(records, where)


def validate(kind, records):
  """Checks every record against `kind`'s format (schema.py); the error names record and field."""
  for i, r in enumerate(records):
    try:
      schema.check(kind, r)
    except schema.FieldError as e:
      if isinstance(records, Records):
        at = records.where[i]
      else:
        at = f"{kind} record {i}" + (f" (image_id={r.get('image_id')!r})" if isinstance(r, dict) else "")
      raise EvalError(f"{at}: {e}") from e


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    return x.item()
  if isinstance(x, bytes):
    return x.decode("ascii")
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_jsonl(path, records):
  atomic.write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in records))


def write_json(path, value):
  atomic.write_text(path, json.dumps(value, indent=1, default=_json_default))


def by_source(records, metric_fn, **kw):
  """metric_fn on each source's records -> {'by_source/<src>/<key>': value}.

  Given only when the records mix sources, since pooled numbers then mix
  populations (e.g. TBX11K TB images with NIH normals).
  """
  groups = collections.defaultdict(list)
  for r in records:
    groups[str(r.get("source", "unknown"))].append(r)
  if len(groups) < 2:
    return {}
  out = {}
  for src, recs in sorted(groups.items()):
    for k, v in metric_fn(recs, **kw).items():
      out[f"by_source/{src}/{k}"] = v
  return out


def normalize_answer(text):
  """Lower case, collapse whitespace, strip surrounding punctuation."""
  return " ".join(str(text).lower().split()).strip(" .,;:!?\"'")


def bootstrap_ci(values_fn, n, *, strata=None, n_boot=1000, seed=0, alpha=0.05):
  """Percentile bootstrap CI of `values_fn(indices)` over `n` items.

  With `strata` (an int array [n]) each resample draws with replacement within
  every stratum, keeping its size (stratified bootstrap). NaN statistics of a
  resample are dropped. Returns (low, high) or (nan, nan).
  """
  rng = np.random.default_rng(seed)
  strata = np.zeros(n, int) if strata is None else np.asarray(strata)
  groups = [np.nonzero(strata == s)[0] for s in np.unique(strata)]
  stats = []
  for _ in range(n_boot):
    idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
    v = values_fn(idx)
    if not math.isnan(v):
      stats.append(v)
  if not stats:
    return float("nan"), float("nan")
  return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


class Evaluator:
  """Base: runs `predict_batch` over the eval data, then `compute_metrics`.

  predictor: a `decode.Predictor`. data: an iterable of `(batch, ground_truths)`
  (what `input_pipeline.evaluation` yields; batch['image'] may be padded, only
  the first len(ground_truths) rows are used), or a callable returning one. A
  one-shot iterator is kept in memory after its first pass so that `run` can be
  called at every evaluation step. outfile: optional JSONL of the records.
  task, eval_set: which task and data the records are of (the results table's rows).
  """
  name = None  # the registered type, whose record format schema.py checks

  def __init__(self, predictor, data, *, outfile=None, task=None, eval_set=None, **metric_kw):
    self.predictor = predictor
    self._data = data
    self._cached = None
    self.outfile = outfile
    self.task = task or self.name  # the task of the examples (perplexity: any)
    self.eval_set = eval_set  # the data's name in the results table
    self.metric_kw = metric_kw

  def _batches(self):
    if callable(self._data):
      return self._data()
    if iter(self._data) is self._data:  # one-shot iterator: keep it
      if self._cached is None:
        self._cached = list(self._data)
      return self._cached
    return self._data

  def predict_batch(self, params, batch, ground_truths):
    raise NotImplementedError

  def predict(self, params):
    records = []
    for batch, gts in self._batches():
      if gts:
        records += self.predict_batch(params, batch, list(gts))
    return records

  metric_fn = None  # (records, **options) -> metrics
  options = ()  # the names of the options compute_metrics takes

  sampler_fn = None  # (records, **options) -> fn(indices) -> metric_fn's metrics of records[indices]

  @classmethod
  def _check(cls, records, options):
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
      takes = f"take only {list(cls.options)}" if cls.options else "take no options"
      raise EvalError(f"{cls.name} metrics {takes}, got {unknown}.")
    validate(cls.name, records)

  @classmethod
  def compute_metrics(cls, records, **options):
    """Checks the options and every record (schema.py), then `metrics`."""
    cls._check(records, options)
    return cls.metrics(records, **options)

  @classmethod
  def sampler(cls, records, **options):
    """fn(indices) -> the metrics of [records[i] for i in indices] (repeats allowed), for bootstraps.

    Checked once, like `compute_metrics`. An evaluator with a `sampler_fn` computes its
    own metrics as that function at every index, doing each record's work once (parsing,
    matching boxes); the others run `metric_fn` on the resampled records.
    """
    cls._check(records, options)
    if cls.sampler_fn is not None:
      return cls.sampler_fn(records, **options)
    return lambda indices: cls.metric_fn([records[i] for i in indices], **options)

  @classmethod
  def metrics(cls, records, **options):
    """`metric_fn` over all (valid) records plus per source."""
    return {**cls.metric_fn(records, **options), **by_source(records, cls.metric_fn, **options)}

  def run(self, params):
    records = self.predict(params)
    if self.outfile:
      write_jsonl(self.outfile, records)
    return self.compute_metrics(records, **self.metric_kw)


def base_record(gt):
  """The fields every prediction record copies from its ground truth."""
  return {k: gt.get(k) for k in ("image_id", "patient_id", "source", "task", "prefix")}


def generate(predictor, params, batch, gts):
  """Predictor.generate on the batch's valid rows (padding rows are dropped)."""
  n = len(gts)
  return predictor.generate(params, np.asarray(batch["image"])[:n], [g["prefix"] for g in gts])


# The evaluator type and decoding length of each task (configs; `evaluate --eval` sets).
TASK_EVALS = {
    "diagnosis": dict(type="diagnosis", pred_kw=dict(max_decode_len=8)),
    "vqa": dict(type="vqa", pred_kw=dict(max_decode_len=6)),
    "report": dict(type="report", pred_kw=dict(max_decode_len=48)),
    "detection": dict(type="detection", pred_kw=dict(max_decode_len=48)),
    "segmentation": dict(type="segmentation", pred_kw=dict(max_decode_len=90)),
}


def _plain(cfg):
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _all_splits(input_config, name, cfg):
  """The splits the records of dataset `name` fall in, as the input pipeline assigns them."""
  from big_vision_cxr.data import datasets  # pylint: disable=g-import-not-at-top
  from big_vision_cxr.data import splits  # pylint: disable=g-import-not-at-top
  recs = datasets.split_all({name: cfg}, seed=input_config.get("split_seed", 0),
                            fractions=input_config.get("split_fractions", splits.DEFAULT_FRACTIONS))
  return sorted({r.split for r in recs[name]})


def eval_parts(input_config, datasets, split=None):
  """[(input config, split)] read for an eval naming `datasets` ({name: dataset config,
  which may set its own `split`}): each dataset alone with input_config's other settings,
  at its split or (None) at every split: the whole dataset."""
  if not datasets:
    raise EvalError("an eval's datasets are empty: name at least one dataset.")
  input_config, parts = _plain(input_config), []
  for name, cfg in _plain(datasets).items():
    cfg = _plain(cfg)
    own = cfg.pop("split", split)
    one = dict(input_config, datasets={name: cfg})
    parts += [(one, s) for s in ([own] if own else _all_splits(input_config, name, cfg))]
  return parts


def set_label(input_config, datasets=None, split=None):
  """The default name of an eval's data: 'phantom/test', 'tbx11k/val+nih/all'."""
  if datasets is None:
    return "+".join(sorted(_plain(input_config)["datasets"])) + f"/{split}"
  return "+".join(f"{name}/{_plain(cfg).get('split', split) or 'all'}"
                  for name, cfg in _plain(datasets).items())


def from_config(config, model, tokenizer, seg_codec, *, class_names=None, image_size=None,
                check_train_patients=True):
  """{name: (evaluator, every_n_steps)} from config.evals (docs/EVALUATION.md).

  An entry evaluates `task` on `split` of config.input's datasets or, when it
  names `datasets`, on those (`eval_parts`; no split = all of each: an external
  test set), read with config.input's other settings, prompted with
  `class_names` (None: the data's) and checked against the model's
  `image_size`; `set` names the data in the results table (default `set_label`).
  Patients of config.input's training split found in an eval's own datasets are
  an error or left out (config.input.shared_patients), unless not
  `check_train_patients` (the training data cannot be read).
  every_n_steps 0 or None: only at the end of training.
  """
  if not config.get("evals"):
    return {}
  from big_vision_cxr import decode  # pylint: disable=g-import-not-at-top
  from big_vision_cxr import input_pipeline  # pylint: disable=g-import-not-at-top
  out = {}
  for name, ev in config.evals.items():
    ev = _plain(ev)
    predictor = decode.Predictor(model, tokenizer, **ev.pop("pred_kw", {}))
    task, datasets, split = ev.pop("task"), ev.pop("datasets", None), ev.pop("split", None)
    kw = dict(task=task, batch_size=ev.pop("batch_size", 8), seg_codec=seg_codec,
              class_names=class_names, image_size=image_size)
    if datasets is not None:
      train_config = config.input if check_train_patients else None
      data = itertools.chain(*[input_pipeline.evaluation(c, split=s, train_config=train_config, **kw)
                               for c, s in eval_parts(config.input, datasets, split)])
    elif split:
      data = input_pipeline.evaluation(config.input, split=split, **kw)
    else:
      raise EvalError(f"config.evals.{name}: give the split of config.input's datasets to "
                      f"evaluate, or the eval's own datasets.")
    eval_set = ev.pop("set", None) or set_label(config.input, datasets, split)
    every = ev.pop("log_steps", None)
    kind = ev.pop("type")
    if kind == "segmentation" and seg_codec is not None:
      ev.setdefault("seg_codec", seg_codec)
    out[name] = (EVALUATORS.get(kind)(predictor, data, task=task, eval_set=eval_set, **ev), every)
  return out
