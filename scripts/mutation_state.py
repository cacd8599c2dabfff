"""Keep mutmut's settled verdicts in the repository, so a mutation pass can span machines.

    python scripts/mutation_state.py save      # mutants/*.meta -> benchmarks/mutation_state.json
    python scripts/mutation_state.py restore   # benchmarks/mutation_state.json -> mutants/*.meta

mutmut keeps its verdicts under `mutants/` (ignored by git), so a fresh clone starts a pass of
thousands of mutants over, hours on 2 CPUs. `save` writes, per mutated file and function, the
function's hash (mutmut's own, of its source) and the numbers of the mutants a test caught (killed
or timed out) or that survived and tests/mutation_equivalents.toml lists as equivalent. `restore`
writes them back as mutmut's meta files before `mutmut run`; mutmut then keeps a verdict only
where the function's hash is unchanged, and tests every other mutant again.

Any other survivor, "no tests" or an unfinished mutant is decided again against the tests of the
day (a test added since may catch it). Listed equivalents are kept because deciding them again costs
a whole run of every test that reaches them (97 of the 144 listed on 2026-12-06 took 33 minutes) to learn
what their reasons already say. A kept verdict is trusted until its function changes; a test
weakened since, or one that would now catch a listed equivalent, is not noticed, which is what
`make mutate-fresh` (every mutant again, nothing restored) is for.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path

from mutation_report import ROOT, meta_path, mutated_files
from mutmut.stats import status_by_exit_code
from mutmut.utils.format_utils import get_mutant_name

sys.path.insert(0, str(ROOT))
from common.atomic import write_text_atomic  # noqa: E402

STATE = ROOT / "benchmarks" / "mutation_state.json"
KEPT_EXIT_CODE = {"killed": 1, "timeout": 36, "equivalent": 0}  # what restore writes for each kept verdict
EQUIVALENTS = Path("tests") / "mutation_equivalents.toml"


def kept_by_function(meta: dict, equivalent: Iterable[str] = ()) -> dict[str, dict]:
    """One file's meta -> {function: {"hash", "killed": [n, ...], "timeout": [...], "equivalent": [...]}};
    `equivalent` names the mutants listed as equivalent (kept only where they survived)."""
    listed = set(equivalent)
    hashes = meta.get("hash_by_function_name", {})
    functions = {f: {"hash": h, **{status: [] for status in KEPT_EXIT_CODE}} for f, h in hashes.items()}
    for key, code in meta["exit_code_by_key"].items():
        status = status_by_exit_code[code]
        if status == "survived" and key in listed:
            status = "equivalent"
        qualified, _, number = key.rpartition("__mutmut_")
        function = qualified.rpartition(".")[2]
        if status in KEPT_EXIT_CODE and function in functions:
            functions[function][status].append(int(number))
    for record in functions.values():
        for status in KEPT_EXIT_CODE:
            record[status].sort()
    return dict(sorted(functions.items()))


def meta_of(path: str, functions: dict[str, dict]) -> dict:
    """The meta file mutmut reads for `path`, holding only the saved verdicts."""
    verdicts = {
        f"{get_mutant_name(Path(path), function)}__mutmut_{n}": KEPT_EXIT_CODE[status]
        for function, record in functions.items()
        for status in KEPT_EXIT_CODE
        for n in record.get(status, [])  # states saved before equivalents were kept have none
    }
    return {
        "exit_code_by_key": verdicts,
        "hash_by_function_name": {function: record["hash"] for function, record in functions.items()},
        "durations_by_key": {},
        "estimated_durations_by_key": {},
    }


def save(root: Path, state: Path) -> dict:
    listed = root / EQUIVALENTS
    equivalent = tomllib.loads(listed.read_text()) if listed.exists() else {}
    files = {}
    for path in mutated_files(root):
        meta = meta_path(root, path)
        if meta.exists():
            files[path] = kept_by_function(json.loads(meta.read_text()), equivalent)
    if not files:
        raise SystemExit(f"no mutmut results under {root / 'mutants'}: run `make mutate` first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    saved = {"tool": f"mutmut {version('mutmut')}", "saved": time.strftime("%Y-%m-%d"), "commit": head, "files": files}
    write_text_atomic(state, json.dumps(saved, indent=1, sort_keys=True) + "\n")
    return saved


def restore(root: Path, state: Path) -> list[str]:
    """Write the saved verdicts where mutants/ has none for a file; the files written."""
    if not state.exists():
        return []
    saved = json.loads(state.read_text())
    written = []
    for path in mutated_files(root):
        meta = meta_path(root, path)
        if path not in saved["files"] or meta.exists():  # a local run is newer than the saved state
            continue
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(meta_of(path, saved["files"][path])))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("--state", type=Path, default=STATE)
    args = parser.parse_args(argv)
    if args.action == "save":
        saved = save(ROOT, args.state)
        kept = sum(len(r[s]) for f in saved["files"].values() for r in f.values() for s in KEPT_EXIT_CODE)
        print(f"{kept} verdicts (caught or listed equivalent) of {len(saved['files'])} files -> {args.state}")
    else:
        written = restore(ROOT, args.state)
        print(
            f"restored the saved verdicts of {len(written)} files from {args.state}" if written else "nothing restored"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
