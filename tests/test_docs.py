"""Docs that cannot drift: computed tables match their generators, and every reference resolves
inside the repository (the paper is cited by its arXiv number, not by a file we do not ship)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from preset_table import replace_in, table  # noqa: E402


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    suffixes = {".py", ".md", ".yaml", ".toml", ".j2", ".sh", ""}
    return [ROOT / f for f in out if Path(f).suffix in suffixes and (ROOT / f).is_file()]


def test_readme_preset_table_is_the_computed_one():
    readme = (ROOT / "README.md").read_text()
    assert replace_in(readme, table()) == readme, "stale preset table: python scripts/preset_table.py --write"


def test_readme_studies_block_is_generated_from_the_committed_studies():
    from bench.study_report import readme_block, replace_readme_block

    readme = (ROOT / "README.md").read_text()
    fresh = replace_readme_block(readme, readme_block(ROOT / "benchmarks" / "studies"))
    assert fresh == readme, "stale studies block: python -m bench.study --report-only"


def test_studies_page_is_the_rendering_of_the_committed_studies(tmp_path):
    from bench.study_report import write_page

    page = write_page(ROOT / "benchmarks" / "studies", tmp_path).read_text()
    assert page == (ROOT / "docs" / "studies.md").read_text(), (
        "stale docs/studies.md: python -m bench.study --report-only"
    )


def test_replace_in_swaps_only_the_table():
    text = "intro\n\n| preset | a |\n|---|---|\n| `x` | 1 |\n\nafter\n"
    assert replace_in(text, "| preset | b |") == "intro\n\n| preset | b |\n\nafter\n"


def test_no_reference_to_files_outside_the_repository():
    offenders = [
        str(f.relative_to(ROOT))
        for f in _tracked_text_files()
        if f.name != "test_docs.py" and "spes-method.md" in f.read_text(errors="replace")
    ]
    assert not offenders, f"cite docs/method.md or arXiv 2602.11543 instead: {offenders}"


def test_every_docs_page_named_in_the_tree_exists():
    named = set()
    for f in _tracked_text_files():
        named |= {(f, m) for m in re.findall(r"\bdocs/[\w.-]+\.(?:md|png)\b", f.read_text(errors="replace"))}
    missing = sorted({f"{m} (in {f.relative_to(ROOT)})" for f, m in named if not (ROOT / m).exists()})
    assert not missing, missing


def test_markdown_links_resolve():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_multi_gpu_memory_table_is_the_computed_one():
    from gpu_memory_table import DOC, replace_in
    from gpu_memory_table import table as gpu_table

    text = DOC.read_text()
    assert replace_in(text, gpu_table()) == text, "stale GPU memory table: python scripts/gpu_memory_table.py --write"


def test_multi_gpu_memory_formula_by_hand():
    from gpu_memory_table import node_bytes

    # 2 layers, 4 experts of 10 parameters over both layers (5 per layer each), node owns 1;
    # shared 100 of which the root (embeddings, head, norm) is 60, so 20 per layer outside experts.
    one = node_bytes(shared=100, per_expert=10, experts=4, owned=1, layers=2, root=60, gpus=1)
    assert one == 16 * 110 + 2 * 30  # trained fp32 + grads + 2 moments, frozen bf16
    two = node_bytes(shared=100, per_expert=10, experts=4, owned=1, layers=2, root=60, gpus=2)
    # sharded (16 * 110 + 4 * 30) / 2 = 940; root gathered with its gradient 8 * 60; largest layer group
    # max(4 * 10 / 2, 40 / 2) = 20 parameters, 12 bytes each
    assert two == 940 + 480 + 240
