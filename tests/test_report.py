"""Run report, console lines and TensorBoard scalars on hand-built round records."""

import io
import json
import math
from dataclasses import replace

import pytest

from server_app.console import RunConsole, format_duration
from server_app.report import (
    PLOTS,
    diloco_bytes_per_node_round,
    expert_load_by_round,
    node_bytes,
    report_from_run_dir,
    summary_rows,
    write_report,
)
from server_app.run_log import RunLog, run_scalars, tensorboard_eval
from strategy.round_record import RoundRecord


def _round(rnd, val, wall, up=(300, 300), down=(1000, 700), loads=None, tokens=(100, 300)):
    loads = loads or ([[0.75, 0.25], [0.5, 0.5]], [[0.25, 0.75], [0.5, 0.5]])
    nodes = {
        str(p): {
            "bytes_up": up[p],
            "bytes_down": down[p],
            "status": "ok",
            "expert_load": loads[p],
            "num_tokens": tokens[p],
            "tokens_per_s": 50.0,
            "peak_mem_mb": 200.0,
        }
        for p in range(2)
    }
    return RoundRecord(
        round=rnd,
        global_step=3 * rnd,
        applied=True,
        tokens=float(sum(tokens)),
        train_loss=val + 0.1,
        bytes_up=sum(up),
        bytes_down=sum(down),
        val_loss=val,
        val_ppl=math.exp(val),
        wall_s=wall,
        nodes=nodes,
    )


ROUNDS = [_round(1, 5.0, 12.0), _round(2, 4.5, 22.0, down=(700, 700))]
SUMMARY = {
    "run_name": "unit",
    "strategy": "spes",
    "model": "tiny",
    "nodes": 2,
    "rounds": 2,
    "local_steps": 3,
    "first_val_loss": 6.0,
    "final_val_loss": 4.5,
    "final_train_loss": 4.6,
    "tokens_trained": 800.0,
    "bytes_up": 1200,
    "bytes_down": 3100,
    "wall_s": 22.0,
    "peak_mem_mb_node": 200.0,
    "tokens_per_s_node": 50.0,
    "trainable_params_node": 80,
    "total_params": 100,
    "failed_node_rounds": 0,
}
CONFIG = {"seed": 0, "data": {"source": "embedded", "heldout_fraction": 0.05, "seq_len": 64}}


def test_bytes_per_node_and_diloco_line():
    assert node_bytes(ROUNDS) == {
        "0": {"up": [300.0, 300.0], "down": [1000.0, 700.0]},
        "1": {"up": [300.0, 300.0], "down": [700.0, 700.0]},
    }
    assert diloco_bytes_per_node_round(100) == 800.0  # 2 directions x 4 bytes x 100 params


def test_expert_load_is_token_weighted_share_over_nodes():
    grid = expert_load_by_round(ROUNDS)
    # layer 0: (100 * 0.75 + 300 * 0.25) / 400 = 0.375 and 0.625; layer 1 balanced.
    assert grid[0] == [[0.375, 0.375], [0.625, 0.625]]
    assert grid[1] == [[0.5, 0.5], [0.5, 0.5]]
    counts = [_round(1, 5.0, 1.0, loads=([[30, 10], [2, 2]], [[1, 3], [7, 7]]))]
    assert expert_load_by_round(counts)[0] == [[0.375], [0.625]]  # counts normalise like fractions
    no_load = [replace(ROUNDS[0], nodes={"0": {"bytes_up": 1, "status": "ok"}})]
    assert expert_load_by_round(no_load) is None


def test_summary_table_compares_with_diloco():
    rows = dict(summary_rows(ROUNDS, SUMMARY))
    # SPES per node-round: (1300 + 1000 + 1000 + 1000) / 4 = 1075 B; DiLoCo 800 B: 34.4 % more.
    assert rows["up + down per node and round"] == "1.07 kB"
    assert rows["DiLoCo, same model, per node and round"] == "800 B (SPES sends 34.4 % more)"
    cheaper = dict(summary_rows(ROUNDS, {**SUMMARY, "total_params": 1075}))  # DiLoCo 8600 B: 87.5 % less
    assert cheaper["DiLoCo, same model, per node and round"] == "8.60 kB (SPES sends 87.5 % less)"
    assert rows["held-out loss"] == "6.0000 -> 4.5000"
    assert rows["wall time"] == "22 s (11.0 s/round)"


def test_write_report_files_and_markdown_names_every_plot(tmp_path):
    (tmp_path / "loss.png").write_bytes(b"\x89PNG")  # RunLog.plot_loss writes the real one
    path = write_report(tmp_path, ROUNDS, SUMMARY, CONFIG)
    assert path == tmp_path / "report.md"
    for plot in ("traffic.png", "expert_load.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    md = path.read_text()
    for plot in PLOTS:
        assert f"]({plot})" in md
    assert json.loads((tmp_path / "config.json").read_text()) == CONFIG
    assert '"heldout_fraction": 0.05' in md
    assert "| 2 | 4.5000 | 90.0 | 4.6000 | 400 | 0.00 | 0.00 | 10.0 | 22 | 2/2 |" in md  # 600 B, 1400 B: 0.00 MB
    assert "No model/eval.json yet" in md


def test_report_from_run_dir_includes_eval_json(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in ROUNDS))
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "eval.json").write_text(
        json.dumps(
            {
                "checkpoint": "x/model",
                "results": {"spes_heldout": {"bits_per_byte": 1.25}},
                "skipped": ["downstream suite: offline"],
            }
        )
    )
    md = report_from_run_dir(tmp_path).read_text()
    assert "| spes_heldout | bits_per_byte | 1.2500 |" in md
    assert "Skipped: downstream suite: offline" in md
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        report_from_run_dir(tmp_path / "missing")


def test_console_one_line_per_round_with_rate_and_eta():
    out = io.StringIO()
    console = RunConsole(4, out=out, bar=False)
    console.start(6.0, wall_s=2.0)
    console.round(ROUNDS[0])  # 12 - 2 = 10 s; ETA 3 rounds x 10 s
    console.round(replace(ROUNDS[1], nodes={**ROUNDS[1].nodes, "1": {"status": "timeout"}}))  # 10 s
    console.close("done")
    assert out.getvalue().splitlines() == [
        "[spes] round 0/4 | held-out loss 6.0000",
        "[spes] round 1/4 | held-out loss 5.0000 | 400 tokens | up 0.0 MB, down 0.0 MB | 10.0 s/round | ETA 30s",
        (
            "[spes] round 2/4 | held-out loss 4.5000 | 400 tokens | up 0.0 MB, down 0.0 MB | 10.0 s/round | ETA 20s"
            " | nodes not ok: 1"
        ),
        "[spes] done",
    ]
    assert format_duration(3725) == "1h02m" and format_duration(61) == "1m01s"


def test_console_draws_a_bar_only_on_a_terminal(monkeypatch, caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("SPES_CONSOLE_BAR", raising=False)
    for out, drawn in ((io.StringIO(), False), (Terminal(), True)):
        console = RunConsole(2, out=out)
        console.start(6.0)
        console.round(ROUNDS[0])
        console.close()
        assert ("\r" in out.getvalue()) == drawn
    # A Flower simulation's ServerApp writes into the launcher's pipe: the launcher decides.
    monkeypatch.setenv("SPES_CONSOLE_BAR", "1")
    assert RunConsole(2, out=io.StringIO())._use_bar
    monkeypatch.setenv("SPES_CONSOLE_BAR", "0")
    assert not RunConsole(2, out=Terminal())._use_bar
    # every line also reaches the coordinator's log
    with caplog.at_level("INFO", logger="spes.server"):
        RunConsole(2, out=io.StringIO()).start(6.0)
    assert "[spes] round 0/2 | held-out loss 6.0000" in caplog.text


def test_console_bar_lines_all_carry_the_prefix():
    out = io.StringIO()
    console = RunConsole(2, out=out, bar=True)
    console.start(6.0, wall_s=0.0)
    for r in ROUNDS:
        console.round(r)
    console.close()
    segments = [s.strip() for s in out.getvalue().replace("\r", "\n").split("\n") if s.strip()]
    assert segments and all(s.startswith("[spes]") for s in segments)
    assert sum(1 for s in segments if " | held-out loss " in s and "round 0/" not in s) == 2
    assert any("[spes] rounds:" in s and "2/2" in s for s in segments)


def test_run_scalars_cumulative_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = run_scalars(ROUNDS)
    assert s["total/bytes_up"] == 1200 and s["total/bytes_down"] == 3100
    assert s["node0/bytes_total"] == 2300 and s["node1/bytes_total"] == 2000
    assert s["round_s"] == 10.0
    assert s["expert_load/layer0/expert1"] == 0.625 * 2
    log = RunLog(tmp_path, tensorboard=True)
    for r in ROUNDS:
        log.log_round(r)
    log.close()
    assert tensorboard_eval(tmp_path, {"spes_heldout": {"bits_per_byte": 1.5, "alias": "x"}}, step=2)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("total/bytes_down")] == [1700, 3100]
    assert [e.value for e in acc.Scalars("node0/bytes_total")] == [1300, 2300]
    assert [(e.step, e.value) for e in acc.Scalars("eval/spes_heldout/bits_per_byte")] == [(2, 1.5)]
    assert not tensorboard_eval(tmp_path / "no-tb", {"t": {"m": 1.0}}, step=1)


def test_node_round_overhead_from_later_rounds_only():
    from server_app.summary import node_round_overhead as _node_round_overhead

    def node(round_s, train_s, kept, status="ok"):
        return {"round_seconds": round_s, "train_seconds": train_s, "resident": kept, "status": status}

    # (2.0 - 1.5) + (3.0 - 2.5) outside the loop over 5.0 s of node rounds: 20 %; one of two kept.
    out = _node_round_overhead([node(2.0, 1.5, 0.0), node(3.0, 2.5, 1.0)])
    assert out == {"node_round_overhead": pytest.approx(0.2), "node_rounds_resident": 1, "node_rounds_timed": 2}
    assert _node_round_overhead([{"status": "ok", "train_seconds": 1.0}]) == {}  # older nodes send no round time
    rows = dict(summary_rows(ROUNDS, {**SUMMARY, **out}))
    assert (
        rows["node round time outside the training loop (build, load, save; rounds 2..)"]
        == "20.0 % (model kept in memory in 1 of 2 node-rounds)"
    )
    assert not any(k.startswith("node round time") for k in dict(summary_rows(ROUNDS, SUMMARY)))


def test_report_names_starving_experts_of_the_last_round():
    rows = dict(summary_rows([*ROUNDS[:-1], replace(ROUNDS[-1], starving_experts=[[0, 3], [1, 0]])], SUMMARY))
    assert rows["starving experts at the last round (under 0.1x the uniform share for 3+ rounds)"] == (
        "layer 0 expert 3, layer 1 expert 0"
    )
    healthy = dict(summary_rows([*ROUNDS[:-1], replace(ROUNDS[-1], starving_experts=[])], SUMMARY))
    assert healthy["starving experts at the last round (under 0.1x the uniform share for 3+ rounds)"] == "none"
    assert not any(k.startswith("starving") for k in dict(summary_rows(ROUNDS, SUMMARY)))  # older runs


def test_traffic_plot_draws_identical_nodes_as_one_line():
    from server_app.report import traffic_lines

    same = {"up": [1.0, 2.0], "down": [3.0, 4.0]}
    lines = traffic_lines({"0": same, "1": dict(same), "2": {"up": [1.0, 2.0], "down": [3.0, 5.0]}})
    assert lines == {"nodes 0, 1 (identical)": same, "node 2": {"up": [1.0, 2.0], "down": [3.0, 5.0]}}
