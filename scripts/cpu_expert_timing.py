"""CPU training throughput of the expert implementations on a preset (default: tiny, as in the demo).

    python scripts/cpu_expert_timing.py --preset tiny --batch 8 --seq 128 --threads 1

One SPES node (owns 4 of 16 experts) runs the real training step (training.trainer) with the
per-expert loop and with grouped GEMM, alternating, and prints tokens/s (wall clock) and tokens
per CPU-second (1 thread: what a loaded shared machine still measures fairly), medians of repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import MoEArgs, build_model  # noqa: E402
from model.experts import set_experts_implementation  # noqa: E402
from training.trainer import TrainConfig, make_optimizer, train_steps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--owned", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impls", default="loop,grouped")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    margs = MoEArgs.from_dict(yaml.safe_load((ROOT / "conf" / "model" / f"{args.preset}.yaml").read_text()))
    cfg = TrainConfig(batch_size=args.batch, warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (64, args.seq + 1), generator=gen)

    def batches():
        i = 0
        while True:
            yield data[[(i + j) % len(data) for j in range(args.batch)]]
            i += args.batch

    runs = {}
    for impl in args.impls.split(","):
        model = build_model(margs, vocab_size=args.vocab, owned=range(args.owned), seed=0)
        set_experts_implementation(model, impl)
        opt = make_optimizer(model, cfg)
        train_steps(model, opt, batches(), cfg, 0, 2, 1000, torch.device("cpu"))  # warm-up
        runs[impl] = (model, opt)
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits every implementation
        for impl, (model, opt) in runs.items():
            c0 = time.process_time()
            m = train_steps(model, opt, batches(), cfg, 0, args.steps, 1000, torch.device("cpu"))
            wall[impl].append(m["tokens-per-s"])
            # Tokens per CPU-second of this (single-threaded) process: robust to other load on the machine.
            cpu[impl].append(m["num-tokens"] / (time.process_time() - c0))
    print(
        json.dumps(
            {
                k: {
                    "median_tokens_per_s": round(statistics.median(wall[k])),
                    "median_tokens_per_cpu_s": round(statistics.median(cpu[k])),
                    "tokens_per_cpu_s": [round(x) for x in cpu[k]],
                }
                for k in runs
            }
        )
    )


if __name__ == "__main__":
    main()
