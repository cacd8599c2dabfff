"""The run report: plots and a markdown page a person reads instead of metrics.jsonl.

`write_report(run_dir, rounds, summary, config)` writes, next to loss.png:

* traffic.png: payload bytes per round per node (up and down), and cumulative bytes per node
  beside the analytic DiLoCo line (the full fp32 model both ways every round);
* expert_load.png: per-layer heat map of the share of routed tokens each expert got, by round;
* config.json: the resolved run config (evaluation.checkpoint_eval reads the data split from it);
* report.md: summary table, per-round table, lm-eval results (eval.json) when present, the
  plots and the config.

`rounds` are the records `RunLog.log_round` received, `summary` is summary.json's object.
`report_from_run_dir` rebuilds everything from the files a run left (used by evaluation.checkpoint_eval).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.atomic import write_json_atomic
from server_app.summary import describe_hardware
from strategy.round_record import RoundRecord

PLOTS = ("loss.png", "traffic.png", "expert_load.png", "expert_imbalance.png")
FP32_BYTES = 4
MB = 1e6


def diloco_bytes_per_node_round(total_params: int) -> float:
    """DiLoCo ships the whole fp32 model down and a full pseudo-gradient up every round."""
    return 2 * FP32_BYTES * float(total_params)


def _pids(rounds: list[RoundRecord]) -> list[str]:
    pids = {pid for r in rounds for pid in r.nodes}
    return sorted(pids, key=lambda p: (len(p), p))


def node_bytes(rounds: list[RoundRecord]) -> dict[str, dict[str, list[float]]]:
    """Per node: bytes up/down per round (0 when the node is absent from a round)."""
    out: dict[str, dict[str, list[float]]] = {}
    for pid in _pids(rounds):
        up = [float(r.nodes.get(pid, {}).get("bytes_up", 0.0)) for r in rounds]
        down = [float(r.nodes.get(pid, {}).get("bytes_down", 0.0)) for r in rounds]
        out[pid] = {"up": up, "down": down}
    return out


def traffic_lines(per_node: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    """One line per group of nodes whose traffic was identical in every round (SPES nodes of equal
    shares usually are), labelled with the nodes it stands for; one line per node otherwise."""
    groups: dict[tuple, list[str]] = {}
    for pid, b in per_node.items():
        groups.setdefault((tuple(b["up"]), tuple(b["down"])), []).append(pid)
    lines = {}
    for pids in groups.values():
        label = f"node {pids[0]}" if len(pids) == 1 else f"nodes {', '.join(pids)} (identical)"
        lines[label] = per_node[pids[0]]
    return lines


def _cumsum(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def expert_load_by_round(rounds: list[RoundRecord]) -> list[list[list[float]]] | None:
    """Share of routed tokens per expert, `[layer][expert][round index]`, over all nodes.

    A node's row is normalised per layer first (nodes report fractions; counts work too),
    then nodes are averaged weighted by the tokens they trained on (`num_tokens`, else equally).
    A round without any report is NaN. None when no round has expert load.
    """
    shape = None
    for r in rounds:
        for node in r.nodes.values():
            load = node.get("expert_load")
            if load:
                shape = (len(load), len(load[0]))
                break
        if shape:
            break
    if shape is None:
        return None
    layers, experts = shape
    grid = [[[math.nan] * len(rounds) for _ in range(experts)] for _ in range(layers)]
    for j, r in enumerate(rounds):
        acc = [[0.0] * experts for _ in range(layers)]
        weight = 0.0
        for node in r.nodes.values():
            load = node.get("expert_load")
            if not load or (len(load), len(load[0])) != shape:
                continue
            w = float(node.get("num_tokens", 1.0)) or 1.0
            for layer, row in enumerate(load):
                total = sum(row)
                if total > 0:
                    for e, x in enumerate(row):
                        acc[layer][e] += w * x / total
            weight += w
        if weight > 0:
            for layer in range(layers):
                for e in range(experts):
                    grid[layer][e][j] = acc[layer][e] / weight
    return grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_traffic(run_dir: Path, rounds: list[RoundRecord], total_params: int | None) -> Path:
    plt = _pyplot()
    x = [r.round for r in rounds]
    per_node = traffic_lines(node_bytes(rounds))
    fig, (ax_round, ax_cum) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, b) in enumerate(per_node.items()):
        color = f"C{i % 10}"
        ax_round.plot(x, [v / MB for v in b["up"]], color=color, marker=".", label=label)
        ax_round.plot(x, [v / MB for v in b["down"]], color=color, ls="--", marker=".")
        total = [u + d for u, d in zip(b["up"], b["down"])]
        ax_cum.plot(x, [v / MB for v in _cumsum(total)], color=color, marker=".", label=label)
    if total_params:
        per_round = diloco_bytes_per_node_round(total_params)
        ax_cum.plot(
            x,
            [per_round * k / MB for k in x],
            color="black",
            ls=":",
            lw=2,
            label="DiLoCo (2 x 4 B x all params per round)",
        )
    ax_round.plot([], [], color="gray", label="up (solid)")
    ax_round.plot([], [], color="gray", ls="--", label="down (dashed)")
    ax_round.set_title("payload per round and node (decimal MB)")
    ax_round.set_ylabel("MB")
    ax_cum.set_title("cumulative up + down per node")
    ax_cum.set_ylabel("MB")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_round, ax_cum):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(per_node) > 4 else 1)
    fig.suptitle(f"{run_dir.name}: traffic")
    fig.tight_layout()
    path = run_dir / "traffic.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_imbalance(run_dir: Path, rounds: list[RoundRecord]) -> Path:
    """max/mean tokens per expert of the federation's load, by round: mean over layers and worst layer."""
    plt = _pyplot()
    path = run_dir / "expert_imbalance.png"
    have = [r for r in rounds if r.expert_imbalance is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), layout="constrained")
    if not have:
        ax.axis("off")
        ax.text(0.5, 0.5, "no expert load reported by the nodes", ha="center", va="center")
    else:
        x = [r.round for r in have]
        ax.plot(x, [r.expert_imbalance for r in have], marker=".", label="mean over layers")
        ax.plot(x, [r.expert_imbalance_max for r in have], marker=".", linestyle="--", label="worst layer")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("round")
        ax.set_ylabel("max / mean tokens per expert")
        ax.legend(fontsize=8)
        ax.set_title(f"{run_dir.name}: expert-load imbalance (all nodes)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(run_dir: Path, rounds: list[RoundRecord]) -> Path:
    plt = _pyplot()
    grid = expert_load_by_round(rounds)
    path = run_dir / "expert_load.png"
    if grid is None:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no expert load reported by the nodes", ha="center", va="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    from matplotlib.ticker import MaxNLocator

    layers, experts = len(grid), len(grid[0])
    cols = min(layers, 4)
    rows = math.ceil(layers / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols + 1.2, 2.6 * rows + 0.8), squeeze=False, layout="constrained"
    )
    # Relative to a uniform router (1 = balanced) so presets with different E read alike.
    vmax = max(2.0, max((v * experts for layer in grid for row in layer for v in row if math.isfinite(v)), default=2.0))
    rounds_x = [r.round for r in rounds]
    image = None
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= layers:
            ax.axis("off")
            continue
        rel = [[v * experts for v in row] for row in grid[layer]]
        image = ax.imshow(
            rel,
            aspect="auto",
            origin="lower",
            cmap="magma",
            vmin=0.0,
            vmax=vmax,
            interpolation="nearest",
            extent=(rounds_x[0] - 0.5, rounds_x[-1] + 0.5, -0.5, experts - 0.5),
        )
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes, shrink=0.9, label="token share x E (1 = uniform)")
    fig.suptitle(f"{run_dir.name}: expert load (all nodes)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def _fmt(x: Any, spec: str = ".4f") -> str:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return format(x, spec) if math.isfinite(x) else str(x)
    return "-" if x is None else str(x)


def _bpb_label(summary: dict) -> str:
    bpt = _fmt(summary.get("heldout_bytes_per_token"), ".2f")
    return f"held-out bits per byte, last round ({bpt} UTF-8 bytes of text per token scored)"


def summary_rows(rounds: list[RoundRecord], summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary table."""
    rows = [
        ("run", str(summary.get("run_name", "-"))),
        ("strategy / model", f"{summary.get('strategy', '-')} / {summary.get('model', '-')}"),
        (
            "nodes x rounds x local steps",
            f"{summary.get('nodes', '-')} x {summary.get('rounds', len(rounds))} x {summary.get('local_steps', '-')}",
        ),
        ("held-out loss", f"{_fmt(summary.get('first_val_loss'))} -> {_fmt(summary.get('final_val_loss'))}"),
        ("held-out perplexity per token, last round", _fmt(_ppl(summary.get("final_val_loss")), ".1f")),
        (_bpb_label(summary), _fmt(summary.get("final_val_bits_per_byte"), ".4f")),
        (
            "the nodes' own evaluation, last round (their held-out shards, token-weighted)",
            _fmt(summary.get("federated_eval_loss")),
        ),
        ("final train loss (node mean: cross-entropy + balancing + z-losses)", _fmt(summary.get("final_train_loss"))),
        ("tokens trained (all nodes)", _fmt(summary.get("tokens_trained"), ",.0f")),
    ]
    if hardware := summary.get("node_hardware"):
        lines = [f"partition {pid}: {describe_hardware(hw)}" for pid, hw in hardware.items()]
        rows.append(("how each node trains (its own report)", "; ".join(lines)))
    rows += _traffic_rows(rounds, summary) + _cost_rows(rounds, summary)
    imb = [r.expert_imbalance for r in rounds if r.expert_imbalance is not None]
    if imb:
        rows.append(
            (
                "expert imbalance, max/mean per layer (1 = even): first -> last round",
                f"{_fmt(imb[0], '.3f')} -> {_fmt(imb[-1], '.3f')}",
            )
        )
    if rounds and rounds[-1].starving_experts is not None:
        starving = rounds[-1].starving_experts
        rows.append(
            (
                "starving experts at the last round (under 0.1x the uniform share for 3+ rounds)",
                ", ".join(f"layer {layer} expert {e}" for layer, e in starving) or "none",
            )
        )
    return rows


def _traffic_rows(rounds: list[RoundRecord], summary: dict) -> list[tuple[str, str]]:
    """Bytes sent, per node and round, beside what DiLoCo would send for the same model."""
    per_node_round = [
        float(node.get("bytes_up", 0)) + float(node.get("bytes_down", 0)) for r in rounds for node in r.nodes.values()
    ]
    spes_node_round = sum(per_node_round) / len(per_node_round) if per_node_round else None
    rows = [
        (
            "bytes up / down (all nodes, all rounds)",
            f"{_fmt_bytes(summary.get('bytes_up'))} / {_fmt_bytes(summary.get('bytes_down'))}",
        ),
        ("up + down per node and round", _fmt_bytes(spes_node_round)),
    ]
    if total := summary.get("total_params"):
        diloco = diloco_bytes_per_node_round(total)
        saving = ""
        if spes_node_round:
            pct = 100 * (1 - spes_node_round / diloco)
            saving = f" (SPES sends {abs(pct):.1f} % {'less' if pct >= 0 else 'more'})"
        rows.append(("DiLoCo, same model, per node and round", _fmt_bytes(diloco) + saving))
    return rows


def _cost_rows(rounds: list[RoundRecord], summary: dict) -> list[tuple[str, str]]:
    """Time, memory, speed, parameters and failures."""
    wall, n = summary.get("wall_s"), max(len(rounds), 1)
    rows = [
        ("wall time", f"{_fmt(wall, '.0f')} s ({_fmt(wall / n if wall else None, '.1f')} s/round)"),
        ("peak memory per node", f"{_fmt(summary.get('peak_mem_mb_node'), '.0f')} MiB"),
        ("tokens/s per node (mean)", _fmt(summary.get("tokens_per_s_node"), ".0f")),
    ]
    if summary.get("node_round_overhead") is not None:
        rows.append(
            (
                "node round time outside the training loop (build, load, save; rounds 2..)",
                (
                    f"{100 * summary['node_round_overhead']:.1f} % (model kept in memory in "
                    f"{summary['node_rounds_resident']} of {summary['node_rounds_timed']} node-rounds)"
                ),
            )
        )
    return [
        *rows,
        (
            "parameters: total / trainable per node",
            f"{_fmt(summary.get('total_params'), ',')} / {_fmt(summary.get('trainable_params_node'), ',')}",
        ),
        ("failed node-rounds", _fmt(summary.get("failed_node_rounds"), "d")),
        *(
            [
                (
                    "updates clipped / dropped by the guard (guard cost)",
                    (
                        f"{summary['clipped_updates']} / {summary['guard_dropped_updates']} "
                        f"({summary['guard_evaluations']} evaluations, {summary['guard_seconds']:.1f} s)"
                    ),
                )
            ]
            if "guard_evaluations" in summary
            else []
        ),
    ]


def _round_table(rounds: list[RoundRecord]) -> list[str]:
    lines = [
        (
            "| round | held-out loss | held-out ppl (token) | train loss | tokens | MB up | MB down | s this round "
            "| s since start | nodes ok |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    previous = None
    for r in rounds:
        nodes = r.nodes
        ok = sum(1 for n in nodes.values() if n.get("status") == "ok")
        took = r.wall_s - previous if r.wall_s is not None and previous is not None else None
        previous = r.wall_s
        lines.append(
            f"| {r.round} | {_fmt(r.val_loss)} | {_fmt(r.val_ppl, '.1f')} | {_fmt(r.train_loss)} | "
            f"{_fmt(r.tokens, ',.0f')} | {_fmt(r.bytes_up / MB, '.2f')} | {_fmt(r.bytes_down / MB, '.2f')} | "
            f"{_fmt(took, '.1f')} | {_fmt(r.wall_s, '.0f')} | {ok}/{len(nodes)} |"
        )
    return lines


def eval_rows(eval_results: dict) -> list[str]:
    """Markdown table of eval.json's `results` (task -> metric -> value)."""
    lines = ["| task | metric | value |", "|---|---|---:|"]
    for task, metrics in sorted(eval_results.get("results", {}).items()):
        for metric, value in sorted(metrics.items()):
            lines.append(f"| {task} | {metric} | {_fmt(value)} |")
    return lines


def render_markdown(
    run_dir: Path, rounds: list[RoundRecord], summary: dict, config: dict, eval_results: dict | None = None
) -> str:
    name = summary.get("run_name", run_dir.name)
    made = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    md = [
        f"# Run report: {name}",
        "",
        f"Written from `{run_dir}`: metrics.jsonl (one record per round), summary.json, config.json.",
        "",
        f"Made by `{made.get('command', '?')}` at code commit `{made.get('commit') or 'unknown'}`, started "
        f"{made.get('started', '?')}; versions and machine in run.json."
        if made
        else "No run.json (an older run).",
        "",
        "## Summary",
        "",
        "Units: bytes on the wire in decimal kB/MB/GB (10^3/10^6/10^9 bytes); memory in MiB (2^20 bytes).",
        "",
        "| | |",
        "|---|---|",
    ]
    md += [f"| {label} | {value} |" for label, value in summary_rows(rounds, summary)]
    md += ["", "## Evaluation (lm-eval-harness)", ""]
    if eval_results:
        md += [f"Checkpoint `{eval_results.get('checkpoint', '-')}`; `python -m evaluation` wrote model/eval.json."]
        if held := eval_results.get("heldout_data"):
            md += [
                (
                    f"Held-out text scored: the held-out split of `{held.get('source')}` (fraction "
                    f"{held.get('heldout_fraction')}, chosen by a hash of each document), {held.get('documents')} "
                    f"documents, in windows of {eval_results.get('max_length')} tokens."
                )
            ]
        md += [""] + eval_rows(eval_results)
        for skipped in eval_results.get("skipped", []):
            md.append(f"\nSkipped: {skipped}")
    else:
        md.append("No model/eval.json yet: `python -m evaluation <run dir>/model` (or `make eval`) adds it here.")
    md += ["", "## Plots", ""]
    captions = {
        "loss.png": "Held-out and train loss against tokens trained",
        "traffic.png": "Payload bytes per round and node; cumulative per node beside DiLoCo",
        "expert_load.png": "Expert load per layer over rounds (token share x number of experts)",
        "expert_imbalance.png": "Expert-load imbalance of the federation per round (max / mean tokens per expert)",
    }
    for plot in PLOTS:
        if (run_dir / plot).exists():
            md += [f"### {plot}", "", f"![{captions[plot]}]({plot})", ""]
        else:
            md += [f"### {plot}", "", f"({plot} was not written)", ""]
    md += ["## Rounds", ""] + _round_table(rounds)
    md += ["", "## Config", "", "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(md)


def write_report(run_dir: Path, rounds: list[RoundRecord], summary: dict, config: dict) -> Path:
    """Write traffic.png, expert_load.png, config.json and report.md into `run_dir`; return report.md.

    loss.png is written by `RunLog.plot_loss`; call this after it so the report finds it.
    model/eval.json, when evaluation.checkpoint_eval has written one into the checkpoint, goes into the report too.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config:  # report_from_run_dir passes {} when a run left no config.json
        write_json_atomic(run_dir / "config.json", config)
    if rounds:
        plot_traffic(run_dir, rounds, summary.get("total_params"))
        plot_expert_load(run_dir, rounds)
        plot_imbalance(run_dir, rounds)
    eval_path = next(
        (p for p in (run_dir / "model" / "eval.json", run_dir / "eval.json") if p.exists()),
        run_dir / "model" / "eval.json",
    )  # older runs wrote it beside model/
    eval_results = json.loads(eval_path.read_text()) if eval_path.exists() else None
    path = run_dir / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text(render_markdown(run_dir, rounds, summary, config, eval_results))
    tmp.replace(path)
    return path


def read_rounds(run_dir: Path) -> list[RoundRecord]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    return [RoundRecord.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def report_from_run_dir(run_dir: Path) -> Path:
    """Rebuild the report from metrics.jsonl, summary.json and config.json of a finished run."""
    run_dir = Path(run_dir)
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"run_name": run_dir.name}
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return write_report(run_dir, read_rounds(run_dir), summary, config)
