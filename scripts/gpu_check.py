"""Throughput, peak GPU memory and MFU of one SPES node, one full-training node and stock transformers.

One configuration (prints one JSON line; run each in its own process so peak memory is clean):

    python scripts/gpu_check.py --preset 1b --mode spes --owned 4 --steps 10
    python scripts/gpu_check.py --preset 7b --mode spes --lean --batch 2
    python scripts/gpu_check.py --preset tiny --device cpu --mode full --steps 2   # CPU smoke test

The suite (1b at 4 x 2048: stock / full / SPES, with and without the memory options; 7b at
2 x 2048: full / SPES, with and without), each run in a subprocess, a table on stdout and
benchmarks/gpu.json:

    python scripts/gpu_check.py --suite [--steps 10] [--out benchmarks/gpu.json]

Modes: spes = owned experts trainable, the others frozen (stored in bf16 under bf16 precision);
full = every expert trainable (a DiLoCo node); stock = transformers' own fused-experts model,
everything trainable. Memory options (--lean): memory-lean loss, activation checkpointing and
8-bit AdamW when torchao or bitsandbytes is installed. The real training step runs
(training.trainer.train_steps: AdamW, grad clip, CE + router losses, bf16 autocast) on
synthetic token ids: no tokenizer, data, Flower or Hydra needed (torch + transformers only).

MFU = tokens/s x 6 x active parameters / 989e12 (dense bf16 peak of an H100/H200 SXM); active
parameters = every matmul weight a token passes through: shared weights without the input
embedding, plus top-k experts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = 989e12


def _preset(name: str):
    import yaml

    from model import MoEArgs

    return MoEArgs.from_dict(yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()))


def active_params(config) -> int:
    from model import count_parameters

    c = count_parameters(config)
    return c["shared"] - config.vocab_size * config.hidden_size + config.num_experts_per_tok * c["per_expert"]


def have_8bit_optimizer() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("torchao", "bitsandbytes"))


def run_one(args: argparse.Namespace) -> dict:
    import torch
    from transformers import Qwen3MoeForCausalLM

    from model import build_model, count_parameters
    from model.args import build_config
    from model.experts import set_experts_implementation
    from training.trainer import TrainConfig, make_optimizer, train_steps

    margs = _preset(args.preset)
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    eight_bit = args.lean and device.type == "cuda" and have_8bit_optimizer()
    cfg = TrainConfig(
        device=args.device,
        precision="bf16" if bf16 else "fp32",
        batch_size=args.batch,
        lr=5e-4,
        warmup_steps=10,
        lean_loss=args.lean,
        activation_checkpointing=args.lean,
        optimizer="adamw8bit" if eight_bit else "adamw",
        compile=args.compile,
    )
    torch.manual_seed(0)
    vocab = margs.vocab_size or 4096
    if args.mode == "stock":
        with torch.device(device):
            model = Qwen3MoeForCausalLM(build_config(margs, vocab))
    else:
        owned = list(range(args.owned)) if args.mode == "spes" else None
        model = build_model(
            margs, vocab_size=vocab, owned=owned, device=device, frozen_dtype=torch.bfloat16 if bf16 and owned else None
        )
        set_experts_implementation(model, args.impl)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def batches():
        while True:
            yield torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen)

    it = batches()
    result = {
        "preset": args.preset,
        "mode": args.mode,
        "lean": args.lean,
        "compile": args.compile,
        "optimizer": cfg.optimizer,
        "experts_impl": args.impl if args.mode != "stock" else "transformers",
        "owned_experts": args.owned if args.mode == "spes" else margs.num_experts,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    counts = count_parameters(model.config)
    result.update(
        {
            "total_params": counts["total"],
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "active_params": active_params(model.config),
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "tokens_per_step": args.batch * args.seq,
        }
    )
    try:
        train_steps(model, opt, it, cfg, 0, args.warmup, 1000, device)
        t0 = time.perf_counter()
        m = train_steps(model, opt, it, cfg, args.warmup, args.steps, 1000, device)
    except torch.OutOfMemoryError as exc:
        result.update({"oom": True, "error": str(exc).splitlines()[0][:300]})
        return result
    result.update(
        {
            "oom": False,
            "tokens_per_s": m["tokens-per-s"],
            "wall_s": time.perf_counter() - t0,
            "peak_mem_gb": m["peak-mem-mb"] / 1024,
            "mfu": m["tokens-per-s"] * 6 * result["active_params"] / PEAK_FLOPS,
            "final_train_loss": m["ce-loss"],
        }
    )
    return result


class _Vocab:
    """What a node round needs of a tokenizer when the tokens are synthetic: the vocabulary size."""

    eos_token_id = pad_token_id = 0

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def run_round(args: argparse.Namespace) -> dict:
    """Node round overhead: a SPES node's whole round (`client_app.local_round.run_local_round`,
    what the ClientApp runs: build, load what arrived and the saved state, train, save the state)
    against its training loop, in four variants: the model rebuilt from the node's disk every round
    (deployment: a fresh process per message) or kept in memory (train.resident, simulation), and
    the state saved before the reply or after it (train.save_in_background). Round 1 receives the
    full model (cold); rounds 2.. a sparse downlink, as in a run. Synthetic tokens; no Flower,
    Hydra or data needed.

    The overhead is the time to the reply outside the training loop. A state saved after the reply
    overlaps the upload, the aggregation and the next downlink; here nothing else happens, so the
    harness waits for it between rounds and reports that wait (`save_after_reply_s`): a run hides
    it when its exchange takes at least that long. The overhead does not grow with H, so it is
    measured with --steps steps per round and also given as a share of a round of --round-h steps
    at the measured step time.
    """
    import tempfile

    import torch
    import yaml

    from client_app import background_save, resident
    from client_app.local_round import NodeContext, RoundOrder, run_local_round
    from common.spec import from_dict
    from model import build_model, expert_param_names

    preset = yaml.safe_load((ROOT / "conf" / "model" / f"{args.preset}.yaml").read_text())
    vocab = preset.get("vocab_size") or 4096
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, vocab, (max(args.batch * args.steps, 8), args.seq + 1), generator=gen)
    owned = list(range(args.owned))
    init = build_model(from_dict({"model": preset}).model, vocab, seed=0).state_dict()
    own = set(expert_param_names(list(init), owned))
    result = {
        "preset": args.preset,
        "mode": "round",
        "lean": args.lean,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "owned_experts": args.owned,
        "device": torch.cuda.get_device_name(device) if bf16 else "cpu",
        "round_h": args.round_h,
    }
    result["fresh_process_s"] = _fresh_process_s(args.device)
    for variant, (keep, background) in ROUND_VARIANTS.items():
        spec = from_dict(
            {
                "model": preset,
                "nodes": 4,
                "rounds": args.rounds,
                "strategy": {"local_steps": args.steps},
                "train": {
                    "device": args.device,
                    "precision": "bf16" if bf16 else "fp32",
                    "batch_size": args.batch,
                    "lr": 5e-4,
                    "warmup_steps": 0,
                    "resident": keep,
                    "save_in_background": background,
                    "lean_loss": args.lean,
                    "activation_checkpointing": args.lean,
                },
            }
        )
        rounds = []
        with tempfile.TemporaryDirectory(prefix="spes-round-", dir=args.workdir) as tmp:
            ctx = NodeContext(
                spec, _Vocab(vocab), Path(tmp) / "node0", 0, 4, progress=False, blocks=(blocks, blocks[:8])
            )
            for r in range(args.rounds):
                received = init if r == 0 else {k: v for k, v in init.items() if k not in own}
                _, m = run_local_round(
                    ctx, received, RoundOrder(owned, r == 0, r * args.steps, args.steps), show_progress=False
                )
                t0 = time.perf_counter()
                background_save.wait_for_saves(ctx.workdir / "state")  # the exchange a run overlaps it with
                rounds.append(
                    {
                        "round_s": m["round-seconds"],
                        "train_s": m["train-seconds"],
                        "resident": bool(m["resident"]),
                        "tokens_per_s": m["tokens-per-s"],
                        "save_after_reply_s": time.perf_counter() - t0,
                    }
                )
        resident.drop()
        warm = rounds[1:]
        overhead = sum(r["round_s"] - r["train_s"] for r in warm) / len(warm)
        step_s = sum(r["train_s"] for r in warm) / (len(warm) * args.steps)
        result[variant] = {
            "rounds": rounds,
            "overhead_s": overhead,
            "save_after_reply_s": sum(r["save_after_reply_s"] for r in warm) / len(warm),
            "step_s": step_s,
            "overhead_share": overhead / (overhead + args.steps * step_s),
            f"overhead_share_at_h{args.round_h}": overhead / (overhead + args.round_h * step_s),
            "first_round_overhead_s": rounds[0]["round_s"] - rounds[0]["train_s"],
        }
        if not keep:  # in deployment every round also starts a fresh process
            fresh = overhead + result["fresh_process_s"]
            result[variant][f"overhead_share_at_h{args.round_h}_fresh_process"] = fresh / (
                fresh + args.round_h * step_s
            )
    return result


def _fresh_process_s(device: str) -> float:
    """Wall time of a new Python process that imports the node's round code and touches the device:
    what a deployment message pays before its round starts (Flower 1.42 runs each message in a
    fresh `flwr-clientapp`; Flower's own import and messaging are not on the GPU machine, so not
    counted). The second of two runs, with the files in the page cache as on a running node."""
    code = f"import torch, client_app.local_round; torch.zeros(1, device={device!r}).sum().item()"
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        took = time.perf_counter() - t0
    return took


# Round mode: (train.resident, train.save_in_background). Deployment runs every message in a fresh
# process, so its defaults are "rebuilt_bg"; a simulation's are "resident_bg".
ROUND_VARIANTS = {
    "rebuilt": (False, False),
    "rebuilt_bg": (False, True),
    "resident": (True, False),
    "resident_bg": (True, True),
}

# (size, mode, lean): "1b" and "7b" stand for --small-preset and --large-preset.
SUITE = [
    ("1b", "stock", False),
    ("1b", "full", False),
    ("1b", "spes", False),
    ("1b", "full", True),
    ("1b", "spes", True),
    ("7b", "full", False),
    ("7b", "spes", False),
    ("7b", "full", True),
    ("7b", "spes", True),
    ("1b", "round", False),
]


def _ratio(a, b):
    return a / b if a is not None and b else None


def suite_ratios(rows: list[dict]) -> dict:
    """The suite's headline ratios from its rows (None where a row failed or ran out of memory)."""

    def get(size, mode, lean, key):
        for r in rows:
            if (r["size"], r.get("mode"), r.get("lean")) == (size, mode, lean) and not r.get("oom"):
                return r.get(key)
        return None

    return {
        "spes_over_stock_tokens_per_s_1b": _ratio(
            get("1b", "spes", False, "tokens_per_s"), get("1b", "stock", False, "tokens_per_s")
        ),
        "mem_spes_over_full_1b": _ratio(
            get("1b", "spes", False, "peak_mem_gb"), get("1b", "full", False, "peak_mem_gb")
        ),
        "mem_spes_over_full_7b": _ratio(
            get("7b", "spes", False, "peak_mem_gb"), get("7b", "full", False, "peak_mem_gb")
        ),
        "peak_gb_7b_spes_lean": get("7b", "spes", True, "peak_mem_gb"),
        # Target 4: everything but the H steps, as a share of a round at H = 100 (1b), with the
        # defaults of deployment (rebuilt, saved after the reply) and of simulation (kept), and as
        # before the state was saved after the reply.
        "node_round_overhead_1b_h100": (get("1b", "round", False, "rebuilt_bg") or {}).get(
            "overhead_share_at_h100_fresh_process"
        ),
        "node_round_overhead_1b_h100_resident": (get("1b", "round", False, "resident_bg") or {}).get(
            "overhead_share_at_h100"
        ),
        "node_round_overhead_1b_h100_save_before_reply": (get("1b", "round", False, "rebuilt") or {}).get(
            "overhead_share_at_h100_fresh_process"
        ),
    }


def run_suite(args: argparse.Namespace) -> dict:
    rows = []
    for size, mode, lean in SUITE:
        small = size == "1b"
        preset = args.small_preset if small else args.large_preset
        cmd = (
            [
                sys.executable,
                __file__,
                "--preset",
                preset,
                "--mode",
                mode,
                "--rounds",
                str(args.rounds),
                "--round-h",
                str(args.round_h),
                "--batch",
                str(args.batch_small if small else args.batch_large),
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
                "--owned",
                str(args.owned_small if small else args.owned_large),
                "--impl",
                args.impl,
            ]
            + (["--lean"] if lean else [])
            + (["--compile"] if args.compile else [])
        )
        label = f"{size}:{preset} {mode}{' +lean' if lean else ''}"
        try:
            # A round row runs 2 x --rounds node rounds, each saving the node's state.
            timeout = args.timeout * (2 if mode == "round" else 1)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = (
                json.loads(lines[-1])
                if lines
                else {"preset": preset, "mode": mode, "lean": lean, "error": proc.stderr.strip().splitlines()[-1:]}
            )
        except subprocess.TimeoutExpired:
            row = {"preset": preset, "mode": mode, "lean": lean, "error": f"timeout {timeout}s"}
        row["size"] = size
        rows.append(row)
        print(_fmt(label, row), flush=True)
        _write(args.out, {"runs": rows, "complete": False})  # a suite cut short keeps its finished rows

    ratios = suite_ratios(rows)
    out = {
        "runs": rows,
        "ratios": ratios,
        "mfu_peak_flops": PEAK_FLOPS,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "complete": True,
    }
    _write(args.out, out)
    print(json.dumps(ratios), flush=True)
    print(f"wrote {args.out}", flush=True)
    return out


def _write(out: str, data: dict) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _fmt(label: str, r: dict) -> str:
    if r.get("error") or r.get("oom"):
        return f"{label:<16} {'OOM' if r.get('oom') else 'failed'}: {r.get('error')}"
    if r.get("mode") == "round":
        h = r["round_h"]
        lines = [f"{label:<16} a fresh process (deployment, every round): {r['fresh_process_s']:.2f} s"]
        for k in ROUND_VARIANTS:
            v = r[k]
            share = v.get(f"overhead_share_at_h{h}_fresh_process", v[f"overhead_share_at_h{h}"])
            lines.append(
                f"{'':<16} {k:>11}: {v['overhead_s']:6.2f} s outside {r['steps']} steps of {v['step_s']:.3f} s "
                f"= {100 * share:4.1f} % of a round at H={h}{' with the fresh process' if 'rebuilt' in k else ''} "
                f"(cold round {v['first_round_overhead_s']:.2f} s; "
                f"{v['save_after_reply_s']:.2f} s saving after the reply)"
            )
        return "\n".join(lines)
    return (
        f"{label:<16} {r['tokens_per_s']:>9.0f} tok/s  {r['peak_mem_gb']:>7.2f} GB  MFU {100 * r['mfu']:5.1f} %  "
        f"trainable {r['trainable_params'] / 1e6:,.0f} M of {r['total_params'] / 1e6:,.0f} M  opt {r['optimizer']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", action="store_true", help="run the 1b/7b matrix and write --out")
    ap.add_argument("--preset", default="1b")
    ap.add_argument(
        "--mode",
        choices=["spes", "full", "stock", "round"],
        default="spes",
        help="round: node round overhead (whole run_local_round vs its training loop)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="round mode: rounds per variant (the first is cold)")
    ap.add_argument("--round-h", type=int, default=100, help="round mode: H the overhead share is given for")
    ap.add_argument("--workdir", default=None, help="round mode: where the node's state is saved (default: temp)")
    ap.add_argument("--owned", type=int, default=4, help="experts this node trains (spes mode)")
    ap.add_argument("--small-preset", default="1b", help="suite: the preset of the 1b rows")
    ap.add_argument("--large-preset", default="7b", help="suite: the preset of the 7b rows")
    ap.add_argument("--owned-small", type=int, default=4, help="suite: owned experts at 1b (4 of 16)")
    ap.add_argument("--owned-large", type=int, default=8, help="suite: owned experts at 7b (8 of 32)")
    ap.add_argument("--batch-small", type=int, default=4, help="suite: sequences per step at 1b")
    ap.add_argument("--batch-large", type=int, default=2, help="suite: sequences per step at 7b")
    ap.add_argument("--lean", action="store_true", help="memory options: lean loss, checkpointing, 8-bit AdamW")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    ap.add_argument("--impl", default="auto", choices=["auto", "loop", "grouped"], help="expert compute")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=int, default=300, help="suite: seconds per configuration")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu.json"))
    args = ap.parse_args()
    if args.suite:
        run_suite(args)
        return
    # Before torch starts CUDA: fewer fragmentation OOMs near the memory limit.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    print(json.dumps(run_round(args) if args.mode == "round" else run_one(args)), flush=True)


if __name__ == "__main__":
    main()
