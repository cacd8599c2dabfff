"""One node's rounds on `world` ranks (gloo, CPU), for tests/test_parallel.py.

    python tests/rank_round.py <case.json>

Every rank plays the same rounds of the same node (run_local_round, as the node's ranks do);
rank 0 writes each round's reply and metrics, and the node's whole model after the last round
(gathered from the kept model), under the case's `out` folder as safetensors and JSON.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from client_app import resident
from client_app.local_round import DeltaDownlink, NodeContext, RoundOrder, run_local_round
from common.codec import to_record
from common.spec import from_dict
from data import load_tokenizer
from training import parallel


def round_input(spec, received: dict, order: RoundOrder) -> tuple[dict, RoundOrder]:
    """(received tensors, order) of a full-model round; with delta sync, the same model as a
    delta-sync message of whole values."""
    if not spec.strategy.delta_sync:
        return received, order
    record = to_record({k: v.numpy() for k, v in received.items()})
    return {}, dataclasses.replace(order, delta=DeltaDownlink(record, -1, False))


def main(case_path: str) -> None:
    case = json.loads(Path(case_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.FileStore(case["store"], world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.set_num_threads(1)
    spec = from_dict(case["spec"])
    out = Path(case["out"])
    tok = load_tokenizer(spec.data, Path(case["cache"]))
    ctx = NodeContext(spec, tok, Path(case["workdir"]), 0, 1, progress=False)
    received = load_file(case["init"])
    for i, (owned, full, start, steps) in enumerate(case["rounds"]):
        reply, metrics = run_local_round(ctx, *round_input(spec, received, RoundOrder(owned, full, start, steps)))
        if rank == 0:
            tensors = {k: torch.as_tensor(v).contiguous() for k, v in reply.items()}
            save_file(tensors, str(out / f"reply-{i}.safetensors"))
            (out / f"metrics-{i}.json").write_text(json.dumps(metrics))
    if spec.train.resident:
        (kept,) = [entry for entry, _ in resident._kept.values()]
        whole = {kept.plain[n]: parallel.full(t).detach().float() for n, t in kept.model.state_dict().items()}
        if rank == 0:
            save_file({k: v.contiguous() for k, v in whole.items()}, str(out / "model.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
