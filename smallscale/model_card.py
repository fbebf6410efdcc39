"""The model card (README.md) of an exported run, from the files the run left on disk.

The YAML front matter is what the Hugging Face Hub reads (language, license, datasets, metrics,
pipeline tag, and `model-index` with the evaluation results), written by huggingface_hub's
`ModelCardData`. The body states the architecture, parameter and token counts, the data and
tokenizer, the training config, every result in eval/*.json, the energy and CO2 CodeCarbon measured,
how to load the model, and what it is for and not for. Every number comes from a file of the run:

    model.json, config.yaml, summary.json, eval/*.json   the run
    manifest.json                                        its dataset (source, splits, tokenizer)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

import smallscale
from smallscale.model.gpt import GPTConfig

# numbers of an eval result that are counts, not metrics (as are n_* keys)
RESULT_BOOKKEEPING = {"step", "n", "wall_s", "tokens", "bytes", "documents"}
HUB_METRICS = {"accuracy": "accuracy", "acc": "accuracy", "acc_norm": "accuracy", "f1": "f1", "chrf": "chrf",
               "bleu": "bleu", "ppl": "perplexity", "perplexity": "perplexity"}  # ours -> the Hub's metric ids  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _source_facts(source: str) -> tuple[list[str], list[str], str]:
    """(languages, Hub dataset ids, words) for a dataset's `source` as data prepare recorded it."""
    from smallscale.data.builtins import BUILTINS

    if source.startswith("builtin:") and source[len("builtin:") :] in BUILTINS:
        entry = BUILTINS[source[len("builtin:") :]]
        return [entry.language], [], f"{entry.description} (`{source}`; license: {entry.license})"
    if source.startswith("hf:") and not source.startswith("hf:/"):
        repo = source[len("hf:") :]
        return [], [repo], f"the Hugging Face dataset [{repo}](https://huggingface.co/datasets/{repo})"
    return [], [], f"local text `{Path(source).name}`"


def eval_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """task -> {metric: value}: the numeric top-level values of each eval/<task>.json."""
    out = {}
    for path in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []:
        result = _read_json(path)
        metrics = {k: float(v) for k, v in result.items() if k not in RESULT_BOOKKEEPING and not k.startswith("n_")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        if metrics:
            out[path.stem] = metrics
    return out


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def model_card(
    run_dir: str | Path, model_cfg: GPTConfig, dataset_dir: Path, architecture: str, checkpoint: str, step: int, *,
    name: str, license_id: str = "unknown", languages: list[str] | None = None,
) -> str:  # fmt: skip
    """The README.md text of the export of `run_dir` (`architecture`: the transformers class)."""
    from huggingface_hub import EvalResult, ModelCardData

    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    manifest = _read_json(dataset_dir / "manifest.json")
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if (run_dir / "config.yaml").exists() else {}
    evals = eval_metrics(run_dir)
    source = str(manifest.get("source") or "unknown")
    source_languages, hub_datasets, data_words = _source_facts(source)
    languages = languages or source_languages
    # a local file's folder means nothing on the Hub: its name only
    dataset_type = hub_datasets[0] if hub_datasets else source if source.startswith("builtin:") else Path(source).name

    results = []
    if summary.get("val_bpb") is not None:
        for key, label in (("val_bpb", "validation bits per byte"), ("val_loss", "validation loss (nats/token)")):
            results.append(EvalResult(task_type="text-generation", task_name="Language modelling", dataset_type=dataset_type,
                                      dataset_name=f"{Path(source).name} (held-out split)", dataset_split="validation",
                                      metric_type=key, metric_name=label, metric_value=summary[key]))  # fmt: skip
    for task, metrics in evals.items():
        for key, value in metrics.items():
            results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                      metric_type=key, metric_name=f"{task} {key}", metric_value=value))  # fmt: skip
    hub_metrics = sorted({HUB_METRICS[k] for m in evals.values() for k in m if k in HUB_METRICS} | {"perplexity"})
    data = ModelCardData(
        language=languages or None, license=license_id, library_name="transformers", pipeline_tag="text-generation",
        datasets=hub_datasets or None, metrics=hub_metrics, tags=["smallscale", "causal-lm", "pretrained-from-scratch"],
        model_name=name, eval_results=results or None,
    )  # fmt: skip
    body = _body(name, model_cfg, architecture, summary, manifest, config, evals, data_words, checkpoint, step, run_dir)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _body(name: str, cfg: GPTConfig, architecture: str, summary: dict[str, Any], manifest: dict[str, Any],
          config: dict[str, Any], evals: dict[str, dict[str, float]], data_words: str, checkpoint: str, step: int,
          run_dir: Path) -> str:  # fmt: skip
    splits = manifest.get("splits") or {}
    train_split, val_split = splits.get("train") or {}, splits.get("val") or {}
    tokenizer = manifest.get("tokenizer") or {}
    train_cfg, optim, schedule = config.get("train") or {}, config.get("optim") or {}, config.get("schedule") or {}
    shown_config = {k: v for k, v in config.items() if k != "out"}  # the local run folder means nothing elsewhere
    if "data" in shown_config and isinstance(shown_config["data"], dict):
        shown_config["data"] = {**shown_config["data"], "path": Path(str(shown_config["data"].get("path", ""))).name}
    params, tokens = summary.get("params"), summary.get("tokens_seen")
    lines = [
        f"# {name}",
        "",
        (f"A {_number(params)}-parameter decoder-only transformer ({architecture}) pretrained from scratch with "
        f"smallscale on {_number(tokens)} tokens of {data_words}. "
        "It is a research artefact of a small-scale pretraining study, not a general-purpose language model."),
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {architecture}: n_layer {cfg.n_layer}, n_head {cfg.n_head}, d_model {cfg.d_model}, d_ff {cfg.ffn_dim} |",
        f"| positions / norm / MLP | {cfg.position} / {cfg.norm} / {cfg.mlp}; bias {cfg.bias}; tied embeddings {cfg.tie_embeddings} |",
        f"| context length | {cfg.seq_len} tokens |",
        f"| parameters | {_number(params)} ({_number(summary.get('non_embedding_params'))} non-embedding) |",
        f"| vocabulary | {cfg.vocab_size:,} |",
        "",
        "## Data and tokenizer",
        "",
        f"- Source: {data_words}.",
        (f"- Train split: {_number(train_split.get('documents'))} documents, {_number(train_split.get('tokens'))} tokens, "
        f"{_number(train_split.get('bytes'))} bytes ({_number(train_split.get('bytes_per_token'), 3)} bytes per token)."),
        f"- Validation split: {_number(val_split.get('documents'))} documents, {_number(val_split.get('tokens'))} tokens.",
        (f"- Tokenizer: {tokenizer.get('kind', '?')} trained on the corpus by smallscale, vocabulary {_number(manifest.get('vocab_size'))}; "
        "its `tokenizer.json` is in this folder."),
        "",
        "## Training",
        "",
        (f"- {_number(tokens)} tokens in {_number(summary.get('steps'))} optimizer steps of {_number(train_cfg.get('global_batch_tokens'))} tokens "
        f"({_number(summary.get('epochs'), 3)} epoch{'' if summary.get('epochs') == 1 else 's'} over a budget of "
        f"{_number(summary.get('token_budget'))} tokens)."),
        (f"- Optimizer {optim.get('name', '?')}, learning rate {_number(optim.get('lr'))}, {schedule.get('kind', '?')} schedule; "
        f"precision {summary.get('precision', '?')}; seed {train_cfg.get('seed', '?')}."),
        (f"- Device {summary.get('device', '?')}, wall time {_number(summary.get('wall_s'), 3)} s, "
        f"{_number(round(summary['tokens_per_s']) if summary.get('tokens_per_s') is not None else None)} tokens/s."),
        f"- Exported from checkpoint `{checkpoint}` (step {step}) with smallscale {smallscale.__version__}.",
        "",
        "<details><summary>Full training config (config.yaml)</summary>",
        "",
        "```yaml",
        yaml.safe_dump(shown_config, sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
        "",
        "## Evaluation",
        "",
        "| task | metric | value |",
        "|---|---|---|",
        f"| held-out validation split | val_bpb (bits per byte) | {_number(summary.get('val_bpb'))} |",
        f"| held-out validation split | val_loss (nats per token) | {_number(summary.get('val_loss'))} |",
        *[f"| {task} | {key} | {_number(value)} |" for task, metrics in evals.items() for key, value in metrics.items()],
        "",
        "Bits per byte compare across tokenizers; perplexity only within one tokenizer.",
        "",
        "## Energy and CO2",
        "",
        *_energy_lines(summary, run_dir),
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'generate = pipeline("text-generation", model="{name if "/" in name else "./" + name}")',
        'print(generate("Once upon a time", max_new_tokens=40, do_sample=False)[0]["generated_text"])',
        "```",
        "",
        "## Intended use and limitations",
        "",
        ("- Intended for research on small-scale pretraining (scaling, data efficiency, architecture and optimizer "
        "comparisons), for reproducing the study it comes from, and for teaching."),
        (f"- It is small ({_number(params)} parameters, {_number(tokens)} training tokens, {cfg.seq_len}-token context): its "
        "text is often ungrammatical or incoherent, and it knows little beyond the style of its training data."),
        ("- It has had no instruction tuning, no safety tuning and no filtering beyond the corpus's own; it reproduces "
        "the biases and content of its training data. Do not use it to make decisions about people or for any "
        "application where its output could cause harm."),
        "- Languages other than those of its training data are out of scope.",
        "",
    ]
    return "\n".join(lines)


def _energy_lines(summary: dict[str, Any], run_dir: Path) -> list[str]:
    lines = []
    if summary.get("energy_kwh") is not None:
        lines.append(f"- Training: {summary['energy_kwh']:.4g} kWh, {summary.get('co2_kg', 0):.4g} kg CO2eq at "
                     f"{_number(summary.get('carbon_intensity_g_per_kwh'))} g CO2eq/kWh "
                     f"({summary.get('energy_country') or 'world average'}), measured by {summary.get('energy_method')}.")  # fmt: skip
    else:
        lines.append(f"- Training: {summary.get('energy_method') or 'energy was not measured'}.")
    if summary.get("energy_j") is not None:
        lines.append(f"- GPU energy counter (NVML): {summary['energy_j'] / 3.6e6:.4g} kWh.")
    eval_energy = [_read_json(p).get("energy") or {} for p in sorted((run_dir / "eval").glob("*.json"))] if (run_dir / "eval").is_dir() else []
    eval_kwh = [e["energy_kwh"] for e in eval_energy if isinstance(e.get("energy_kwh"), (int, float))]
    if eval_kwh:
        eval_co2 = sum(e.get("co2_kg") or 0.0 for e in eval_energy)
        lines.append(f"- Evaluation (eval/*.json, {len(eval_kwh)} results): {sum(eval_kwh):.4g} kWh, {eval_co2:.4g} kg CO2eq.")
    return lines
