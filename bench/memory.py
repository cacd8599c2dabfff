"""Peak memory of one node's training loop, SPES vs DiLoCo, each in a fresh process.

    python -m bench.memory [hydra overrides]          # default: model=small, 4 nodes
    python -m bench.memory model=tiny data.vocab_size=4096 --batch 4 --seq 128 --steps 3

ru_maxrss only ever grows, so every measurement runs in its own subprocess: one for a SPES
node (node 0's block of experts trainable) and one for a DiLoCo node (every expert
trainable). Each worker builds the model, runs the project's own optimizer and train_steps
on synthetic token ids (memory does not depend on the text, so no tokenizer or corpus is
needed) and reports the process's peak RSS. Beside it we report the analytic floor: all
weights + gradients + both AdamW moments of the trainable parameters, fp32.

The worker imports only torch, transformers and the model/trainer modules (not Flower), so
the interpreter baseline it carries is the smallest a training process can have; that
baseline is reported separately and never subtracted silently.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BYTES_FP32 = 4


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc (Linux)."""
    from training.trainer import process_memory_mb

    return process_memory_mb("VmRSS") or 0.0, process_memory_mb("VmHWM") or 0.0


def _worker(job: dict) -> dict:
    """Runs inside the fresh subprocess: build, train a few steps, report peak RSS."""
    import resource

    import torch

    from model import build_model, count_parameters
    from model.args import MoEArgs
    from training.trainer import TrainConfig, make_optimizer, train_steps

    torch.set_num_threads(job["threads"])
    rss_imports, _ = _rss_mb()
    args = MoEArgs.from_dict(job["model"])
    vocab = args.vocab_size or job["vocab_size"]
    cfg = TrainConfig.from_dict(job["train"])
    model = build_model(args, vocab, owned=job["owned"], seed=0)
    optimizer = make_optimizer(model, cfg)
    rss_built, peak_built = _rss_mb()

    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:  # synthetic ids: the memory footprint is independent of the text
            yield torch.randint(0, vocab, (job["batch"], job["seq"] + 1), generator=gen)

    t0 = time.perf_counter()
    metrics = train_steps(model, optimizer, batches(), cfg, 0, job["steps"], job["steps"], torch.device("cpu"))
    seconds = time.perf_counter() - t0
    counts = count_parameters(model.config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _, peak_train = _rss_mb()
    return {
        # train_steps starts a new peak window (clear_refs), so take the build-time peak too.
        "peak_rss_mb": max(peak_built, peak_train, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_after_imports_mb": rss_imports,
        "rss_after_build_mb": rss_built,
        "peak_rss_before_train_mb": peak_built,
        "trainable_params": trainable,
        "total_params": counts["total"],
        "train_loss": metrics["train-loss"],
        "seconds": seconds,
    }


def analytic_floor_mb(total: int, trainable: int) -> float:
    """All weights + grads + 2 AdamW moments of the trainable params, fp32, in MiB."""
    return BYTES_FP32 * (total + 3 * trainable) / 2**20


def measure(overrides: list[str], batch: int = 4, seq: int = 128, steps: int = 3, threads: int = 1) -> dict:
    """Peak RSS of a SPES node and of a DiLoCo node, each in a fresh subprocess."""
    from server_app.config import load
    from strategy.assignment import contiguous_assignment

    spec = load(overrides)
    owned_spes = list(contiguous_assignment(spec.model.num_experts, spec.nodes).experts_of(0))
    base = {
        "model": spec.model.to_dict(),
        "vocab_size": spec.data.vocab_size,
        "train": {**spec.train.to_dict(), "device": "cpu", "precision": "fp32"},
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "threads": threads,
    }
    out = {
        "model": spec.model.name,
        "overrides": overrides,
        "nodes": spec.nodes,
        "batch": batch,
        "seq_len": seq,
        "steps": steps,
        "threads": threads,
    }
    for method, owned in (("spes", owned_spes), ("diloco", None)):
        print(
            f"[memory] {method}: fresh process, model={spec.model.name}, "
            f"{'experts ' + str(owned) if owned else 'all experts'} trainable, {steps} steps of {batch}x{seq}",
            flush=True,
        )
        job = {**base, "owned": owned}
        proc = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--worker", json.dumps(job)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker ({method}) failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["owned_experts"] = len(owned) if owned else spec.model.num_experts
        res["analytic_floor_mb"] = analytic_floor_mb(res["total_params"], res["trainable_params"])
        res["peak_minus_imports_mb"] = res["peak_rss_mb"] - res["rss_after_imports_mb"]
        print(
            f"[memory] {method}: peak RSS {res['peak_rss_mb']:.0f} MiB (analytic floor "
            f"{res['analytic_floor_mb']:.0f} MiB, interpreter+libraries {res['rss_after_imports_mb']:.0f} MiB) "
            f"in {res['seconds']:.0f}s",
            flush=True,
        )
        out[method] = res
    s, d = out["spes"], out["diloco"]
    out["ratio_measured"] = s["peak_rss_mb"] / d["peak_rss_mb"]
    out["ratio_analytic_floor"] = s["analytic_floor_mb"] / d["analytic_floor_mb"]
    # Labelled, never the headline: the same interpreter/library RSS is removed from both sides.
    out["ratio_minus_imports"] = s["peak_minus_imports_mb"] / d["peak_minus_imports_mb"]
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        print(json.dumps(_worker(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a simulated node gets 1 CPU)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (default: model=small)")
    a = p.parse_args(argv)
    res = measure(a.overrides or ["model=small"], a.batch, a.seq, a.steps, a.threads)
    print(json.dumps({k: res[k] for k in ("ratio_measured", "ratio_analytic_floor", "ratio_minus_imports")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
