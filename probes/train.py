"""Train a layer-by-site sweep of memorization probes from a config.

    python probes/train.py --config organism

Labels the model's sequences, captures activations at the configured sites, fits a
probe per site and per combination, and writes results.json, results.parquet,
layer_sweep.html and the best probes to the config's output directory.
"""

import argparse
import json

from memlens.steps.probe import run_config


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True,
                    help="a TOML file, or the name of a config memlens ships (organism)")
    args = ap.parse_args()
    summary = run_config(args.config)
    keys = ("best_site", "best_token_auroc", "selectivity", "best_single_site",
            "best_single_site_auroc", "best_sequence_auroc", "baseline_sequence_auroc")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
