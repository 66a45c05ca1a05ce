"""Hostile input against the command line: does each case fail clearly and lose nothing?

    python experiments/adversarial.py [--root DIR] [--out experiments/results/adversarial.json]

Each case runs ``python -m memlens ...`` in a fresh process on a copy of the tiny organism
and is scored: ``good`` (exit 2, a one-line ``memlens: error:`` message, no traceback, every
protected file intact), ``weak`` (refused, but with a traceback), ``bad`` (exit 0 on bad input,
or a protected file changed). ``--root`` runs another checkout's memlens (for a before/after
comparison); cases whose flags that checkout lacks are skipped and counted as such.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from memlens.core import jsonio


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def jsonl(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--organism", type=Path, default=None, help="default: the tiny organism")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/adversarial.json"))
    args = ap.parse_args()
    args.root, args.out = args.root.resolve(), args.out.resolve()
    env = {**os.environ, "PYTHONPATH": str(args.root), "HF_HUB_OFFLINE": "1"}
    if args.organism is None:
        found = subprocess.run(
            [sys.executable, "-m", "memlens", "organism", "path", "--preset", "tiny"],
            env=env, capture_output=True, text=True, check=True, cwd=args.root)
        args.organism = Path(found.stdout.strip().splitlines()[-1])
    work = Path(tempfile.mkdtemp(prefix="memlens-adversarial-"))
    org = work / "org"
    shutil.copytree(args.organism, org)
    ok = jsonl(work / "ok.jsonl", {"text": "Biography. Ann Lee was born on May 1, 1990 and "
                                           "works as a nurse at Acme. They live at 1 Main St, "
                                           "Springfield. Call them at 555-123-4567."})

    def cli(*argv, max_file_bytes=None):  # from the root, so that its memlens is imported
        def full_disk():  # the OS refuses any file beyond the limit, as a full disk would
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.RLIM_INFINITY))

        return subprocess.run([sys.executable, "-m", "memlens", *map(str, argv)], env=env,
                              capture_output=True, text=True, cwd=args.root,
                              preexec_fn=full_disk if max_file_bytes else None)

    def bad_model(name, change):
        d = work / name
        shutil.copytree(org, d)
        data = bytearray((d / "model.safetensors").read_bytes())
        (d / "model.safetensors").write_bytes(change(data))
        return d

    def flip(data):
        data[-100] ^= 0x40
        return bytes(data)

    factors = work / "f.safetensors"
    cli("kfac", "collect", "--model", org, "--data", org, "--out", factors, "--max-tokens",
        "500")
    (work / "factors-cut.safetensors").write_bytes(factors.read_bytes()[:2000])
    fdata = bytearray(factors.read_bytes())
    fdata[-20] ^= 0x10
    (work / "factors-flip.safetensors").write_bytes(bytes(fdata))
    (work / "factors-text.safetensors").write_text("not a tensor file")
    a_file = work / "a-file.txt"
    a_file.write_text("keep")
    foreign = work / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text('{"mine": 1}')
    stray = work / "stray"
    stray.mkdir()
    (stray / "tokens.parquet").write_bytes(b"PAR1")

    long = ("Biography. Ann Lee was born on May 1, 1990 and works as a nurse at Acme. They "
            "live at 1 Main St, Springfield. Call them at 555-123-4567.")
    lab = ("label", "--model", org, "--out", work / "labels-x", "--no-generate", "--data")
    cases = {
        "text null": [*lab, jsonl(work / "1.jsonl", {"text": None})],
        "token_ids 12": [*lab, jsonl(work / "2.jsonl", {"token_ids": 12})],
        "span start as string": [*lab, jsonl(work / "3.jsonl", {"text": "Phone 555", "spans": [
            {"field": "phone", "start": "6", "end": 9}]})],
        "span start as float": [*lab, jsonl(work / "4.jsonl", {"text": long, "spans": [
            {"field": "phone", "start": 6.0, "end": 9}]})],
        "lone surrogate": [*lab, jsonl(work / "5.jsonl", '{"text": "a \\ud800 b"}')],
        "duplication 'many'": [*lab, jsonl(work / "6.jsonl", {"text": long,
                                                              "duplication": "many"})],
        "duplication -3": [*lab, jsonl(work / "7.jsonl", {"text": long, "duplication": -3})],
        "duplication 2.5": [*lab, jsonl(work / "8.jsonl", {"text": long, "duplication": 2.5})],
        "token ids true/false": [*lab, jsonl(work / "9.jsonl",
                                              {"token_ids": [1, True, False] + [5] * 60})],
        "text is a list": [*lab, jsonl(work / "10.jsonl", {"text": ["a", "b"]})],
        "binary input": [*lab, work / "11.jsonl"],
        "--batch-size 0": ["label", "--model", org, "--data", ok, "--out", work / "b0",
                           "--batch-size", "0"],
        "--out is a file": ["label", "--model", org, "--data", ok, "--out", a_file],
        "--out holds a foreign summary.json": ["label", "--model", org, "--data", ok,
                                               "--out", foreign],
        "--out holds a stray tokens.parquet": ["label", "--model", org, "--data", ok,
                                               "--out", stray],
        "kfac collect over model weights": ["kfac", "collect", "--model", org, "--data", org,
                                            "--out", org / "model.safetensors",
                                            "--max-tokens", "300"],
        "kfac edit --out is the model": ["kfac", "edit", "--model", org, "--factors", factors,
                                         "--rho", "0.9", "--out", org],
        "truncated factor file": ["kfac", "edit", "--model", org, "--factors",
                                  work / "factors-cut.safetensors", "--rho", "0.9", "--out",
                                  work / "e1"],
        "flipped byte in factor file": ["kfac", "edit", "--model", org, "--factors",
                                        work / "factors-flip.safetensors", "--rho", "0.9",
                                        "--out", work / "e2"],
        "text file as factors": ["kfac", "edit", "--model", org, "--factors",
                                 work / "factors-text.safetensors", "--rho", "0.9", "--out",
                                 work / "e3"],
        "truncated model weights": ["label", "--model",
                                    bad_model("m-cut", lambda d: bytes(d[:len(d) // 2])),
                                    "--data", ok, "--out", work / "l1"],
        "flipped byte in model weights": ["label", "--model", bad_model("m-flip", flip),
                                          "--data", ok, "--out", work / "l2"],
    }
    labels = work / "labels"
    cli("label", "--model", org, "--data", org, "--out", labels, "--no-generate", "--roles",
        "canary")
    store = work / "store"
    cli("capture", "--model", org, "--labels", labels, "--sites", "blocks.0.hook_resid_post",
        "--out", store)
    full = {"disk full: label": 20_000, "disk full: capture": 20_000,
            "disk full: kfac collect": 20_000}
    cases.update({
        "disk full: label": ["label", "--model", org, "--data", org, "--out", work / "l3"],
        "disk full: capture": ["capture", "--model", org, "--labels", labels, "--sites",
                               "blocks.1.hook_resid_post", "--out", work / "s1"],
        "disk full: kfac collect": ["kfac", "collect", "--model", org, "--data", org,
                                    "--out", work / "f2.safetensors", "--max-tokens", "300"],
        "other capture into a finished --out": [
            "capture", "--model", org, "--labels", labels, "--sites",
            "blocks.1.hook_resid_post", "--out", store],
    })
    (work / "11.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe\x00 binary')
    protected = [a_file, foreign / "summary.json", org / "model.safetensors", factors,
                 store / "manifest.json"]
    before = {p: digest(p) for p in protected}
    rows = []
    for name, argv in cases.items():
        run = cli(*argv, max_file_bytes=full.get(name))
        changed = [str(p) for p in protected if digest(p) != before[p]]
        if "unrecognized arguments" in run.stderr or "required:" in run.stderr:
            verdict = "skipped"
        elif run.returncode == 0 or changed:
            verdict = "bad"
        elif "Traceback" in run.stderr or not run.stderr.strip().splitlines()[-1].startswith(
                "memlens: error:"):
            verdict = "weak"
        else:
            verdict = "good"
        rows.append({"case": name, "verdict": verdict, "exit": run.returncode,
                     "changed": changed, "message": run.stderr.strip().splitlines()[-1][:200]
                     if run.stderr.strip() else ""})
        print(f"{verdict:8} {name:40} {rows[-1]['message'][:90]}", flush=True)
        for p in protected:  # keep the next case honest
            before[p] = digest(p)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("good", "weak", "bad",
                                                                 "skipped")}
    print(counts)
    jsonio.write(args.out, {"root": str(args.root), "counts": counts, "cases": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
