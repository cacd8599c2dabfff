"""Bad configurations fail before any training, with one clear message."""

import pytest

from server_app.config import ConfigError, load


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nodes=20"], r"E >= N.*E=16, N=20"),
        (["model.top_k=16"], r"model.top_k must be in \[1, num_experts\)"),
        (["strategy.merge.top_k=16"], r"strategy.merge.top_k must be in \[1, num_experts\)"),
        (["model=huge"], r"unknown model preset 'huge'; available: 1b, 7b, 9b, mini, small, tiny"),
        (["data.source=/no/such/corpus.jsonl"], r"'/no/such/corpus.jsonl' does not exist"),
        (["init_from=/no/such/ckpt"], r"init_from checkpoint '/no/such/ckpt' does not exist"),
        (["strategy.local_steps=0"], r"strategy.local_steps must be >= 1"),
        (["train.precision=fp8"], r"train.precision must be fp32 or bf16"),
        (["no_such_key=1"], r"unknown key no_such_key; every key is listed in conf/config.yaml"),
        (["strategy.local_step=25"], r"unknown key strategy.local_step; did you mean strategy.local_steps\?$"),
        (["trian.lr=1e-3"], r"unknown key trian.lr; did you mean train.lr"),
        (["train.lora_rank=4", "strategy.max_update_ratio=0.5"], r"max_update_ratio cannot be used with train.lora"),
    ],
)
def test_bad_config_fails_with_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(overrides)


def test_defaults_are_the_demo():
    spec = load([])
    assert (spec.nodes, spec.model.name, spec.model.num_experts, spec.strategy_name) == (4, "tiny", 16, "spes")
    assert spec.total_steps == spec.rounds * spec.strategy.local_steps


def test_spec_round_trips_through_json():
    spec = load(["rounds=3", "strategy.merge.enabled=false"])
    again = type(spec).from_json(spec.to_json())
    assert again.raw == spec.raw and again.rounds == 3 and not again.strategy.merge.enabled


# Issue 8, finding 6: values that used to pass validation and then fail on every node (or give a
# raw traceback) stop `python -m sim` before Flower starts, with a message naming the key.
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.beta1=1.5", r"train\.beta1 must be a finite number in \[0, 1\), got 1\.5"),
        ("train.beta2=1.0", r"train\.beta2 must be a finite number in \[0, 1\), got 1\.0"),
        ("train.threads=-1", r"train\.threads must be an integer >= 0, got -1"),
        ("train.warmup_steps=-5", r"train\.warmup_steps must be an integer >= 0, got -5"),
        ("train.weight_decay=-0.1", r"train\.weight_decay must be a finite number >= 0, got -0\.1"),
        ("train.grad_clip=-1", r"train\.grad_clip must be a finite number >= 0 \(0: no clipping\), got -1"),
        ("train.lr=inf", r"train\.lr must be a finite number > 0, got inf"),
        ("train.lr=0", r"train\.lr must be a finite number > 0, got 0"),
        ("train.total_steps=0", r"train\.total_steps must be an integer >= 1, got 0"),
        ("train.batch_size=abc", r"train\.batch_size must be an integer >= 1, got 'abc'"),
        ("train.aux_loss_weight=-0.01", r"train\.aux_loss_weight must be a finite number >= 0"),
        ("model.num_heads=0", r"model\.num_heads must be an integer >= 1, got 0"),
        ("model.num_kv_heads=3", r"model\.num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
        ("model.num_layers=0", r"model\.num_layers must be an integer >= 1, got 0"),
        ("model.hidden_size=130", r"model\.hidden_size \(130\) must be divisible by num_heads \(4\)"),
        ("model.hidden_size=12", r"model\.hidden_size / num_heads \(the head size, 3\) must be even"),
        ("model.top_k=0", r"model\.top_k must be an integer >= 1, got 0"),
        ("model.rms_norm_eps=0", r"model\.rms_norm_eps must be a finite number > 0, got 0"),
        ("data.seq_len=4", r"data\.seq_len must be at least 8, got 4"),
        ("data.heldout_fraction=0.9", r"data\.heldout_fraction must be in \(0, 0\.5\], got 0\.9"),
        ("data.partition=dirichlet", r"data\.partition must be one of \['iid', 'contiguous'\], got 'dirichlet'"),
        ("data.text_field=''", r"data\.text_field must be a non-empty string, got ''"),
        ("data.vocab_size=100", r"data\.vocab_size must be at least 260 for tokenizer 'bpe', got 100"),
        ("data.on_bad_file=ignore", r"data\.on_bad_file must be one of \['skip', 'error'\], got 'ignore'"),
        ("data.decode_errors=ignore", r"data\.decode_errors must be one of \['replace', 'strict'\]"),
        ("strategy.outer_lr=0", r"strategy\.outer_lr must be > 0, got 0"),
        ("strategy.outer_lr=-0.7", r"strategy\.outer_lr must be > 0, got -0\.7"),
        ("strategy.min_nodes=9", r"strategy\.min_nodes must be in \[0, nodes=4\], got 9"),
        ("strategy.round_timeout_s=0", r"strategy\.round_timeout_s must be > 0"),
        ("strategy.trim_fraction=0.5", r"strategy\.trim_fraction must be in \[0, 0\.5\)"),
        ("strategy.clip_shared=-1", r"strategy\.clip_shared and clip_experts must be >= 0"),
        ("strategy.guard.window=2", r"strategy\.guard\.window must be an integer >= 3, got 2"),
        ("eval.batch_size=0", r"eval\.batch_size and eval\.max_batches must be >= 1"),
        ("eval.max_batches=-1", r"eval\.batch_size and eval\.max_batches must be >= 1"),
        ("nodes=abc", r"nodes must be an integer, got 'abc'"),
        ("+eval.unknown=1", r"eval: unknown key\(s\) \['unknown'\]"),
    ],
)
def test_bad_value_stops_the_entry_point_naming_the_key(override, message, tmp_path, capsys, monkeypatch):
    import re

    import engine.simulate
    from engine.simulate import simulate as main

    launched = []
    monkeypatch.setattr(engine.simulate, "run_app", lambda *a, **k: launched.append(a) or 1)
    assert main([override, f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and re.search(message, err), err
    assert launched == []


def test_seq_len_above_the_model_maximum_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.seq_len \(4096\) exceeds model\.max_seq_len \(2048\)"):
        load(["data.seq_len=4096"])


def test_model_validate_checks_seq_len_against_max_seq_len():
    from model.args import MoEArgs

    MoEArgs(max_seq_len=128).validate(seq_len=128)
    with pytest.raises(ValueError, match=r"data\.seq_len \(129\) exceeds model\.max_seq_len \(128\)"):
        MoEArgs(max_seq_len=128).validate(seq_len=129)


def test_unwritable_output_dir_is_a_config_error(tmp_path, capsys, monkeypatch):
    import engine.simulate
    from engine.simulate import simulate as main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = str(blocker / "out")  # cannot be created, not even by root
    monkeypatch.setattr(engine.simulate, "run_app", lambda *a, **k: 1)
    assert main([f"output_dir={target}"]) == 2
    assert "output_dir" in capsys.readouterr().err


def test_print_config_composes_without_torch_and_fast():
    """`python -m sim --print-config` prints the composed config and exits before any torch import."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    code = (
        "import runpy, sys\n"
        "sys.argv = ['sim', '--print-config', 'model=small', 'rounds=3']\n"
        "try:\n    runpy.run_module('sim', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('TORCH-IMPORTED', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.perf_counter() - t0
    print(f"--print-config took {took:.2f} s")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["name"] == "small" and cfg["rounds"] == 3 and "strategy" in cfg
    assert "TORCH-IMPORTED False" in proc.stderr
