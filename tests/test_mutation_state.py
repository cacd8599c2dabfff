"""scripts/mutation_state.py carries mutmut's caught verdicts across machines, and mutmut honours them."""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import mutation_state  # noqa: E402

CORE = """
def clip(x, lo, hi):
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x


def double(x):
    return 2 * x
"""

TESTS = """
from pkg.core import clip, double


def test_clip():
    assert clip(-1, 0, 5) == 0 and clip(9, 0, 5) == 5 and clip(3, 0, 5) == 3


def test_double():
    assert double(3) == 6
"""

PYPROJECT = """
[tool.mutmut]
source_paths = ["pkg/"]
only_mutate = ["pkg/core.py"]
pytest_add_cli_args_test_selection = ["tests/"]
"""

# mutmut's exit codes: 1 killed, 36 timed out, 0 survived, 33 no tests, None not checked.
META = {
    "exit_code_by_key": {
        "pkg.core.x_clip__mutmut_1": 1,
        "pkg.core.x_clip__mutmut_2": 0,
        "pkg.core.x_clip__mutmut_3": 36,
        "pkg.core.x_double__mutmut_1": 33,
        "pkg.core.x_double__mutmut_2": None,
        "pkg.core.xǁBoxǁsize__mutmut_4": 1,
    },
    "hash_by_function_name": {"x_clip": "aaa", "x_double": "bbb", "xǁBoxǁsize": "ccc"},
    "durations_by_key": {},
    "estimated_durations_by_key": {},
}


def _project(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "core.py").write_text(CORE)
    (root / "tests" / "test_core.py").write_text(TESTS)
    (root / "pyproject.toml").write_text(PYPROJECT)
    return root


def _meta(root: Path) -> dict:
    return json.loads((root / "mutants" / "pkg" / "core.py.meta").read_text())


def _write_meta(root: Path, meta: dict) -> None:
    (root / "mutants" / "pkg").mkdir(parents=True)
    (root / "mutants" / "pkg" / "core.py.meta").write_text(json.dumps(meta))


def test_caught_verdicts_and_listed_equivalents_are_saved_and_restored_with_every_hash(tmp_path):
    here, there = _project(tmp_path / "here"), _project(tmp_path / "there")
    _write_meta(here, META)
    # Listed: a survivor (kept) and a mutant not checked yet (not kept: no verdict to keep).
    listed = '"pkg.core.x_clip__mutmut_2" = "why"\n"pkg.core.x_double__mutmut_2" = "why"\n'
    (here / "tests" / "mutation_equivalents.toml").write_text(listed)
    state = tmp_path / "state.json"
    saved = mutation_state.save(here, state)
    assert saved["files"]["pkg/core.py"] == {
        "x_clip": {"hash": "aaa", "killed": [1], "timeout": [3], "equivalent": [2]},
        "x_double": {"hash": "bbb", "killed": [], "timeout": [], "equivalent": []},
        "xǁBoxǁsize": {"hash": "ccc", "killed": [4], "timeout": [], "equivalent": []},
    }
    assert mutation_state.restore(there, state) == ["pkg/core.py"]
    restored = _meta(there)
    assert restored["exit_code_by_key"] == {
        "pkg.core.x_clip__mutmut_1": 1,
        "pkg.core.x_clip__mutmut_2": 0,
        "pkg.core.x_clip__mutmut_3": 36,
        "pkg.core.xǁBoxǁsize__mutmut_4": 1,
    }
    assert restored["hash_by_function_name"] == META["hash_by_function_name"]


def test_a_state_saved_before_equivalents_were_kept_restores_its_caught_verdicts(tmp_path):
    there = _project(tmp_path / "there")
    old = {"files": {"pkg/core.py": {"x_clip": {"hash": "aaa", "killed": [1], "timeout": [3]}}}}
    (tmp_path / "state.json").write_text(json.dumps(old))
    assert mutation_state.restore(there, tmp_path / "state.json") == ["pkg/core.py"]
    assert _meta(there)["exit_code_by_key"] == {"pkg.core.x_clip__mutmut_1": 1, "pkg.core.x_clip__mutmut_3": 36}


def test_restore_leaves_a_local_run_alone(tmp_path):
    here, there = _project(tmp_path / "here"), _project(tmp_path / "there")
    _write_meta(here, META)
    local = dict(META, exit_code_by_key={"pkg.core.x_clip__mutmut_1": 0})
    _write_meta(there, local)
    mutation_state.save(here, tmp_path / "state.json")
    assert mutation_state.restore(there, tmp_path / "state.json") == []
    assert _meta(there) == local


def _mutmut_run(root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mutmut", "run"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_mutmut_keeps_restored_verdicts_of_unchanged_functions_and_retests_the_rest(tmp_path):
    first, second = _project(tmp_path / "first"), _project(tmp_path / "second")
    _mutmut_run(first)
    verdicts = _meta(first)["exit_code_by_key"]
    killed = {k for k, code in verdicts.items() if code == 1}
    assert killed == {"pkg.core.x_double__mutmut_1", "pkg.core.x_double__mutmut_2"}  # 2*x -> 3*x, 2/x
    mutation_state.save(first, tmp_path / "state.json")

    # A fresh clone: the caught verdicts come back and are not run again; the survivors are.
    mutation_state.restore(second, tmp_path / "state.json")
    _mutmut_run(second)
    meta = _meta(second)
    assert meta["exit_code_by_key"] == verdicts
    assert set(meta["durations_by_key"]) == set(verdicts) - killed

    # An edited function loses its saved verdicts: its mutants are tested again.
    third = _project(tmp_path / "third")
    (third / "pkg" / "core.py").write_text(CORE.replace("return 2 * x", "return x + x"))
    mutation_state.restore(third, tmp_path / "state.json")
    _mutmut_run(third)
    assert {k for k in _meta(third)["durations_by_key"] if "double" in k}
