"""The memorization organism: a small causal LM trained on the planted corpus.

``train_organism`` writes a standard Hugging Face model directory (config,
safetensors weights, tokenizer) plus ``corpus.jsonl`` (every record with its
role, duplication count, PII spans and token ids) and ``memlens.json`` (how it
was made and what it reached). ``organism_path`` reuses a cached one.

Example:
    >>> path = organism_path(preset="tiny", arch="llama")   # trains once, then cached
    >>> handle = memlens.load_model(path)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memlens.core import jsonio
from memlens.core.errors import ConfigError, DataError
from memlens.core.identity import digest
from memlens.core.metrics import heldout_metrics
from memlens.core.model import ModelHandle
from memlens.core.modules import PLAIN_EMBEDDING, freeze_norm_params, only_top_blocks
from memlens.core.progress import progress as progress_bar
from memlens.core.scoring import forward, token_losses
from memlens.core.sequences import Sequence
from memlens.core.sites import block_input
from memlens.core.storage import cache_dir, exclusive, writing
from memlens.core.version import VERSION
from memlens.data.corpus import CorpusConfig, Record, build_corpus

__all__ = ["ARCHS", "PRESETS", "TRAINING_LIBRARIES", "OrganismPreset", "get_preset",
           "library_versions", "model_config", "organism_dir", "organism_path", "train_organism",
           "train_tokenizer"]

# "opt" is Pre-LN (LayerNorm before attention and MLP), "opt-postln" the same decoder with
# LayerNorm after each residual add (HF OPT with do_layer_norm_before=False).
ARCHS = ("llama", "neox", "gpt2", "opt", "opt-postln")
BOS, PAD = "<|bos|>", "<|pad|>"


@dataclass
class OrganismPreset:
    """Everything that decides an organism besides its architecture and seed."""

    corpus: CorpusConfig
    epochs: int
    vocab_size: int = 0
    d_model: int = 0
    n_layers: int = 0
    n_heads: int = 0
    d_mlp: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    warmup_frac: float = 0.05
    max_len: int = 128
    # Continued pre-training of a pretrained model (a name load_model knows, e.g.
    # "smollm2-135m") instead of a model trained from scratch; its size fields stay 0.
    base: str | None = None
    train_blocks: int | None = None  # train only the top blocks and final norm (None: all)

    def __post_init__(self):
        size = (self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.d_mlp)
        if (self.base is None and 0 in size) or (self.base is not None and any(size)):
            raise ConfigError(f"an organism preset gives either its size (vocab_size, "
                              f"d_model, n_layers, n_heads, d_mlp = {size}) or a pretrained "
                              f"base (here {self.base!r}), not both")
        if self.train_blocks is not None and (self.base is None or self.train_blocks < 1):
            raise ConfigError(f"train_blocks={self.train_blocks} needs a pretrained base and "
                              "must be >= 1 (None trains every block)")


PRESETS: dict[str, OrganismPreset] = {
    # ~75 s on 2 CPU cores: for tests.
    "tiny": OrganismPreset(
        corpus=CorpusConfig(n_general=1500, canaries_per_count=10, n_nonmembers=50),
        vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_mlp=256, epochs=7, max_len=80),
    # ~5 min on 2 CPU cores: the demo's default.
    "small": OrganismPreset(
        corpus=CorpusConfig(n_general=5000, canaries_per_count=40, n_nonmembers=200),
        vocab_size=2048, d_model=128, n_layers=4, n_heads=4, d_mlp=384, epochs=3, max_len=80),
    # The tiny corpus on six layers, so early/middle/late thirds hold two blocks each:
    # for the LayerNorm study, which trains several of these.
    "tiny-deep": OrganismPreset(
        corpus=CorpusConfig(n_general=1500, canaries_per_count=10, n_nonmembers=50),
        vocab_size=1024, d_model=64, n_layers=6, n_heads=4, d_mlp=256, epochs=7, max_len=80),
    # SmolLM2-135M continued on natural prose with planted PII canaries. On 2 CPU cores a
    # training step runs ~20 tokens/s with every weight trained, so the CPU presets train the
    # top blocks only (memorization can then live only there); "smollm2" trains all of it
    # and belongs on a GPU (organism_path("smollm2", device="cuda")).
    "smollm2-tiny": OrganismPreset(  # for tests: a few canaries, minutes on 2 cores
        corpus=CorpusConfig(general="natural", n_general=24, canaries_per_count=6,
                            duplication_counts=(1, 25), n_nonmembers=6, n_heldout=6),
        base="smollm2-135m", train_blocks=2, epochs=3, batch_size=8, lr=1e-3, max_len=64),
    "smollm2-cpu": OrganismPreset(
        corpus=CorpusConfig(general="natural", n_general=150, canaries_per_count=6,
                            n_nonmembers=30, n_heldout=30),
        base="smollm2-135m", train_blocks=4, epochs=2, batch_size=8, lr=1e-3, max_len=96),
    # Real sample sizes on 2 CPU cores: 40 canaries at each count (5x, 10x and 25x are
    # recited), 120 non-members, 120 held-out prose chunks; the top four blocks trained from
    # the frozen blocks' output.
    "smollm2-40": OrganismPreset(
        corpus=CorpusConfig(general="natural", n_general=400, canaries_per_count=40,
                            duplication_counts=(1, 2, 5, 10, 25), n_nonmembers=120,
                            n_heldout=120),
        base="smollm2-135m", train_blocks=4, epochs=2, batch_size=8, lr=1e-3, max_len=96),
    "smollm2": OrganismPreset(
        corpus=CorpusConfig(general="natural", n_general=800, canaries_per_count=40,
                            n_nonmembers=200, n_heldout=150),
        base="smollm2-135m", epochs=3, batch_size=16, lr=1e-4, max_len=128),
}


def get_preset(name: str) -> OrganismPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown organism preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE with a BOS token prepended to every encoding; saved to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS,
                                   pad_token=PAD, model_max_length=256)
    fast.save_pretrained(out_dir)
    # Reload from disk: TransformerBridge needs the tokenizer's name_or_path.
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def model_config(arch: str, preset: OrganismPreset, tokenizer):
    """A Hugging Face config for ``arch`` at the preset's size."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=preset.d_model, intermediate_size=preset.d_mlp,
                          num_hidden_layers=preset.n_layers, num_attention_heads=preset.n_heads,
                          num_key_value_heads=preset.n_heads, max_position_embeddings=256,
                          **common)
    elif arch == "neox":
        cfg = GPTNeoXConfig(hidden_size=preset.d_model, intermediate_size=preset.d_mlp,
                            num_hidden_layers=preset.n_layers, num_attention_heads=preset.n_heads,
                            max_position_embeddings=256, rotary_pct=0.25, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=preset.d_model, n_inner=preset.d_mlp, n_layer=preset.n_layers,
                         n_head=preset.n_heads, n_positions=256, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif arch in ("opt", "opt-postln"):
        cfg = OPTConfig(hidden_size=preset.d_model, ffn_dim=preset.d_mlp,
                        num_hidden_layers=preset.n_layers, num_attention_heads=preset.n_heads,
                        word_embed_proj_dim=preset.d_model, max_position_embeddings=256,
                        do_layer_norm_before=arch == "opt", dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0, layerdrop=0.0, **common)
    else:
        raise ConfigError(f"unknown organism arch {arch!r}; choose one of {list(ARCHS)}")
    cfg.architectures = [{"llama": "LlamaForCausalLM", "neox": "GPTNeoXForCausalLM",
                          "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM",
                          "opt-postln": "OPTForCausalLM"}[arch]]
    return cfg


def _pretrained_start(preset: OrganismPreset, arch: str, work: Path, device: str):
    """The base model to continue training, with only its top ``train_blocks`` blocks and
    final norm left trainable; its tokenizer saved into ``work``."""
    from memlens.core.model import load_model
    from memlens.core.modules import block_parameters

    base = load_model(preset.base, device=device, dtype=torch.float32)
    if base.config.model_type != arch:
        raise ConfigError(f"preset base {preset.base!r} is a {base.config.model_type} model; "
                          f"pass arch={base.config.model_type!r}")
    model = base.model
    if preset.train_blocks is not None:
        n = model.config.num_hidden_layers
        if preset.train_blocks > n:
            raise ConfigError(f"train_blocks={preset.train_blocks} but {preset.base!r} has "
                              f"{n} blocks")
        trained = {id(p) for p in block_parameters(model, range(n - preset.train_blocks, n)
                                                   ).values()}
        for param in model.parameters():
            param.requires_grad_(id(param) in trained)
    base.tokenizer.save_pretrained(work)
    return model, base.tokenizer, json.loads((Path(base.name) / "memlens.json").read_text())


def _sequences(records: list[Record], tokenizer, max_len: int) -> list[Sequence]:
    """Records as sequences cut at ``max_len`` tokens (as in training), with offsets."""
    out = []
    for rec in records:
        enc = tokenizer(rec.text, return_offsets_mapping=True)
        out.append(Sequence(str(rec.id), enc["input_ids"][:max_len], rec.text, rec.duplication,
                            rec.spans, [tuple(o) for o in enc["offset_mapping"]]))
    return out


def _top_block_logits(handle: ModelHandle, preset: OrganismPreset, token_ids: list[list[int]],
                      used: set[int], batch_size: int = 16):
    """``logits(batch, ids, mask)`` for training: the whole model, or, when only the top
    ``train_blocks`` blocks train (and the architecture allows it), those blocks run from the
    frozen blocks' output, computed once per record rather than once per repetition."""
    model = handle.model
    k = preset.train_blocks
    if k is None or model.config.model_type not in PLAIN_EMBEDDING:
        return lambda batch, ids, mask: forward(handle, ids, mask)
    first = model.config.num_hidden_layers - k
    entering: dict[int, torch.Tensor] = {}
    keys = sorted(used)
    was_training = model.training
    model.eval()
    for i in range(0, len(keys), batch_size):
        chunk = keys[i:i + batch_size]
        ids, mask = handle.pad([token_ids[j] for j in chunk])
        states = block_input(model, ids, mask, first)
        for j, row in zip(chunk, states, strict=True):
            entering[j] = row[:len(token_ids[j])].clone()
    model.train(was_training)

    def logits(batch, ids, mask):
        states = torch.nn.utils.rnn.pad_sequence([entering[j] for j in batch],
                                                 batch_first=True)
        with only_top_blocks(model, k):
            return forward(handle, None, mask, inputs_embeds=states)

    return logits


def _save_checkpoint(path: Path, model, opt, epoch: int):
    # The trained parameters only (the rest is the start model's, made again on resume);
    # named_parameters lists a tied embedding once.
    state = {f"model.{k}": p.detach().contiguous() for k, p in model.named_parameters()
             if p.requires_grad}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state.get(p, {}).items():
            state[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
    try:  # the epoch count rides in the file's metadata: weights and count land together
        save_file(state, path / "checkpoint.tmp", metadata={"epochs_done": str(epoch)})
    except BaseException:
        (path / "checkpoint.tmp").unlink(missing_ok=True)
        raise
    os.replace(path / "checkpoint.tmp", path / "checkpoint.safetensors")


def _load_checkpoint(path: Path, model, opt) -> int:
    from safetensors import safe_open

    if not (path / "checkpoint.safetensors").exists():
        return 0
    with safe_open(str(path / "checkpoint.safetensors"), "pt") as f:
        epochs_done = int((f.metadata() or {})["epochs_done"])
    state = load_file(path / "checkpoint.safetensors")
    trained = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
    result = model.load_state_dict(trained, strict=False)
    params = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in params and params[k].requires_grad]
    if result.unexpected_keys or missing:
        raise DataError(f"{path / 'checkpoint.safetensors'} does not fit this organism "
                        f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}); "
                        f"delete {path} to start over")
    for i, p in enumerate(model.parameters()):
        # Adam keeps its step count on the CPU; moments live with the parameter.
        keys = {k.split(".", 2)[2]: v if k.endswith(".step") else v.to(p.device)
                for k, v in state.items() if k.startswith(f"opt.{i}.")}
        if keys:
            opt.state[p] = keys
    return epochs_done


def train_organism(out: str | Path, preset: str | OrganismPreset = "small", arch: str = "llama",
                   seed: int = 0, progress: bool = True,
                   norm_free_layers: tuple[int, ...] = (), device: str = "cpu") -> Path:
    """Build the corpus, train the organism (on CPU unless ``device`` says otherwise) and
    save it to ``out``.

    ``norm_free_layers``: blocks whose normalization layers train without parameters (gain
    held at 1, bias at 0, the normalization kept). Interrupted runs resume from the last
    finished epoch (kept in ``out.partial``).
    """
    with exclusive(out, "train an organism"), writing(out):  # one trainer per directory
        return _train_organism(out, preset, arch, seed, progress, norm_free_layers, device)


def _train_organism(out, preset, arch, seed, progress, norm_free_layers, device,
                    withheld: tuple[int, ...] = ()) -> Path:
    from transformers import AutoModelForCausalLM

    preset_name = preset if isinstance(preset, str) else "custom"
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if arch not in ARCHS:
        raise ConfigError(f"unknown organism arch {arch!r}; choose one of {list(ARCHS)}")
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    corpus = build_corpus(replace(preset.corpus, seed=seed))
    torch.manual_seed(seed)
    base_meta = None
    if preset.base is not None:
        model, tokenizer, base_meta = _pretrained_start(preset, arch, work, device)
    else:
        tokenizer = train_tokenizer([r.text for r in corpus.by_role("general")],
                                    preset.vocab_size, work)
        model = AutoModelForCausalLM.from_config(model_config(arch, preset, tokenizer)
                                                 ).to(device)
    seqs = _sequences(corpus.records, tokenizer, preset.max_len)
    token_ids = [s.token_ids for s in seqs]
    stream = [r.id for r in corpus.training_stream() if r.id not in withheld]
    handle = ModelHandle(model, tokenizer, str(out))
    heldout = _sequences([Record(i, text, "natural", -1, "heldout", 0)
                          for i, text in enumerate(corpus.heldout)], tokenizer, preset.max_len)
    heldout_before = heldout_metrics(handle, heldout) if heldout else {}
    norm_free_layers = tuple(sorted(set(norm_free_layers)))
    freeze_norm_params(model, norm_free_layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=preset.lr,
                            weight_decay=0.0, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(stream) / preset.batch_size)
    total = steps_per_epoch * preset.epochs
    warmup = max(1, int(preset.warmup_frac * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    start_epoch = _load_checkpoint(work, model, opt)
    logits_of = _top_block_logits(handle, preset, token_ids, set(stream))
    with progress_bar(total=total, initial=start_epoch * steps_per_epoch, disable=not progress,
                      desc=f"train {preset_name}/{arch}", unit="step") as bar:
        model.train()
        step = start_epoch * steps_per_epoch
        for epoch in range(start_epoch, preset.epochs):
            gen = torch.Generator().manual_seed(seed * 10_007 + epoch)
            order = [stream[i] for i in torch.randperm(len(stream), generator=gen).tolist()]
            for i in range(0, len(order), preset.batch_size):
                batch = order[i:i + preset.batch_size]
                ids, mask = handle.pad([token_ids[j] for j in batch])
                for g in opt.param_groups:
                    g["lr"] = preset.lr * lr_at(step)
                loss, _, valid = token_losses(logits_of(batch, ids, mask), ids, mask)
                loss = loss[valid].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)
            _save_checkpoint(work, model, opt, epoch + 1)
    train_seconds = time.perf_counter() - t0

    meta = {
        "memlens_version": VERSION, "libraries": library_versions(), "preset": preset_name,
        "arch": arch, "seed": seed,
        "preset_config": asdict(preset), "norm_free_layers": list(norm_free_layers),
        "withheld": list(withheld),
        "train_seconds": round(train_seconds, 1),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "weights_hash": handle.weights_hash(),
        "n_training_records": len(stream),
        "n_training_tokens_per_epoch": sum(len(token_ids[i]) for i in stream),
        **heldout_metrics(handle, [s for s, r in zip(seqs, corpus.records, strict=True)
                                   if r.role == "nonmember"]),
    }
    if heldout:  # natural text never trained on, before and after the continued training
        meta["heldout_text"] = {"n_sequences": len(heldout), "before": heldout_before,
                                "after": heldout_metrics(handle, heldout)}
        with open(work / "heldout.jsonl", "w") as f:
            for seq in heldout:
                f.write(jsonio.dumps({"id": f"heldout-{seq.id}", "text": seq.text,
                                    "duplication": 0,
                                    "role": "heldout"}) + "\n")
    if base_meta is not None:
        meta["base"] = base_meta
    model.cpu().save_pretrained(work)
    with open(work / "corpus.jsonl", "w") as f:
        for rec, ids in zip(corpus.records, token_ids, strict=True):
            row = {**rec.to_json(), "token_ids": ids}
            if rec.id in withheld:  # in the corpus, never trained on
                row |= {"role": "withheld", "duplication": 0, "member": False}
            f.write(jsonio.dumps(row) + "\n")
    jsonio.write(work / "memlens.json", meta)
    (work / "checkpoint.safetensors").unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return out


# The libraries whose releases take part in training an organism: the corpus generator,
# the tokenizer trainer, the model code and the numerics. A cache from other releases is
# not reused as if it were the same organism.
TRAINING_LIBRARIES = ("torch", "transformers", "tokenizers", "faker", "numpy")


def library_versions() -> dict[str, str]:
    """The installed release of each of :data:`TRAINING_LIBRARIES`."""
    from importlib.metadata import version

    return {name: version(name) for name in TRAINING_LIBRARIES}


def organism_dir(preset: str = "small", arch: str = "llama", seed: int = 0,
                 norm_free_layers: tuple[int, ...] = (), withheld: tuple[int, ...] = ()
                 ) -> Path:
    """Where the organism for these settings is cached (it may not be trained yet): the
    name holds the preset, arch, variant, seed, memlens version and a key over the preset's
    settings and the releases of :data:`TRAINING_LIBRARIES`."""
    chosen = get_preset(preset)
    # Natural text comes from this Python's standard library: part of what the key covers.
    python = list(sys.version_info[:2]) if chosen.corpus.general == "natural" else None
    key = digest({**asdict(chosen), **({"python": python} if python else {}),
                  "libraries": library_versions()}, 8)
    norm_free_layers = tuple(sorted(set(norm_free_layers)))
    variant = "-nonorm" + "_".join(map(str, norm_free_layers)) if norm_free_layers else ""
    withheld = tuple(sorted({int(i) for i in withheld}))
    if withheld:
        members = {r.id for r in build_corpus(replace(chosen.corpus, seed=seed)).records
                   if r.member}
        if not set(withheld) <= members:
            raise ConfigError(f"withheld records {sorted(set(withheld) - members)} are not "
                              f"members of the {preset} corpus; withhold canary or general "
                              "record ids")
        variant += "-without" + digest(list(withheld), 6)
    return (cache_dir() / "organisms"
            / f"{preset}-{arch}{variant}-seed{seed}-v{VERSION}-{key}")


def organism_path(preset: str = "small", arch: str = "llama", seed: int = 0,
                  progress: bool = True, norm_free_layers: tuple[int, ...] = (),
                  device: str = "cpu", withheld: tuple[int, ...] = ()) -> Path:
    """The cached organism for (preset, arch, seed, memlens version); trains it if missing.

    The preset's settings and the releases of :data:`TRAINING_LIBRARIES` are part of the
    key (:func:`organism_dir`), so changing a preset or upgrading one of them retrains.
    ``withheld`` (record ids) trains the same organism without those records: the gold
    standard a removal of them is compared with (:mod:`memlens.methods.audit`).
    """
    path = organism_dir(preset, arch, seed, norm_free_layers, withheld)
    norm_free_layers = tuple(sorted(set(norm_free_layers)))
    withheld = tuple(sorted({int(i) for i in withheld}))
    if not (path / "memlens.json").exists():
        # Several processes may want it at once: one trains, the others wait and reuse it.
        with exclusive(path, "train an organism", wait=True):
            if not (path / "memlens.json").exists():
                _train_organism(path, preset, arch, seed, progress, norm_free_layers, device,
                                withheld)
    return path
