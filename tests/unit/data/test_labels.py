"""Concurrency, faults and hostile input: each case fails loudly, names the file or value,"""

import pytest

from memlens.core.errors import DataError
from memlens.core.model import load_model


def test_sequences_beyond_the_context_are_refused_with_the_fix(random_models, tmp_path):
    handle = load_model(random_models["gpt2"])
    limit = handle.max_positions
    with pytest.raises(DataError, match=f"longer than the {limit} positions.*--max-len {limit}"):
        handle.pad([[1] * (limit + 5)])
