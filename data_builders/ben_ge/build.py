"""Command line: prepare the TFDS dataset `ben_ge/NAME` from a raw ben-ge folder or archive, without TensorFlow.

    python -m data_builders.ben_ge.build --manual_dir PATH --data_dir OUT [--config NAME]

PATH holds the extracted folder NAME/ or the archive NAME.tar.gz (the full-dataset subsets ben-ge-0.x read
the folder ben-ge/). Prints where the prepared dataset is and how many examples each split has. Running it
again on a prepared dataset does nothing but print.
"""

import argparse
import json
import logging
import sys
import time

from data_builders.ben_ge import ben_ge
from data_builders.ben_ge import reading


def split_sizes(dataset_path) -> dict[str, int]:
  """Examples per split, read from the prepared dataset's dataset_info.json (no data is opened)."""
  info = json.loads((dataset_path / "dataset_info.json").read_text())
  return {split["name"]: sum(int(n) for n in split.get("shardLengths", [])) for split in info["splits"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_builders.ben_ge.build", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=ben_ge.BenGe.MANUAL_DOWNLOAD_INSTRUCTIONS)
  parser.add_argument("--manual_dir", required=True, help="folder holding NAME/ or NAME.tar.gz")
  parser.add_argument("--data_dir", required=True, help="TFDS data dir; the dataset goes to DATA_DIR/ben_ge/NAME/VERSION")
  parser.add_argument("--config", default="ben-ge-800", choices=ben_ge.config_names(), help="dataset (builder config)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  start = time.time()
  try:
    path = ben_ge.prepare(args.manual_dir, args.data_dir, args.config)
  except reading.BenGeDataError as error:
    print(f"ben_ge/{args.config}: build failed, nothing was prepared:\n{error}", file=sys.stderr)
    return 1
  sizes = split_sizes(path)
  print(f"ben_ge/{args.config} prepared in {path} ({time.time() - start:.1f} s)")
  for split, count in sizes.items():
    print(f"  {split}: {count} examples")
  print(f"Read it with tfds.data_source('ben_ge/{args.config}', data_dir='{args.data_dir}') "
        f"or tfds.builder_from_directory('{path}').as_data_source(split).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
