"""The README's table of model presets, computed from conf/model/*.yaml (`--write` rewrites it there).

    python scripts/preset_table.py           # print the table
    python scripts/preset_table.py --write   # replace the table in README.md

Parameter counts come from the models' configs (model.args.count_parameters), never by hand, so
the table cannot drift from the presets; tests/test_docs.py fails when README.md holds another table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.args import build_config, count_parameters  # noqa: E402
from server_app.config import available_presets, load  # noqa: E402

USE = {
    "tiny": "CPU demo and tests",
    "mini": "scale trends on a CPU (studies)",
    "small": "the paper's 4 x 4 ratio at a size a CPU can still step",
    "1b": 'the paper\'s "1B" (docs/method.md section 5)',
    "7b": 'the paper\'s "7B (A1.7B)"',
    "9b": 'the paper\'s "9B (A3B)", upcycled from a dense Qwen3-1.7B shape',
}
HEADER = (
    "| preset | parameters (vocabulary) | shared weights | layers x d_model | experts / top-k / expert FFN | use |\n"
    "|---|---|---|---|---|---|"
)
ORDER = ("tiny", "mini", "small", "1b", "7b", "9b")


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def row(preset: str) -> str:
    spec = load([f"model={preset}"])
    m = spec.model
    vocab = m.vocab_size or spec.data.vocab_size
    c = count_parameters(build_config(m, vocab))
    return (
        f"| `{preset}` | {_count(c['total'])} ({vocab:,}) | {c['shared'] / c['total']:.0%} | "
        f"{m.num_layers} x {m.hidden_size} | {m.num_experts} / {m.top_k} / {m.expert_ffn} | {USE.get(preset, '')} |"
    )


def table() -> str:
    presets = sorted(available_presets("model"), key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))
    return "\n".join([HEADER, *(row(p) for p in presets)])


def replace_in(text: str, new: str) -> str:
    """`text` with its preset table (the block from the header line to the last row) replaced by `new`."""
    pattern = re.compile(r"^\| preset \|.*?\n(?:\|.*\n)+", re.MULTILINE)
    if not pattern.search(text):
        raise ValueError("no preset table (a line starting with '| preset |') found")
    return pattern.sub(new + "\n", text, count=1)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = p.parse_args(argv)
    new = table()
    if args.write:
        readme = ROOT / "README.md"
        readme.write_text(replace_in(readme.read_text(), new))
    print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
