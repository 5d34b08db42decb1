"""Index-based examples: the mixture's global sequence and the per-example work grain runs.

    seq = stream.Sequence(probs, seed=0, start=0, counts=[0] * len(probs))
    unit, k = seq(g)              # global example g: its unit and its rank among that unit's draws
    make = stream.Examples(records, units, unit_names, ...)
    element = make.train(g)       # curated, preprocessed, tokenised (in a grain worker)

- A unit is two arrays over its examples: `rec` (index into `records`) and `k`
  (which example of that task the record gives, `curation.curate`'s order), built
  from the records' summaries alone (`curation.summary`), so a streamed dataset
  curates nothing up front.
- `Sequence` draws the unit of g with splitmix64 of (seed, g) (vectorised, the
  values of `input_pipeline.uniform`) and counts draws per unit from a base state
  in blocks, so g can be looked up in any order (grain workers each take a slice).
- Inside a unit, example k goes to the permutation of its epoch (seeded by seed,
  the unit name and the epoch), as before.
- `Examples` fetches a record (in memory, or `tfds_source.fetch` for a streamed
  one), curates the one example, runs the image pp up to a trailing value_range and
  tokenises. A record that cannot be read or curated is logged in one line naming
  it and replaced by its unit's next example; 16 in a row are an InputError.
"""
import hashlib
import logging
import threading

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr import tokenizer as tokenizer_lib
from big_vision_cxr.data import curation, prompts
from big_vision_cxr.pp import builder, ops_image

_M64 = (1 << 64) - 1
BLOCK = 4096  # draws counted per block (and cached)
MAX_BAD = 16  # bad examples in a row before giving up


class StreamError(errors.Error):
  """Examples cannot be produced; the message names the records."""


def _mix64(x):
  x = (x + 0x9E3779B97F4A7C15) & _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def _mix64_np(x):  # uint64 arrays wrap modulo 2**64 like the masks above
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def uniform(seed, index):
  """Counter-based uniform in [0, 1) for (seed, index)."""
  return _mix64(_mix64(seed & _M64) ^ index) / 2.0 ** 64


def uniforms(seed, start, stop):
  """[uniform(seed, g) for g in range(start, stop)] as float64 [stop - start]."""
  g = np.arange(start, stop, dtype=np.uint64)
  return _mix64_np(np.uint64(_mix64(seed & _M64)) ^ g).astype(np.float64) / 2.0 ** 64


def name_hash(name):
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


class Sequence:
  """Global example g >= start -> (unit, rank of g among its unit's draws), the ranks
  continuing from `counts` (the draws per unit before `start`)."""

  def __init__(self, probs, *, seed, start, counts):
    self.cum = np.cumsum(probs)
    self.cum[-1] = 1.0
    self.seed, self.start = seed, start
    self._counts = [np.asarray(counts, np.int64)]  # [units] at start + b * BLOCK
    self._block = None  # (b, units [BLOCK], ranks [BLOCK])
    self._lock = threading.Lock()

  def __getstate__(self):
    return {**self.__dict__, "_counts": self._counts[:1], "_block": None, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def units(self, lo, hi):
    """Unit indices [hi - lo] of draws lo..hi-1."""
    u = np.searchsorted(self.cum, uniforms(self.seed, lo, hi), side="right")
    return np.minimum(u, len(self.cum) - 1)

  def _get_block(self, b):
    with self._lock:
      if self._block is None or self._block[0] != b:
        while len(self._counts) <= b:
          lo = self.start + (len(self._counts) - 1) * BLOCK
          n = np.bincount(self.units(lo, lo + BLOCK), minlength=len(self.cum))
          self._counts.append(self._counts[-1] + n)
        lo = self.start + b * BLOCK
        units = self.units(lo, lo + BLOCK)
        ranks = np.zeros(BLOCK, np.int64)
        for u in range(len(self.cum)):
          hit = units == u
          ranks[hit] = self._counts[b][u] + np.arange(hit.sum())
        self._block = (b, units, ranks)
      return self._block

  def __call__(self, g):
    if g < self.start:
      raise StreamError(f"example {g} is before this sequence's start {self.start}")
    b, i = divmod(g - self.start, BLOCK)
    _, units, ranks = self._get_block(b)
    return int(units[i]), int(ranks[i])

  def counts(self, g):
    """Draws per unit before g (int list)."""
    b, i = divmod(g - self.start, BLOCK)
    _, units, _ = self._get_block(b)
    return (self._counts[b] + np.bincount(units[:i], minlength=len(self.cum))).tolist()


class Unit:
  """A mixture unit: example j is example k[j] of `task` of record rec[j]."""

  def __init__(self, task, rec, k):
    self.task, self.rec, self.k = task, np.asarray(rec, np.int64), np.asarray(k, np.int64)

  def __len__(self):
    return len(self.rec)


class Curated:
  """A unit whose iteration curates its examples (`Examples.example`), e.g. for the
  baselines' majority answers (a streamed unit reads its records to do so)."""

  def __init__(self, unit, examples):
    self.task, self.rec, self.k, self._examples = unit.task, unit.rec, unit.k, examples

  def __len__(self):
    return len(self.rec)

  def __iter__(self):
    return (self._examples.example(int(r), self.task, int(k)) for r, k in zip(self.rec, self.k))


class Examples:
  """Examples by index, for training (`train(g)`) and evaluation (`get`).

  records: the split's records (full, or streamed stubs: `fetch(record, masks)` reads one;
  masks are decoded only when a unit segments, and for evaluation); units: {name: Unit};
  seg_from_boxes: bool per record. Pickles without its tokenizer/codec objects (rebuilt
  from their files and params in grain's worker processes).
  """

  def __init__(self, records, units, *, fetch, class_names, seg_codec, seg_from_boxes,
               pp_image, image_size, tokenizer=None, text_len=None, cache=False):
    self.records, self.units, self.fetch = records, units, fetch
    self.names = list(units)
    self.class_names, self.seg_codec, self.seg_from_boxes = class_names, seg_codec, seg_from_boxes
    self.pp_image, self.image_size = pp_image, image_size
    self.tokenizer, self.text_len = tokenizer, text_len
    self.streamed = any(r.image is None for r in records)  # read from disk when drawn
    self.cache = cache and not self.streamed  # in memory: images and examples kept once made
    self.masks = any(u.task == "segmentation" for u in units.values())  # else not decoded
    self.sequence, self.seed, self.process_index, self.process_count = None, 0, 0, 1
    self._init_local()

  def _init_local(self):
    self.model_input = ops_image.model_input_fn(self.pp_image, self.image_size)
    self.text_fn = None if self.tokenizer is None else builder.get_preprocess_fn(
        f"tokenize_train({self.text_len})", tokenizer=self.tokenizer)
    self._perms, self.image_cache, self._examples = {}, {}, {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = {k: v for k, v in self.__dict__.items()
             if k not in ("model_input", "text_fn", "_perms", "image_cache", "_examples", "_lock")}
    if self.tokenizer is not None:
      state["tokenizer"] = ("file", self.tokenizer.model_file)
    if self.seg_codec is not None:
      import jax  # pylint: disable=import-outside-toplevel
      state["seg_codec"] = ("params", self.seg_codec.model, jax.device_get(self.seg_codec.params))
    return state

  def __setstate__(self, state):
    if isinstance(state.get("tokenizer"), tuple):
      state["tokenizer"] = tokenizer_lib.Tokenizer(state["tokenizer"][1])
    if isinstance(state.get("seg_codec"), tuple):
      from big_vision_cxr import seg_codec as seg_codec_lib  # pylint: disable=import-outside-toplevel
      state["seg_codec"] = seg_codec_lib.SegCodec(*state["seg_codec"][1:])
    self.__dict__.update(state)
    self._init_local()

  def start(self, sequence, *, seed, process_index, process_count):
    """Training from `sequence` (a Sequence at its start) on this process."""
    self.sequence, self.seed = sequence, seed
    self.process_index, self.process_count = process_index, process_count
    return self

  def _perm(self, u, epoch):
    name, key = self.names[u], (u, epoch)
    with self._lock:
      if key not in self._perms:
        self._perms = {k: v for k, v in self._perms.items() if k[0] != u}
        rng = np.random.default_rng([self.seed & _M64, name_hash(name), epoch])
        self._perms[key] = rng.permutation(len(self.units[name]))
      return self._perms[key]

  def locate(self, u, rank):
    """(record index, k) of the `rank`-th draw of unit u."""
    unit = self.units[self.names[u]]
    epoch, pos = divmod(rank, len(unit))
    j = self._perm(u, epoch)[pos]
    return int(unit.rec[j]), int(unit.k[j])

  def example(self, r, task, k, record=None):
    """The curated example (curation.Example) k of `task` of record r (`record`: r fetched)."""
    key = (r, task, k)
    if key in self._examples:
      return self._examples[key]
    rec = self.fetch(self.records[r], masks=self.masks) if record is None else record
    ex = curation.example(rec, task, k, class_names=self.class_names, seg_codec=self.seg_codec,
                          seg_from_boxes=bool(self.seg_from_boxes[r]))
    if self.cache:
      self._examples[key] = ex
    return ex

  def image(self, ex):
    """The model input up to a trailing value_range: [size, size, 1 or 3]."""
    key = (ex.source, ex.image_id)
    if key in self.image_cache:
      return self.image_cache[key]
    out = self.model_input.stored(ex.image)
    if self.cache:
      self.image_cache[key] = out
    return out

  def _good(self, u, rank, task):
    """The example of draw `rank` of unit u, or of the unit's next draws when a record
    cannot be read (logged in one line naming it); config errors are raised."""
    bad = []
    for attempt in range(MAX_BAD):
      r, k = self.locate(u, rank + attempt)
      if (r, task, k) in self._examples:
        return self._examples[(r, task, k)]
      try:
        record = self.fetch(self.records[r], masks=self.masks)
      except errors.Error as e:
        bad.append(self.records[r].image_id)
        logging.warning("skipping record %r: %s", bad[-1], str(e).splitlines()[0])
        continue
      return self.example(r, task, k, record)
    raise StreamError(f"unit {self.names[u]!r}: {MAX_BAD} unreadable records in a row: {bad[:4]}")

  def train(self, i):
    """This process's i-th training element (global g = i * P + p from the sequence's
    start on): image [S, S, C] uint8 (before value_range), text/mask_ar/mask_loss [L]
    int32, task_id int32, truncated bool."""
    first = self.sequence.start + (self.process_index - self.sequence.start) % self.process_count
    g = first + i * self.process_count
    u, rank = self.sequence(g)
    task = self.units[self.names[u]].task
    ex = self._good(u, rank, task)
    out = self.text_fn({"prefix": ex.prefix, "suffix": ex.suffix})
    return {"image": self.image(ex), "text": out["text"], "mask_ar": out["mask_ar"],
            "mask_loss": out["mask_loss"], "task_id": np.int32(prompts.TASKS.index(task)),
            "truncated": bool(out["text"][-1] not in (tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID))}

  def draw(self, g):
    """(unit name, curated example) of global example g (no preprocessing)."""
    u, rank = self.sequence(g)
    return self.names[u], self._good(u, rank, self.units[self.names[u]].task)

  def get(self, item):
    """Evaluation element of (record, task, k, valid): (image, ground truth or None)."""
    r, task, k, valid = item
    ex = self.example(r, task, k, self.fetch(self.records[r], masks=True))
    return self.image(ex), (ex.ground_truth() if valid else None)


def stack_train(elements):
  """grain batch_fn: the training elements -> one batch (numpy, stacked per key)."""
  return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def stack_eval(elements):
  """grain batch_fn: (image [B, S, S, C], [ground truths of the valid rows])."""
  return np.stack([e[0] for e in elements]), [e[1] for e in elements if e[1] is not None]
