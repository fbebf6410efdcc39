"""`smallscale eval / generate / export` on a real (tiny) run, the way a user calls them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from smallscale.train.trainer import load_run_config, train

CLI = [sys.executable, "-m", "smallscale.cli"]


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun") / "run"
    overrides = [f"data.path={tiny_dataset}", f"out={run}", "model.preset=null", "model.n_layer=2", "model.n_head=2",
                 "model.d_model=32", "model.seq_len=256", "train.steps=5", "train.global_batch_tokens=4096",
                 "train.micro_batch=16", "train.precision=fp32"]  # fmt: skip
    train(load_run_config(None, overrides), progress=False)
    return run


@pytest.mark.data
@pytest.mark.slow
def test_eval_writes_one_json_per_task(tiny_run):
    tasks = "heldout,flores_swh,blimp,piqa,winogrande,sst2_zeroshot,afrisenti_swa_finetune,generation"
    options = ["-o", "generation.prompt_tokens=8", "-o", "generation.new_tokens=16"]
    proc = subprocess.run([*CLI, "eval", str(tiny_run), "--tasks", tasks, "--limit", "8", *options], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in tasks.split(","):
        result = json.loads((tiny_run / "eval" / f"{name}.json").read_text())
        assert result["task"] == name and result["step"] == 5 and "settings" in result
    assert json.loads((tiny_run / "eval" / "blimp.json").read_text())["n"] == 67 * 8
    heldout = json.loads((tiny_run / "eval" / "heldout.json").read_text())
    assert heldout["bpb"] > 0 and heldout["tokens"] > 0
    gen = json.loads((tiny_run / "eval" / "generation.json").read_text())
    assert {"chrf", "chrfpp", "bleu", "distinct_1", "distinct_2", "self_bleu"} <= set(gen)
    samples = (tiny_run / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == gen["n"] and {"prompt", "continuation", "reference"} <= set(json.loads(samples[0]))


def test_unknown_task_is_a_one_line_error(tiny_run):
    proc = subprocess.run([*CLI, "eval", str(tiny_run), "--tasks", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown task 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_and_export_from_the_command_line(tiny_run, tmp_path):
    proc = subprocess.run([*CLI, "generate", str(tiny_run), "-p", "the cat", "--max-new-tokens", "5", "--temperature", "0"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert proc.stdout.startswith("the cat")
    subprocess.run([*CLI, "export", str(tiny_run), str(tmp_path / "hf")], capture_output=True, check=True)
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
