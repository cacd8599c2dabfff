"""`python -m bench.study <name>`: a declarative study with seeds, resumable, summarised on a generated page.

    python -m bench.study parity                 # run (or continue) conf/study/parity.yaml
    python -m bench.study parity --seeds 0,1     # fewer seeds (a quick look, not a finding)
    python -m bench.study --report-only          # rewrite docs/studies.md and its plots from the JSON

A study (conf/study/<name>.yaml) is a base of Hydra overrides, seeds, and arms. An arm is one method
(federated through the in-process engine, or the centralized baseline) with its own overrides and,
optionally, a grid of alternatives (e.g. learning rates). A grid is searched on the first seed; the
point with the lowest final held-out loss is then run with every seed, so each arm is compared at
its best ("best vs best"). A seed changes the model init, the data order and the shard assignment;
the held-out split is the same for every seed (a hash of each document). A cell's run is
bit-identical when repeated on the same machine; repeated on another machine of the same class,
a tiny SPES run of 2 M tokens differed in the fourth decimal after round 1 and ended 1-2 % apart
(within the spread over seeds): float-level differences, most likely the CPU's kernels. So each
cell records its CPU model and the page lists them.

Every finished cell (arm, grid point, seed) is written to benchmarks/studies/<name>.json at once with
its full overrides and numbers, so an interrupted study continues where it stopped. Run directories
go to benchmarks/studies/runs/ (not committed). The page (bench/study_report.py) reports mean and
sample standard deviation over seeds, ratios paired by seed, and loss curves with bands.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.runs import ROOT, merge_overrides, portable_arg, read_run, traffic_per_node
from bench.study_cost import training_flops
from common.atomic import write_json_atomic
from server_app.provenance import code_commit

STUDY_DIR = ROOT / "conf" / "study"
KINDS = ("federated", "centralized")


@dataclass
class Arm:
    name: str
    overrides: list[str]
    kind: str = "federated"
    grid: dict[str, list[str]] = field(default_factory=dict)  # label -> extra overrides, searched on one seed
    reference: str | None = None  # the arm this one is divided by (default: the study's reference)
    series: str | None = None  # for a trend: the line this arm's ratio belongs to (e.g. a model preset) ...
    x: float | None = None  # ... and where on it (e.g. tokens trained)


@dataclass
class Study:
    name: str
    title: str
    question: str
    base: list[str]
    seeds: list[int]
    arms: list[Arm]
    reference: str | None = None  # the arm others are divided by
    subject: str | None = None  # the arm the study is about (the README line divides it by the others)
    budget: str = ""  # what the study costs, as measured, for the page


def load_study(name: str) -> Study:
    """conf/study/<name>.yaml, or the YAML file `name` names."""
    path = Path(name) if name.endswith(".yaml") else STUDY_DIR / f"{name}.yaml"
    name = path.stem
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in STUDY_DIR.glob("*.yaml")))
        raise SystemExit(f"no study {name!r} ({path}); known: {known}")
    raw = yaml.safe_load(path.read_text())
    try:
        arms = [Arm(name=k, **v) for k, v in raw.pop("arms").items()]
        study = Study(name=name, arms=arms, **raw)
    except (TypeError, AttributeError, KeyError) as exc:
        raise SystemExit(
            f"{path}: {exc} (a study has title, question, base, seeds, arms; an arm has overrides, "
            "and optionally kind, grid, reference, series, x)"
        ) from None
    for arm in arms:
        if arm.kind not in KINDS:
            raise SystemExit(f"{path}: arm {arm.name}: kind must be one of {KINDS}, got {arm.kind!r}")
    names = {a.name for a in arms}
    for ref in [study.reference, study.subject, *(a.reference for a in arms)]:
        if ref is not None and ref not in names:
            raise SystemExit(f"{path}: reference or subject {ref!r} is not an arm")
    return study


def check_study(study: Study) -> None:
    """Every cell's config composed and validated before the first run (a typo fails in seconds)."""
    from server_app.config import ConfigError, load

    for arm in study.arms:
        for point in arm.grid or [None]:
            try:
                load([*cell_overrides(study, arm, point, study.seeds[0]), "engine=inprocess"])
            except ConfigError as exc:
                raise SystemExit(f"study {study.name}, arm {arm.name}{' ' + point if point else ''}: {exc}") from None


def cell_overrides(study: Study, arm: Arm, point: str | None, seed: int) -> list[str]:
    return merge_overrides([*study.base, *arm.overrides, *(arm.grid[point] if point else [])], [f"seed={seed}"])


def cell_id(overrides: list[str], arm: str | None = None) -> str:
    """The cell's key in the JSON: its overrides and its arm's name (a centralized arm may share
    every override with a federated one, as in the scale study's pairs). Keys written before the
    arm was part of them (overrides alone) stay valid: a cell is found by content (`finished`)."""
    return hashlib.sha1(" ".join([*overrides, *([f"arm={arm}"] if arm else [])]).encode()).hexdigest()[:12]


def finished(cells: dict, arm: str, point: str | None, seed: int, overrides: list[str]) -> bool:
    """Whether this arm's cell with these overrides is in the JSON (by content, not by key: keys
    written before cell_id knew the arm stay valid)."""
    portable = [portable_arg(o) for o in overrides]
    return any(
        (c["arm"], c["point"], c["seed"], c["overrides"]) == (arm, point, seed, portable) for c in cells.values()
    )


def run_cell(
    study: Study, arm: Arm, point: str | None, seed: int, runs: Path, threads: int, commit: str | None
) -> dict:
    """Train one cell; its record (overrides, losses by round, tokens, bytes, FLOPs, wall time)."""
    from bench import centralized
    from bench.report import cpu_model
    from engine import inprocess
    from engine.simulate import node_environment
    from server_app.config import load
    from server_app.config import run_dir as run_dir_of
    from server_app.run_lock import move_aside

    overrides = cell_overrides(study, arm, point, seed)
    name = cell_run_name(study.name, arm.name, point, seed, overrides)
    full = [*overrides, f"run_name={name}", f"output_dir={runs}", "logging.node_progress=false"]
    t0 = time.time()
    if arm.kind == "centralized":
        centralized.run(full)
        spec = load(full)
    else:
        spec = load([*full, "engine=inprocess"])
        move_aside(run_dir_of(spec))  # what an interrupted attempt at this cell left
        run_dir_of(spec).mkdir(parents=True, exist_ok=True)
        inprocess.run(spec, node_environment(spec, run_dir_of(spec)), threads_per_node=threads)
    summary, rounds = read_run(run_dir_of(spec))
    tokens = [0.0]
    for r in rounds:
        tokens.append(tokens[-1] + r.tokens)
    return {
        "arm": arm.name,
        "kind": arm.kind,
        "point": point,
        "seed": seed,
        "overrides": [portable_arg(o) for o in overrides],
        "final_val_loss": summary["final_val_loss"],
        "val_loss_by_round": summary["val_loss_by_round"],
        "tokens_by_round": tokens,
        "bytes_up_per_round_node": summary["bytes_up_per_round_node"],
        "bytes_down_per_round_node": summary["bytes_down_per_round_node"],
        **traffic_per_node(rounds),
        "flops_by_round": [training_flops(spec, t, centralized=arm.kind == "centralized") for t in tokens],
        "expert_imbalance_by_round": [r.expert_imbalance for r in rounds],
        "tokens_per_s_node": summary["tokens_per_s_node"],
        "wall_s": time.time() - t0,
        "commit": commit,
        # a rerun repeats a cell's bits only on the same machine (see the module's docstring)
        "cpu": cpu_model(),
    }


def cell_run_name(study_name: str, arm: str, point: str | None, seed: int, overrides: list[str]) -> str:
    return f"{study_name}-{arm}{'-' + point if point else ''}-s{seed}-{cell_id(overrides)}"


def cell_run_folder(out: Path, study_name: str, cell: dict) -> Path:
    """Where a recorded cell's run folder is (or was) under a study's output folder."""
    return out / "runs" / cell_run_name(study_name, cell["arm"], cell["point"], cell["seed"], cell["overrides"])


def refresh_traffic(study: Study, out: Path) -> int:
    """Recompute the steady and largest per-node bytes of every cell whose run folder is still in
    <out>/runs, from its metrics.jsonl (for cells recorded before those figures existed)."""
    path = out / f"{study.name}.json"
    results = json.loads(path.read_text())
    done = 0
    for cell in results["cells"].values():
        run = cell_run_folder(out, study.name, cell)
        if (run / "metrics.jsonl").exists():
            cell.update(traffic_per_node(read_run(run)[1]))
            done += 1
    write_json_atomic(path, results)
    return done


def best_point(cells: dict, arm: Arm, seed: int) -> str:
    """The grid point with the lowest final held-out loss on `seed`."""
    scored = [(c["final_val_loss"], c["point"]) for c in cells.values() if c["arm"] == arm.name and c["seed"] == seed]
    return min(scored)[1]


def run_study(study: Study, out: Path, threads: int, seeds: list[int] | None = None) -> dict:
    path = out / f"{study.name}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    cells: dict[str, dict] = results.get("cells", {})
    seeds = seeds or study.seeds
    runs = out / "runs"
    t0, commit = time.time(), code_commit()

    def ensure(arm: Arm, point: str | None, seed: int) -> None:
        overrides = cell_overrides(study, arm, point, seed)
        if finished(cells, arm.name, point, seed, overrides):
            return
        key = cell_id(overrides, arm.name)
        label = f"{arm.name}{' ' + point if point else ''} seed {seed}"
        print(f"[study {study.name}] {label} ({(time.time() - t0) / 60:.1f} min)", flush=True)
        cells[key] = run_cell(study, arm, point, seed, runs, threads, commit)
        print(f"[study {study.name}] {label}: final held-out loss {cells[key]['final_val_loss']:.4f}", flush=True)
        _save(path, study, cells)

    for arm in study.arms:
        point = None
        if arm.grid:
            for p in arm.grid:
                ensure(arm, p, seeds[0])
            point = best_point(cells, arm, seeds[0])
        for seed in seeds:
            ensure(arm, point, seed)
    return _save(path, study, cells)


def _save(path: Path, study: Study, cells: dict) -> dict:
    results = {
        "study": study.name,
        "title": study.title,
        "question": study.question,
        "base": study.base,
        "seeds": study.seeds,
        "reference": study.reference,
        "subject": study.subject,
        "budget": study.budget,
        "arms": {
            a.name: {
                "kind": a.kind,
                "overrides": a.overrides,
                "grid": a.grid,
                "reference": a.reference,
                "series": a.series,
                "x": a.x,
            }
            for a in study.arms
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cells": cells,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)
    return results


def main(argv: list[str]) -> int:
    from bench.study_report import write_page

    p = argparse.ArgumentParser(
        prog="python -m bench.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("name", nargs="?", help="conf/study/<name>.yaml (or a path to a study YAML)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "studies"), help="<name>.json and runs/ go here")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="studies.md and its plots go here")
    p.add_argument("--seeds", help="comma-separated seeds instead of the study's")
    p.add_argument("--threads", type=int, default=2, help="torch threads per node (nodes run one at a time)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the page from the JSON files")
    p.add_argument(
        "--refresh-traffic",
        action="store_true",
        help="recompute each cell's steady and largest bytes from its run folder, then rewrite the page",
    )
    a = p.parse_args(argv)
    out, docs = Path(a.out), Path(a.docs)
    if a.refresh_traffic:
        if not a.name:
            p.error("--refresh-traffic needs a study name")
        print(f"[study] traffic refreshed for {refresh_traffic(load_study(a.name), out)} cells")
    elif not a.report_only:
        if not a.name:
            p.error("a study name is needed (or --report-only)")
        study = load_study(a.name)
        check_study(study)
        seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
        run_study(study, out, a.threads, seeds)
    readme = ROOT / "README.md" if Path(a.docs).resolve() == (ROOT / "docs").resolve() else None
    print(f"[study] {write_page(out, docs, readme)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
