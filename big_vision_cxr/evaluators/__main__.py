"""Metrics of a predictions file, as the evaluators compute them inside training.

  python -m big_vision_cxr.evaluators --type detection --predictions preds.jsonl [--json out.json]

Prints one `metric  value` line per metric; record formats in docs/EVALUATION.md,
checked by schema.py: a malformed file or record is one `error: FILE:LINE: ...` line.
"""
import sys

from big_vision_cxr import errors
from big_vision_cxr.evaluators import common
from big_vision_cxr.registry import EVALUATORS


def main(argv=None):
  p = errors.ArgumentParser(prog="python -m big_vision_cxr.evaluators",
                            description="Metrics of a predictions JSONL file (docs/EVALUATION.md).",
                            epilog="--debug: show the traceback of an error.")
  p.add_argument("--type", required=True, help=f"one of {EVALUATORS.names()}")
  p.add_argument("--predictions", required=True)
  p.add_argument("--json", help="also write the metrics to this JSON file")
  p.add_argument("--score_rule", help="detection/segmentation: which stored score ranks boxes")
  p.add_argument("--vqvae", help="segmentation: VQ-VAE .npz decoding seg tokens of text-only records")
  args = p.parse_args(argv)
  try:
    cls = EVALUATORS.get(args.type)
  except KeyError as e:
    raise common.EvalError(f"--type: {e.args[0]}") from None
  kw = {k: v for k, v in (("score_rule", args.score_rule), ("vqvae", args.vqvae)) if v}
  metrics = cls.compute_metrics(common.read_jsonl(args.predictions), **kw)
  width = max(map(len, metrics), default=0)
  for k, v in metrics.items():
    print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
  if args.json:
    common.write_json(args.json, metrics)
  return 0


if __name__ == "__main__":
  sys.exit(errors.cli_main(main))
