"""The core every memlens step stands on.

- :mod:`~memlens.core.model`: the model handle (HF module, TransformerLens and nnsight views);
- :mod:`~memlens.core.sequences`: the sequence record and the rule for unknown duplication;
- :mod:`~memlens.core.scoring`: the one batched, padded, teacher-forced scoring kernel;
- :mod:`~memlens.core.metrics`: extraction by duplication, perplexity, held-out loss;
- :mod:`~memlens.core.modules`: blocks, MLP projections, neuron sites, norms; gradient contexts;
- :mod:`~memlens.core.sites`: hook names and module paths, and reading activations at them;
- :mod:`~memlens.core.identity`: the header every artifact writes and checks on load;
- :mod:`~memlens.core.errors`: the errors that mean "the input is wrong" (not a bug);
- :mod:`~memlens.core.progress`: progress bars that stay readable in logs;
- :mod:`~memlens.core.distributed`: data parallel under torchrun (shard, gather, all-reduce);
- :mod:`~memlens.core.jsonio`: strict JSON for every artifact (no NaN or Infinity);
- :mod:`~memlens.core.logs`: third-party start-up notices kept quiet unless asked for;
- :mod:`~memlens.core.storage`: one writer at a time, outputs checked first, written whole.
"""

__all__ = []
