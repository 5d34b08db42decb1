"""Export for serving with HF transformers: weights (convert.py) plus a processor.

`write_processor` writes what `PaliGemmaProcessor.from_pretrained(dir)` needs
(tokenizer.json + tokenizer_config.json, the SigLIP image processor with
`image_seq_length`, processor_config.json) from our SentencePiece model. The
1024 `<loc>` and 128 `<seg>` pieces keep their ids (base_size + i), `<image>`
gets the id right after them (our vocab_size), as HF's config expects.

  python -m big_vision_cxr.serving --checkpoint WORKDIR_OR_NPZ [--config C | --model_variant V] \
      [--tokenizer SPM] --out DIR

A training workdir carries its own settings; a .npz needs --config or --model_variant.

See docs/SERVING.md for transformers inference on the export.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile

from big_vision_cxr import atomic
from big_vision_cxr import errors
from big_vision_cxr import inference
from big_vision_cxr import tokenizer as tokenizer_lib

# big_vision resizes bilinearly; HF's SigLIP default is bicubic. PIL's code for bilinear.
PIL_BILINEAR = 2


class ServingError(errors.Error):
  """An export that cannot be written (bad tokenizer, size, or folder)."""


def hf_tokenizer(tokenizer_file):
  """Our SentencePiece model -> a transformers GemmaTokenizer with the same ids."""
  from transformers import GemmaTokenizer  # pylint: disable=import-outside-toplevel
  tok = tokenizer_lib.Tokenizer(tokenizer_file)
  names = dict(pad_token=tok.id_to_piece(tok.pad_id), eos_token=tok.id_to_piece(tok.eos_id),
               bos_token=tok.id_to_piece(tok.bos_id), unk_token=tok.id_to_piece(tok.unk_id))
  with tempfile.TemporaryDirectory() as tmp:
    # The converter reads `tokenizer.model`; the loc/seg pieces are already in the file
    # only if it is the official one, so write the model as our Tokenizer sees it.
    with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
      f.write(tok.serialized_model())
    hf = GemmaTokenizer.from_pretrained(tmp, mask_token=None, **names)
  if len(hf) != tok.vocab_size:
    raise ServingError(f"{tokenizer_file}: transformers sees {len(hf)} tokens, ours {tok.vocab_size}.")
  return hf


def write_processor(tokenizer_file, out_dir, image_size, num_image_tokens):
  """Writes the tokenizer, image processor and processor configs into `out_dir`."""
  from transformers import PaliGemmaProcessor, SiglipImageProcessorPil  # pylint: disable=import-outside-toplevel
  if image_size <= 0 or num_image_tokens <= 0:
    raise ServingError(f"image_size {image_size} and num_image_tokens {num_image_tokens} must be > 0.")
  image_processor = SiglipImageProcessorPil(
      size=dict(height=image_size, width=image_size), resample=PIL_BILINEAR,
      image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)
  image_processor.image_seq_length = num_image_tokens
  processor = PaliGemmaProcessor(image_processor=image_processor,
                                 tokenizer=hf_tokenizer(tokenizer_file))
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  processor.save_pretrained(out_dir)
  # The saved config would point at the temporary SentencePiece file; tokenizer.json is complete.
  config_path = out_dir / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  config.pop("vocab_file", None)
  config_path.write_text(json.dumps(config, indent=2))
  (out_dir / "tokenizer.model").unlink(missing_ok=True)
  return processor


def export(checkpoint, out_dir, *, config=None, model_variant=None, tokenizer=None, step=None,
           bf16=False):
  """Our checkpoint (orbax workdir or .npz) -> an HF directory with weights and processor.

  The model, params and tokenizer are resolved by `inference.load`, as predict
  resolves them. The embedding is not padded: `<image>` is our vocab_size, one past the
  last row, so HF can never generate an id our tokenizer lacks.
  """
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  from big_vision_cxr import hf_interop  # pylint: disable=import-outside-toplevel
  loaded = inference.load(checkpoint, config=config, model_variant=model_variant,
                        tokenizer=tokenizer, step=step, with_vqvae=False)
  hf_config = hf_interop.save_hf(loaded.params, loaded.model_cfg, out_dir, vocab_pad_multiple=0,
                                 dtype=ml_dtypes.bfloat16 if bf16 else None)
  processor = write_processor(loaded.provenance["tokenizer"], out_dir, loaded.image_size,
                              hf_config["text_config"].get("num_image_tokens")
                              or (loaded.image_size // loaded.model_cfg["img"]["patch_size"]) ** 2)
  if processor.image_token_id != hf_config["image_token_index"]:
    raise ServingError(f"the processor's <image> id {processor.image_token_id} differs from the "
                       f"model's image_token_index {hf_config['image_token_index']}.")
  provenance = dict(loaded.provenance, exported_from="big_vision_cxr.serving")
  if loaded.config is not None:  # the data, model and recipe it was trained with
    provenance["training_config"] = json.loads(loaded.config.to_json_best_effort())
  atomic.write_text(pathlib.Path(out_dir) / "big_vision_cxr_provenance.json",
                    json.dumps(provenance, indent=2))
  return out_dir


def run(argv):
  parser = errors.ArgumentParser(prog="python -m big_vision_cxr.serving", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="our orbax workdir or a .npz")
  parser.add_argument("--config", help="the training config (file.py:args); workdirs store their own")
  parser.add_argument("--model_variant", help="PaliGemma variant of a .npz without --config")
  parser.add_argument("--tokenizer", help="SentencePiece model (default: the run's, or the demo asset)")
  parser.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
  parser.add_argument("--bf16", action="store_true", help="write bfloat16 safetensors")
  parser.add_argument("--out", required=True, help="output directory")
  args = parser.parse_args(argv)
  from big_vision_cxr import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config(args.config) if args.config else None
  export(args.checkpoint, args.out, config=config, model_variant=args.model_variant,
         tokenizer=args.tokenizer, step=args.step, bf16=args.bf16)
  print(f"wrote {args.out}: load it with PaliGemmaForConditionalGeneration.from_pretrained and "
        f"PaliGemmaProcessor.from_pretrained (docs/SERVING.md).", file=sys.stderr)
  return 0


def main(argv=None):
  return errors.cli_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
