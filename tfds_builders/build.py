"""Builds cxr_tb/<config> through the TFDS Python API (no apache_beam needed).

    python -m tfds_builders.build --config tbx11k --manual_dir /data/tbx11k [--data_dir DIR]
"""
import argparse
import pathlib
import sys

import tensorflow_datasets as tfds

from big_vision_cxr import errors
from tfds_builders import cxr_tb


def run(argv):
  parser = errors.ArgumentParser(prog="python -m tfds_builders.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, choices=[c.name for c in cxr_tb.CxrTb.BUILDER_CONFIGS])
  parser.add_argument("--manual_dir", default=None)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args(argv)
  if cxr_tb.CxrTb.builder_configs[args.config].source != "phantom":
    if not args.manual_dir:
      parser.error(f"--config {args.config} needs --manual_dir")
    if not pathlib.Path(args.manual_dir).is_dir():
      raise FileNotFoundError(f"--manual_dir {args.manual_dir}: no such folder")
  builder = cxr_tb.CxrTb(config=args.config, data_dir=args.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
  skipped = builder.info.metadata["skipped"]
  splits = ", ".join(f"{s}={i.num_examples}" for s, i in builder.info.splits.items())
  absent = skipped["absent_count"]
  print(f"built {builder.data_dir}: {splits}; skipped {skipped['count']}"
        + (f"; {absent} images the source lists are not in this copy (a partial copy is fine: "
           "only the images present are built)" if absent else ""))
  return 0


def main(argv=None):
  return errors.cli_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
