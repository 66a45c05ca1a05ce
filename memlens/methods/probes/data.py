"""What a probe reads: labeled tokens joined with their activations in a capture store,
split by sequence (train / val / test), and the settings of a probe run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from memlens.core.config import COUNT, INDEX, NONNEGATIVE, UNIT, Config, option
from memlens.core.errors import ConfigError, DataError
from memlens.core.identity import Identity
from memlens.data.labels import Labels
from memlens.data.store import ActivationStore

__all__ = ["CONFIDENCE", "ProbeConfig", "ProbeData", "SiteFeatures", "split_sequences"]

CONFIDENCE = "confidence"  # pseudo-site: the model's max log-prob and entropy


@dataclass
class ProbeConfig(Config):
    """Which tokens, which split, how to fit.

    ``align="predicting"`` reads the activation at the position that predicts the
    token (t - 1): where the model recalls it. ``"token"`` reads position t.
    """

    positive: tuple[str, ...] = option(("memorized",), "token labels that are positives")
    negative: tuple[str, ...] = option(("generic", "not_memorized"),
                                       "token labels that are negatives")
    align: str = option("predicting", "predicting (read position t - 1) or token "
                        "(position t)", choices=("predicting", "token"))
    split: tuple[float, ...] = option((0.6, 0.2, 0.2), "train, val and test fractions of "
                                      "the sequences", UNIT)
    l2: float = option(1e-3, "L2 penalty", NONNEGATIVE)
    max_iter: int = option(200, "most solver steps", COUNT)
    patience: int = option(2, "stop after this many steps without a better validation "
                           "loss", COUNT)
    n_bootstrap: int = option(200, "bootstrap resamples for the intervals", INDEX)
    seed: int = option(0, "split and bootstrap seed", INDEX)
    device: str = option("cpu", "where the torch trainer runs (cuda on a GPU)")
    chunk_mb: int = option(512, "features the torch trainer holds at once, in MB (it streams "
                           "the rest; 0: the smallest chunks)", INDEX)

    def __post_init__(self):
        self.positive, self.negative = tuple(self.positive), tuple(self.negative)
        self.split = tuple(self.split)
        super().__post_init__()
        if abs(sum(self.split) - 1) > 1e-6 or len(self.split) != 3:
            raise ConfigError(f"split={self.split} must be three fractions (train, val, test) "
                             "summing to 1")
        if set(self.positive) & set(self.negative):
            raise ConfigError(f"labels {set(self.positive) & set(self.negative)} are both "
                             "positive and negative")


def split_sequences(seq_dup: pd.Series, fractions, seed: int) -> pd.Series:
    """train/val/test per sequence id, stratified by duplication count."""
    rng = np.random.default_rng(seed)
    out = {}
    for _, ids in seq_dup.groupby(seq_dup.fillna(-1)).groups.items():
        ids = rng.permutation(np.asarray(ids))
        n_train = int(round(fractions[0] * len(ids)))
        n_val = int(round(fractions[1] * len(ids)))
        for k, i in enumerate(ids):
            out[i] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return pd.Series(out)


class SiteFeatures(Mapping):
    """Features per site at the labeled tokens, read from the store when asked for: nothing
    is held in memory. ``features[site]`` loads one site's rows; :meth:`rows` any subset.
    ``derived`` holds features computed per token rather than captured (``confidence``:
    the model's max log-prob and entropy; ``lens``: see :mod:`memlens.methods.probes.lens`)."""

    def __init__(self, store: ActivationStore, sites: list[str], store_rows: np.ndarray,
                 derived: dict[str, np.ndarray]):
        self.store, self.sites = store, list(sites)
        self.store_rows, self.derived = store_rows, dict(derived)

    def __getitem__(self, site: str) -> np.ndarray:
        return self.rows(site, np.arange(len(self.store_rows))).astype(np.float32, copy=False)

    def __iter__(self):
        return iter([*self.sites, *self.derived])

    def __len__(self) -> int:
        return len(self.sites) + len(self.derived)

    def rows(self, site: str, index: np.ndarray) -> np.ndarray:
        """[len(index), d]: the features of tokens ``index`` (rows of the tokens table) at
        ``site``, float32 or float16 as stored (bfloat16 becomes float32)."""
        if site in self.derived:
            return self.derived[site][index]
        if site not in self.sites:
            raise KeyError(site)
        x = self.store.rows(site, self.store_rows[index], dtype=None)
        x = x.float() if x.dtype == torch.bfloat16 else x
        return x.numpy().reshape(len(index), -1)


@dataclass
class ProbeData:
    """Features per site, aligned with one row per labeled token (read from the store on
    demand, so a store larger than memory works)."""

    tokens: pd.DataFrame                  # id, position, label, y, split, duplication, ...
    features: Mapping[str, np.ndarray]    # site -> [n_tokens, d] (float32), loaded per access
    config: ProbeConfig
    identity: Identity | None = None      # the store's; probes trained here inherit it
    inputs: dict = field(default_factory=dict)

    @classmethod
    def from_store(cls, store: ActivationStore, labels: Labels | pd.DataFrame,
                   config: ProbeConfig | None = None, sites: list[str] | None = None,
                   split: dict[str, str] | None = None) -> ProbeData:
        """Join a capture store with labels (``Labels.load(dir)``, or a labels ``tokens``
        table). Labels are checked against the store: same model, same sequences.

        ``split`` (sequence id -> train/val/test) replaces the random grouped split.
        """
        config = config or ProbeConfig()
        inputs = {"store": store.identity}
        if isinstance(labels, Labels):
            labels.identity.check_corpus(store.identity, labels.where, str(store.path))
            inputs["labels"] = labels.identity
            token_labels = labels.tokens
        else:
            token_labels = labels
        keep = token_labels["label"].isin(config.positive + config.negative)
        tok = token_labels[keep].copy()
        tok["id"] = tok["id"].astype(str)
        if tok.empty:
            raise DataError(f"no tokens labeled {config.positive + config.negative}; "
                            "check the labels table")
        rows = store.tokens[["id", "position"]].copy()
        rows["row"] = np.arange(len(rows))
        shift = 1 if config.align == "predicting" else 0
        tok["feature_position"] = tok["position"] - shift
        tok = tok.merge(rows.rename(columns={"position": "feature_position"}),
                        on=["id", "feature_position"], how="inner")
        if len(tok) < keep.sum():
            missing = int(keep.sum() - len(tok))
            raise DataError(f"{missing} labeled tokens have no captured activation at "
                            f"align={config.align!r}; capture with --positions all")
        tok["y"] = tok["label"].isin(config.positive).astype(np.int64)
        if split is None:
            per_seq = tok.groupby("id")["duplication"].first()
            split = split_sequences(per_seq, config.split, config.seed)
        tok["split"] = tok["id"].map(split)
        if tok["split"].isna().any():
            raise DataError(f"{tok.loc[tok['split'].isna(), 'id'].nunique()} labeled "
                            "sequences have no train/val/test assignment in split")
        # In store order, so that a run of tokens is a run of rows in one shard.
        tok = tok.sort_values("row", kind="stable").reset_index(drop=True)
        for site in sites or []:
            store.shards(site)  # an unknown site fails here, naming the store's sites
        features = SiteFeatures(store, sites or store.sites, tok["row"].to_numpy(),
                                {CONFIDENCE: tok[["max_logprob", "entropy"]].to_numpy(
                                    np.float32)})
        return cls(tok, features, config, store.identity,
                   {k: v.digest for k, v in inputs.items()})

    def with_features(self, name: str, values: np.ndarray) -> ProbeData:
        """A pseudo-site ``name`` whose features [tokens, d] are given, not captured
        (e.g. :func:`~memlens.methods.probes.lens.lens_features`); probes and combinations
        can read it as they read a site."""
        if not isinstance(self.features, SiteFeatures):
            raise ConfigError("with_features needs features read from a store")
        if len(values) != len(self.tokens):
            raise DataError(f"{name}: {len(values)} rows of features for {len(self.tokens)} "
                            "tokens")
        f = self.features
        features = SiteFeatures(f.store, f.sites, f.store_rows,
                                {**f.derived, name: np.asarray(values, dtype=np.float32)})
        return ProbeData(self.tokens, features, self.config, self.identity, self.inputs)

    def combined(self, sites: list[str], index: np.ndarray | None = None) -> np.ndarray:
        """[tokens, sum of d]: the sites' features side by side (at tokens ``index``)."""
        index = np.arange(len(self.tokens)) if index is None else index
        read = getattr(self.features, "rows", lambda s, i: np.asarray(self.features[s])[i])
        return np.concatenate([read(s, index) for s in sites], axis=1)

    def mask(self, split: str) -> np.ndarray:
        return (self.tokens["split"] == split).to_numpy()


# --------------------------------------------------------------------------- fitting
