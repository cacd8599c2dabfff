"""Summarise a mutmut run into benchmarks/mutation.json (`make mutate` runs it after mutmut).

Reads mutmut's per-file results (`mutants/<file>.meta`) for the files `[tool.mutmut] only_mutate`
names, and the mutants judged equivalent (tests/mutation_equivalents.toml: mutant name -> the
one-line reason no test can tell it apart). Per file and over all of them:

    score = (killed + timed out) / (mutants - equivalent)

A mutant that hangs the tests counts as caught (mutmut's own convention); "no tests" (no fast test
reaches the function) and "not checked" (the run was stopped before it) count against the score.
An equivalence entry for a mutant a test catches, or that no longer exists, is an error: the list
must say what is true of this run (an entry for a mutant not run yet waits for its verdict).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
import tomllib
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.toml"
OUT = ROOT / "benchmarks" / "mutation.json"


def mutated_files(root: Path) -> list[str]:
    conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    files = sorted(str(p.relative_to(root)) for src in conf["source_paths"] for p in (root / src).rglob("*.py"))
    return [f for f in files if any(fnmatch.fnmatch(f, pat) for pat in conf["only_mutate"])]


def meta_path(root: Path, path: str) -> Path:
    """Where mutmut keeps one source file's verdicts."""
    return root / "mutants" / f"{path}.meta"


def file_summary(meta: dict, equivalent: dict[str, str]) -> dict:
    status = {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}
    tally = Counter(status.values())
    kinds = ("killed", "survived", "timeout", "no tests", "not checked", "suspicious")
    counts = {kind.replace(" ", "_"): tally[kind] for kind in kinds}
    refuted = [name for name in equivalent if status.get(name) in ("killed", "timeout")]
    if refuted:
        raise SystemExit(f"{EQUIVALENTS.name}: listed as equivalent but a test catches them: {refuted}")
    # An entry applies to a survivor; one for a mutant not (yet) run waits for its verdict.
    mine = {name: why for name, why in equivalent.items() if status.get(name) == "survived"}
    considered = len(status) - len(mine)
    caught = counts["killed"] + counts["timeout"]
    open_ = sorted(n for n, s in status.items() if s != "killed" and s != "timeout" and n not in mine)
    # mutmut's estimate per mutant: the recorded time of the tests that reach its function, which
    # is what a surviving mutant costs (a killed one stops at its first failing test).
    durations = meta.get("estimated_durations_by_key", {})
    return {
        "mutants": len(status),
        **counts,
        "equivalent": dict(sorted(mine.items())),
        "score": round(caught / considered, 4) if considered else None,
        "not_caught": open_,
        "worst_case_test_seconds": round(sum(d for d in durations.values() if d), 1),
    }


def report(root: Path) -> dict:
    listed = root / EQUIVALENTS.relative_to(ROOT)
    equivalent = tomllib.loads(listed.read_text()) if listed.exists() else {}
    files, known = {}, set()
    for path in mutated_files(root):
        meta_file = meta_path(root, path)
        if not meta_file.exists():
            continue
        meta = json.loads(meta_file.read_text())
        known |= set(meta["exit_code_by_key"])
        files[path] = file_summary(meta, equivalent)
    stale = sorted(set(equivalent) - known)
    if stale:
        raise SystemExit(f"{EQUIVALENTS.name}: no such mutant in this run: {stale}")
    total = {k: sum(f[k] for f in files.values()) for k in ("mutants", "killed", "survived", "timeout")}
    total |= {k: sum(f[k] for f in files.values()) for k in ("no_tests", "not_checked", "suspicious")}
    total["equivalent"] = sum(len(f["equivalent"]) for f in files.values())
    considered = total["mutants"] - total["equivalent"]
    total["score"] = round((total["killed"] + total["timeout"]) / considered, 4) if considered else None
    return {
        "tool": f"mutmut {version('mutmut')}",
        "written": time.strftime("%Y-%m-%d"),
        "total": total,
        "files": files,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    result = report(ROOT)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for path, f in result["files"].items():
        print(f"{path:32s} {f['mutants']:5d} mutants  score {f['score']}  not caught {len(f['not_caught'])}")
    t = result["total"]
    print(f"{'all':32s} {t['mutants']:5d} mutants  score {t['score']}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
