"""The `smallscale` command. Subcommands map 1:1 to the stages in ARCHITECTURE.md.

User mistakes surface as `UserError` and print as one line (exit status 2), never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from smallscale.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Small-scale LM pretraining research.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare corpora: tokenizer + token shards + manifest.")
model_app = typer.Typer(no_args_is_help=True, help="Model presets.")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
console = Console(stderr=True, soft_wrap=True)
stdout = Console(soft_wrap=True)

DEFAULT_SOURCE = "builtin:tinyshakespeare"
DEFAULT_DATASET = "data/tinyshakespeare"


@data_app.command("prepare")
def data_prepare(
    source: Annotated[str, typer.Argument(help="path/glob/folder, hf:owner/name, hf:/local/dir or builtin:NAME")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output dataset folder")],
    tokenizer: Annotated[str, typer.Option(help="'bpe', 'unigram' or a tokenizer.json to reuse")] = "bpe",
    vocab_size: Annotated[int, typer.Option(help="vocabulary size when training a tokenizer")] = 8192,
    split_by: Annotated[Optional[str], typer.Option(help="document = 'file' | 'line' | 'paragraph'")] = None,
    text_field: Annotated[str, typer.Option(help="JSONL field / Parquet or HF column")] = "text",
    hf_config: Annotated[Optional[str], typer.Option(help="Hugging Face dataset config name")] = None,
    hf_split: Annotated[str, typer.Option(help="Hugging Face dataset split")] = "train",
    streaming: Annotated[bool, typer.Option(help="stream a Hugging Face dataset")] = False,
    data_root: Annotated[Optional[str], typer.Option(help="folder of built-in corpora (else $SMALLSCALE_DATA_ROOT)")] = None,
    nfc: Annotated[bool, typer.Option(help="Unicode NFC normalisation")] = True,
    dedup: Annotated[bool, typer.Option(help="remove exact duplicate documents")] = True,
    val_fraction: Annotated[float, typer.Option(help="fraction of documents held out")] = 0.05,
    seed: Annotated[int, typer.Option(help="seed of the split and of the document order")] = 1234,
    shard_tokens: Annotated[int, typer.Option(help="max tokens per shard file")] = 100_000_000,
    tokenizer_train_bytes: Annotated[int, typer.Option(help="bytes of text to train the tokenizer on")] = 200_000_000,
    workers: Annotated[Optional[int], typer.Option(help="worker processes (default: all cores)")] = None,
) -> None:
    """Read documents, train/load a tokenizer, write token shards and manifest.json."""
    from smallscale.config import validate
    from smallscale.data.shards import PrepareConfig, prepare

    fields = {k: v for k, v in locals().items() if k in PrepareConfig.model_fields}
    fields["out"] = str(out)
    if workers is None:
        fields.pop("workers")
    cfg = validate(PrepareConfig, fields, source="data prepare")
    manifest = prepare(cfg)
    _print_manifest_summary(manifest, out)


def _print_manifest_summary(manifest: dict, out: Path) -> None:
    table = Table(title=f"{out}  (vocab {manifest['vocab_size']}, {manifest['dtype']})")
    for col in ("split", "documents", "tokens", "bytes", "bytes/token", "tokens/word"):
        table.add_column(col, justify="right")
    for name, s in manifest["splits"].items():
        bpt = f"{s['bytes_per_token']:.3f}" if s["bytes_per_token"] else "-"
        fert = f"{s['fertility']:.3f}" if s["fertility"] else "-"
        table.add_row(name, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes']:,}", bpt, fert)
    stdout.print(table)
    stdout.print(
        f"duplicates removed: {manifest['duplicates_removed']:,}   "
        f"invalid UTF-8 replaced: {manifest['replaced_invalid_utf8']:,}"
    )


@data_app.command("info")
def data_info(dataset: Annotated[Path, typer.Argument(help="a prepared dataset folder")]) -> None:
    """Show a prepared dataset's manifest summary."""
    from smallscale.data.shards import load_manifest

    _print_manifest_summary(load_manifest(dataset), dataset)


@data_app.command("builtins")
def data_builtins() -> None:
    """List the built-in corpora."""
    from smallscale.data.builtins import list_builtins

    rows = list_builtins()
    table = Table()
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    stdout.print(table)


@model_app.command("list")
def model_list(
    vocab_size: Annotated[Optional[int], typer.Option(help="count parameters at this vocabulary size")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="context length for FLOPs/token")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Named model sizes with exact parameter counts and FLOPs per token."""
    from smallscale.model.presets import preset_table

    rows = preset_table(vocab_size=vocab_size, seq_len=seq_len)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(caption="FLOPs/token = 6N + 12·n_layer·d_model·seq_len (N includes the tied embedding)")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row.values()))
    stdout.print(table)


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_cmd(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Argument(help="run config YAML; then key=value overrides")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train a model: `smallscale train CONFIG.yaml train.tokens=2e6 optim.name=lion ...`."""
    from smallscale.train.trainer import load_run_config, train

    overrides = list(ctx.args)
    if config is not None and "=" in str(config) and not config.exists():
        overrides.insert(0, str(config))
        config = None
    summary = train(load_run_config(config, overrides), progress=progress)
    if os.environ.get("RANK", "0") == "0":
        _print_summary(summary)


@app.command("resume")
def resume_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory with checkpoints")],
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Continue an interrupted run from its latest checkpoint (bitwise identical on CPU)."""
    from smallscale.train.trainer import resume

    _print_summary(resume(run_dir, progress=progress))


def _print_summary(summary: dict) -> None:
    keys = ("params", "tokens_seen", "epochs", "val_loss", "val_bpb", "wall_s", "tokens_per_s", "mfu", "peak_mem_bytes")
    table = Table(title="run summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in keys:
        v = summary.get(k)
        table.add_row(k, f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if isinstance(v, float) else str(v)))
    stdout.print(table)


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    out_dir: Annotated[Path, typer.Argument(help="output folder")],
    to: Annotated[str, typer.Option("--to", help="target format (only 'hf')")] = "hf",
    checkpoint: Annotated[Optional[str], typer.Option(help="checkpoint name or step (default: latest)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
) -> None:
    """Export a run as a Hugging Face folder (LlamaForCausalLM or GPT2LMHeadModel + tokenizer)."""
    from smallscale.export import export_hf

    if to != "hf":
        raise UserError(f"--to {to!r} is not supported; use --to hf")
    path = export_hf(run_dir, out_dir, checkpoint=checkpoint, overwrite=overwrite)
    stdout.print(f"exported to {path} (load with transformers.AutoModelForCausalLM.from_pretrained)")


@app.command("generate")
def generate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt text (repeatable)")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 100,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="sample from the k likeliest tokens")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass")] = 0.95,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    checkpoint: Annotated[Optional[str], typer.Option(help="checkpoint name or step (default: latest)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Sample continuations from a trained run (KV cache)."""
    from smallscale.eval.generate import generate_text
    from smallscale.eval.runs import load_run

    run = load_run(run_dir, checkpoint=checkpoint, device=device)
    outputs = generate_text(run.model, run.tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed)  # fmt: skip
    for p, out in zip(prompt, outputs, strict=True):
        print(p + out)
        print("-" * 40)


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Optional[Path], typer.Argument(help="a run directory")] = None,
    tasks: Annotated[str, typer.Option(help="comma-separated task names (see --list) or generic:SPEC.yaml")] = "heldout",
    limit: Annotated[Optional[int], typer.Option(help="examples per task (BLiMP: per paradigm) for quick checks")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="batch size (default: per task)")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="checkpoint name or step (default: latest)")] = None,
    data_root: Annotated[Optional[str], typer.Option(help="folder of the evaluation data (else $SMALLSCALE_DATA_ROOT)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="TASK.KEY=VALUE task setting, e.g. generation.temperature=0")] = None,
    list_tasks: Annotated[bool, typer.Option("--list", help="list the task names and exit")] = False,
) -> None:
    """Evaluate a run; each task writes RUN_DIR/eval/<task>.json (metrics, n, exact settings)."""
    from smallscale.config import parse_overrides

    from smallscale.eval.runs import load_run
    from smallscale.eval.tasks.registry import RUN_TASKS, TASKS, run_task, save_result

    if list_tasks:
        stdout.print("\n".join([*TASKS, *RUN_TASKS, "generic:SPEC.yaml"]))
        return
    if run_dir is None:
        raise UserError("give a run directory: smallscale eval RUN_DIR --tasks heldout,blimp")
    task_options = parse_overrides(option or [])
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    for extra in set(task_options) - set(names):
        raise UserError(f"--option for {extra!r}, which is not among --tasks {','.join(names)}")
    run = load_run(run_dir, checkpoint=checkpoint, device=device)
    table = Table(title=f"{run_dir} (step {run.step})")
    for col in ("task", "metric", "value", "n", "seconds", "file"):
        table.add_column(col)
    for name in names:
        try:
            result = run_task(name, run, data_root=data_root, limit=limit, batch_size=batch_size, device=device,
                              **task_options.get(name, {}))  # fmt: skip
        except TypeError as exc:  # an option the task does not take
            raise UserError(f"task {name!r}: {exc}") from None
        path = save_result(run_dir, name, result)
        metric = next((k for k in ("bpb", "acc", "accuracy", "chrf") if isinstance(result.get(k), (int, float))), None)
        value = f"{result[metric]:.4f}" if metric else "-"
        table.add_row(name, metric or "-", value, str(result.get("n", "-")), f"{result['wall_s']:.1f}", str(path))
    stdout.print(table)


@app.command("quickstart")
def quickstart(
    data_dir: Annotated[Path, typer.Option(help="dataset folder")] = Path(DEFAULT_DATASET),
    config: Annotated[Path, typer.Option(help="training config")] = Path("configs/quickstart-train.yaml"),
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """The main job on the built-in default: prepare tinyshakespeare, train a cpu-2m model, report.

    Idempotent: an existing dataset is reused and an existing run is resumed (or just reported).
    """
    from smallscale.config import validate
    from smallscale.data.shards import PrepareConfig, prepare
    from smallscale.train.trainer import load_run_config, resume, train

    if not (data_dir / "manifest.json").exists():
        cfg = validate(PrepareConfig, {"source": DEFAULT_SOURCE, "out": str(data_dir), "vocab_size": 4096}, source="quickstart")
        _print_manifest_summary(prepare(cfg, progress=progress), data_dir)
    run_cfg = load_run_config(config, [f"data.path={data_dir}"])
    run_dir = Path(run_cfg.out)
    summary = resume(run_dir, progress=progress) if (run_dir / "config.yaml").exists() else train(run_cfg, progress=progress)
    _print_summary(summary)
    stdout.print(f"run directory: {run_dir}  (metrics.jsonl, summary.json, checkpoints/)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("train", "resume", "quickstart"):
        from smallscale.launch import ensure_cpu_allocator_env

        ensure_cpu_allocator_env()  # re-exec once with glibc malloc thresholds raised (CPU speed)
    try:
        app()
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
