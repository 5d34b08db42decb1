"""Predict throughput: images/s for all five tasks, against HF transformers in the same run.

  python -m bench.predict_bench [--quick] [--json PATH] [--model_variant bench_100m]
      [--images N] [--repeats N] [--checkpoint CKPT --config CFG]

Rows (same images, prompts and decode length):
- ours, generate only: the 11 generations per image that the five tasks need
  (diagnosis, report, 7 VQA questions, detect, segment), through decode.Predictor;
- HF transformers, generate only: the same prompts, greedy, on the HF export of
  the same weights (serving.export), sdpa attention, torch.inference_mode(), batched
  with padding, torch threads = cores and 1 (on a shared box one thread can win); the
  processor runs before the timed region;
- ours, all five tasks: Runner.run (adds P(tb) scoring of 3 candidates, parsing,
  box scores, VQ-VAE mask decoding and RLE);
- ours, CLI path: predict_files on PNG files (reading, the above, JSON + overlay PNG).

Ours and HF generate-only are timed interleaved (ours, HF, HF 1 thread, ours, ...) after
a warm-up call each, medians kept; the other rows are medians after a warm-up.
same_tokens: the fraction of generations whose greedy tokens equal ours.
The demo model shows the fixed overheads. A random-weight variant whose vocabulary is
not the demo tokenizer's (bench_100m: 257152, PaliGemma's) gets a synthetic tokenizer of
that size (`synthetic_tokenizer`, written to the temporary folder).

Without --checkpoint the weights are random (std 1) `--model_variant` weights: the decode
work per prompt is then set by max_decode_len (random text rarely hits EOS) and
masks are rarely produced; a demo-trained checkpoint gives realistic lengths.
"""
import pathlib
import tempfile

import jax
import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from bench import common
from big_vision_cxr import host_allocator
from big_vision_cxr import npz
from big_vision_cxr import inference
from big_vision_cxr import predict
from big_vision_cxr import serving
from big_vision_cxr import tokenizer as tokenizer_lib
from big_vision_cxr.data import phantom
from big_vision_cxr.models import paligemma
from big_vision_cxr.models import vqvae


def random_assets(folder, variant):
  """Random-weight model and VQ-VAE `.npz` files in `folder` (also used by the notebook test)."""
  rng = np.random.default_rng(0)
  shapes = paligemma.param_shapes(paligemma.get_config(variant))
  npz.save_npz(jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes),
               folder / "model.npz")
  vq_shapes = vqvae.param_shapes(vqvae.Model(vqvae.Config()))
  vqvae.save_npz(jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.2).astype(s.dtype), vq_shapes),
                 folder / "vqvae.npz")
  return folder / "model.npz", folder / "vqvae.npz"


def synthetic_tokenizer(path, vocab_size):
  """The demo tokenizer padded to `vocab_size` pieces in PaliGemma's layout.

  Its base pieces keep their ids (texts encode as with the demo tokenizer); UNUSED
  pieces (never produced by encoding) fill the base vocabulary up to
  vocab_size - 1152, then `<loc0000>`..`<seg127>` at PaliGemma's ids.
  """
  proto = sp_pb.ModelProto()
  proto.ParseFromString(tokenizer_lib.DEMO_TOKENIZER.read_bytes())
  n_extra = len(tokenizer_lib.extra_pieces())
  extra = list(proto.pieces[-n_extra:])
  del proto.pieces[-n_extra:]
  for k in range(vocab_size - n_extra - len(proto.pieces)):
    proto.pieces.add(piece=f"<synthetic{k}>", score=-1e9, type=sp_pb.ModelProto.SentencePiece.UNUSED)
  proto.pieces.extend(extra)
  path.write_bytes(proto.SerializeToString())
  return path


def _hf_generate_fns(hf_dir, jobs, pixels, batch_size, max_new_tokens, threads):
  """One generate-only function per thread count; the processor runs here, untimed."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor  # pylint: disable=import-outside-toplevel
  processor = PaliGemmaProcessor.from_pretrained(hf_dir)
  model = PaliGemmaForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
  batches = [processor(images=[pixels[j.index] for j in jobs[s:s + batch_size]],
                       text=["<image>" + j.prefix for j in jobs[s:s + batch_size]],
                       padding="longest", return_tensors="pt")
             for s in range(0, len(jobs), batch_size)]

  tokens = {}

  def make(n):
    def run():
      torch.set_num_threads(n)
      out = []
      with torch.inference_mode():
        for inputs in batches:
          seqs = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
          out += seqs[:, inputs["input_ids"].shape[1]:].tolist()
      tokens[n] = out
    return run
  return {n: make(n) for n in threads}, tokens


def _same_tokens(ours, hf):
  """Fraction of generations whose tokens equal HF's (HF pads after EOS up to the longest)."""
  return float(np.mean([h[:len(o)] == o for o, h in zip(ours, hf)]))


def main(argv=None):
  parser = common.arg_parser(__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", help="our workdir or .npz (default: random demo weights)")
  parser.add_argument("--config", help="training config for --checkpoint, e.g. configs/cxr_mix.py:demo")
  parser.add_argument("--model_variant", default="demo")
  parser.add_argument("--vqvae", help="VQ-VAE .npz (default: the demo asset or a random one)")
  parser.add_argument("--no_hf", action="store_true", help="skip the transformers reference")
  parser.add_argument("--images", type=int, help="images (default 8; --quick: 2)")
  parser.add_argument("--repeats", type=int, help="timed repeats (default 3; --quick: 1)")
  args = parser.parse_args(argv)
  n_images = args.images or (2 if args.quick else 8)
  batch_size = 8
  max_decode_len = 8 if args.quick else 32
  repeats = args.repeats or (1 if args.quick else 3)

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    checkpoint, vq, tok = args.checkpoint, args.vqvae, None
    if checkpoint is None:
      checkpoint, random_vq = random_assets(tmp, args.model_variant)
      vq = vq or random_vq
      vocab_size = paligemma.get_config(args.model_variant).llm.vocab_size
      if vocab_size != tokenizer_lib.Tokenizer(tokenizer_lib.DEMO_TOKENIZER).vocab_size:
        tok = synthetic_tokenizer(tmp / "synthetic.model", vocab_size)
    config = None
    if args.config:
      from big_vision_cxr import config as config_lib  # pylint: disable=import-outside-toplevel
      config = config_lib.load_config(args.config)
    loaded = inference.load(checkpoint, config=config, model_variant=None if config else args.model_variant,
                            tokenizer=tok, vqvae=vq, class_names=None if config else phantom.CLASS_NAMES)
    runner = inference.Runner(loaded, batch_size=batch_size, max_decode_len=max_decode_len)
    images = [phantom.generate(200_000 + i, size=256).image for i in range(n_images)]
    inputs = np.stack([loaded.model_input(im) for im in images])
    jobs = inference.task_jobs(n_images, inference.TASKS, loaded.prompts)
    files = []
    for i, im in enumerate(images):
      from PIL import Image  # pylint: disable=import-outside-toplevel
      files.append(tmp / "in" / f"img{i}.png")
      files[-1].parent.mkdir(exist_ok=True)
      Image.fromarray(im).save(files[-1])

    ours_tokens = []

    def ours_generate():
      ours_tokens[:] = [g["tokens"] for g in runner._generate(inputs, jobs)]  # pylint: disable=protected-access

    rows = []
    def add(name, seconds, ref=None):
      row = dict(path=name, images=n_images, seconds=seconds, images_per_s=n_images / seconds,
                 generations_per_s=len(jobs) / seconds)
      if ref is not None:
        row["vs_hf"] = common.ratio(row["images_per_s"], ref["images_per_s"])
      rows.append(row)
      return row

    timed = common.time_fn
    hf_row = None
    if args.no_hf:
      generate_row = add("ours: generate only (11 prompts/image)", timed(ours_generate, repeats))
    else:
      hf_dir = tmp / "hf"
      serving.export(checkpoint, hf_dir, config=config, tokenizer=tok,
                     model_variant=None if config else args.model_variant)
      pixels = [np.round((x + 1) * 127.5).astype(np.uint8) for x in inputs]
      import os  # pylint: disable=import-outside-toplevel
      threads = sorted({os.cpu_count(), 1}, reverse=True)
      hf_fns, hf_tokens = _hf_generate_fns(hf_dir, jobs, pixels, batch_size, max_decode_len, threads)
      seconds = common.interleaved([ours_generate, *hf_fns.values()], repeats)
      generate_row = add("ours: generate only (11 prompts/image)", seconds[0])
      hf_rows = [add(f"HF transformers: generate only (torch CPU, sdpa, {n} thread(s))", s)
                 for n, s in zip(threads, seconds[1:])]
      for n, row in zip(threads, hf_rows):
        row["same_tokens"] = _same_tokens(ours_tokens, hf_tokens[n])
      hf_row = max(hf_rows, key=lambda r: r["images_per_s"])  # the faster HF is the reference
      generate_row["vs_hf"] = common.ratio(generate_row["images_per_s"], hf_row["images_per_s"])
    add("ours: all five tasks (Runner.run)", timed(lambda: runner.run(images), repeats), hf_row)
    add("ours: CLI path (read PNG, predict, JSON + overlay)",
        timed(lambda: predict.predict_files(runner, files, tmp / "out", progress=False), repeats),
        hf_row)

  notes = [f"model: {loaded.provenance['model_variant']} ({'random std-1 weights' if args.checkpoint is None else checkpoint}"
           f"{', synthetic tokenizer' if tok else ''}), "
           f"image {loaded.image_size} px, batch {batch_size}, max_decode_len {max_decode_len}, "
           f"{len(jobs) // n_images} generations + 3 scorings per image; medians of {repeats} after "
           "1 warm-up each (ours and HF generate-only interleaved).",
           "vs_hf = our images/s / the faster HF transformers row's images/s for the same generations "
           "(higher is faster); same_tokens = fraction of generations whose greedy tokens equal ours."]
  common.report("predict throughput", rows, args, notes=notes)
  return rows


if __name__ == "__main__":
  host_allocator.reexec()  # both sides run with the CLIs' malloc settings
  main()
