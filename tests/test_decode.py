"""decode: cached generation == a no-cache full-forward loop; samplers, beam, EOS, score, Predictor."""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_cxr import decode
from big_vision_cxr import tokenizer as tk
from big_vision_cxr.models import paligemma as pg

STEPS = 8
PROMPTS = [[2, 10, 11, 12, 13, 108], [2, 14, 108], [2, 15, 16, 108], [2, 17, 18, 19, 20, 21, 108]]
DEMO_TOKENIZER = pathlib.Path(pg.__file__).parents[1] / "assets" / "cxr_demo_spm.model"


def _random_params(model, seed=0):
  """Random weights everywhere (the zero-initialised ViT head would hide the image). A small
  tied embedding keeps a random model from just repeating its last token."""
  img = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), img, jnp.ones((1, 4), jnp.int32),
                          jnp.ones((1, 4), jnp.int32))["params"]
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  scale = lambda path: 0.02 if "input_embedding" in jax.tree_util.keystr(path) else 0.5
  return jax.tree.unflatten(treedef, [scale(path) * jax.random.normal(key, leaf.shape)
                                      for (path, leaf), key in zip(leaves, keys)])


def _model(variant, **llm):
  cfg = pg.get_config(variant)
  cfg.llm.update(llm)
  return pg.Model(**cfg)


@pytest.fixture(scope="module", params=["tiny", "tiny_pg2"])
def setup(request):
  model = _model(request.param)
  params = _random_params(model)
  images = jax.random.uniform(jax.random.PRNGKey(7), (len(PROMPTS), 32, 32, 3), minval=-1, maxval=1)
  text = np.zeros((len(PROMPTS), 8), np.int32)
  for i, p in enumerate(PROMPTS):
    text[i, :len(p)] = p
  return model, params, images, text


class Reference:
  """No cache: re-runs the full training-layout forward on [prompt, generated] every step."""

  def __init__(self, model, params, images):
    self.params, self.images = params, images
    self.fwd = jax.jit(lambda p, im, t, a: model.apply({"params": p}, im, t, a)[0])

  def logprobs(self, prompts, generated, rows=None):
    """Log-softmax [B, S, V] of the distributions that produced generated[:, s].

    One buffer shape (longest prompt + STEPS) for every call, so one compile."""
    rows = np.arange(len(prompts)) if rows is None else np.asarray(rows)
    buf = np.zeros((len(prompts), max(map(len, PROMPTS)) + STEPS), np.int32)
    mask_ar = np.ones_like(buf)
    for i, p in enumerate(prompts):
      buf[i, :len(p)], mask_ar[i, :len(p)] = p, 0
      buf[i, len(p):len(p) + generated.shape[1]] = generated[i]
    logp = jax.nn.log_softmax(self.fwd(self.params, self.images[rows], buf, mask_ar))
    return np.stack([logp[i, len(p) - 1:len(p) - 1 + generated.shape[1]]
                     for i, p in enumerate(prompts)])

  def greedy(self, prompts, steps):
    tokens = np.zeros((len(prompts), steps), np.int32)
    logps = np.zeros((len(prompts), steps), np.float32)
    for s in range(steps):
      logp = self.logprobs(prompts, tokens)[:, s]  # Causal: tokens from s on don't matter.
      tokens[:, s] = np.argmax(logp, axis=-1)
      logps[:, s] = logp[np.arange(len(prompts)), tokens[:, s]]
    return tokens, logps

  def token_logprobs(self, prompts, generated):
    logp = self.logprobs(prompts, generated)
    return np.take_along_axis(logp, generated[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def reference(setup):
  model, params, images, _ = setup
  return Reference(model, params, images)


@pytest.fixture(scope="module")
def greedy(setup):
  model, params, images, text = setup
  fn = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=-1)
  return jax.device_get(fn(params, images, text, text != 0, None))


def test_cached_greedy_equals_full_forward_loop(greedy, reference):
  tokens, logps = greedy
  ref_tokens, ref_logps = reference.greedy(PROMPTS, STEPS)
  np.testing.assert_array_equal(tokens, ref_tokens)
  np.testing.assert_allclose(logps, ref_logps, atol=1e-5)
  assert len(set(tokens.ravel().tolist())) > STEPS  # Not a degenerate constant output.


def test_beam_size_one_is_greedy(setup, greedy):
  model, params, images, text = setup
  fn = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=-1, beam_size=1)
  tokens, logps = fn(params, images, text, text != 0, None)
  np.testing.assert_array_equal(tokens, greedy[0])
  np.testing.assert_allclose(logps, greedy[1], atol=1e-6)


def test_beam_search(setup, greedy, reference):
  model, params, images, text = setup
  fn = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=-1, beam_size=8)
  tokens, logps = jax.device_get(fn(params, images, text, text != 0, None))
  np.testing.assert_allclose(logps, reference.token_logprobs(PROMPTS, tokens), atol=1e-5)
  assert np.all(logps.sum(1) >= greedy[1].sum(1) - 1e-5)
  assert np.any(logps.sum(1) > greedy[1].sum(1) + 1e-3)  # Beam search did find better ones.


def test_beam_search_stops_at_eos(setup, reference):
  """A hypothesis that ends with EOS keeps its score (no further costs): the best beam of
  example 0 without EOS, cut at its 3rd token made EOS, must come back finished."""
  model, params, images, text = setup
  free = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=-1, beam_size=4)
  eos = int(jax.device_get(free(params, images, text, text != 0, None))[0][0, 2])
  fn = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=eos, beam_size=4)
  tokens, logps = jax.device_get(fn(params, images, text, text != 0, None))
  assert eos in tokens[0].tolist()[:3]
  ref = reference.token_logprobs(PROMPTS, tokens)
  for i in range(len(PROMPTS)):
    row = tokens[i].tolist()
    stop = row.index(eos) + 1 if eos in row else STEPS
    np.testing.assert_allclose(logps[i, :stop], ref[i, :stop], atol=1e-5)
    assert np.all(tokens[i, stop:] == 0) and np.all(logps[i, stop:] == 0)


def test_beam_search_is_exact_on_two_tokens(setup, reference):
  """With 2 steps, beam k returns the best pair whose first token is among the top-k."""
  model, params, images, text = setup
  k = 4
  tokens, logps = jax.device_get(decode.make_generate_fn(
      model, max_decode_len=2, eos_id=-1, beam_size=k)(params, images, text, text != 0, None))
  first = reference.logprobs(PROMPTS, np.zeros((len(PROMPTS), 1), np.int32))[:, 0]
  for i, p in enumerate(PROMPTS):
    top = np.argsort(-first[i])[:k]  # k == batch size: same shape as the other calls.
    pairs = np.stack([top, np.zeros(k, int)], axis=1).astype(np.int32)
    second = reference.logprobs([p] * k, pairs, rows=[i] * k)[:, 1]  # [k, V]
    j = int(np.argmax(second.max(-1) + first[i, top]))
    best = (first[i, top[j]] + second[j].max(), [int(top[j]), int(second[j].argmax())])
    assert tokens[i].tolist() == best[1]
    np.testing.assert_allclose(logps[i].sum(), best[0], atol=1e-5)


@pytest.mark.parametrize("sampler,kw", [("temperature", dict(temperature=1.5)),
                                        ("top_k", dict(top_k=3, temperature=2.0)),
                                        ("top_p", dict(top_p=0.5, temperature=1.0))])
def test_sampling(setup, reference, sampler, kw):
  model, params, images, text = setup
  fn = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=-1, sampler=sampler, **kw)
  run = lambda seed: jax.device_get(fn(params, images, text, text != 0, jax.random.PRNGKey(seed)))
  tokens, logps = run(0)
  np.testing.assert_array_equal(run(0)[0], tokens)  # Reproducible with a fixed rng.
  assert not np.array_equal(run(1)[0], tokens)
  ref_logp = reference.logprobs(PROMPTS, tokens)  # [B, S, V] untempered
  chosen = np.take_along_axis(ref_logp, tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(logps, chosen, atol=1e-5)  # Untempered model log-probs.
  rank = (ref_logp > chosen[..., None]).sum(-1)  # 0 = most likely token.
  if sampler == "top_k":
    assert rank.max() < 3
    assert rank.max() > 0  # It does sample, not just argmax.
  if sampler == "top_p":  # Chosen token is inside the nucleus: mass of better tokens < p.
    probs = np.exp(ref_logp / kw["temperature"] - np.log(np.exp(ref_logp / kw["temperature"]).sum(-1, keepdims=True)))
    better_mass = np.where(ref_logp > chosen[..., None], probs, 0).sum(-1)
    assert np.all(better_mass < 0.5 + 1e-5)
  if sampler == "temperature":
    assert rank.max() > 3


def test_bfloat16_weights(setup, reference):
  """weights_dtype=bfloat16: log-probs within bf16 rounding of the exact model's for the same
  tokens; batch 1 gives what the batch gives for that example."""
  model, params, images, text = setup
  fn = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=-1, weights_dtype=jnp.bfloat16)
  tokens, logps = jax.device_get(fn(params, images, text, text != 0, None))
  np.testing.assert_allclose(logps, reference.token_logprobs(PROMPTS, tokens), atol=0.1)
  one, one_logps = jax.device_get(fn(params, images[:1], text[:1], text[:1] != 0, None))
  np.testing.assert_array_equal(one[0], tokens[0])
  np.testing.assert_allclose(one_logps[0], logps[0], atol=0.02)
  with pytest.raises(decode.DecodeError, match="prepared for weights_dtype"):
    fn(decode.prepare(params), images, text, text != 0, None)


def test_prepared_params_give_the_same_tokens(setup, greedy):
  """prepare() (dot layout, done once) == the stored params prepared inside each call."""
  model, params, images, text = setup
  prepared = decode.prepare(params)
  assert prepared.params["llm"]["embedder"]["input_embedding"].shape[::-1] == (
      params["llm"]["embedder"]["input_embedding"].shape)
  fn = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=-1)
  tokens, logps = jax.device_get(fn(prepared, images, text, text != 0, None))
  np.testing.assert_array_equal(tokens, greedy[0])
  np.testing.assert_allclose(logps, greedy[1], atol=1e-6)


def _while_bodies(hlo):
  """{name: top-level instruction lines} of each while loop's body in compiled HLO text."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name:
      comps[name].append(line)
  return {b: comps[b] for b in set(re.findall(r"body=%?([\w.\-]+)", hlo))}


def _size(dims):  # "4,32,12" -> 1536
  return int(np.prod([int(d) for d in dims.split(",") if d]))


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_copies_no_weight(setup, batch):
  """The compiled decode loop reads each weight where `prepare` put it: inside the while
  loop no copy, transpose, slice or loop fusion makes a weight-sized array (>= 1/16 of
  it: a layer's slice of a stack counts) out of a weight (head included); gathering the
  embeddings of B tokens is fine."""
  model, params, images, text = setup
  fn = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=-1)
  prepared = decode.prepare(params)
  rows = np.arange(batch) % len(text)
  hlo = fn.lower(prepared, images[rows], text[rows], text[rows] != 0, None).compile().as_text()
  shapes = {",".join(map(str, w.shape)) for w in jax.tree.leaves(prepared.params["llm"])
            if w.ndim >= 2}
  decode_loop = [lines for lines in _while_bodies(hlo).values()
                 if any("llm_forward" in line for line in lines)]
  assert len(decode_loop) == 1
  weights = {}  # The loop's name of each weight it carries -> its size.
  for line in decode_loop[0]:
    inst = re.match(r"\s*%(\S+) = \w+\[([\d,]*)\]\S* get-tuple-element\(", line)
    if inst and inst.group(2) in shapes:
      weights[inst.group(1)] = _size(inst.group(2))
  assert weights
  moved = []
  for line in decode_loop[0]:
    inst = re.match(r"\s*%\S+ = \w+\[([\d,]*)\]\S* (copy|transpose|slice|dynamic-slice|fusion)\(",
                    line)
    read = [weights[n] for n in re.findall(r"%([\w.\-]+)", line.split("(", 1)[-1]) if n in weights]
    if inst and read and "kind=kCustom" not in line and 16 * _size(inst.group(1)) >= min(read):
      moved.append(line.strip()[:160])
  assert not moved, moved


def test_eos_stops_each_example(setup, greedy):
  model, params, images, text = setup
  tokens = greedy[0]
  # The EOS is some example's token that first appears at step >= 1 of its output.
  row, first_new = next((i, s) for i in range(len(PROMPTS)) for s in range(1, STEPS)
                        if tokens[i, s] not in tokens[i, :s])
  eos = int(tokens[row, first_new])
  fn = decode.make_generate_fn(model, max_decode_len=STEPS, eos_id=eos)
  got, logps = jax.device_get(fn(params, images, text, text != 0, None))
  for i in range(len(PROMPTS)):
    stop = list(tokens[i]).index(eos) + 1 if eos in tokens[i] else STEPS
    np.testing.assert_array_equal(got[i, :stop], tokens[i, :stop])
    np.testing.assert_allclose(logps[i, :stop], greedy[1][i, :stop], atol=1e-6)
    assert np.all(got[i, stop:] == 0) and np.all(logps[i, stop:] == 0)


def test_score_equals_forward_logprobs(setup, greedy, reference):
  model, params, images, text = setup
  suffix = greedy[0][:, :5]
  length = max(map(len, PROMPTS)) + 5 + 2
  buf, mask_ar, mask_loss = (np.zeros((len(PROMPTS), length), np.int32) for _ in range(3))
  for i, p in enumerate(PROMPTS):
    row = p + suffix[i].tolist() + [1]
    buf[i, :len(row)] = row
    mask_ar[i, len(p):] = 1
    mask_loss[i, len(p):len(row)] = 1
  total, per_token = decode.make_score_fn(model)(params, images, buf, mask_ar, mask_loss)
  with_eos = np.c_[suffix, np.ones(len(PROMPTS), np.int32)]
  np.testing.assert_allclose(total, reference.token_logprobs(PROMPTS, with_eos).sum(1), atol=1e-4)
  np.testing.assert_allclose(np.asarray(per_token).sum(1), total, atol=1e-5)


@pytest.mark.parametrize("vocab", [257152, 1000, 7])
def test_argmax_equals_jnp_argmax(vocab):
  """Ties (first index wins, also across blocks), NaN (the first, as for jnp.argmax), an
  all -inf row and a vocabulary that is not a multiple of the block."""
  rng = np.random.default_rng(vocab)
  logits = rng.standard_normal((6, vocab)).astype(np.float32)
  logits[1] = np.round(logits[1])  # Many ties at the max.
  logits[2, [vocab // 3, vocab - 1]] = 100.0  # A tie across blocks.
  logits[3, [vocab // 2, vocab - 1]] = np.nan
  logits[4] = -np.inf
  logits[5, -1] = 1e9  # The max in the padded last block.
  got = jax.jit(decode.argmax)(jnp.asarray(logits))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


def test_bad_arguments():
  model = _model("tiny")
  for kw, msg in [(dict(sampler="nucleus"), "sampler must be"),
                  (dict(sampler="top_k"), "top_k"),
                  (dict(sampler="top_p", top_p=1.5), "top_p"),
                  (dict(sampler="temperature", temperature=0.0), "temperature"),
                  (dict(beam_size=0), "beam_size"),
                  (dict(beam_size=2, sampler="top_k", top_k=2), "beam search"),
                  (dict(max_decode_len=0), "max_decode_len")]:
    with pytest.raises(decode.DecodeError, match=msg):
      decode.make_generate_fn(model, **{"max_decode_len": 4, "eos_id": 1, **kw})


@pytest.fixture(scope="module")
def predictor_setup():
  tok = tk.Tokenizer(DEMO_TOKENIZER)
  model = _model("tiny", vocab_size=tok.vocab_size)
  params = _random_params(model, seed=3)
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(4), (5, 32, 32, 3), minval=-1, maxval=1))
  return tok, model, params, images


def test_predictor_generate_and_score(predictor_setup):
  tok, model, params, images = predictor_setup
  prefixes = ["detect tuberculosis", "answer en is the heart enlarged?", "caption en"]
  pred = decode.Predictor(model, tok, max_decode_len=6)
  assert pred.prompt_tokens(prefixes[0]) == [tok.bos_id] + tok.encode(prefixes[0]) + [tok.sep_id]
  out = pred.generate(params, images[:3], prefixes)
  fn = decode.make_generate_fn(model, max_decode_len=6, eos_id=tok.eos_id)
  text = np.zeros((3, 16), np.int32)
  for i, p in enumerate(prefixes):
    ids = pred.prompt_tokens(p)
    text[i, :len(ids)] = ids
  tokens, logps = fn(params, images[:3], text, text != 0, None)
  for i, res in enumerate(out):
    n = len(res["tokens"])
    assert res["tokens"] == tokens[i, :n].tolist() and 1 <= n <= 6
    np.testing.assert_allclose(res["token_logprobs"], logps[i, :n], atol=1e-5)
    assert res["text"] == tok.decode(res["tokens"])
  # Score = teacher-forced log-prob of suffix + EOS in the training layout, one example at a time.
  suffixes = [r["text"] for r in out]
  scores = decode.Predictor(model, tok, max_decode_len=16).score(params, images[:3], prefixes, suffixes)
  score_fn = decode.make_score_fn(model)
  for i, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
    head, tail = pred.prompt_tokens(prefix), tok.encode(suffix) + [tok.eos_id]
    row = np.array([head + tail], np.int32)
    mask_ar = np.array([[0] * len(head) + [1] * len(tail)], np.int32)
    expected, per_token = score_fn(params, images[i:i + 1], row, mask_ar, mask_ar)
    np.testing.assert_allclose(scores[i], expected[0], atol=1e-4)
    assert np.count_nonzero(per_token) == len(tail)
  assert scores.shape == (3,) and np.all(scores < 0)


def test_predictor_buckets_avoid_recompiles(predictor_setup):
  tok, model, params, images = predictor_setup
  pred = decode.Predictor(model, tok, max_decode_len=3)
  first = pred.generate(params, images[:3], ["a", "bb", "detect tb"])
  pred.generate(params, images[:4], ["c", "dd", "e", "f"])  # Same buckets: batch 4, length 16.
  assert pred._generate._cache_size() == 1  # pylint: disable=protected-access
  again = pred.generate(params, images[:1], ["a"])  # Padding examples never change results.
  assert again[0]["tokens"] == first[0]["tokens"]


def test_predictor_errors(predictor_setup):
  tok, model, params, images = predictor_setup
  pred = decode.Predictor(model, tok, max_decode_len=3, max_prompt_len=16)
  with pytest.raises(decode.DecodeError, match="prefix 1 is .* max_prompt_len=16"):
    pred.generate(params, images[:2], ["ok", "word " * 40])
  with pytest.raises(decode.DecodeError, match="2 prefixes for 3 images"):
    pred.generate(params, images[:3], ["a", "b"])
  with pytest.raises(decode.DecodeError, match=r"images must be \[B, H, W, 3\]"):
    pred.generate(params, images[0], ["a"])
  with pytest.raises(decode.DecodeError, match="suffix\\+EOS"):
    pred.score(params, images[:1], ["a"], ["word " * 10])
  with pytest.raises(decode.DecodeError, match="list of str"):
    pred.score(params, images[:1], ["a"], [3])


@pytest.mark.parametrize("kind", ["pg1", "pg2"])
def test_greedy_matches_hf_generate(kind):
  """32 new tokens, token for token, against HF `generate` on the same random weights.

  HF numbers positions from 1 during generation, we from 0: RoPE only sees offsets,
  so the logits agree to float rounding and so do the greedy tokens. HF's vocabulary is
  exactly ours (no padding rows, which HF could otherwise pick) and eos_token_id=-1 on
  both sides so neither stops early."""
  torch = pytest.importorskip("torch")
  hf_utils = pytest.importorskip("hf_utils")
  from big_vision_cxr import hf_interop  # pylint: disable=import-outside-toplevel
  hf = hf_utils.make_hf_model(kind, seed=1, extra_vocab_rows=0)
  with torch.no_grad():  # Sharper than the default random weights: no repeated-token loops.
    for name, p in hf.named_parameters():
      if "embed_tokens" in name:
        p.mul_(0.2)
      elif "language_model" in name and "norm" not in name:
        p.mul_(3.0)
  cfg = pg.get_config(hf_utils.OUR_VARIANT[kind])
  params = hf_interop.params_from_hf(hf.state_dict(), config=cfg)
  image, text, mask_ar = hf_utils.random_inputs(batch=2, prefix_len=6, suffix_len=0, seed=1)
  text[:, -1] = 108  # BOS, prompt, "\n".
  steps = 32
  ours, logps = jax.device_get(decode.make_generate_fn(pg.Model(**cfg), max_decode_len=steps, eos_id=-1)(
      params, image, text, text != 0, None))
  inputs = hf_utils.hf_inputs(hf, image, text, mask_ar)
  del inputs["position_ids"]  # HF's own (1-indexed) generation positions.
  with torch.no_grad():
    out = hf.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=-1,
                      pad_token_id=0, output_scores=True, return_dict_in_generate=True)
  theirs = out.sequences[:, inputs["input_ids"].shape[1]:].numpy()
  assert theirs.shape == (2, steps)
  np.testing.assert_array_equal(ours, theirs)
  hf_logp = torch.stack(out.scores, 1).log_softmax(-1).numpy()
  np.testing.assert_allclose(logps, np.take_along_axis(hf_logp, theirs[..., None], -1)[..., 0],
                             atol=1e-4)
  assert min(len(set(row)) for row in ours.tolist()) > 16  # Varied text, not one repeated token.
