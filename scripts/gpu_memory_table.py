"""Per-GPU memory of one SPES node of each recipe, on 1 to 8 GPUs (node-config gpus): analytic.

    python scripts/gpu_memory_table.py           # print the table
    python scripts/gpu_memory_table.py --write   # replace it in docs/join-as-supernode.md

The model state only, in GB (1e9 bytes): weights, gradients and AdamW moments, plus what FSDP2
gathers for the computation. Not included: activations (they shrink with the rank's share of
the batch, train.batch_size / gpus, and with activation checkpointing), the CUDA context
(~0.5-1 GB) and the allocator's slack. No multi-GPU machine has measured these yet; the one-GPU
column is what docs/gpu.md measures at 1b and 7b plus activations.

With T the node's trained parameters (shared weights + its own experts) and F its frozen
experts, all counted by model.args.count_parameters:
- 1 GPU (precision=bf16 as in the recipes): fp32 trained weights, gradients and both moments,
  16 T bytes, and bf16 frozen experts, 2 F.
- n GPUs: every tensor sharded n ways, frozen experts included, in fp32 (FSDP2 gathers one dtype
  per group): (16 T + 4 F) / n. Gathered while computing: the root group (embeddings, output
  head, final norm) stays whole from forward through backward, with its gradient before the
  reduce-scatter, 2 x 4 bytes per root parameter; of the per-layer groups (a layer's experts, the
  rest of the layer), the largest one computing and the next one prefetched, with the
  gradient of one, 3 x 4 bytes per parameter of the largest group.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.args import build_config, count_parameters  # noqa: E402
from server_app.config import load  # noqa: E402

DOC = ROOT / "docs" / "join-as-supernode.md"
RECIPES = ("1b", "7b", "9b")
GPUS = (1, 2, 4, 8)
HEADER = "| recipe (node owns) | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in GPUS) + " |"


def node_bytes(shared: int, per_expert: int, experts: int, owned: int, layers: int, root: int, gpus: int):
    """Bytes of model state on each of a node's `gpus` GPUs (see the module docstring)."""
    trained = shared + owned * per_expert
    frozen = (experts - owned) * per_expert
    if gpus == 1:
        return 16 * trained + 2 * frozen
    layer_experts = experts * per_expert // layers
    layer_rest = (shared - root) // layers
    return (16 * trained + 4 * frozen) / gpus + 8 * root + 12 * max(layer_experts, layer_rest)


def row(recipe: str) -> str:
    spec = load([f"recipe={recipe}"])
    m = spec.model
    config = build_config(m, m.vocab_size or spec.data.vocab_size)
    c = count_parameters(config)
    owned = m.num_experts // spec.nodes
    root = 2 * config.vocab_size * m.hidden_size + m.hidden_size
    cells = [node_bytes(c["shared"], c["per_expert"], m.num_experts, owned, m.num_layers, root, n) / 1e9 for n in GPUS]
    return f"| `{recipe}` ({owned} of {m.num_experts} experts) | " + " | ".join(f"{v:.1f} GB" for v in cells) + " |"


def table() -> str:
    return "\n".join([HEADER, "|" + "---|" * (len(GPUS) + 1), *(row(r) for r in RECIPES)])


def replace_in(text: str, new: str) -> str:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("| recipe (node owns) |")), None)
    if start is None:
        raise ValueError("no GPU memory table (a line starting with '| recipe (node owns) |') found")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join(lines[:start]) + new + "\n" + "".join(lines[end:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"replace the table in {DOC.relative_to(ROOT)}")
    args = ap.parse_args()
    if args.write:
        DOC.write_text(replace_in(DOC.read_text(), table()))
    else:
        print(table())


if __name__ == "__main__":
    main()
