"""Plots and Markdown for sim.bench: docs/benchmarks.md and its figures, from results.json."""

from __future__ import annotations

import os
import platform
from pathlib import Path

MiB = 2**20
LABELS = {"spes": "SPES", "diloco": "DiLoCo", "fedavg": "FedAvg", "centralized": "centralized"}
RATIO_ORDER = ("mem_spes_over_diloco", "bytes_spes_over_diloco", "loss_spes_over_centralized",
               "loss_spes_over_diloco", "flower_overhead")


def machine_info() -> dict:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem_gb = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        import flwr

        flwr_version = flwr.__version__
    except Exception:  # noqa: BLE001 - only informative
        flwr_version = "?"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu, "cores": cores, "mem_gb": mem_gb, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr_version,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (f"{m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB RAM{gpu}; {m['platform']}; "
            f"Python {m['python']}, torch {m['torch']}, flwr {m['flwr']}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str) -> Path:
    """curves: label -> (tokens, held-out loss)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (tokens, loss) in curves.items():
        ax.plot(tokens, loss, marker="o", markersize=3, label=label)
    ax.set_xlabel("tokens trained (all nodes)")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bytes(methods: dict, path: Path) -> Path:
    plt = _plt()
    fed = [m for m in methods if "bytes_per_round_node" in methods[m]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["-", "--", ":"]  # DiLoCo and FedAvg send identical bytes: keep both lines visible
    for i, m in enumerate(fed):
        per = methods[m]["bytes_per_round_node"]
        a.plot(range(1, len(per) + 1), [x / MiB for x in per], marker="o", markersize=3,
               linestyle=styles[i % 3], linewidth=2.5 - 0.7 * i, label=LABELS[m])
    a.set_xlabel("round")
    a.set_ylabel("MiB per node (up + down)")
    a.set_ylim(bottom=0)
    a.set_title("measured bytes per round per node")
    a.grid(alpha=0.3)
    a.legend()
    x = range(len(fed))
    w = 0.2
    up = [methods[m]["bytes_up_steady_per_round_node"] / MiB for m in fed]
    down = [methods[m]["bytes_down_steady_per_round_node"] / MiB for m in fed]
    up_a = [methods[m]["analytic"]["bytes_up_per_round_node"] / MiB for m in fed]
    down_a = [methods[m]["analytic"]["bytes_down_steady_per_round_node"] / MiB for m in fed]
    b.bar([i - 1.5 * w for i in x], up, w, label="up, measured")
    b.bar([i - 0.5 * w for i in x], up_a, w, label="up, analytic", alpha=0.5)
    b.bar([i + 0.5 * w for i in x], down, w, label="down, measured")
    b.bar([i + 1.5 * w for i in x], down_a, w, label="down, analytic", alpha=0.5)
    b.set_xticks(list(x), [LABELS[m] for m in fed])
    b.set_ylabel("MiB per node per round")
    b.set_title("steady-state round (after a non-merge round)")
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4)
    b.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_memory(results: dict, path: Path) -> Path:
    plt = _plt()
    mem, methods = results["memory"], results["methods"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["spes", "diloco"]
    x = range(len(names))
    w = 0.27
    a.bar([i - w for i in x], [mem[n]["peak_rss_mb"] for n in names], w, label="peak RSS, measured")
    a.bar(list(x), [mem[n]["analytic_floor_mb"] for n in names], w, label="analytic floor (W + G + 2 Adam)")
    a.bar([i + w for i in x], [mem[n]["rss_after_imports_mb"] for n in names], w, label="interpreter + libraries")
    a.set_xticks(list(x), [LABELS[n] for n in names])
    a.set_ylabel("MiB")
    a.set_title(f"one node, model={mem['model']}, fresh process each")
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    a.grid(alpha=0.3, axis="y")
    order = [m for m in ("spes", "diloco", "fedavg", "centralized") if m in methods]
    b.bar(range(len(order)), [methods[m]["peak_mem_mb_node"] for m in order])
    b.set_xticks(range(len(order)), [LABELS[m] for m in order])
    b.set_ylabel("MiB (largest per-round peak RSS)")
    b.set_title("as reported by the nodes of the benchmark runs")
    b.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _rel(path: str) -> str:
    """Path relative to the repository when inside it (docs stay valid on other machines)."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def _shape(overrides: list[str]) -> str:
    """The model shape behind a preset name, since presets can be retuned between runs."""
    from server_app.config import load

    m = load(overrides).model
    return (f"{m.num_layers} x d{m.hidden_size}, vocab {m.vocab_size or 'from tokenizer'}, "
            f"{m.num_experts} experts of FFN {m.expert_ffn}, top-{m.top_k}")


def _all_rounds(entry: dict) -> float:
    return entry["bytes_up_per_round_node"] + entry["bytes_down_per_round_node"]


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:.2f}"


def write_bench_docs(results: dict, docs: Path) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    # results.json is written with sorted keys: restore the reading order here.
    methods = {m: results["methods"][m] for m in LABELS if m in results["methods"]}
    ratios = {k: results["ratios"][k] for k in RATIO_ORDER if k in results["ratios"]}
    mem, over = results["memory"], results["overhead"]
    plot_loss({LABELS[m]: (e["tokens_by_round"], e["val_loss_by_round"]) for m, e in methods.items()},
              docs / "bench_loss.png", "held-out loss vs tokens")
    plot_bytes(methods, docs / "bench_bytes.png")
    plot_memory(results, docs / "bench_memory.png")

    spes = methods["spes"]
    cfg = " ".join(results["overrides"])
    L = [
        "# Benchmarks",
        "",
        "Generated by the benchmark harness (`sim/bench.py`); do not edit by hand: rerun it.",
        "",
        f"- Command: `{results['command'].strip()}` (`make bench` runs `python -m sim.bench`)",
        f"- Date: {results['date']} (UTC); the whole benchmark took {results['bench_wall_s'] / 60:.1f} min",
        f"- Machine: {machine_line(results['machine'])}",
        f"- Runs (Hydra overrides for every method): `{cfg}`; run outputs under `{_rel(results['out'])}/runs/`, "
        f"numbers in `{_rel(results['out'])}/results.json`",
        "",
        "## Methods at equal tokens",
        "",
        "All four train the same initial model (same seed) on the same data for the same number of tokens "
        "with the same LR schedule; held-out loss is measured by the coordinator on the same held-out "
        "blocks after every round (centralized: every H steps). Bytes are tensor payload (fp32), per node "
        "per round. *all rounds* is the mean over every round; *steady* is the mean over rounds that follow "
        "a non-merge round (no first contact, no merged experts), where a SPES node receives everything "
        "except its own experts.",
        "",
        "| method | final held-out loss | tokens | up / round / node (MiB, all) "
        "| down / round / node (MiB, all) | up + down steady (MiB) | analytic steady (MiB) "
        "| peak mem (MiB, run) | tokens/s/node | trainable params/node | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, e in methods.items():
        an = e.get("analytic", {})
        L.append(
            f"| {LABELS[m]} | {e['final_val_loss']:.4f} | {e['tokens_trained']:,.0f} | "
            f"{_mib(e['bytes_up_per_round_node'])} | {_mib(e['bytes_down_per_round_node'])} | "
            f"{_mib(e.get('bytes_steady_per_round_node'))} | {_mib(an.get('bytes_steady_per_round_node'))} | "
            f"{e['peak_mem_mb_node']:.0f} | {e['tokens_per_s_node']:.0f} | {e['trainable_params_node']:,} | "
            f"{e['wall_s']:.0f} |"
        )
    sa = spes["analytic"]
    L += [
        "",
        f"SPES analytic bytes per node: up {_mib(sa['bytes_up_per_round_node'])} MiB (shared + "
        f"{sa['owned_experts']} experts), down {_mib(sa['bytes_down_steady_per_round_node'])} MiB in a steady "
        f"round (total - own experts) and {_mib(sa['bytes_down_full_per_round_node'])} MiB (full model) in "
        f"round 1 and after merge rounds (steady rounds here: {spes['steady_rounds']}); all-round analytic mean "
        f"down {_mib(sa['bytes_down_per_round_node_all_rounds'])} MiB vs measured "
        f"{_mib(spes['bytes_down_per_round_node'])} MiB. DiLoCo/FedAvg: 2 x total every round. "
        "*peak mem (run)* is the largest per-round peak RSS a node reported: the peak of the process that ran "
        "the node during its round (VmHWM, reset at the start of each round's training; it includes the Ray "
        "actor's Flower/Ray libraries; centralized: the whole training process). The clean per-node "
        "comparison is under Memory below. *tokens/s/node* is a node's training throughput on 1 thread "
        "(2 nodes train at a time on this machine); centralized: the one process, all threads.",
        "",
        "![loss vs tokens](bench_loss.png)",
        "",
        "![bytes per round per node](bench_bytes.png)",
        "",
        "## Ratios",
        "",
        "Computed by the harness from the measured values named in `ratio_sources` of results.json.",
        "",
        "| ratio | value | from | analytic |",
        "|---|---|---|---|",
    ]
    analytic = {"bytes_spes_over_diloco": results["analytic_ratios"]["bytes_spes_over_diloco"],
                "mem_spes_over_diloco": results["analytic_ratios"]["mem_floor_spes_over_diloco"]}
    for k, v in ratios.items():
        num, den = results["ratio_sources"][k]
        an = f"{analytic[k]:.4f}" if k in analytic else "-"
        L.append(f"| `{k}` | {v:.4f} | `{num}` / `{den}` | {an} |")
    L += [
        "",
        *_loss_verdict(results),
        "",
        "`bytes_spes_over_diloco` uses the steady-state measured bytes (up + down per node per round); over "
        f"all rounds, including the full-model downlinks of round 1 and merge rounds, it is "
        f"{_all_rounds(spes) / _all_rounds(methods['diloco']):.4f}.",
        "",
        "## Memory per node",
        "",
        f"Model `{' '.join(mem['overrides'])}` ({_shape(mem['overrides'])}; {mem['spes']['total_params']:,} "
        f"parameters), {mem['nodes']} nodes: a "
        f"SPES node trains the shared weights + {mem['spes']['owned_experts']} experts "
        f"({mem['spes']['trainable_params']:,} trainable), a DiLoCo node all {mem['diloco']['owned_experts']} "
        f"({mem['diloco']['trainable_params']:,}). Each is a fresh Python process (`python -m sim.memory`) that "
        f"builds the model, creates the project's AdamW (`make_optimizer`) and runs {mem['steps']} steps of "
        f"`train_steps` on synthetic {mem['batch']} x {mem['seq_len']} token batches with {mem['threads']} "
        "thread(s); peak = the process's peak RSS over its whole life (build and training). The analytic floor is all weights + gradients + 2 AdamW "
        "moments of the trainable parameters, fp32.",
        "",
        "| node | peak RSS (MiB) | analytic floor (MiB) | interpreter + libraries (MiB) | peak - interpreter (MiB) |",
        "|---|---|---|---|---|",
    ]
    for n in ("spes", "diloco"):
        r = mem[n]
        L.append(f"| {LABELS[n]} | {r['peak_rss_mb']:.0f} | {r['analytic_floor_mb']:.0f} | "
                 f"{r['rss_after_imports_mb']:.0f} | {r['peak_minus_imports_mb']:.0f} |")
    L += [
        "",
        f"SPES / DiLoCo: **{mem['ratio_measured']:.3f} measured** (this is `mem_spes_over_diloco`); "
        f"{mem['ratio_analytic_floor']:.3f} analytic floor; {mem['ratio_minus_imports']:.3f} with the "
        "interpreter + library RSS (measured after the imports, before the model) removed from both sides "
        "(labelled, not the headline). Above the floor are the activations and logits of the batch, "
        "AdamW's foreach temporaries and allocator slack.",
        "",
        *_memory_verdict(mem),
        "",
        "![memory](bench_memory.png)",
        "",
        "## Flower overhead",
        "",
        f"`flower_overhead` = mean wall time of a simulated SPES round / wall time of the same local steps in "
        f"a bare training loop = {over['sim_round_s']:.2f} s / {over['bare_round_s']:.2f} s = "
        f"**{ratios['flower_overhead']:.2f}**.",
        "",
        "- Simulated round: differences of the coordinator's cumulative `wall_s` in metrics.jsonl for rounds "
        f"2..R (round 1 also pays start-up and node discovery), {len(over['sim_round_s_by_round'])} rounds. It "
        "includes: configure messages and encode tensors, Flower/Ray delivery to the virtual SuperNodes "
        f"({over['bare']['slots']} concurrent 1-CPU Ray actors), each node's `run_local_round` (model rebuild, "
        "loading received + saved state, data shard, H training steps, saving state, encoding the reply), "
        "validation and aggregation, expert merging, the coordinator's held-out evaluation and its Hugging "
        "Face checkpoint write.",
        f"- Bare loop: `train_steps` for H steps per node only, every node of the run, on {over['bare']['slots']} "
        "processes x 1 torch thread (the simulation's concurrency), node p on process p % slots; a round's "
        f"time is the slowest process's total; mean of bare rounds 2..{over['bare']['rounds']}.",
        "",
        "Where the simulated round's time goes (bare measurements on this machine):",
        "",
        "| part | seconds |",
        "|---|---|",
        f"| H training steps of all nodes (bare loop, the denominator) | {over['bare_round_s']:.2f} |",
        "| whole node rounds without Flower (`run_local_round`: + rebuild, state, data) "
        f"| {over['bare']['local_round_s']:.2f} |",
        f"| coordinator held-out evaluation | {over['coordinator']['eval_s']:.2f} |",
        f"| coordinator checkpoint write | {over['coordinator']['checkpoint_s']:.2f} |",
        "| rest: Flower/Ray messaging, (de)serialisation, aggregation, merging, scheduling "
        f"| {over['unaccounted_s']:.2f} |",
        f"| simulated round (mean) | {over['sim_round_s']:.2f} |",
        "",
        f"Against whole node rounds without Flower the ratio is {over['sim_over_local_round']:.2f}.",
        *_overhead_by_h(over, results),
        "",
        *_overhead_verdict(over),
        "",
        "## Analytic ratios of the larger presets",
        "",
        "Not measured here (they need a GPU): computed from `model.count_parameters` with the paper's node "
        "counts, for orientation.",
        "",
        "| preset | nodes x experts | bytes SPES / DiLoCo (steady) | memory floor SPES / DiLoCo |",
        "|---|---|---|---|",
    ]
    for name, nodes, row in _preset_ratios():
        L.append(f"| {name} | {nodes} | {row[0]:.3f} | {row[1]:.3f} |")
    path = docs / "benchmarks.md"
    path.write_text("\n".join(L) + "\n")
    return path


def _loss_verdict(results: dict) -> list[str]:
    """Goal SPES / centralized <= 1.03 at equal tokens: say whether it is met, and what the others reached."""
    m, r = results["methods"], results["ratios"]["loss_spes_over_centralized"]
    if r <= 1.03:
        return [f"`loss_spes_over_centralized` {r:.3f} meets the goal (<= 1.03)."]
    cen = m["centralized"]["final_val_loss"]
    others = ", ".join(f"{LABELS[k]} {m[k]['final_val_loss'] / cen:.3f}" for k in ("fedavg", "diloco") if k in m)
    return [
        f"`loss_spes_over_centralized` {r:.3f} misses the goal (<= 1.03) by {r - 1.03:.3f}. The other "
        f"federated methods at the same tokens, over centralized: {others}. At equal tokens a SPES expert is "
        "trained only on its owner's share of the tokens (1 / nodes of them), and every federated node "
        "takes the same number of steps as the centralized run with a nodes-times smaller batch; this "
        f"benchmark is short ({m['spes']['tokens_trained']:,.0f} tokens, one seed). The paper's claim is for "
        "far longer runs of far larger models.",
    ]


def _overhead_verdict(over: dict) -> list[str]:
    r = over["flower_overhead"]
    if r <= 1.10:
        return [f"`flower_overhead` {r:.2f} meets the goal (<= 1.10)."]
    fixed = over["sim_round_s"] - over["bare_round_s"]
    return [
        f"`flower_overhead` {r:.2f} misses the goal (<= 1.10) by {r - 1.10:.2f} at this H. What Flower and the "
        f"node round add is about fixed per round ({fixed:.2f} s here: rebuilding the node's model and "
        "loading its state, the coordinator's evaluation and checkpoint, messaging), so the ratio falls as H "
        "grows; the table above measures it again at larger H.",
    ]


def _overhead_by_h(over: dict, results: dict) -> list[str]:
    """Overhead measured again at larger H: the per-round cost is fixed, the training time grows with H."""
    at = over.get("at_local_steps") or {}
    if not at:
        return []
    from server_app.config import load

    h0 = load(results["overrides"]).strategy.local_steps
    lines = ["", "The same measurement at other sync intervals (short SPES runs, same model and nodes; "
             "`--overhead-h`):", "",
             "| H | simulated round (s) | bare train loop (s) | overhead | vs whole node rounds | rest (s) |",
             "|---|---|---|---|---|---|",
             f"| {h0} (headline) | {over['sim_round_s']:.2f} | {over['bare_round_s']:.2f} | "
             f"{over['flower_overhead']:.2f} | {over['sim_over_local_round']:.2f} | {over['unaccounted_s']:.2f} |"]
    for h, x in sorted(at.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {h} | {x['sim_round_s']:.2f} | {x['bare_round_s']:.2f} | {x['flower_overhead']:.2f} | "
                     f"{x['sim_over_local_round']:.2f} | {x['unaccounted_s']:.2f} |")
    return lines


def _memory_verdict(mem: dict) -> list[str]:
    """Goal <= 0.60, acceptance <= 0.65: say whether the measured ratio meets them and why not."""
    s, d = mem["spes"], mem["diloco"]
    r, floor = mem["ratio_measured"], mem["ratio_analytic_floor"]
    per_expert = (d["trainable_params"] - s["trainable_params"]) / (d["owned_experts"] - s["owned_experts"])
    shared = s["trainable_params"] - s["owned_experts"] * per_expert
    from server_app.config import load

    spec = load(mem["overrides"])
    vocab = spec.model.vocab_size or spec.data.vocab_size
    embed = 2 * vocab * spec.model.hidden_size  # untied input embedding + LM head
    verdict = "meets the goal (<= 0.60)" if r <= 0.60 else (
        f"meets the acceptance bound (<= 0.65) but misses the 0.60 goal by {r - 0.60:.3f}" if r <= 0.65
        else f"misses the 0.65 acceptance bound by {r - 0.65:.3f} (the 0.60 goal by {r - 0.60:.3f})")
    lines = [f"Target: SPES / DiLoCo <= 0.60 (goal), <= 0.65 (acceptance). Measured {r:.3f}: {verdict}."]
    if r > 0.60:
        lines += [
            "",
            f"Why: every node keeps the full fp32 model and trains all shared weights, so the analytic floor of "
            f"this preset is already {floor:.3f}. The shared weights are {shared / s['total_params']:.0%} of the "
            f"parameters (untied embeddings + LM head alone {embed / s['total_params']:.0%}, from the "
            f"{vocab}-token vocabulary), so owning {s['owned_experts']} of {d['owned_experts']} experts removes "
            "gradients and AdamW state "
            f"for only {(d['trainable_params'] - s['trainable_params']) / d['trainable_params']:.0%} of the "
            f"trainable parameters. On top of the floor both processes carry the same interpreter + libraries "
            f"({s['rss_after_imports_mb']:.0f} MiB) and batch-sized activations/logits, which pull the ratio "
            f"further towards 1 ({s['peak_rss_mb'] - s['analytic_floor_mb']:.0f} vs "
            f"{d['peak_rss_mb'] - d['analytic_floor_mb']:.0f} MiB above the floor). For the 1b / 7b presets, whose "
            "experts dominate, the floor ratio is far lower (table at the end).",
        ]
    return lines


def _preset_ratios():
    """(preset, 'N x m', (bytes ratio, memory floor ratio)) for small, 1b, 7b at their paper node counts."""
    from model.args import build_config, count_parameters
    from server_app.config import load
    from sim.memory import analytic_floor_mb

    for name, nodes in (("small", 4), ("1b", 4), ("7b", 4)):
        spec = load([f"model={name}", f"nodes={nodes}"])
        c = count_parameters(build_config(spec.model, spec.data.vocab_size))
        m = spec.model.num_experts // nodes
        trainable = c["shared"] + m * c["per_expert"]
        bytes_ratio = (trainable + c["total"] - m * c["per_expert"]) / (2 * c["total"])
        mem_ratio = analytic_floor_mb(c["total"], trainable) / analytic_floor_mb(c["total"], c["total"])
        yield name, f"{nodes} x {m}", (bytes_ratio, mem_ratio)
