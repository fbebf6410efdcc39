"""Damaged checkpoints and run files: resume passes over a damaged checkpoint to the newest intact
one (and ends bitwise identical to a clean run), eval/generate/export name the damage in one line,
nothing in a checkpoint is ever unpickled as code, and a torn last line of metrics.jsonl is dropped."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smallscale.errors import UserError
from smallscale.eval.runs import load_run, read_metrics
from smallscale.io import sha256_file
from smallscale.model.gpt import GPT, GPTConfig
from smallscale.train import checkpoint
from smallscale.train.trainer import load_run_config, resume, train

CLI = [sys.executable, "-m", "smallscale.cli"]
# 6 steps of 256 tokens, a checkpoint every 2 steps (all kept), dropout so that the RNG state matters.
RUN = ["model.preset=null", "model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.seq_len=32", "model.dropout=0.1",
       "train.steps=6", "train.global_batch_tokens=256", "train.micro_batch=8", "train.precision=fp32",
       "train.log_every_steps=1", "train.eval_batch=8", "train.checkpoint_every_tokens=512", "train.keep_checkpoints=5"]  # fmt: skip
OLDER, NEWER, FINAL = "step-00000002", "step-00000004", "step-00000006"


def run_cfg(dataset: Path, out: Path, *overrides: str):
    return load_run_config(None, [f"data.path={dataset}", f"out={out}", *RUN, *overrides])


@pytest.fixture(scope="module")
def clean(tiny_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("integrity") / "clean"
    train(run_cfg(tiny_dataset, run), progress=False)
    return run


def interrupted(clean: Path, out: Path, *, hashes: bool = True) -> Path:
    """The clean run as it was when it stopped after its step-4 checkpoint (its metrics.jsonl already
    holds later records, which resume drops). hashes=False: checkpoints as written before state.json
    recorded sha256s."""
    for name in (OLDER, NEWER):
        shutil.copytree(clean / "checkpoints" / name, out / "checkpoints" / name)
        if not hashes:
            edit_state(out / "checkpoints" / name, lambda state: state.pop("sha256"))
    for name in ("config.yaml", "model.json", "metrics.jsonl"):
        shutil.copy(clean / name, out / name)
    return out


def edit_state(ckpt: Path, change: Callable[[dict], object]) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    change(state)
    (ckpt / "state.json").write_text(json.dumps(state))


def rehash(ckpt: Path, name: str) -> None:
    """Record the current sha256 of `name`, as a crafted checkpoint would: only the content checks remain."""
    edit_state(ckpt, lambda state: state["sha256"].update({name: sha256_file(ckpt / name)}) if "sha256" in state else None)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / FINAL / "model.safetensors"))


def losses(run: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(run / "metrics.jsonl")]


class WritesAFile:
    """Unpickling this calls open(path, 'w'): code that weights_only=True must never run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# ---------------------------------------------------------------------------------------- damages
# Each damages a checkpoint folder and returns the words that must name what is wrong with it.
def truncated_weights(ckpt: Path) -> str:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    hashed = "sha256" in json.loads((ckpt / "state.json").read_text())
    return "model.safetensors: sha256 mismatch" if hashed else "model.safetensors: unreadable (Error while deserializing header"


def flipped_weight_byte(ckpt: Path) -> str:
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a bit rot in the last tensor: the header still parses, only the hash can tell
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    return "model.safetensors: sha256 mismatch"


def state_not_json(ckpt: Path) -> str:
    (ckpt / "state.json").write_text('{"step": 4, "tok')
    return "state.json: unreadable (Unterminated string"


def state_without_loader(ckpt: Path) -> str:
    edit_state(ckpt, lambda state: state.pop("loader"))
    return "state.json: no 'loader'"


def malicious_optimizer(ckpt: Path) -> str:
    marker = ckpt.parents[1] / "PWNED"
    # protocol 2, torch.save's: the unpickler reads as far as the global it must refuse
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"state": {}, "param_groups": WritesAFile(marker)}, protocol=2))
    rehash(ckpt, "optimizer.pt")
    return "optimizer.pt: refused to unpickle"


def other_shape_weights(ckpt: Path) -> str:
    """The weights of the same model with d_model 48, as if copied in from another run."""
    fields = json.loads((ckpt.parents[1] / "model.json").read_text())
    other = GPT(GPTConfig(**{**fields, "d_model": 48}))
    save_file({k: v.clone() for k, v in other.state_dict().items()}, str(ckpt / "model.safetensors"))
    rehash(ckpt, "model.safetensors")
    vocab = fields["vocab_size"]
    return f"model.safetensors: weights of another model shape (tok_emb.weight [{vocab}, 48] vs [{vocab}, 32] in "


def missing_rng(ckpt: Path) -> str:
    (ckpt / "rng.pt").unlink()
    return "rng.pt: missing"


HASHED_DAMAGES = [truncated_weights, flipped_weight_byte, state_not_json, state_without_loader, malicious_optimizer,
                  other_shape_weights, missing_rng]  # fmt: skip
LEGACY_DAMAGES = [truncated_weights, malicious_optimizer]  # what checkpoints without hashes still detect


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize(
    ("damage", "hashes"),
    [(d, True) for d in HASHED_DAMAGES] + [(d, False) for d in LEGACY_DAMAGES],
    ids=[d.__name__ for d in HASHED_DAMAGES] + [f"legacy-{d.__name__}" for d in LEGACY_DAMAGES],
)
def test_resume_passes_over_a_damaged_checkpoint_and_matches_a_clean_run(clean, tmp_path, damage, hashes):
    run = interrupted(clean, tmp_path / "run", hashes=hashes)
    words = damage(run / "checkpoints" / NEWER)
    with pytest.warns(UserWarning, match=rf"checkpoint {NEWER} is unusable \(.*\); resuming from {OLDER}") as caught:
        resume(run, progress=False)
    assert any(words in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert damage is not other_shape_weights or any("in config.yaml" in str(w.message) for w in caught)
    assert losses(run) == losses(clean)  # exact float equality
    wc, wr = final_weights(clean), final_weights(run)
    assert all(torch.equal(wc[k], wr[k]) for k in wc)
    assert (run / "checkpoints" / f"damaged-{NEWER}").is_dir()  # kept for inspection, outside the rotation
    assert not (run / "PWNED").exists()


def test_checkpoints_without_hashes_still_resume_exactly(clean, tmp_path):
    run = interrupted(clean, tmp_path / "run", hashes=False)
    resume(run, progress=False)
    assert losses(run) == losses(clean)
    wc, wr = final_weights(clean), final_weights(run)
    assert all(torch.equal(wc[k], wr[k]) for k in wc)
    assert "sha256" in json.loads((run / "checkpoints" / FINAL / "state.json").read_text())


def test_saved_state_records_the_sha256_of_each_file(clean):
    ckpt = clean / "checkpoints" / NEWER
    recorded = json.loads((ckpt / "state.json").read_text())["sha256"]
    assert recorded == {name: sha256_file(ckpt / name) for name in ("model.safetensors", "optimizer.pt", "rng.pt")}


def test_resume_refuses_when_no_checkpoint_is_intact(clean, tmp_path):
    run = interrupted(clean, tmp_path / "run")
    state_not_json(run / "checkpoints" / NEWER)
    missing_rng(run / "checkpoints" / OLDER)
    with pytest.raises(UserError) as err:
        resume(run, progress=False)
    message = str(err.value)
    assert "no intact checkpoint" in message and f"{NEWER}: state.json: unreadable" in message and f"{OLDER}: rng.pt: missing" in message
    assert "to train the run again from step 0" in message and "\n" not in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [OLDER, NEWER]  # nothing moved or deleted


def test_rotation_after_a_fallback_never_deletes_the_new_checkpoint(clean, tmp_path):
    """keep_checkpoints=1 after resuming from step 2 past a damaged step 4: a save at step 3 (the last
    step of a run since shortened) must not leave the damaged step 4 as 'the newest' and delete step 3."""
    ckpt_dir = interrupted(clean, tmp_path / "run") / "checkpoints"
    flipped_weight_byte(ckpt_dir / NEWER)
    model_state = load_file(str(ckpt_dir / OLDER / "model.safetensors"))
    with pytest.warns(UserWarning, match=f"resuming from {OLDER}"):
        found = checkpoint.resume_point(ckpt_dir, model_state)
    optim_state = checkpoint.load_optimizer(found.path)
    checkpoint.save(ckpt_dir, 3, model_state, optim_state, {k: found.state[k] for k in checkpoint.RESUME_KEYS}, keep=1)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [f"damaged-{NEWER}", "step-00000003"]
    assert checkpoint.latest(ckpt_dir).step == 3


def test_latest_skips_a_checkpoint_with_a_corrupt_state(clean, tmp_path):
    ckpt_dir = interrupted(clean, tmp_path / "run") / "checkpoints"
    state_not_json(ckpt_dir / NEWER)
    assert checkpoint.latest(ckpt_dir).step == 2  # what the study runner records as resumed_from_step


def test_resume_of_a_finished_run_with_a_damaged_summary_writes_it_again(clean, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clean, run)
    (run / "summary.json").write_text('{"status": "do')
    with pytest.warns(UserWarning, match="summary.json is damaged; writing it again"):
        summary = resume(run, progress=False)
    expected = json.loads((clean / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-6)
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


# ---------------------------------------------------------------------------------------- load_run
LOAD_RUN_DAMAGES = [truncated_weights, flipped_weight_byte, state_not_json, other_shape_weights]


@pytest.mark.parametrize("damage", LOAD_RUN_DAMAGES, ids=[d.__name__ for d in LOAD_RUN_DAMAGES])
def test_a_requested_damaged_checkpoint_is_a_one_line_error(clean, tmp_path, damage):
    run = interrupted(clean, tmp_path / "run")
    words = damage(run / "checkpoints" / NEWER)
    with pytest.raises(UserError) as err:
        load_run(run, checkpoint=NEWER)
    message = str(err.value)
    assert message.startswith(f"checkpoint {NEWER} of ") and words in message and f"(available: {OLDER})" in message
    assert damage is not other_shape_weights or "in model.json" in message
    assert "\n" not in message


@pytest.mark.parametrize("damage", LOAD_RUN_DAMAGES, ids=[d.__name__ for d in LOAD_RUN_DAMAGES])
def test_the_latest_checkpoint_falls_back_to_the_newest_intact_one_with_a_warning(clean, tmp_path, damage):
    run = interrupted(clean, tmp_path / "run")
    damage(run / "checkpoints" / NEWER)
    with pytest.warns(UserWarning, match=rf"checkpoint {NEWER} of .* is unusable \(.*\); using {OLDER}"):
        loaded = load_run(run)
    assert loaded.step == 2 and loaded.checkpoint.name == OLDER
    weights = load_file(str(clean / "checkpoints" / OLDER / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in loaded.model.state_dict().items())


def test_evaluation_never_unpickles_the_optimizer_file(clean, tmp_path):
    run = interrupted(clean, tmp_path / "run")
    payload = WritesAFile(tmp_path / "payload-is-live")
    pickle.loads(pickle.dumps(payload)).close()  # the payload does run code when unpickled unsafely
    assert (tmp_path / "payload-is-live").exists()
    malicious_optimizer(run / "checkpoints" / NEWER)
    assert load_run(run, checkpoint=NEWER).step == 4  # eval reads only the weights and state.json
    assert not (run / "PWNED").exists()


def test_checkpoints_without_hashes_still_load_for_evaluation(clean, tmp_path):
    run = interrupted(clean, tmp_path / "run", hashes=False)
    assert load_run(run).step == 4


def test_no_usable_checkpoint_is_a_one_line_error_naming_each(clean, tmp_path):
    run = interrupted(clean, tmp_path / "run")
    truncated_weights(run / "checkpoints" / NEWER)
    other_shape_weights(run / "checkpoints" / OLDER)
    with pytest.raises(UserError, match=rf"no usable checkpoint \({NEWER}: model.safetensors: sha256 mismatch.*; {OLDER}: .*another model shape"):
        load_run(run)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda run: shutil.rmtree(run / "checkpoints"), "has no complete checkpoint under checkpoints/"),
        (lambda run: (run / "model.json").write_text('{"vocab_size": 51'), "model.json' is not a valid model config"),
        (lambda run: (run / "model.json").write_text("[1, 2]"), "model.json' is not a valid model config (not a JSON object)"),
        (lambda run: (run / "model.json").write_bytes(b"\xff\xfe"), "model.json' is not a valid model config"),
        (lambda run: (run / "config.yaml").write_text("data: here\n"), "config.yaml' has no data.path"),
    ],
    ids=["no-checkpoints", "model-json-torn", "model-json-not-object", "model-json-not-utf8", "config-data-not-mapping"],
)
def test_a_damaged_run_directory_is_a_one_line_error(clean, tmp_path, change, words):
    run = interrupted(clean, tmp_path / "run")
    change(run)
    with pytest.raises(UserError) as err:
        load_run(run)
    assert words in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the command line
@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "generate", "export"])
def test_commands_on_a_damaged_checkpoint_print_one_line(clean, tmp_path, command):
    run = interrupted(clean, tmp_path / "run")
    truncated_weights(run / "checkpoints" / NEWER)
    extra = {"eval": ["--tasks", "heldout"], "generate": ["-p", "the cat"], "export": [str(tmp_path / "hf")]}[command]
    proc = subprocess.run([*CLI, command, str(run), *extra, "--checkpoint", NEWER], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert f"checkpoint {NEWER} of" in proc.stderr and "model.safetensors: sha256 mismatch" in proc.stderr


@pytest.mark.slow
def test_resume_command_refuses_a_malicious_pickle_without_a_traceback(clean, tmp_path):
    run = interrupted(clean, tmp_path / "run")
    malicious_optimizer(run / "checkpoints" / NEWER)
    proc = subprocess.run([*CLI, "resume", str(run), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (run / "PWNED").exists()
    assert f"checkpoint {NEWER} is unusable (optimizer.pt: refused to unpickle" in proc.stderr and "GLOBAL io.open" in proc.stderr
    assert f"resuming from {OLDER}" in proc.stderr


@pytest.mark.slow
def test_resume_command_with_no_intact_checkpoint_prints_one_line(clean, tmp_path):
    run = interrupted(clean, tmp_path / "run")
    for name in (OLDER, NEWER):
        other_shape_weights(run / "checkpoints" / name)
    proc = subprocess.run([*CLI, "resume", str(run), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no intact checkpoint" in proc.stderr


# ---------------------------------------------------------------------------------- metrics.jsonl
def test_resume_drops_a_torn_last_line_of_the_metrics(clean, tmp_path):
    run = interrupted(clean, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "tokens": 17')  # the write a power cut interrupted
    resume(run, progress=False)
    assert losses(run) == losses(clean)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (run / "metrics.jsonl").read_text().endswith("}\n")


@pytest.mark.parametrize(
    ("tail", "kept"),
    [(b'{"step": 3, "lo', 2), (b"\x00" * 40, 2), (b'{"step": 3}', 3), (b'{"step": 3}\n\n', 3), (b"", 2)],
    ids=["torn", "zero-filled", "complete-without-newline", "blank-lines-after", "nothing"],
)
def test_only_a_bad_last_line_is_dropped(tmp_path, tail, kept):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 6.2}\n{"step": 2, "loss": 6.0}\n' + tail)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3][:kept]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', "line 2 of"),
        ('{"step": 1}\n[2]\n', "line 2 of"),
        ('{"step": 1}\n\n{"loss": 5.0}\n{"step": 4}\n', "line 3 of"),
    ],
    ids=["torn-in-the-middle", "not-an-object", "no-step"],
)
def test_a_bad_line_before_the_last_is_a_one_line_error(tmp_path, text, words):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_metrics(path)
    assert words in str(err.value) and "delete or repair that line" in str(err.value) and "\n" not in str(err.value)


def test_resume_names_a_corrupt_metrics_line(clean, tmp_path):
    run = interrupted(clean, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"line 3 of .*metrics.jsonl.* is not valid JSON"):
        resume(run, progress=False)


def test_report_curves_drop_a_torn_last_line_and_name_a_corrupt_one(tmp_path):
    from smallscale.study.report import _curve

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    records = [{"step": i, "tokens": 512 * i, "loss": 6.0 - i / 10} for i in range(1, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "tok')
    assert _curve(tmp_path, "a")["tokens"] == [512, 1024, 1536]
    (run / "metrics.jsonl").write_text('{"step": 1, "tokens": 512, "loss": 6.0}\n{"ste\n{"step": 3, "tokens": 1536, "loss": 5.8}\n')
    with pytest.raises(UserError, match="line 2 of"):
        _curve(tmp_path, "a")
