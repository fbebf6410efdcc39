"""Conversion of a `GPT` to the equivalent Hugging Face transformers model, logit for logit.

Two architectures map exactly:
  LlamaForCausalLM   position='rope',    norm='rmsnorm',   mlp='swiglu', bias=False, qk_norm=False
  GPT2LMHeadModel    position='learned', norm='layernorm', mlp='gelu',   bias=True,  qk_norm=False
Embeddings may be tied or untied in both. Anything else is refused rather than approximated.

`to_hf` converts a model in memory; `export_hf` turns a run directory into a folder that
`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` and
`pipeline("text-generation")` load offline, with a model card (README.md, model_card.py);
`push_to_hub` uploads such a folder to the Hugging Face Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import smallscale
from smallscale.data.tokenizer import to_transformers
from smallscale.errors import UserError
from smallscale.eval.runs import load_run
from smallscale.model.gpt import GPT, GPTConfig
from smallscale.model_card import model_card

if TYPE_CHECKING:
    import transformers

# switch -> value each target needs
_TARGETS: dict[str, dict[str, object]] = {
    "LlamaForCausalLM": dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=False),
    "GPT2LMHeadModel": dict(position="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False),
}


def _target(cfg: GPTConfig) -> str:
    """The transformers class that represents cfg exactly, or a ValueError naming the switches that
    no supported class can represent (relative to the closest one)."""
    mismatches = {
        name: [k for k, v in needs.items() if getattr(cfg, k) != v] for name, needs in _TARGETS.items()
    }
    closest = min(mismatches, key=lambda name: len(mismatches[name]))
    if not mismatches[closest]:
        return closest
    bad = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in mismatches[closest])
    needs = ", ".join(f"{k}={_TARGETS[closest][k]!r}" for k in mismatches[closest])
    raise ValueError(
        f"Cannot export to transformers: {bad} not representable; the closest class, {closest}, "
        f"needs {needs} (only LlamaForCausalLM and GPT2LMHeadModel layouts are supported)."
    )


def hf_config_for(cfg: GPTConfig) -> transformers.PretrainedConfig:
    """The LlamaConfig or GPT2Config describing the same network as cfg (ValueError if none does)."""
    import transformers

    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": None,  # token ids belong to the tokenizer; the exporter of the tokenizer sets them
        "eos_token_id": None,
    }
    if _target(cfg) == "LlamaForCausalLM":
        return transformers.LlamaConfig(
            hidden_size=cfg.d_model,
            intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            head_dim=cfg.head_dim,
            hidden_act="silu",
            max_position_embeddings=cfg.seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_base,  # transformers 5 maps this onto rope_parameters
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,  # Llama has no residual dropout: training-time dropout does not carry over
            **common,
        )
    return transformers.GPT2Config(
        n_embd=cfg.d_model,
        n_inner=cfg.ffn_dim,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_positions=cfg.seq_len,
        activation_function="gelu",  # exact erf GELU, as ours (not GPT-2's tanh "gelu_new")
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        **common,
    )


def _llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    C, hidden = model.cfg.d_model, model.cfg.ffn_dim
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm_f.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(C, dim=0)
        gate, up = block.mlp.fc.weight.split(hidden, dim=0)
        sd |= {
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.proj.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.proj.weight,
        }
    sd["lm_head.weight"] = model.lm_head.weight
    return sd


def _gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    # GPT-2's Conv1D stores weights as (in, out): the transpose of nn.Linear's (out, in).
    sd = {
        "transformer.wte.weight": model.tok_emb.weight,
        "transformer.wpe.weight": model.positions.pos_emb.weight,
        "transformer.ln_f.weight": model.norm_f.weight,
        "transformer.ln_f.bias": model.norm_f.bias,
    }
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        sd |= {
            p + "ln_1.weight": block.attn_norm.weight,
            p + "ln_1.bias": block.attn_norm.bias,
            p + "attn.c_attn.weight": block.attn.qkv.weight.t(),
            p + "attn.c_attn.bias": block.attn.qkv.bias,
            p + "attn.c_proj.weight": block.attn.proj.weight.t(),
            p + "attn.c_proj.bias": block.attn.proj.bias,
            p + "ln_2.weight": block.mlp_norm.weight,
            p + "ln_2.bias": block.mlp_norm.bias,
            p + "mlp.c_fc.weight": block.mlp.fc.weight.t(),
            p + "mlp.c_fc.bias": block.mlp.fc.bias,
            p + "mlp.c_proj.weight": block.mlp.proj.weight.t(),
            p + "mlp.c_proj.bias": block.mlp.proj.bias,
        }
    sd["lm_head.weight"] = model.lm_head.weight
    return sd


@torch.no_grad()
def to_hf(model: GPT) -> transformers.PreTrainedModel:
    """A LlamaForCausalLM or GPT2LMHeadModel with model's weights copied in: same logits, same
    device, dtype and train/eval mode. ValueError naming the switches if neither can represent it."""
    import transformers

    hf_config = hf_config_for(model.cfg)
    is_llama = isinstance(hf_config, transformers.LlamaConfig)
    hf_cls = transformers.LlamaForCausalLM if is_llama else transformers.GPT2LMHeadModel
    state = _llama_state_dict(model) if is_llama else _gpt2_state_dict(model)
    weight = model.tok_emb.weight
    hf_model = hf_cls(hf_config).to(device=weight.device, dtype=weight.dtype)
    hf_model.load_state_dict({k: v.detach().contiguous() for k, v in state.items()}, strict=True)
    return hf_model.train(model.training)


EXPORT_RECORD = "smallscale_export.json"


def export_hf(
    run_dir: str | Path, out_dir: str | Path, checkpoint: str | None = None, overwrite: bool = False, *,
    name: str | None = None, license_id: str = "unknown", languages: list[str] | None = None,
) -> Path:  # fmt: skip
    """Write the model of `run_dir` (its latest complete checkpoint, or `checkpoint`) with its tokenizer
    as a Hugging Face folder at `out_dir`, plus `smallscale_export.json` naming the source run and a
    model card README.md (`name`, default the folder's name; `license_id` and `languages` for its
    front matter, the languages by default those of a built-in corpus).

    The folder is assembled next to `out_dir` and renamed into place, so `out_dir` is either absent
    or complete. An existing non-empty `out_dir` is an error unless `overwrite`. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    is_empty_dir = out_dir.is_dir() and not any(out_dir.iterdir())
    if out_dir.exists() and not is_empty_dir and not overwrite:
        raise UserError(f"export folder {str(out_dir)!r} already exists and is not empty; choose a new folder or pass overwrite")
    run = load_run(run_dir, checkpoint, device="cpu")
    try:
        hf_model = to_hf(run.model)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    hf_tokenizer = to_transformers(run.dataset_dir / "tokenizer.json")
    hf_tokenizer.model_max_length = run.model_cfg.seq_len
    # The model config leaves special ids to the tokenizer; generation needs them on the model too.
    for config in (hf_model.config, hf_model.generation_config):
        config.bos_token_id = hf_tokenizer.bos_token_id
        config.eos_token_id = hf_tokenizer.eos_token_id
        config.pad_token_id = hf_tokenizer.pad_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer.save_pretrained(tmp)
        record = {
            "source_run": str(run.run_dir),
            "checkpoint": run.checkpoint.name,
            "step": run.step,
            "dataset_dir": str(run.dataset_dir),
            "architecture": type(hf_model).__name__,
            "smallscale_version": smallscale.__version__,
        }
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        card = model_card(run.run_dir, run.model_cfg, run.dataset_dir, record["architecture"], run.checkpoint.name, run.step,
                          name=name or out_dir.name, license_id=license_id, languages=languages)  # fmt: skip
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder src to dst; an old dst is moved aside first and removed after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to the Hugging Face Hub as model repository `repo_id` (created if
    it does not exist); returns the commit URL. The token comes from `token`, else HF_TOKEN or
    `hf auth login`. Hub errors (no token, no permission, no network) are UserErrors naming the repo."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    folder = Path(folder)
    if not (folder / EXPORT_RECORD).is_file():
        raise UserError(f"{str(folder)!r} is not an exported folder (no {EXPORT_RECORD}); export it first with `smallscale export`")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                                   commit_message=f"Upload {folder.name} (smallscale export)")  # fmt: skip
    except LocalTokenNotFoundError:
        raise UserError(f"pushing to {repo_id!r} needs a Hugging Face token: set HF_TOKEN or run `hf auth login`") from None
    except Exception as exc:  # the Hub client's HTTP, network and permission errors share no narrower base class
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"pushing to {repo_id!r} failed: {type(exc).__name__}: {first_line}") from None
    return str(commit.commit_url)
