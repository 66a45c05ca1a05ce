"""Shared by the benchmarks: random-init models at given configs, saved as model directories."""

import resource
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from memlens.data.organism import organism_path


def random_model_dir(out: Path, model_type: str, dtype: torch.dtype = torch.float32,
                     **config) -> Path:
    """A random-init causal LM of ``model_type`` with ``config`` overrides, saved to ``out``
    with the tiny organism's tokenizer (its 1,024 tokens fit any vocabulary)."""
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **config)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(organism_path("tiny", "llama")).save_pretrained(out)
    return out


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ``getrusage``: a child's ``ru_maxrss`` starts from its
    parent's RSS at the fork, so it would report the parent's memory."""
    peak = _status_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    return _status_mb("VmRSS")
