"""`smallscale export --to hf`: the folder works with transformers' pipeline("text-generation") and
AutoTokenizer, its README.md is a model card the Hub reads (front matter, model-index) that states
the run's numbers, and `--push-to-hub` goes through huggingface_hub up to the network call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from huggingface_hub import HfApi, ModelCard  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from smallscale.cli import app  # noqa: E402
from smallscale.eval.runs import load_run  # noqa: E402
from smallscale.export import export_hf  # noqa: E402
from smallscale.model_card import _source_facts  # noqa: E402
from smallscale.train.trainer import load_run_config, train  # noqa: E402

TINY = ["model.preset=null", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
        "train.steps=8", "train.global_batch_tokens=512", "train.micro_batch=16", "train.precision=fp32",
        "train.eval_batch=8", "train.eval_tokens=2000", "train.energy.country=GBR", "optim.lr=3e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tiny_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama-layout run, evaluated on heldout, exported: (run_dir, export folder)."""
    from smallscale.eval.tasks.registry import run_task, save_result

    tmp = tmp_path_factory.mktemp("card")
    run_dir = tmp / "run"
    train(load_run_config(None, [f"data.path={tiny_dataset}", f"out={run_dir}", *TINY]), progress=False)
    save_result(run_dir, "heldout", run_task("heldout", load_run(run_dir), batch_size=8))
    return run_dir, export_hf(run_dir, tmp / "tiny-llama", license_id="apache-2.0", languages=["en"])


def test_pipeline_text_generation_continues_like_smallscale(exported):
    from transformers import AutoTokenizer, pipeline

    from smallscale.eval.generate import generate_text

    run_dir, folder = exported
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = load_run(run_dir)
    text = "The cat sat on the mat. A big dog ran under the tree."
    ids = tokenizer(text)["input_ids"]
    assert ids == [tokenizer.eos_token_id, *ours.tokenizer.encode(text).ids]  # after the EOS, as smallscale reads text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text

    generate_hf = pipeline("text-generation", model=str(folder), device="cpu")
    prompt = "The cat sat on"
    out = generate_hf(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    expected = generate_text(ours.model, ours.tokenizer, [prompt], max_new_tokens=12, temperature=0.0)[0]
    assert out.startswith(prompt) and len(expected.strip()) > 0
    assert out[len(prompt) :] == expected  # the same continuation as `smallscale generate`


def test_model_card_front_matter_is_what_the_hub_reads(exported):
    run_dir, folder = exported
    card = ModelCard.load(folder / "README.md")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    heldout = json.loads((run_dir / "eval" / "heldout.json").read_text(encoding="utf-8"))
    data = card.data
    assert (data.license, data.language, data.library_name, data.pipeline_tag) == ("apache-2.0", ["en"], "transformers", "text-generation")
    assert "perplexity" in data.metrics and "smallscale" in data.tags
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert results[("heldout", "bpb")] == pytest.approx(heldout["bpb"])
    assert results[("corpus.txt (held-out split)", "val_bpb")] == pytest.approx(summary["val_bpb"])
    assert ("heldout", "n") not in results and ("heldout", "tokens") not in results  # counts are not metrics


def test_model_card_states_the_runs_numbers_energy_and_limits(exported):
    run_dir, folder = exported
    text = (folder / "README.md").read_text(encoding="utf-8")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert f"A {summary['params']:,}-parameter decoder-only transformer (LlamaForCausalLM)" in text
    assert f"pretrained from scratch with smallscale on {summary['tokens_seen']:,} tokens" in text
    assert f"- Training: {summary['energy_kwh']:.4g} kWh, {summary['co2_kg']:.4g} kg CO2eq at 237.6 g CO2eq/kWh (GBR)" in text
    assert f"measured by {summary['energy_method']}" in text and "- Evaluation (eval/*.json, 1 results):" in text
    assert "## Intended use and limitations" in text and 'pipeline("text-generation", model="./tiny-llama")' in text
    assert str(run_dir) not in text  # no local paths on the Hub


def test_a_builtin_corpus_gives_the_language_and_a_hub_dataset_its_id():
    assert _source_facts("builtin:tinyshakespeare")[:2] == (["en"], [])
    assert _source_facts("builtin:maneno-yetu")[0] == ["sw"]
    assert _source_facts("hf:roneneldan/TinyStories")[:2] == ([], ["roneneldan/TinyStories"])
    assert _source_facts("/home/me/corpus.txt") == ([], [], "local text `corpus.txt`")


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(exported, tmp_path, monkeypatch):
    run_dir, _ = exported
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path(kwargs["folder_path"]).iterdir()}
        return type("Commit", (), {"commit_url": "https://huggingface.co/me/tiny/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)  # the network calls
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    result = CliRunner().invoke(app, ["export", str(run_dir), str(tmp_path / "out"), "--push-to-hub", "me/tiny", "--private"])
    assert result.exit_code == 0, result.output
    assert [(c[0], c[1]) for c in calls] == [("create_repo", "me/tiny"), ("upload_folder", "me/tiny")]
    assert calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert calls[1][2]["repo_type"] == "model" and Path(calls[1][2]["folder_path"]) == tmp_path / "out"
    assert ModelCard.load(tmp_path / "out" / "README.md").data.model_name == "me/tiny"
    assert "https://huggingface.co/me/tiny/commit/abc" in result.output


def test_a_hub_failure_is_one_line_naming_the_repo(exported, tmp_path, monkeypatch):
    from smallscale.errors import UserError
    from smallscale.export import push_to_hub

    def refuse(self, repo_id, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(UserError, match=r"^pushing to 'me/tiny' failed: ConnectionError: \[Errno 111\] Connection refused$"):
        push_to_hub(exported[1], "me/tiny")
    with pytest.raises(UserError, match="is not an exported folder"):
        push_to_hub(tmp_path, "me/tiny")
