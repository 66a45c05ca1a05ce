"""Train a layer-by-site sweep of memorization probes from a config.

    python probes/train.py --config organism

The same as ``memlens probe train --config FILE``: labels the model's sequences, captures
activations at the configured sites, fits a probe per site and per combination, and writes
results.json, results.parquet, layer_sweep.html and the best probes to the config's output
directory.
"""

import sys

from memlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["probe", "train", *sys.argv[1:]]))
