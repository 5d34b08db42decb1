"""Checkpoint conversion between HF transformers and big_vision .npz.

  python -m big_vision_cxr.convert hf2bv --hf_dir DIR --out model.npz
  python -m big_vision_cxr.convert bv2hf --npz model.npz --variant pg1_3b_224 --out_dir DIR
  python -m big_vision_cxr.convert export --workdir runs/x --out m.npz

`bv2hf` writes config.json + model.safetensors loadable by
`PaliGemmaForConditionalGeneration.from_pretrained(DIR)`. Only safetensors are read.
`export` writes a training workdir's last complete checkpoint (LoRA merged with the
run's stored settings) as a big_vision .npz, usable as `config.model_init` or by `bv2hf`.
"""
import argparse
import sys

import jax
import ml_dtypes
import numpy as np

from big_vision_cxr import checkpointing
from big_vision_cxr import errors
from big_vision_cxr import hf_interop
from big_vision_cxr import inference
from big_vision_cxr import npz
from big_vision_cxr import run_settings
from big_vision_cxr.models import paligemma


def _to_bf16(params):
  return jax.tree.map(lambda v: np.asarray(v).astype(ml_dtypes.bfloat16), params)


def hf2bv(hf_dir, out, bf16=False):
  """Reads a save_pretrained directory, writes our .npz; returns our model config."""
  state_dict, hf_config = hf_interop.read_hf_dir(hf_dir)
  config = hf_interop.config_from_hf(hf_config)
  params = hf_interop.params_from_hf(state_dict, config)
  npz.save_npz(_to_bf16(params) if bf16 else params, out)
  return config


def bv2hf(npz_path, variant, out_dir, bf16=False, vocab_pad_multiple=64, config=None):
  """Loads our .npz for `variant` (or a training `config`'s model, e.g. a PG2 fine-tuned
  without the final softcap; checked against its shapes), writes an HF directory."""
  if config is not None:
    from big_vision_cxr.models import common as model_common  # pylint: disable=import-outside-toplevel
    config = model_common.model_config(config)
  else:
    config = paligemma.get_config(variant)
  params = paligemma.load(paligemma.param_shapes(config), npz_path, config)
  return hf_interop.save_hf(params, config, out_dir, vocab_pad_multiple,
                            dtype=ml_dtypes.bfloat16 if bf16 else None)


def export(workdir, out, config=None, step=None, bf16=False):
  """Our orbax training workdir -> big_vision .npz (LoRA merged); returns the step.

  The LoRA settings come from the workdir's stored settings, else from `config`.
  """
  stored = run_settings.read(workdir)
  lora_cfg = stored[1]["lora"] if stored else (config.get("lora") if config else None)
  if stored and config is not None:
    run_settings.check_same("config.lora", lora_cfg, config.get("lora") and config.lora.to_dict(),
                            workdir)
  params, step = checkpointing.restore_params(workdir, step)
  if "lora" in params and not lora_cfg:
    raise errors.CheckpointError(f"{workdir} holds LoRA params but no LoRA settings: pass the "
                                 f"training --config.")
  params = inference.merge_lora(params, lora_cfg) if "lora" in params else params
  npz.save_npz(_to_bf16(params) if bf16 else params, out)
  return step


def run(argv):
  parser = errors.ArgumentParser(prog="python -m big_vision_cxr.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf2bv", help="HF save_pretrained directory -> big_vision .npz")
  a.add_argument("--hf_dir", required=True)
  a.add_argument("--out", required=True, help="output .npz path")
  a.add_argument("--bf16", action="store_true", help="store bfloat16 (as 'V2') instead of f32")
  b = sub.add_parser("bv2hf", help="big_vision .npz -> HF directory")
  b.add_argument("--npz", required=True, help="model.npz (keys with or without 'params/')")
  b.add_argument("--variant", help=f"one of {', '.join(paligemma.VARIANTS)}")
  b.add_argument("--config", help="the training config (file.py:args) instead of --variant")
  b.add_argument("--out_dir", required=True)
  b.add_argument("--bf16", action="store_true", help="write bfloat16 safetensors")
  b.add_argument("--vocab_pad_multiple", type=int, default=64,
                 help="pad the HF embedding (with room for <image>) to this multiple; 0: none")
  e = sub.add_parser("export", help="our training workdir -> big_vision .npz")
  e.add_argument("--workdir", required=True)
  e.add_argument("--config", help="the training config (file.py:args); workdirs store their own")
  e.add_argument("--out", required=True, help="output .npz path")
  e.add_argument("--step", type=int, default=None, help="default: the last complete one")
  e.add_argument("--bf16", action="store_true", help="store bfloat16 (as 'V2') instead of f32")
  args = parser.parse_args(argv)
  if args.command == "hf2bv":
    if not args.out.endswith(".npz"):
      parser.error(f"--out must end in .npz, got {args.out!r}")
    config = hf2bv(args.hf_dir, args.out, args.bf16)
    print(f"wrote {args.out} (img {dict(config.img)}, llm {dict(config.llm)})")
  elif args.command == "export":
    from big_vision_cxr import config as config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.load_config(args.config) if args.config else None
    step = export(args.workdir, args.out, config, args.step, args.bf16)
    print(f"wrote {args.out} (step {step} of {args.workdir})")
  else:
    if not args.variant and not args.config:
      parser.error("bv2hf needs --variant or --config")
    from big_vision_cxr import config as config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.load_config(args.config) if args.config else None
    bv2hf(args.npz, args.variant, args.out_dir, args.bf16, args.vocab_pad_multiple, config)
    print(f"wrote {args.out_dir}/config.json and model.safetensors")
  return 0


def main(argv=None):
  return errors.cli_main(run, argv, exit_code=1)


if __name__ == "__main__":
  sys.exit(main())
