"""Loading models: the bridge, nnsight and HF views agree; errors name the fix."""

import json
import re

import pytest
import torch

from memlens.core.model import SUPPORTED_ARCHITECTURES, ModelLoadError, load_model

ARCHS = ("llama", "neox", "gpt2")
TEXTS = ["Biography. Ann Lee was born on May 1, 1990.", "Phone 555-123-4567."]


@pytest.mark.parametrize("arch", ARCHS)
def test_bridge_and_nnsight_share_weights_and_match_hf(arch, random_models):
    handle = load_model(random_models[arch])
    ids, mask = handle.tokenize(TEXTS[0])
    with torch.no_grad():
        hf = handle.model(input_ids=ids).logits
        tl = handle.bridge(ids)
    torch.testing.assert_close(tl, hf, atol=1e-5, rtol=1e-5)
    hf_ptrs = {p.data_ptr() for p in handle.model.parameters()}
    copied = [n for n, p in handle.bridge.named_parameters() if p.data_ptr() not in hf_ptrs]
    # Only the q/k/v split of a fused QKV projection (GPT-2, GPT-NeoX) is a copy.
    assert all(re.search(r"\.(attn|attention)\.[qkv]\.", n) for n in copied), copied
    assert bool(copied) == (arch != "llama")
    with torch.no_grad(), handle.nnsight.trace(ids):
        out = handle.nnsight.output.save()
    torch.testing.assert_close(out.logits, hf)
    # A canonical TransformerLens hook name is available on every architecture.
    _, cache = handle.bridge.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    assert cache["blocks.0.hook_resid_post"].shape == (1, ids.shape[1], handle.config.hidden_size)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_unpadded_runs(arch, side, random_models):
    handle = load_model(random_models[arch])
    ids, mask = handle.tokenize(TEXTS, side=side)
    with torch.no_grad():
        batched = handle.model(input_ids=ids, attention_mask=mask,
                               position_ids=handle.position_ids(mask)).logits
        for row, text in enumerate(TEXTS):
            single, _ = handle.tokenize(text)
            alone = handle.model(input_ids=single).logits[0]
            valid = mask[row].bool()
            assert torch.equal(ids[row, valid], single[0])
            torch.testing.assert_close(batched[row, valid], alone, atol=1e-5, rtol=1e-4)


def test_olmo2_loads_with_bridge(tmp_path, saved_tokenizer):
    from transformers import AutoModelForCausalLM, Olmo2Config

    cfg = Olmo2Config(vocab_size=len(saved_tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                      pad_token_id=saved_tokenizer.pad_token_id)
    cfg.architectures = ["Olmo2ForCausalLM"]
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    saved_tokenizer.save_pretrained(tmp_path)
    handle = load_model(tmp_path)
    ids, _ = handle.tokenize(TEXTS[1])
    with torch.no_grad():
        torch.testing.assert_close(handle.bridge(ids), handle.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    assert "blocks.1.mlp.hook_out" in handle.bridge.hook_dict
    # Shown in a notebook: one line that says what the model is, not a module dump.
    n = sum(p.numel() for p in handle.model.parameters())
    assert repr(handle) == (f"ModelHandle({str(tmp_path)!r}: olmo2, {n / 1e6:.2f}M parameters, "
                            "2 blocks, d_model 64, float32 on cpu)")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_tokenizer_that_does_not_fit_the_model(tmp_path, saved_tokenizer, make_random_model):
    small = make_random_model("gpt2", saved_tokenizer, tmp_path)
    cfg = json.loads((small / "config.json").read_text())
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg.update(vocab_size=100)
    AutoModelForCausalLM.from_config(GPT2Config(**cfg)).save_pretrained(small)
    with pytest.raises(ModelLoadError, match=r"512 tokens but the model's embedding has 100"):
        load_model(small)


def test_unsupported_architecture_lists_supported(tmp_path, saved_tokenizer):
    from transformers import AutoModelForCausalLM, GPTJConfig

    cfg = GPTJConfig(vocab_size=len(saved_tokenizer), n_embd=32, n_layer=1, n_head=2,
                     rotary_dim=8, n_positions=64)
    cfg.architectures = ["GPTJForCausalLM"]
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    saved_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(err.value)
    assert "allow_untested=True" in str(err.value)
    assert load_model(tmp_path, allow_untested=True).config.model_type == "gptj"


def test_weights_hash_changes_with_weights(random_models):
    handle = load_model(random_models["llama"])
    before = handle.weights_hash()
    assert before == load_model(random_models["llama"]).weights_hash()
    with torch.no_grad():
        next(handle.model.parameters())[0, 0] += 1
    assert handle.weights_hash() != before


def test_hub_name_offline_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 is set"):
        load_model("EleutherAI/pythia-14m-not-cached")


def test_bridge_leaves_the_hf_module_tree_alone_and_sees_in_place_edits(random_models):
    handle = load_model(random_models["llama"])
    ids, _ = handle.tokenize(TEXTS[0])
    bridge = handle.bridge
    assert not any(type(m).__module__.startswith("transformer_lens")
                   for m in handle.model.modules())
    with torch.no_grad():
        handle.model.model.layers[0].mlp.up_proj.weight.mul_(3.0)
        torch.testing.assert_close(bridge(ids), handle.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_reset_views_rebuilds_the_bridge_after_an_edit(random_models):
    handle = load_model(random_models["gpt2"])
    ids, _ = handle.tokenize(TEXTS[0])
    first = handle.bridge
    with torch.no_grad():
        handle.model.transformer.h[0].attn.c_attn.weight.mul_(2.0)
        handle.reset_views()
        assert handle.bridge is not first
        torch.testing.assert_close(handle.bridge(ids), handle.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_device_map_loads_the_same_model(random_models):
    path = random_models["llama"]
    ids = torch.tensor([[0, 5, 9, 13]])
    plain = load_model(path)
    mapped = load_model(path, device_map="auto")  # CPU-only here: everything on the CPU
    assert mapped.device.type == "cpu"
    assert torch.equal(mapped.model(ids).logits, plain.model(ids).logits)
