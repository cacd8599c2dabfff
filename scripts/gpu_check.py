"""Throughput and peak GPU memory of one SPES node vs one full-training (DiLoCo) node.

    python scripts/gpu_check.py --preset 1b --mode spes --owned 4 --steps 30
    python scripts/gpu_check.py --preset 1b --mode full --steps 30

Runs the real training step (client_app.trainer.train_steps: AdamW, grad clip, CE + router
losses, bf16 autocast) on synthetic token ids, so it needs no tokenizer or data download.
Prints one JSON line. Run each mode in its own process so peak memory is clean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client_app.trainer import TrainConfig, make_optimizer, train_steps  # noqa: E402
from model import MoEArgs, build_model, count_parameters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--mode", choices=["spes", "full"], default="spes")
    ap.add_argument("--owned", type=int, default=4, help="experts this node trains (spes mode)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    margs = MoEArgs.from_dict(yaml.safe_load((ROOT / "conf" / "model" / f"{args.preset}.yaml").read_text()))
    owned = list(range(args.owned)) if args.mode == "spes" else None
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(margs, vocab_size=margs.vocab_size or 4096, owned=owned, device=device)
    cfg = TrainConfig(device=args.device, precision="bf16" if device.type == "cuda" else "fp32", batch_size=args.batch,
                      lr=5e-4, warmup_steps=10)
    opt = make_optimizer(model, cfg)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)

    def batches():
        while True:
            yield torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen)

    it = batches()
    train_steps(model, opt, it, cfg, 0, args.warmup, 1000, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    m = train_steps(model, opt, it, cfg, args.warmup, args.steps, 1000, device)
    wall = time.perf_counter() - t0
    counts = count_parameters(model.config)
    result = {
        "preset": args.preset,
        "mode": args.mode,
        "owned_experts": args.owned if owned else margs.num_experts,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "total_params": counts["total"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": args.steps,
        "tokens_per_step": args.batch * args.seq,
        "tokens_per_s": m["tokens-per-s"],
        "wall_s": wall,
        "peak_mem_gb": m["peak-mem-mb"] / 1024,
        "final_train_loss": m["ce-loss"],
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
