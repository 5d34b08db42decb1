"""Streaming from a TFDS ArrayRecord build through grain: equal to in memory, task rates,
hosts, bad records, and exact resume after SIGKILL (with a grain worker process)."""
import collections
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import stats

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")
from big_vision_cxr import input_pipeline as ip  # pylint: disable=g-import-not-at-top
from big_vision_cxr.data import curation, prompts, stream, tfds_source  # pylint: disable=g-import-not-at-top
from big_vision_cxr.pp import ops_text  # pylint: disable=g-import-not-at-top
from tfds_builders import cxr_tb  # pylint: disable=g-import-not-at-top

TASKS = ("diagnosis", "vqa", "report", "detection")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  builder = cxr_tb.CxrTb(config="phantom_small", data_dir=str(tmp_path_factory.mktemp("ar")))
  builder.download_and_prepare()
  return str(builder.data_dir)


@pytest.fixture(scope="module")
def tok():
  return ops_text.default_tokenizer()


def config(path, **kw):
  return {**dict(datasets={"ph": dict(source="tfds", name=path, split_map={"val": "train"})},
                 tasks=TASKS, pp_image="decode|resize(32)|value_range(-1, 1)", text_len=40), **kw}


def test_the_index_is_streamed_and_matches_the_records(built):
  stubs = tfds_source.read(built)
  assert len(stubs) == 48 and all(s.image is None for s in stubs)
  info = tfds.builder_from_directory(built).info.metadata
  full = {r.image_id: r for r in tfds_source.read(built, stream=False)}
  counts = collections.Counter()
  for s in stubs:
    rec = tfds_source.fetch(s)
    assert rec.image_id == s.image_id and rec.image.shape == (64, 64)
    assert s.meta["summary"] == curation.summary(full[s.image_id])
    counts.update(collections.Counter(e.task for e in curation.curate(rec, class_names=("x",),
                                                                      tasks=TASKS)))
  assert {t: sum(c[t] for c in info["task_counts"].values()) for t in TASKS} == dict(counts)
  assert info["class_names"] == ["active tb", "latent tb"]


def test_streamed_batches_equal_the_in_memory_ones(built, tok):
  a = ip.training(config(built), batch_size=8, seed=0, tokenizer=tok)
  cfg = config(built)
  cfg["datasets"]["ph"]["stream"] = False
  b = ip.training(cfg, batch_size=8, seed=0, tokenizer=tok)
  assert not a.examples.cache and b.examples.cache  # streamed: nothing kept in memory
  for _ in range(5):
    x, y = next(a), next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert a.get_state() == b.get_state()


def test_streamed_evaluation_equals_the_in_memory_one(built):
  cfg = config(built, tasks=("segmentation",))
  memory = config(built, tasks=("segmentation",))
  memory["datasets"]["ph"]["stream"] = False
  kw = dict(task="segmentation", split="test", batch_size=3, seg_codec=_BoxCodec())
  a, b = list(ip.evaluation(cfg, **kw)), list(ip.evaluation(memory, **kw))
  assert len(a) == len(b) == 2  # 4 test images, 3 per batch: one padded
  for (xa, ga), (xb, gb) in zip(a, b):
    np.testing.assert_array_equal(xa["image"], xb["image"])
    np.testing.assert_array_equal(xa["valid"], xb["valid"])
    assert [g["suffix"] for g in ga] == [g["suffix"] for g in gb]
    for g, h in zip(ga, gb):  # masks decoded for evaluation
      np.testing.assert_array_equal(g["objects"]["mask"], h["objects"]["mask"])


class _BoxCodec:
  """A stand-in VQ-VAE: 16 ids from each mask's area."""

  def encode(self, masks, boxes):
    return np.stack([np.full(16, int(m.sum()) % 128) for m in masks]).astype(np.int32)


@pytest.mark.parametrize("workers", [0, 2])
def test_read_threads_and_workers_give_the_same_batches(built, tok, workers):
  plain = ip.training(config(built, read_threads=0), batch_size=4, seed=3, tokenizer=tok)
  threaded = ip.training(config(built, num_workers=workers, read_threads=2), batch_size=4, seed=3,
                         tokenizer=tok)
  for _ in range(6):  # 2 batches at once in each process that maps
    x, y = next(plain), next(threaded)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert plain.get_state() == threaded.get_state()
  threaded.close()


def test_evaluation_starts_no_worker_processes_whatever_num_workers_says(built):
  """Workers would start afresh for every eval call (seconds each): eval reads here."""
  kw = dict(task="diagnosis", split="test", batch_size=3)
  with_workers = ip.evaluation(config(built, num_workers=2), **kw)
  first = next(with_workers)
  assert not multiprocessing.active_children()
  plain = list(ip.evaluation(config(built), **kw))
  for (x, gx), (y, gy) in zip([first, *with_workers], plain, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    assert gx == gy


def test_stream_draws_tasks_at_their_rates(built, tok):
  it = ip.training(config(built), batch_size=100, seed=1, tokenizer=tok)
  n = 3000
  tasks = np.concatenate([next(it)["task_id"] for _ in range(n // 100)])
  observed = [int(np.sum(tasks == prompts.TASKS.index(u))) for u in it.names]
  sizes = {u: len(it.units[u]) for u in it.names}
  inv = {u: 1 / sizes[u] for u in it.names}  # the paper's p_t ∝ 1/N_t
  expected = [n * inv[u] / sum(inv.values()) for u in it.names]
  assert stats.chisquare(observed, expected).pvalue > 1e-4
  assert it.get_state()["unit_counts"] == dict(zip(it.names, observed))


def test_two_hosts_take_disjoint_halves_of_the_global_sequence(built, tok):
  whole = ip.training(config(built), batch_size=8, seed=5, tokenizer=tok)
  hosts = [ip.training(config(built), batch_size=4, seed=5, tokenizer=tok, process_index=p,
                       process_count=2) for p in range(2)]
  for _ in range(3):
    w, parts = next(whole), [next(h) for h in hosts]
    for k in w:
      np.testing.assert_array_equal(w[k][0::2], parts[0][k])
      np.testing.assert_array_equal(w[k][1::2], parts[1][k])
  assert hosts[0].get_state() == hosts[1].get_state() == whole.get_state()
  g = lambda p: {whole.examples.sequence.start + i * 2 + p for i in range(12)}
  assert not g(0) & g(1)


class _Corrupt:
  """A data source whose record `bad` holds PNG bytes that do not decode."""

  def __init__(self, source, bad):
    self.source, self.bad = source, bad

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if i == self.bad:
      tfds.features.Image(shape=(None, None, 1)).decode_example_np(b"\x89PNG\r\n\x1a\n broken")
    return self.source[i]


def test_a_bad_record_is_named_in_one_line_and_skipped(built, tok, caplog):
  stubs = [s for s in tfds_source.read(built) if s.split == "train"]
  keys = [(built, "train", masks) for masks in (True, False)]
  for key in keys:  # pylint: disable=protected-access
    tfds_source.fetch(stubs[0], masks=key[2])
    tfds_source._SOURCES[key] = _Corrupt(tfds_source._SOURCES[key], bad=3)
  try:
    with pytest.raises(tfds_source.TfdsSourceError, match=rf"record 3 \('{stubs[3].image_id}'\)"):
      tfds_source.fetch(stubs[3])
    it = ip.training(config(built, tasks=("diagnosis",)), batch_size=48, seed=0, tokenizer=tok)
    with caplog.at_level("WARNING"):
      batch = next(it)
    assert batch["image"].shape == (48, 32, 32, 3)
    lines = [r.getMessage() for r in caplog.records if "skipping record" in r.getMessage()]
    assert lines and all(stubs[3].image_id in l and "\n" not in l for l in lines)
  finally:
    for key in keys:
      del tfds_source._SOURCES[key]  # pylint: disable=protected-access


def test_only_unreadable_records_stop_with_one_error_naming_them(built, tok, monkeypatch):
  def unreadable(stub, masks=True):
    raise tfds_source.TfdsSourceError(f"record {stub.meta['stream'][2]} ({stub.image_id!r}): broken")
  monkeypatch.setattr(tfds_source, "fetch", unreadable)
  it = ip.training(config(built, tasks=("diagnosis",)), batch_size=4, seed=0, tokenizer=tok)
  with pytest.raises(stream.StreamError, match=r"unit 'diagnosis': 16 unreadable records in a row: \['phantom-s0-"):
    next(it)


_RUN = textwrap.dedent("""
    import hashlib, json, os, signal, sys
    from big_vision_cxr import input_pipeline as ip
    from big_vision_cxr.pp import ops_text
    cfg, out, start, stop, kill_at = json.loads(sys.argv[1])
    it = ip.training(cfg, batch_size=6, seed=3, tokenizer=ops_text.default_tokenizer())
    if start:
      it.set_state(json.loads(open(out + ".state").read()))
    for step in range(start, stop):
      batch = next(it)
      digest = hashlib.sha256(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()
      with open(out, "a") as f:
        f.write(json.dumps([step, digest]) + "\\n")
      with open(out + ".state.tmp", "w") as f:  # what a checkpoint stores with step + 1
        f.write(json.dumps(it.get_state()))
      os.replace(out + ".state.tmp", out + ".state")
      if step + 1 == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _run(cfg, out, start, stop, kill_at=-1):
  """Runs _RUN; output to a file (no pipe a stray worker could hold open)."""
  args = json.dumps([cfg, str(out), start, stop, kill_at])
  with open(f"{out}.log", "w") as log:
    done = subprocess.run([sys.executable, "-c", _RUN, args], stdout=log, stderr=log, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
  done.log = open(f"{out}.log").read()[-2000:]
  return done


def test_resume_after_sigkill_continues_at_exactly_the_next_example(built, tmp_path):
  cfg = config(built, num_workers=1)  # decoding in a grain worker process
  ref, run = tmp_path / "ref.jsonl", tmp_path / "run.jsonl"
  assert _run(config(built), ref, 0, 8).returncode == 0
  killed = _run(cfg, run, 0, 8, kill_at=5)
  assert killed.returncode == -9, killed.log
  resumed = _run(cfg, run, json.loads(open(str(run) + ".state").read())["next_example"] // 6, 8)
  assert resumed.returncode == 0, resumed.log
  want = [json.loads(l) for l in open(ref)]
  got = [json.loads(l) for l in open(run)]
  assert [s for s, _ in got] == list(range(8)) and got == want


def test_sequence_looks_up_any_example_like_the_sequential_draws():
  probs, cum = [0.5, 0.3, 0.2], np.cumsum([0.5, 0.3, 0.2])
  counts, want = [7, 0, 2], []
  for g in range(100, 100 + 2 * stream.BLOCK + 5):
    u = min(int(np.searchsorted(cum, ip.uniform(9, g), side="right")), 2)
    want.append((u, counts[u]))
    counts[u] += 1
  forward, backward = (stream.Sequence(probs, seed=9, start=100, counts=[7, 0, 2]) for _ in "ab")
  assert [forward(g) for g in range(100, 100 + len(want))] == want
  assert [backward(g) for g in reversed(range(100, 100 + len(want)))] == want[::-1]
  assert forward.counts(100 + len(want)) == counts
