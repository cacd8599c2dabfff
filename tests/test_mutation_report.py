"""scripts/mutation_report.py counts mutmut's verdicts as documented (docs/testing.md)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import mutation_report  # noqa: E402

PYPROJECT = """
[tool.mutmut]
source_paths = ["pkg/"]
only_mutate = ["pkg/core.py"]
"""


def _project(tmp_path, verdicts, equivalents=""):
    (tmp_path / "pkg").mkdir()
    for name in ("core.py", "other.py"):
        (tmp_path / "pkg" / name).write_text("")
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "mutants" / "pkg").mkdir(parents=True)
    meta = {"exit_code_by_key": verdicts, "estimated_durations_by_key": dict.fromkeys(verdicts, 0.5)}
    (tmp_path / "mutants" / "pkg" / "core.py.meta").write_text(json.dumps(meta))
    (tmp_path / "mutants" / "pkg" / "other.py.meta").write_text(json.dumps({"exit_code_by_key": {"o": 0}}))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "mutation_equivalents.toml").write_text(equivalents)
    return tmp_path


# mutmut's exit codes: 1 killed, 0 survived, 36 timeout, 33 no tests, None not checked.
VERDICTS = {"k1": 1, "k2": 1, "k3": 1, "t": 36, "s1": 0, "s2": 0, "n": 33, "c": None}


def test_counts_and_score_by_hand(tmp_path):
    root = _project(tmp_path, VERDICTS, '"s2" = "same value either way"\n')
    result = mutation_report.report(root)
    core = result["files"]["pkg/core.py"]
    assert list(result["files"]) == ["pkg/core.py"]  # only what only_mutate names
    assert (core["mutants"], core["killed"], core["timeout"], core["survived"]) == (8, 3, 1, 2)
    assert (core["no_tests"], core["not_checked"]) == (1, 1)
    assert core["equivalent"] == {"s2": "same value either way"}
    assert core["score"] == pytest.approx(4 / 7, abs=5e-5)  # (3 killed + 1 timeout) / (8 - 1 equivalent)
    assert core["not_caught"] == ["c", "n", "s1"]
    assert core["worst_case_test_seconds"] == 4.0  # 8 mutants x 0.5 s of tests reaching each
    assert result["total"]["score"] == pytest.approx(4 / 7, abs=5e-5)


def test_an_equivalence_waits_for_a_mutant_not_run_yet(tmp_path):
    core = mutation_report.report(_project(tmp_path, VERDICTS, '"c" = "pending"\n'))["files"]["pkg/core.py"]
    assert core["equivalent"] == {} and core["not_checked"] == 1 and "c" in core["not_caught"]


@pytest.mark.parametrize(
    "entry", ['"k1" = "killed, so not equivalent"\n', '"t" = "timed out"\n', '"gone" = "no such mutant"\n']
)
def test_an_equivalence_that_is_not_true_of_the_run_is_refused(tmp_path, entry):
    with pytest.raises(SystemExit, match="mutation_equivalents.toml"):
        mutation_report.report(_project(tmp_path, VERDICTS, entry))
