"""Export of a trained run to a Hugging Face folder: loads offline with the Auto classes, gives
smallscale's logits and token ids, records its source, and refuses a variant it cannot represent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conftest import SHARED_DATA, synthetic_docs  # noqa: E402
from smallscale.data.shards import PrepareConfig, prepare  # noqa: E402
from smallscale.errors import UserError  # noqa: E402
from smallscale.eval.runs import load_run  # noqa: E402
from smallscale.export import EXPORT_RECORD, export_hf  # noqa: E402
from smallscale.train.trainer import load_run_config, train  # noqa: E402

LLAMA = ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"]
GPT2 = ["model.position=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=true"]
ALIBI = ["model.position=alibi"]


def shakespeare_lines(n: int = 12) -> str:
    """The first n lines of tinyshakespeare, read in place."""
    with open(SHARED_DATA / "tinyshakespeare" / "input.txt", encoding="utf-8") as f:
        return "".join(next(f) for _ in range(n))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export-data")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(synthetic_docs(400, seed=2)), encoding="utf-8")
    out = tmp / "ds"
    prepare(PrepareConfig(source=str(corpus), out=str(out), split_by="line", vocab_size=300, workers=1), progress=False)
    return out


@pytest.fixture(scope="module")
def make_run(dataset, tmp_path_factory):
    """A 3-step run of a tiny model with the given switches (trained once per module)."""
    runs: dict[tuple[str, ...], Path] = {}

    def make(*switches: str) -> Path:
        if switches not in runs:
            out = tmp_path_factory.mktemp("run") / "r"
            overrides = [
                f"data.path={dataset}", f"out={out}", "model.preset=null", "model.n_layer=2", "model.n_head=2",
                "model.d_model=32", "model.seq_len=32", "train.steps=3", "train.global_batch_tokens=512",
                "train.micro_batch=8", "train.precision=fp32", "train.eval_batch=8", *switches,
            ]  # fmt: skip
            train(load_run_config(None, overrides), progress=False)
            runs[switches] = out
        return runs[switches]

    return make


@pytest.mark.data
@pytest.mark.parametrize(("switches", "hf_class"), [(LLAMA, "LlamaForCausalLM"), (GPT2, "GPT2LMHeadModel")])
def test_exported_folder_loads_with_auto_classes_and_gives_the_same_logits(make_run, tmp_path, switches, hf_class):
    run_dir = make_run(*switches)
    folder = export_hf(run_dir, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(folder)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = load_run(run_dir)
    assert type(hf_model).__name__ == hf_class and hf_model.dtype == torch.float32

    text = shakespeare_lines()
    ids = ours.tokenizer.encode(text).ids
    assert hf_tokenizer(text)["input_ids"] == [2, *ids]  # the EOS every document follows, then the same merges
    assert hf_tokenizer.decode(ids) == text
    windows = torch.tensor(ids[: 3 * 32]).view(3, 32)  # three full contexts of real text
    with torch.no_grad():
        expected, actual = ours.model(windows).logits, hf_model(windows).logits
    assert expected.std() > 0.1  # not two near-constant outputs
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_exported_folder_carries_special_tokens_and_its_source(make_run, tmp_path):
    run_dir = make_run(*LLAMA)
    folder = export_hf(run_dir, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(folder)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (hf_tokenizer.pad_token, hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<|pad|>", "<|eos|>", "<|eos|>")
    assert (hf_model.config.pad_token_id, hf_model.config.bos_token_id, hf_model.config.eos_token_id) == (0, 2, 2)
    assert hf_model.generation_config.eos_token_id == 2
    assert hf_tokenizer.model_max_length == 32
    # text spelling a special token stays text, as in smallscale's tokenizer
    assert 2 not in hf_tokenizer("the <|eos|> cat")["input_ids"][1:]  # only the leading one
    record = json.loads((folder / EXPORT_RECORD).read_text())
    assert record["source_run"] == str(run_dir.resolve())
    assert (record["checkpoint"], record["step"]) == ("step-00000003", 3)
    assert record["smallscale_version"]


def test_a_named_checkpoint_is_exported(make_run, tmp_path):
    run_dir = make_run(*LLAMA)
    folder = export_hf(run_dir, tmp_path / "hf", checkpoint="3")
    assert json.loads((folder / EXPORT_RECORD).read_text())["step"] == 3
    with pytest.raises(UserError, match="not a complete checkpoint"):
        export_hf(run_dir, tmp_path / "other", checkpoint="7")
    assert not (tmp_path / "other").exists()


def test_an_alibi_run_is_refused_naming_the_switch_and_nothing_is_written(make_run, tmp_path):
    with pytest.raises(UserError, match="position='alibi'"):
        export_hf(make_run(*ALIBI), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []  # no folder, no temp folder


def test_an_existing_folder_is_replaced_only_with_overwrite(make_run, tmp_path):
    run_dir = make_run(*LLAMA)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="overwrite"):
        export_hf(run_dir, folder)
    export_hf(run_dir, folder, overwrite=True)
    assert not (folder / "stale.txt").exists() and (folder / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the old copy and temp folder are gone
