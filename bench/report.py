"""Plots and Markdown for bench.harness: docs/benchmarks.md and its figures, from results.json.

The Markdown is rendered from bench/templates/*.md.j2 (Jinja2: the report's tables and its
goal-met / goal-missed prose are loops and branches, which live in the template); this module
only computes the numbers. The goals each ratio is judged against are data, in conf/bench/goals.yaml.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS_FILE = ROOT / "conf" / "bench" / "goals.yaml"
TEMPLATES = Path(__file__).resolve().parent / "templates"
MiB = 2**20
LABELS = {
    "spes": "SPES",
    "diloco": "DiLoCo",
    "fedavg": "FedAvg",
    "centralized": "centralized",
    "spes_int8": "SPES int8+EF",
    "spes_bf16": "SPES bf16",
    "spes_topk2": "SPES top-k 2-bit",
    "spes_topk4": "SPES top-k 4-bit",
    "diloco_topk2": "DiLoCo top-k 2-bit",
    "spes_owned": "SPES owned only",
    "spes_owned2": "SPES owned+2",
    "spes_fragments4": "SPES 4 fragments",
}
RATIO_ORDER = (
    "mem_spes_over_diloco",
    "bytes_spes_over_diloco",
    "loss_spes_over_centralized",
    "loss_spes_over_diloco",
    "flower_overhead",
    "bytes_spes_int8_over_diloco_fp32",
    "loss_spes_int8_over_spes_fp32",
    "bytes_spes_topk_over_diloco_fp32",
    "loss_spes_topk_over_spes_fp32",
    "mem_resident_owned_over_spes",
    "bytes_resident_owned_over_spes",
    "loss_resident_owned_over_spes",
    "mem_resident_owned2_over_spes",
    "bytes_resident_owned2_over_spes",
    "loss_resident_owned2_over_spes",
    "peak_bytes_streaming_over_spes",
)

# ratio -> (numerator, denominator): dotted paths into results.json.
RATIO_SOURCES = {
    "mem_spes_over_diloco": ("memory.spes.peak_rss_mb", "memory.diloco.peak_rss_mb"),
    "bytes_spes_over_diloco": (
        "methods.spes.bytes_steady_per_round_node",
        "methods.diloco.bytes_steady_per_round_node",
    ),
    "loss_spes_over_centralized": ("methods.spes.final_val_loss", "methods.centralized.final_val_loss"),
    "loss_spes_over_diloco": ("methods.spes.final_val_loss", "methods.diloco.final_val_loss"),
    "flower_overhead": ("overhead.sim_round_s", "overhead.bare_round_s"),
    "bytes_spes_int8_over_diloco_fp32": (
        "methods.spes_int8.bytes_steady_per_round_node",
        "methods.diloco.bytes_steady_per_round_node",
    ),
    "loss_spes_int8_over_spes_fp32": ("methods.spes_int8.final_val_loss", "methods.spes.final_val_loss"),
    "bytes_spes_topk_over_diloco_fp32": (
        "methods.spes_topk2.bytes_steady_per_round_node",
        "methods.diloco.bytes_steady_per_round_node",
    ),
    "loss_spes_topk_over_spes_fp32": ("methods.spes_topk2.final_val_loss", "methods.spes.final_val_loss"),
    # The largest exchange of a node after round 1: 4 streamed fragments / the whole model (issue 26).
    "peak_bytes_streaming_over_spes": (
        "methods.spes_fragments4.bytes_peak_round_node",
        "methods.spes.bytes_peak_round_node",
    ),
    # Partial residency (issue 25), each against plain SPES: peak memory of a node (bench.memory),
    # steady bytes per node and round, final held-out loss.
    **{
        f"{what}_resident_{arm[5:]}_over_spes": (f"{section}.{arm}.{field}", f"{section}.spes.{field}")
        for arm in ("spes_owned", "spes_owned2")
        for what, section, field in (
            ("mem", "memory", "peak_rss_mb"),
            ("bytes", "methods", "bytes_steady_per_round_node"),
            ("loss", "methods", "final_val_loss"),
        )
    },
}


def lookup(results: dict, path: str):
    node = results
    for part in path.split("."):
        node = node[part]
    return node


def compute_ratios(results: dict) -> dict[str, float]:
    """Every ratio whose inputs the results hold (results from before a method existed lack its ratios)."""
    out = {}
    for k, (num, den) in RATIO_SOURCES.items():
        try:
            out[k] = lookup(results, num) / lookup(results, den)
        except KeyError:
            continue
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_info() -> dict:
    import torch

    cpu = cpu_model()
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
        "cpu": cpu,
        "cores": cores,
        "mem_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr_version,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
MARKERS = ["o", "s", "^", "D", "v", "x"]


def plot_loss(curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str) -> Path:
    """curves: label -> (tokens, held-out loss)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    for i, (label, (tokens, loss)) in enumerate(curves.items()):
        # Curves that nearly coincide stay apart by line style and marker; fewer than 3 points get no line.
        style = STYLES[i % len(STYLES)] if len(tokens) >= 3 else "none"
        ax.plot(
            [t / 1e6 for t in tokens],
            loss,
            marker=MARKERS[i % len(MARKERS)],
            markersize=4,
            linestyle=style,
            label=label,
        )
    ax.set_xlabel("tokens trained, all nodes (M)")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_bytes(methods: dict, path: Path) -> Path:
    plt = _plt()
    fed = [m for m in methods if "bytes_per_round_node" in methods[m]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(fed):
        per = methods[m]["bytes_per_round_node"]
        # DiLoCo and FedAvg send identical bytes: line style, marker and width keep both visible.
        a.plot(
            range(1, len(per) + 1),
            [x / MiB for x in per],
            marker=MARKERS[i % len(MARKERS)],
            markersize=4,
            linestyle=STYLES[i % len(STYLES)],
            linewidth=max(3.0 - 0.5 * i, 1.0),
            label=LABELS[m],
        )
    a.set_xlabel("round")
    a.set_ylabel("MiB per node (up + down)")
    a.set_ylim(bottom=0)
    a.set_title("measured bytes per round per node")
    a.grid(alpha=0.3)
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    x = range(len(fed))
    w = 0.2
    up = [methods[m]["bytes_up_steady_per_round_node"] / MiB for m in fed]
    down = [methods[m]["bytes_down_steady_per_round_node"] / MiB for m in fed]
    nan = float("nan")  # compressed runs have no fp32 formula
    up_a = [methods[m].get("analytic", {}).get("bytes_up_per_round_node", nan) / MiB for m in fed]
    down_a = [methods[m].get("analytic", {}).get("bytes_down_steady_per_round_node", nan) / MiB for m in fed]
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
    bench_model = next((o.split("=", 1)[1] for o in results.get("overrides", []) if o.startswith("model=")), "?")
    b.set_title(f"as reported by the nodes of the benchmark runs, model={bench_model}")
    b.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def display_path(path: str | Path) -> str:
    """A path as the docs print it: relative to the project root when inside it (valid on any checkout)."""
    p = Path(path).resolve()
    try:
        return p.relative_to(ROOT).as_posix()
    except ValueError:
        return str(p)


def load_goals(path: Path = GOALS_FILE) -> dict[str, dict]:
    """ratio -> {"goal": bound, "acceptance": looser bound or None}, from the goals table (YAML)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise FileNotFoundError(f"benchmark goals file {path} is missing")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of ratio name -> {{goal, acceptance}}")
    goals = {}
    for ratio, entry in raw.items():
        if ratio not in RATIO_SOURCES:
            raise ValueError(f"{path}: unknown ratio {ratio!r}; known: {', '.join(RATIO_SOURCES)}")
        if not isinstance(entry, dict) or set(entry) - {"goal", "acceptance"} or "goal" not in entry:
            raise ValueError(f"{path}: {ratio} needs `goal` and may have `acceptance`, nothing else; got {entry!r}")
        goal, acceptance = entry["goal"], entry.get("acceptance")
        for key, bound in (("goal", goal), ("acceptance", acceptance)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
                raise ValueError(f"{path}: {ratio}.{key} must be a number, got {bound!r}")
        if acceptance is not None and acceptance < goal:
            raise ValueError(f"{path}: {ratio}.acceptance {acceptance} is stricter than its goal {goal}")
        goals[ratio] = {"goal": float(goal), "acceptance": None if acceptance is None else float(acceptance)}
    return goals


def verdict(ratio: float, goal: dict) -> dict:
    """Where a measured ratio stands against its goal (every bound is an upper bound)."""
    acc = goal["acceptance"]
    return {
        "ratio": ratio,
        "goal": goal["goal"],
        "acceptance": acc,
        "meets_goal": ratio <= goal["goal"],
        "goal_gap": ratio - goal["goal"],
        "meets_acceptance": None if acc is None else ratio <= acc,
        "acceptance_gap": None if acc is None else ratio - acc,
    }


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _bound(value: float) -> str:
    """A goal as written in the table: two decimals unless it has more."""
    return f"{value:.2f}" if round(value, 2) == value else f"{value:g}"


def render(template: str, context: dict) -> str:
    """Render bench/templates/<template>; an unknown name in the template is an error, not a blank."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )  # Markdown, not HTML
    env.filters.update(fmt=_fmt, mib=lambda x: _fmt(None if x is None else x / MiB, ".2f"), bound=_bound)
    return env.get_template(template).render(context)


def _shape(model) -> str:
    """The model shape behind a preset name, since presets can be retuned between runs."""
    return (
        f"{model.num_layers} x d{model.hidden_size}, vocab {model.vocab_size or 'from tokenizer'}, "
        f"{model.num_experts} experts of FFN {model.expert_ffn}, top-{model.top_k}"
    )


def _all_rounds(entry: dict) -> float:
    return entry["bytes_up_per_round_node"] + entry["bytes_down_per_round_node"]


def memory_facts(mem: dict) -> dict:
    """Why the memory ratio sits where it does: shares of the parameters a SPES node still trains."""
    from server_app.config import load

    s, d = mem["spes"], mem["diloco"]
    per_expert = (d["trainable_params"] - s["trainable_params"]) / (d["owned_experts"] - s["owned_experts"])
    shared = s["trainable_params"] - s["owned_experts"] * per_expert
    spec = load(mem["overrides"])
    vocab = spec.model.vocab_size or spec.data.vocab_size
    embed = 2 * vocab * spec.model.hidden_size  # untied input embedding + LM head
    return {
        "shape": _shape(spec.model),
        "vocab": vocab,
        "shared_share": shared / s["total_params"],
        "embed_share": embed / s["total_params"],
        "freed_share": (d["trainable_params"] - s["trainable_params"]) / d["trainable_params"],
        "above_floor": {n: mem[n]["peak_rss_mb"] - mem[n]["analytic_floor_mb"] for n in ("spes", "diloco")},
    }


def overhead_rows(results: dict) -> list[dict]:
    """The overhead at the bench's H (headline) and at every extra H measured (`--overhead-h`)."""
    over = results["overhead"]
    at = over.get("at_local_steps") or {}
    if not at:
        return []
    from server_app.config import load

    rows = [{"h": f"{load(results['overrides']).strategy.local_steps} (headline)", **over}]
    return rows + [{"h": h, **x} for h, x in sorted(at.items(), key=lambda kv: int(kv[0]))]


def report_numbers(results: dict, results_path: Path) -> dict:
    """What bench/templates/benchmarks.md.j2 shows apart from the goals, from results.json."""
    # results.json is written with sorted keys: restore the reading order here.
    methods = {m: results["methods"][m] for m in LABELS if m in results["methods"]}
    cen = methods["centralized"]["final_val_loss"]
    return {
        "r": results,
        "labels": LABELS,
        "methods": methods,
        "spes": methods["spes"],
        "mem": results["memory"],
        "over": results["overhead"],
        "results_file": display_path(results_path),
        "runs_dir": display_path(results_path.parent / results.get("runs_dir", "runs")),
        "loss_others": [(LABELS[k], methods[k]["final_val_loss"] / cen) for k in ("fedavg", "diloco") if k in methods],
        "bytes_all_rounds_ratio": _all_rounds(methods["spes"]) / _all_rounds(methods["diloco"]),
        "memory": memory_facts(results["memory"]),
        "overhead_rows": overhead_rows(results),
        "presets": list(_preset_ratios()),
        "residency_presets": list(_preset_residency()),
    }


def goal_context(results: dict, goals: dict) -> dict:
    """The ratios table (with each ratio's goal) and the verdicts against the goals table."""
    ratios = {k: results["ratios"][k] for k in RATIO_ORDER if k in results["ratios"]}
    analytic = {
        "bytes_spes_over_diloco": results["analytic_ratios"]["bytes_spes_over_diloco"],
        "mem_spes_over_diloco": results["analytic_ratios"]["mem_floor_spes_over_diloco"],
    }
    return {
        "ratio_rows": [
            {
                "key": k,
                "value": v,
                "num": results["ratio_sources"][k][0],
                "den": results["ratio_sources"][k][1],
                "analytic": analytic.get(k),
                "goal": goals.get(k),
            }
            for k, v in ratios.items()
        ],
        "verdicts": {k: verdict(ratios[k], g) for k, g in goals.items() if k in ratios},
    }


def bench_context(results: dict, results_path: Path, goals: dict) -> dict:
    """Everything bench/templates/benchmarks.md.j2 shows."""
    return {**report_numbers(results, results_path), **goal_context(results, goals)}


def write_bench_docs(results: dict, docs: Path, results_path: Path, goals: dict | None = None) -> Path:
    """docs/benchmarks.md and its plots from results.json (read from `results_path`)."""
    docs.mkdir(parents=True, exist_ok=True)
    context = bench_context(results, results_path, load_goals() if goals is None else goals)
    methods = context["methods"]
    plot_loss(
        {LABELS[m]: (e["tokens_by_round"], e["val_loss_by_round"]) for m, e in methods.items()},
        docs / "bench_loss.png",
        "held-out loss vs tokens",
    )
    plot_bytes(methods, docs / "bench_bytes.png")
    plot_memory(results, docs / "bench_memory.png")
    path = docs / "benchmarks.md"
    path.write_text(render("benchmarks.md.j2", context))
    return path


def _preset_residency():
    """(preset, fp32 GB held by a SPES / owned / owned+2 node, (memory floor owned / SPES, owned+2 /
    SPES, steady bytes owned / SPES, owned+2 / SPES)) at the paper's node counts (4 nodes)."""
    from bench.memory import BYTES_FP32, analytic_floor_mb
    from model.args import build_config, count_parameters
    from server_app.config import load

    for name in ("small", "1b", "7b"):
        spec = load([f"model={name}", "nodes=4"])
        c = count_parameters(build_config(spec.model, spec.data.vocab_size))
        shared, per, m = c["shared"], c["per_expert"], spec.model.num_experts // 4
        trained = shared + m * per
        held = {"spes": c["total"], "owned": trained, "owned2": trained + 2 * per}
        down = {"spes": c["total"] - m * per, "owned": shared, "owned2": shared + 2 * per}
        floor = {k: analytic_floor_mb(v, trained) for k, v in held.items()}
        ratios = (
            floor["owned"] / floor["spes"],
            floor["owned2"] / floor["spes"],
            (trained + down["owned"]) / (trained + down["spes"]),
            (trained + down["owned2"]) / (trained + down["spes"]),
        )
        yield name, [BYTES_FP32 * v / 1e9 for v in held.values()], ratios


def _preset_ratios():
    """(preset, 'N x m', (bytes ratio, memory floor ratio)) for small, 1b, 7b at their paper node counts."""
    from bench.memory import analytic_floor_mb
    from model.args import build_config, count_parameters
    from server_app.config import load

    for name, nodes in (("small", 4), ("1b", 4), ("7b", 4)):
        spec = load([f"model={name}", f"nodes={nodes}"])
        c = count_parameters(build_config(spec.model, spec.data.vocab_size))
        m = spec.model.num_experts // nodes
        trainable = c["shared"] + m * c["per_expert"]
        bytes_ratio = (trainable + c["total"] - m * c["per_expert"]) / (2 * c["total"])
        mem_ratio = analytic_floor_mb(c["total"], trainable) / analytic_floor_mb(c["total"], c["total"])
        yield name, f"{nodes} x {m}", (bytes_ratio, mem_ratio)
