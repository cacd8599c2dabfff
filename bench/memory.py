"""Peak memory of one node's training loop, SPES vs DiLoCo vs partial residency, each in a fresh process.

    python -m bench.memory [hydra overrides]          # default: model=small, 4 nodes
    python -m bench.memory model=tiny data.vocab_size=4096 --batch 4 --seq 128 --steps 3

ru_maxrss only ever grows, so every measurement runs in its own subprocess: one for a SPES
node (node 0's block of experts trainable), one for a DiLoCo node (every expert trainable),
and two for SPES nodes holding fewer experts (`strategy.residency=owned` and `owned+2`: node 0's
experts, and those plus the 2 lowest other ids per layer, the coordinator's choice before any
load is reported). Each worker builds the model as a node does each round (allocated empty, so
an absent expert never takes memory, then initialised in place), runs the project's own optimizer and train_steps
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
    model = build_model(args, vocab, owned=job["owned"], empty=True, absent=job["absent"])
    _initialise(model)
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
        "held_params": sum(p.numel() for p in model.parameters()),  # fewer than total where experts are absent
        "train_loss": metrics["train-loss"],
        "seconds": seconds,
    }


def _initialise(model) -> None:
    """In place, as a node's received weights would fill it: matrices N(0, 0.02), vectors 1."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)


def residency_absent(residency: str, owned: list[int], num_experts: int, num_layers: int) -> list[list[int]]:
    """Per layer, the experts node 0 does not hold under `residency` before any load is reported."""
    from strategy.residency import Residency

    r = Residency(residency, num_experts, every=1)
    r.update(1, {0: owned}, {}, None, num_layers)
    return r.absent(0) or [[] for _ in range(num_layers)]


# arm -> (residency, experts trainable: node 0's or all)
ARMS = {
    "spes": ("all", True),
    "diloco": ("all", False),
    "spes_owned": ("owned", True),
    "spes_owned2": ("owned+2", True),
}


def analytic_floor_mb(held: int, trainable: int) -> float:
    """The weights held + grads + 2 AdamW moments of the trainable params, fp32, in MiB."""
    return BYTES_FP32 * (held + 3 * trainable) / 2**20


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
    for arm, (residency, owns) in ARMS.items():
        owned = owned_spes if owns else None
        absent = residency_absent(residency, owned_spes, spec.model.num_experts, spec.model.num_layers)
        out[arm] = _measure_arm(arm, {**base, "owned": owned, "absent": absent}, spec)
    s, d = out["spes"], out["diloco"]
    out["ratio_measured"] = s["peak_rss_mb"] / d["peak_rss_mb"]
    out["ratio_analytic_floor"] = s["analytic_floor_mb"] / d["analytic_floor_mb"]
    # Labelled, never the headline: the same interpreter/library RSS is removed from both sides.
    out["ratio_minus_imports"] = s["peak_minus_imports_mb"] / d["peak_minus_imports_mb"]
    for arm in ("spes_owned", "spes_owned2"):
        out[f"ratio_{arm}_over_spes"] = out[arm]["peak_rss_mb"] / s["peak_rss_mb"]
        out[f"ratio_{arm}_over_spes_analytic_floor"] = out[arm]["analytic_floor_mb"] / s["analytic_floor_mb"]
    return out


def _measure_arm(arm: str, job: dict, spec) -> dict:
    """One arm in its fresh subprocess: its peak RSS and analytic floor."""
    held = sum(map(len, job["absent"]))
    print(
        f"[memory] {arm}: fresh process, model={spec.model.name}, "
        f"{'experts ' + str(job['owned']) if job['owned'] else 'all experts'} trainable, "
        f"{held} expert-layers absent, {job['steps']} steps of {job['batch']}x{job['seq']}",
        flush=True,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--worker", json.dumps(job)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker ({arm}) failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["owned_experts"] = len(job["owned"]) if job["owned"] else spec.model.num_experts
    res["absent_expert_layers"] = held
    res["analytic_floor_mb"] = analytic_floor_mb(res["held_params"], res["trainable_params"])
    res["peak_minus_imports_mb"] = res["peak_rss_mb"] - res["rss_after_imports_mb"]
    print(
        f"[memory] {arm}: peak RSS {res['peak_rss_mb']:.0f} MiB (analytic floor "
        f"{res['analytic_floor_mb']:.0f} MiB, interpreter+libraries {res['rss_after_imports_mb']:.0f} MiB) "
        f"in {res['seconds']:.0f}s",
        flush=True,
    )
    return res


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
    print(json.dumps({k: v for k, v in res.items() if k.startswith("ratio_")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
