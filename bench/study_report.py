"""docs/studies.md from benchmarks/studies/*.json: per study, the grid searched, each arm at its best
point as mean +- sample standard deviation over seeds, ratios to the reference arm paired by seed
(at equal tokens, and at equal training FLOPs where the reference's curve reaches the arm's FLOPs),
and held-out loss curves with a band of one standard deviation. Rewritten from the JSON alone."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from bench.runs import relative_path


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_ms(values: list[float], spec: str = ".4f") -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:{spec}} ± {s:{spec}}" if len(values) > 1 else f"{m:{spec}} (1 seed)"


def interpolate(x: list[float], y: list[float], at: float) -> float | None:
    """y at `at` on the piecewise-linear curve (x ascending); None outside its range."""
    if not x or at < x[0] or at > x[-1]:
        return None
    for (x0, y0), (x1, y1) in zip(zip(x, y), zip(x[1:], y[1:])):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return y[-1]


def natural_key(name: str) -> list:
    """H25 before H100: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def chosen_cells(results: dict) -> dict[str, list[dict]]:
    """Per arm (in natural order of names), its cells at the point every seed ran (the best grid
    point), ordered by seed."""
    by_arm: dict[str, list[dict]] = {}
    for arm in sorted(results["arms"], key=natural_key):
        cells = [c for c in results["cells"].values() if c["arm"] == arm]
        seeds_per_point: dict = {}
        for c in cells:
            seeds_per_point.setdefault(c["point"], set()).add(c["seed"])
        if not cells:
            continue
        seed0 = min(c["seed"] for c in cells)
        first = {c["point"]: c["final_val_loss"] for c in cells if c["seed"] == seed0}
        # the point run on most seeds; while the grid is still being searched, the best one so far
        point = max(seeds_per_point, key=lambda p: (len(seeds_per_point[p]), -first.get(p, float("inf"))))
        by_arm[arm] = sorted((c for c in cells if c["point"] == point), key=lambda c: c["seed"])
    return by_arm


def late_imbalance(cells: list[dict], rounds: int = 6) -> str:
    """Mean ± std over seeds of each run's mean expert imbalance in its last `rounds` rounds; '-' if none."""
    per_run = []
    for cell in cells:
        late = [x for x in (cell.get("expert_imbalance_by_round") or [])[-rounds:] if x is not None]
        if late:
            per_run.append(sum(late) / len(late))
    return fmt_ms(per_run, ".3f") if len(per_run) == len(cells) else "-"


def steady_and_peak(cells: list[dict]) -> str:
    """A node's bytes in a steady round (mean over seeds) and its largest exchange after round 1
    (over seeds), in MB; "-" for cells recorded before these were (bench.study --refresh-traffic)."""
    if not cells or any(c.get("bytes_steady_round_node") is None for c in cells):
        return "-"
    steady = statistics.fmean(c["bytes_steady_round_node"] for c in cells) / 1e6
    return f"{steady:.3f}, {max(c['bytes_peak_round_node'] for c in cells) / 1e6:.3f}"


def paired_ratios(arm_cells: list[dict], ref_cells: list[dict], equal_flops: bool = False) -> list[float]:
    """arm / reference final held-out loss per seed both ran; with `equal_flops`, the reference's loss
    is read off its loss-vs-FLOPs curve at the arm's total FLOPs (seeds where it does not reach them
    are left out)."""
    ref = {c["seed"]: c for c in ref_cells}
    out = []
    for c in arm_cells:
        r = ref.get(c["seed"])
        if r is None:
            continue
        if equal_flops:
            denom = interpolate(r["flops_by_round"], r["val_loss_by_round"], c["flops_by_round"][-1])
        else:
            denom = r["final_val_loss"]
        if denom:
            out.append(c["final_val_loss"] / denom)
    return out


def planned_runs(results: dict) -> int:
    """Runs the study plans: per arm, its grid on the first seed then the best point on the other seeds."""
    seeds = len(results["seeds"])
    return sum(len(a["grid"]) + seeds - 1 if a.get("grid") else seeds for a in results["arms"].values())


def progress_line(results: dict) -> str:
    done, planned = len(results["cells"]), planned_runs(results)
    if done >= planned:
        return f"Complete: all {planned} planned runs."
    return (
        f"**In progress: {done} of {planned} planned runs.** An arm with fewer than 3 seeds is a hint, not a finding; "
        f"rerun `python -m bench.study {results['study']}` to continue."
    )


def reference_arm(results: dict, arm: str) -> str | None:
    ref = results["arms"][arm].get("reference") or results.get("reference")
    return None if ref == arm else ref


def gap_section(gaps: list[dict]) -> list[str]:
    """Where an arm's loss goes, from `python -m bench.gap --study` (benchmarks/studies/gap/)."""
    md = []
    for gap in gaps:
        md += [
            "",
            (
                f"Where the gap goes, {gap['arm']} against {gap['reference']} (`python -m bench.gap --study "
                f"{gap['study']} --arm {gap['arm']}`, seeds {gap['seeds']}): how far each run moved each parameter "
                "group from their shared start, ||w - w0|| / ||w0||, and the federated run's over the centralized "
                "run's, paired by seed. A group moved much less learned less there; a movement locates, it does "
                "not attribute. The runs compared end at held-out loss "
                f"{fmt_ms(gap['final_val_loss']['federated'])} and {fmt_ms(gap['final_val_loss']['centralized'])}"
                " (runs made again from the study's cells end where the cells did only on the same machine)."
            ),
            "",
            "| group | moved, federated | moved, centralized | federated / centralized |",
            "|---|---:|---:|---:|",
        ]
        md += [
            f"| {r['label']} | {fmt_ms(r['federated'])} | {fmt_ms(r['centralized'])} | {fmt_ms(r['ratio'], '.3f')} |"
            for r in gap["rows"]
        ]
    return md


def study_section(results: dict, png: str | None, gaps: list[dict] = ()) -> list[str]:
    by_arm = chosen_cells(results)
    seeds = sorted({c["seed"] for cells in by_arm.values() for c in cells})
    wall = sum(c["wall_s"] for c in results["cells"].values())
    commits = sorted({c.get("commit") or "?" for c in results["cells"].values()})
    cpus = sorted({c.get("cpu") or "a CPU not recorded" for c in results["cells"].values()})
    md = [
        f"## {results['title']}",
        "",
        results["question"].strip(),
        "",
        (
            f"Regenerate: `python -m bench.study {results['study']}` (resumable). Base: `{' '.join(results['base'])}`; "
            f"seeds {seeds}; {len(results['cells'])} runs, {wall / 3600:.2f} h of run time; code at "
            f"{', '.join(f'`{c}`' for c in commits)}; on {', '.join(cpus)}; last written {results['date']}."
        ),
        "",
        progress_line(results),
        "",
    ]
    if results.get("budget"):
        md += [results["budget"].strip(), ""]
    md += _grid_table(results)
    md += [
        (
            "| arm | point | seeds | final held-out loss | expert imbalance, last 6 rounds "
            "| bytes up+down / round / node (MB) | steady, largest after round 1 (MB) | training PFLOPs "
            "| reference | / reference, equal tokens | / reference, equal FLOPs |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for arm, cells in by_arm.items():
        traffic = [(c["bytes_up_per_round_node"] + c["bytes_down_per_round_node"]) / 1e6 for c in cells]
        ref = reference_arm(results, arm)
        ratios = (
            ("-", "-")
            if ref not in by_arm
            else (
                fmt_ms(paired_ratios(cells, by_arm[ref])),
                fmt_ms(paired_ratios(cells, by_arm[ref], equal_flops=True)),
            )
        )
        md.append(
            f"| {arm} | {cells[0]['point'] or '-'} | {len(cells)} | {fmt_ms([c['final_val_loss'] for c in cells])} "
            f"| {late_imbalance(cells)} | {fmt_ms(traffic, '.2f')} | {steady_and_peak(cells)} "
            f"| {fmt_ms([c['flops_by_round'][-1] / 1e15 for c in cells], '.4f')} "
            f"| {ref or '-'} | {ratios[0]} | {ratios[1]} |"
        )
    md += [
        "",
        (
            "Bytes: a node's payload as encoded, up + down; the first column averages every round (round 1 "
            "downloads the whole model), the second is a steady round's (after a round without a merge) and the "
            "largest single exchange after round 1. "
            "Expert imbalance: the federation's routed tokens per expert, max / mean per layer averaged over "
            "layers (1 = even), averaged over the last 6 rounds of each run. "
            "Ratios are taken per seed (against the same seed's reference run), then mean ± sample standard "
            "deviation; equal FLOPs reads the reference's held-out loss off its loss-vs-FLOPs curve at the arm's "
            'training FLOPs ("-" where the curve does not reach them).'
        ),
    ]
    md += trend_section(results, by_arm)
    md += gap_section(list(gaps))
    if png:
        md += ["", f"![{results['study']}]({png})"]
    return md + [""]


def trend_points(results: dict, by_arm: dict[str, list[dict]]) -> dict[str, list[tuple[float, list[float]]]]:
    """series -> [(x, per-seed ratios to the arm's reference)] for arms that declare a series and x."""
    out: dict[str, list[tuple[float, list[float]]]] = {}
    for arm, cells in by_arm.items():
        spec = results["arms"][arm]
        ref = reference_arm(results, arm)
        if spec.get("series") and spec.get("x") and ref in by_arm:
            out.setdefault(spec["series"], []).append((float(spec["x"]), paired_ratios(cells, by_arm[ref])))
    return {k: sorted(v) for k, v in out.items()}


def fit_log_trend(points: list[tuple[float, list[float]]]) -> tuple[float, float, float] | None:
    """Least-squares line ratio = a + b log10(x) through every seed's ratio; (a, b, standard error of b)."""
    xs = [math.log10(x) for x, rs in points for _ in rs]
    ys = [r for _, rs in points for r in rs]
    if len(set(xs)) < 2 or len(xs) < 3:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    resid = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(resid / (len(xs) - 2) / sxx) if len(xs) > 2 else math.nan
    return a, b, se


def trend_section(results: dict, by_arm: dict[str, list[dict]]) -> list[str]:
    trends = trend_points(results, by_arm)
    if not trends:
        return []
    md = [
        "",
        "Trend of the ratio against log10(tokens), fitted through every seed's ratio:",
        "",
        "| series | points | ratio at the smallest -> largest x | slope per 10x (± 1 s.e.) | the gap |",
        "|---|---:|---|---|---|",
    ]
    for series, points in trends.items():
        fit = fit_log_trend(points)
        first, last = fmt_ms(points[0][1]), fmt_ms(points[-1][1])
        if fit is None:
            md.append(f"| {series} | {len(points)} | {first} -> {last} | - | too few points |")
            continue
        _, b, se = fit
        verdict = "shrinks" if b + 2 * se < 0 else "grows" if b - 2 * se > 0 else "no clear change (within 2 s.e.)"
        md.append(f"| {series} | {len(points)} | {first} -> {last} | {b:+.4f} ± {se:.4f} | {verdict} |")
    return md


def _grid_table(results: dict) -> list[str]:
    tuned = [c for c in results["cells"].values() if c["point"] is not None]
    if not tuned:
        return []
    seed = min(c["seed"] for c in tuned)
    rows = sorted((c for c in tuned if c["seed"] == seed), key=lambda c: (c["arm"], c["final_val_loss"]))
    md = [
        (
            f"Grid searched on seed {seed} (lowest final held-out loss first; the first row of each arm is the one run "
            "with every seed):"
        ),
        "",
        "| arm | point | overrides | final held-out loss |",
        "|---|---|---|---:|",
    ]
    arms = results["arms"]
    md += [
        f"| {c['arm']} | {c['point']} | `{' '.join(arms[c['arm']]['grid'][c['point']])}` | {c['final_val_loss']:.4f} |"
        for c in rows
    ]
    return md + [""]


def plot_study(results: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = chosen_cells(results)
    if not by_arm:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (arm, cells) in enumerate(by_arm.items()):
        n = min(len(c["val_loss_by_round"]) for c in cells)
        x = [t / 1e6 for t in cells[0]["tokens_by_round"][:n]]
        per_round = [[c["val_loss_by_round"][j] for c in cells] for j in range(n)]
        mean = [statistics.fmean(v) for v in per_round]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_round]
        ax.plot(x, mean, color=f"C{i}", marker=".", label=f"{arm} ({len(cells)} seeds)")
        ax.fill_between(
            x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=f"C{i}", alpha=0.2
        )
    ax.set_xlabel("tokens trained, all nodes (M)")
    ax.set_ylabel("held-out loss (mean ± 1 std over seeds)")
    ax.set_title(results["title"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


README_BEGIN = "<!-- studies: generated by python -m bench.study --report-only; do not edit -->"
README_END = "<!-- /studies -->"


def readme_lines(results: dict) -> list[str]:
    """One bullet for the README: each arm at its best point, and (with a reference) the first arm's
    loss over every other arm's, paired by seed, plus over the reference's at equal training FLOPs."""
    by_arm = chosen_cells(results)
    if not by_arm:
        return []
    ref = results.get("reference")
    done = "" if len(results["cells"]) >= planned_runs(results) else " **(in progress: not a finding yet)**"
    seeds = len({c["seed"] for cells in by_arm.values() for c in cells})
    head = f"- **{results['title']}** ({seeds} seed{'s' * (seeds > 1)}, `{' '.join(results['base'])}`){done}: "
    losses = {arm: fmt_ms([c["final_val_loss"] for c in cells]) for arm, cells in by_arm.items()}
    if ref is None:
        return [head + _per_arm_references(results, by_arm, losses)]
    first = results.get("subject") or next(iter(by_arm))
    if first not in by_arm:
        return [head + f"no run of {first} yet."]
    others = [arm for arm in by_arm if arm != first]
    parts = [f"{first} {losses[first]}"]
    parts += [f"{first} / {o} {fmt_ms(paired_ratios(by_arm[first], by_arm[o]))}" for o in others]
    if ref in by_arm and ref != first:
        flops = fmt_ms(paired_ratios(by_arm[first], by_arm[ref], equal_flops=True))
        parts.append(f"{first} / {ref} at equal training FLOPs {flops}")
    return [head + "final held-out loss at equal tokens " + "; ".join(parts) + "."]


def _per_arm_references(results: dict, by_arm: dict[str, list[dict]], losses: dict[str, str]) -> str:
    """Without a study reference: each arm over its own reference, and each series' fitted trend;
    the bare losses where no arm has a reference."""
    paired = [
        f"{arm} / {ref} {fmt_ms(paired_ratios(cells, by_arm[ref]))}"
        for arm, cells in by_arm.items()
        if (ref := reference_arm(results, arm)) in by_arm
    ]
    if not paired:
        return "final held-out loss " + "; ".join(f"{arm} {loss}" for arm, loss in losses.items()) + "."
    trends = [
        f"{series} {fit[1]:+.4f} ± {fit[2]:.4f}"
        for series, points in trend_points(results, by_arm).items()
        if (fit := fit_log_trend(points)) is not None
    ]
    slope = f"; slope of the ratio per 10x tokens {', '.join(trends)}" if trends else ""
    return "final held-out loss over the reference, equal tokens: " + "; ".join(paired) + slope + "."


def readme_block(out: Path) -> str:
    lines = [README_BEGIN]
    for path in sorted(Path(out).glob("*.json")):
        lines += readme_lines(json.loads(path.read_text()))
    return "\n".join([*lines, README_END])


def replace_readme_block(text: str, block: str) -> str:
    """`text` with the block between README_BEGIN and README_END replaced by `block`."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {README_BEGIN!r} ... {README_END!r} block")
    return text[:start] + block + text[end + len(README_END) :]


def write_page(out: Path, docs: Path, readme: Path | None = None) -> Path:
    """docs/studies.md and its plots; with `readme`, also its studies block (README_BEGIN..README_END)."""
    docs.mkdir(parents=True, exist_ok=True)
    md = [
        "# Studies",
        "",
        (
            "Generated by `python -m bench.study <name>` from `benchmarks/studies/<name>.json` (`python -m bench.study "
            "--report-only` rewrites this page and its plots); do not edit by hand. Each arm is shown at its best grid "
            "point; a finding needs at least 3 seeds and is given as mean ± sample standard deviation."
        ),
        "",
    ]
    for path in sorted(Path(out).glob("*.json")):
        results = json.loads(path.read_text())
        png = plot_study(results, docs / f"study_{results['study']}.png")
        gaps = [json.loads(g.read_text()) for g in sorted((Path(out) / "gap").glob(f"{results['study']}-*.json"))]
        md += study_section(results, relative_path(png, docs) if png else None, gaps)
    page = docs / "studies.md"
    page.write_text("\n".join(md).rstrip() + "\n")
    if readme is not None:
        readme.write_text(replace_readme_block(readme.read_text(), readme_block(out)))
    return page
