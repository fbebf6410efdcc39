"""The `smallscale` command. Subcommands map 1:1 to the stages in ARCHITECTURE.md.

User mistakes surface as `UserError` and print as one line (exit status 2), never a traceback.
A write that fails for want of space (full disk or quota, file size limit) prints one line naming
the file, with exit status 1: the command was right, and the same command succeeds once there is room.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from smallscale.errors import Stopped, UserError
from smallscale.humaneval.cli import humaneval_app
from smallscale.io import no_space_message

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Small-scale LM pretraining research.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare corpora: tokenizer + token shards + manifest.")
model_app = typer.Typer(no_args_is_help=True, help="Model presets.")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
study_app = typer.Typer(no_args_is_help=True, help="Studies: grids of runs, results table, report.")
app.add_typer(study_app, name="study")
app.add_typer(humaneval_app, name="human-eval")
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
    val_source: Annotated[Optional[str], typer.Option(help="a source whose documents are the val split instead (e.g. a dev set)")] = None,
    val_tokens: Annotated[int, typer.Option(help="at most this many val tokens (the rest of the held-out documents are trained on); 0: no cap")] = 10_000_000,
    seed: Annotated[int, typer.Option(help="seed of the split and of the document order")] = 1234,
    shard_tokens: Annotated[int, typer.Option(help="max tokens per shard file")] = 100_000_000,
    tokenizer_train_bytes: Annotated[int, typer.Option(help="bytes of text to train the tokenizer on")] = 200_000_000,
    part_bytes: Annotated[int, typer.Option(help="bytes per part (unit of parallel work) of a large line-based file")] = 64 * 2**20,
    workers: Annotated[Optional[int], typer.Option(help="worker processes (default: all cores); with --executor slurm, array tasks (default 64)")] = None,
    executor: Annotated[str, typer.Option(help="where the steps run: local | slurm (a job array, via submitit) | submitit-local")] = "local",
    slurm: Annotated[Optional[list[str]], typer.Option(help="a submitit parameter for --executor slurm, KEY=VALUE (repeatable), e.g. slurm_partition=cpu")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild OUT from scratch even if it holds a dataset")] = False,
) -> None:
    """Read documents, train/load a tokenizer, write token shards and manifest.json.

    A complete dataset in OUT made with the same settings is reused; with other settings it is
    refused unless --force is given."""
    from smallscale.config import validate
    from smallscale.data.shards import PrepareConfig, prepare

    val_tokens = val_tokens or None
    if workers is None and executor == "slurm":
        workers = 64
    fields = {k: v for k, v in locals().items() if k in PrepareConfig.model_fields}
    fields["out"] = str(out)
    if workers is None:
        fields.pop("workers")
    cfg = validate(PrepareConfig, fields, source="data prepare")
    manifest = prepare(cfg, force=force, executor=executor, cluster_parameters=_key_values(slurm or [], "--slurm"))
    _print_manifest_summary(manifest, out)


def _key_values(items: list[str], option: str) -> dict:
    """KEY=VALUE strings as a dict, each VALUE read as YAML (so numbers are numbers)."""
    import yaml

    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{option} {item!r} is not KEY=VALUE; write e.g. {option} slurm_partition=cpu")
        pairs[key] = yaml.safe_load(value)
    return pairs


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


@data_app.command("mix")
def data_mix(
    spec: Annotated[Path, typer.Argument(help="mixture spec YAML: sources: {NAME: {weight: W, source: S, ...}}, tokenizer, vocab_size, ...")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output dataset folder")],
    workers: Annotated[Optional[int], typer.Option(help="worker processes (default: all cores)")] = None,
    data_root: Annotated[Optional[str], typer.Option(help="folder of built-in corpora (else $SMALLSCALE_DATA_ROOT)")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild OUT from scratch even if it holds a mixture")] = False,
) -> None:
    """Mix sources by weight with one shared tokenizer: every prefix of the train stream (every token
    budget) keeps the proportions by tokens (see smallscale/data/mixture.py).

    A complete mixture in OUT made with the same spec is reused; with another it is refused unless --force."""
    from smallscale.data.mixture import load_mixture_spec, prepare_mixture

    manifest = prepare_mixture(load_mixture_spec(spec, out, workers=workers, data_root=data_root), force=force)
    _print_manifest_summary(manifest, out)
    mixture = manifest["mixture"]
    table = Table(title="sources (train split)")
    for col in ("source", "weight", "share", "documents used", "tokens", "bytes"):
        table.add_column(col, justify="right")
    for name, counts in manifest["splits"]["train"]["sources"].items():
        table.add_row(name, f"{mixture['weights'][name]:.4f}", f"{counts['share']:.4f}",
                      f"{counts['documents']:,} of {counts['available_documents']:,}", f"{counts['tokens']:,}", f"{counts['bytes']:,}")  # fmt: skip
    stdout.print(table)
    within = mixture["prefix_tolerance"]["train"]
    held = (f"every prefix of at least {within['within_from_tokens']:,} tokens holds each source's share within "
            f"{within['tolerance']:.0%}" if within["within_from_tokens"] is not None else
            f"the shares drift by more than {within['tolerance']:.0%} even over the whole stream: its documents are long "
            "for its length (split them smaller with split_by)")  # fmt: skip
    stdout.print(f"train stream: {mixture['stop']['train']}; {held} (largest deviation {within['max_deviation_tokens']:,.0f} tokens)")


@data_app.command("info")
def data_info(dataset: Annotated[Path, typer.Argument(help="a prepared dataset folder")]) -> None:
    """Show a prepared dataset's manifest summary."""
    from smallscale.data.shards import load_manifest

    _print_manifest_summary(load_manifest(dataset), dataset)


@data_app.command("verify")
def data_verify(dataset: Annotated[Path, typer.Argument(help="a prepared dataset folder")]) -> None:
    """Check every shard (size, sha256, token ids < vocab size) and the tokenizer against the manifest.

    Prints one OK line, or one line per problem and exits with status 1."""
    from smallscale.data.shards import load_manifest, verify_dataset

    problems = verify_dataset(dataset)
    for file, what in problems:
        typer.echo(f"{dataset / file}: {what}")
    if problems:
        raise typer.Exit(1)
    manifest = load_manifest(dataset)
    splits = manifest["splits"].values()
    typer.echo(
        f"OK {dataset}: {sum(len(s['shards']) for s in splits)} shards, {sum(s['tokens'] for s in splits):,} tokens "
        f"match the manifest (sizes, sha256, token ids < {manifest['vocab_size']:,}); tokenizer.json matches"
    )


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
    table = Table(caption="FLOPs/token = 6N + 12·n_layer·d_model·seq_len (N: matmul parameters, the tied embedding once)")
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the run's size, compute and predicted peak memory; train nothing")] = False,
    device_memory: Annotated[Optional[str], typer.Option(help="the device's memory, e.g. 80GiB (default: NVML on a GPU, available RAM on CPU)")] = None,
) -> None:
    """Train a model: `smallscale train CONFIG.yaml train.tokens=2e6 optim.name=lion ...`.

    A run whose predicted peak memory (smallscale/train/memory.py) exceeds the device's is refused
    before anything is allocated."""
    from smallscale.train.trainer import load_run_config, train

    overrides = list(ctx.args)
    if config is not None and "=" in str(config) and not config.exists():
        overrides.insert(0, str(config))
        config = None
    cfg = load_run_config(config, overrides)
    _set_device_memory(device_memory)
    if dry_run:
        _train_dry_run(cfg)
        return
    try:
        summary = train(cfg, progress=progress)
    except Exception as exc:  # once the run exists, `train` into it again is refused: the way on is `resume`
        line = no_space_message(exc, then=f"resume the run: smallscale resume {cfg.out}")
        if line is None or not (Path(cfg.out) / "config.yaml").exists():
            raise
        _no_space_exit(line)
    if os.environ.get("RANK", "0") == "0":
        _print_summary(summary)


def _set_device_memory(size: str | None) -> None:
    """--device-memory, passed on through the environment to every process that trains (study
    workers, torchrun ranks, SLURM jobs)."""
    from smallscale.train.memory import DEVICE_MEMORY_ENV, parse_size

    if size is not None:
        parse_size(size)  # a bad size is refused here, in one line
        os.environ[DEVICE_MEMORY_ENV] = size


def _train_dry_run(cfg) -> None:
    """What `train` would do: the model, batches, compute and predicted peak memory, then the
    memory check (a refusal exits 2 like the real run would)."""
    import torch

    from smallscale.data.shards import load_manifest
    from smallscale.model.gpt import GPT
    from smallscale.train import memory
    from smallscale.train.trainer import plan_batches

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = cfg.model.build(load_manifest(cfg.data.path)["vocab_size"])
    device_type = memory.planned_device_type(cfg.train.device)
    precision = memory.planned_precision(cfg.train.precision, device_type)
    accum, total_steps = plan_batches(cfg, model_cfg.seq_len, world_size)
    with torch.device("meta"):
        model = GPT(model_cfg)
    est = memory.estimate_run(cfg, model_cfg, precision, device_type, world_size, memory.val_tokens_of(cfg.data.path))
    tokens = total_steps * cfg.train.global_batch_tokens
    stdout.print(f"run {cfg.out}: {model.num_params():,} parameters, {total_steps:,} steps x {cfg.train.global_batch_tokens:,} "
                 f"tokens ({accum} micro-batches of {cfg.train.micro_batch} x {model_cfg.seq_len} per device), "
                 f"{model.flops_per_token() * tokens:.3g} FLOPs; {device_type}, {precision}, {world_size} process(es)")  # fmt: skip
    table = Table("memory (per process)", "bytes", title="predicted peak memory", caption=f"peak at: {est.phase.replace('_', ' ')}")
    labels = {"step_no_checkpointing": "step: activations, gradients, temporaries (no checkpointing)",
              "step_checkpointing": "step: activations, gradients, temporaries (checkpointing)",
              "eval": f"evaluation: {cfg.train.eval_batch} sequences of logits"}  # fmt: skip
    for name, value in est.breakdown().items():
        table.add_row(labels.get(name, name.replace("_", " ")), memory.format_bytes(value))
    stdout.print(table)
    available, source = memory.available_memory(device_type)
    stdout.print(f"device memory: {memory.format_bytes(available) if available else 'unknown'} ({source})")
    memory.check_fits(Path(cfg.out).name or cfg.out, est, available, source, world_size if device_type == "cpu" else 1)
    stdout.print("fits: yes")


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
    license_id: Annotated[str, typer.Option("--license", help="the model's license for its card (a Hub license id, e.g. apache-2.0)")] = "unknown",
    language: Annotated[Optional[list[str]], typer.Option(help="a language of the model for its card, ISO 639-1 (repeatable; default: a built-in corpus's)")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="then upload the folder to this Hub model repo (owner/name)")] = None,
    private: Annotated[bool, typer.Option(help="with --push-to-hub: create the repo private")] = False,
) -> None:
    """Export a run as a Hugging Face folder (LlamaForCausalLM or GPT2LMHeadModel + tokenizer + a
    model card README.md), loadable with transformers' Auto classes and pipeline("text-generation")."""
    from smallscale.export import export_hf
    from smallscale.export import push_to_hub as push

    if to != "hf":
        raise UserError(f"--to {to!r} is not supported; use --to hf")
    path = export_hf(run_dir, out_dir, checkpoint=checkpoint, overwrite=overwrite, name=push_to_hub or out_dir.name,
                     license_id=license_id, languages=language)  # fmt: skip
    stdout.print(f"exported to {path} (load with transformers.AutoModelForCausalLM.from_pretrained; model card {path / 'README.md'})")
    if push_to_hub:
        stdout.print(f"pushed to https://huggingface.co/{push_to_hub}: {push(path, push_to_hub, private=private)}")


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
        metric = next((k for k in ("bpb", "bpb_1x", "acc", "accuracy", "chrf") if isinstance(result.get(k), (int, float))), None)
        value = f"{result[metric]:.4f}" if metric else "-"
        table.add_row(name, metric or "-", value, str(result.get("n", "-")), f"{result['wall_s']:.1f}", str(path))
    stdout.print(table)


@app.command("quickstart")
def quickstart(
    study: Annotated[Path, typer.Option(help="the study file")] = Path("configs/studies/quickstart.yaml"),
    out: Annotated[Path, typer.Option("--out", "-o", help="study directory")] = Path("studies/quickstart"),
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """The main job on the built-in default: run the quickstart study on Tiny Shakespeare (CPU),
    evaluate every run and write the report.

    What the study runs is stated in one place, the study file (its header and description):
    `smallscale study plan configs/studies/quickstart.yaml` lists every run with its size and cost.
    Idempotent: rerun it and finished runs are skipped, interrupted ones resume.
    """
    if not study.exists():
        raise UserError(f"study file {str(study)!r} not found; run from the repository root or pass --study")
    study_run(study, out=out, executor=None, workers=None, retry_failed=True, report=True, progress=progress)


# ----------------------------------------------------------------------------- studies
@study_app.command("run")
def study_run(
    study: Annotated[Path, typer.Argument(help="a study file (see configs/studies/)")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="study directory (default: studies/<name>)")] = None,
    executor: Annotated[Optional[str], typer.Option(help="local | pool | slurm | submitit-local (default: the file's)")] = None,
    workers: Annotated[Optional[int], typer.Option(help="concurrent runs for the pool executor (default: one per GPU, "
                                                   "else one per usable CPU core); the CPU cores are divided among them")] = None,
    retry_failed: Annotated[bool, typer.Option(help="run failed runs again (they resume from checkpoints)")] = True,
    report: Annotated[bool, typer.Option(help="write the results table and the report at the end")] = True,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    device_memory: Annotated[Optional[str], typer.Option(help="each device's memory, e.g. 80GiB (default: NVML on a GPU, available RAM on CPU)")] = None,
) -> None:
    """Prepare the datasets, run every run not done yet (train + evals), write results and report.
    A run whose predicted peak memory exceeds the device's is refused before any run starts.

    Idempotent: rerun it after an interruption and finished runs are skipped, the others resume.
    Two at once on one study share it: each trains the runs the other does not own, then waits for
    the other's (see smallscale/study/executors.py).
    """
    import time

    from smallscale.lock import Owner, hold
    from smallscale.study.executors import execute, plan
    from smallscale.study.grid import load_study

    started = time.perf_counter()
    _set_device_memory(device_memory)
    spec = load_study(study)
    study_dir = out or Path("studies") / spec.name

    def waiting(owner: Owner) -> None:
        console.print(f"waiting for {owner.describe()} ({owner.purpose}) to finish with {study_dir}")

    with hold(study_dir, "study run: planning", wait=True, on_wait=waiting):
        spec, runs = plan(study, study_dir, progress=progress, spec=spec)
    _refuse_unfit_runs(runs)
    console.print(f"study {spec.name}: {len(runs)} runs in {study_dir}")
    counts = execute(study_dir, runs, kind=executor or spec.executor.kind, workers=workers or spec.executor.workers,
                     slurm=spec.executor.slurm, retry_failed=retry_failed, progress=progress)  # fmt: skip
    with hold(study_dir, "study run: results and report", wait=True, on_wait=waiting):
        _finish_study(study_dir, report)
    stdout.print(", ".join(f"{n} {state}" for state, n in counts.items() if n) + f"  ({time.perf_counter() - started:.0f} s)")
    if counts["failed"] or counts["interrupted"]:
        console.print(f"some runs did not finish; see `smallscale study status {study_dir}`")
        raise typer.Exit(1)


def _refuse_unfit_runs(runs: list) -> None:
    """`study run`: refuse, before any run starts, a study with a run that cannot fit its device."""
    from smallscale.data.shards import load_manifest
    from smallscale.train import memory

    manifests = {path: load_manifest(path) for path in {r.config["data"]["path"] for r in runs}}
    estimates = []
    for run in runs:
        manifest = manifests[run.config["data"]["path"]]
        est = memory.estimate_config(run.config, manifest["vocab_size"], manifest["splits"].get("val", {}).get("tokens"))
        estimates.append((run.id, memory.planned_device_type(run.config["train"]["device"]), est))
    memory.check_all_fit(estimates)


def _finish_study(study_dir: Path, report: bool, n_boot: int = 200) -> None:
    from smallscale.study.results import write_results

    csv_path, _ = write_results(study_dir)
    stdout.print(f"results: {csv_path} (+ .parquet)")
    if report:
        import time

        from smallscale.study.report import write_report

        started = time.perf_counter()
        console.print(f"writing the report ({n_boot} bootstrap resamples per fit; a minute or two on a small CPU) ...")
        path = write_report(study_dir, n_boot=n_boot)
        stdout.print(f"report: {path} ({time.perf_counter() - started:.0f} s)")


@study_app.command("plan")
def study_plan(
    study: Annotated[Path, typer.Argument(help="a study file")],
    flops_per_s: Annotated[float, typer.Option(help="sustained training FLOP/s per device for the time estimate")] = 4e14,
    watts: Annotated[Optional[float], typer.Option(help="average power per device while training, W (default: this machine at full load, as CodeCarbon models it)")] = None,
    device_memory: Annotated[Optional[str], typer.Option(help="each device's memory, e.g. 80GiB (default: NVML on a GPU, available RAM on CPU)")] = None,
) -> None:
    """List the runs a study file expands to, with tokens, FLOPs, predicted peak memory, an estimated
    device time on 1 and 8 devices, disk, energy and CO2 (dry run). Refuses a study with a run that
    cannot fit the device's memory (smallscale/train/memory.py).

    Vocabulary sizes come from each dataset's `vocab_size` (or its manifest when `path` is given).
    Energy = watts x hours; CO2 = energy x the carbon intensity CodeCarbon gives for each run's
    train.energy.country (its world average when unset).
    """
    import torch

    from smallscale.data.shards import load_manifest
    from smallscale.model.gpt import GPT
    from smallscale.study.grid import expand, load_study
    from smallscale.train.trainer import ModelSection

    spec = load_study(study)
    vocab = {n: (load_manifest(d.path)["vocab_size"] if d.path else (d.model_extra or {}).get("vocab_size", 8192))
             for n, d in spec.datasets.items()}  # fmt: skip
    from smallscale.train import memory

    _set_device_memory(device_memory)
    power = _plan_power(watts)
    table = Table("run", "params", "tokens", "FLOPs", "hours", "peak mem", *(("kWh", "kg CO2eq") if power else ()))
    estimates: list[tuple[str, str, memory.MemoryEstimate]] = []
    run_hours: list[float] = []
    total_flops = total_kwh = total_co2 = 0.0
    grids: dict[tuple[str | None, str | None], float | None] = {}  # (country, region) -> g CO2eq/kWh
    runs = expand(spec, Path("studies") / spec.name, vocab)
    for run in runs:
        with torch.device("meta"):
            model = GPT(ModelSection(**run.config["model"]).build(vocab[run.dataset]))
        tokens = run.config["train"]["tokens"] or run.config["train"]["steps"] * run.config["train"]["global_batch_tokens"]
        flops = model.flops_per_token() * tokens
        total_flops += flops
        hours = flops / flops_per_s / 3600
        est = memory.estimate_config(run.config, vocab[run.dataset])
        estimates.append((run.id, memory.planned_device_type(run.config["train"]["device"]), est))
        run_hours.append(hours)
        row = [run.id, f"{model.num_params():,}", f"{tokens:,}", f"{flops:.3g}", f"{hours:.2f}", memory.format_bytes(est.peak)]
        if power:
            grid = _plan_grid(run.config["train"].get("energy") or {}, grids)
            kwh = power[0] * hours / 1000
            total_kwh += kwh
            if grid is None:  # no CodeCarbon, so no grid intensities: kWh only
                total_co2 = float("nan")
            else:
                total_co2 += kwh * grid / 1000
            row += [f"{kwh:.3g}", "-" if grid is None else f"{kwh * grid / 1000:.3g}"]
        table.add_row(*row)
    stdout.print(table)
    stdout.print(f"{len(runs)} runs, {total_flops:.3g} FLOPs = {total_flops / flops_per_s / 3600:.1f} device-hours at "
                 f"{flops_per_s:.3g} FLOP/s (6N + 12·n_layer·d_model·seq_len per token)")  # fmt: skip
    _plan_capacity(spec, runs, estimates, run_hours, vocab)
    memory.check_all_fit(estimates)
    if not power:
        stdout.print("energy and CO2: not estimated without CodeCarbon (pip install 'smallscale[energy]')")
        return
    if any(g is None for g in grids.values()):
        stdout.print(f"≈ {total_kwh:.3g} kWh, estimated as {power[0]:g} W ({power[1]}) x device-hours; CO2 not estimated: "
                     "grid intensities come from CodeCarbon (pip install 'smallscale[energy]')")  # fmt: skip
        return
    where = "; ".join(f"{g:.0f} g CO2eq/kWh for {c or 'the world average'}{f' ({r})' if r else ''}" for (c, r), g in grids.items())
    stdout.print(f"≈ {total_kwh:.3g} kWh and {total_co2:.3g} kg CO2eq, estimated as {power[0]:g} W ({power[1]}) x device-hours "
                 f"x the grid's intensity from CodeCarbon's data ({where})")  # fmt: skip


def _plan_capacity(spec, runs: list, estimates: list, run_hours: list[float], vocab: dict[str, int]) -> None:
    """`study plan`'s wall-clock on 1 and 8 devices, disk, and the largest predicted peak memory."""
    from smallscale.data.shards import load_manifest
    from smallscale.train import memory

    total = sum(run_hours)
    eight = _pool_hours(run_hours, 8)
    stdout.print(f"wall-clock: {total:.1f} h on 1 device; {eight:.1f} h on 8 (one run per device, longest first; "
                 f"the longest run takes {max(run_hours, default=0):.1f} h)")  # fmt: skip
    ckpt = sum(r.config["train"]["keep_checkpoints"] * memory.checkpoint_bytes(est) for r, (_, _, est) in zip(runs, estimates, strict=True))
    expected_tokens = spec.expected.get("dataset_tokens", {})
    lines, data_bytes = [], 0
    for name, ds in spec.datasets.items():
        if ds.path:
            manifest = load_manifest(ds.path)
            tokens, text_per_token = sum(sp["tokens"] for sp in manifest["splits"].values()), manifest["splits"]["train"]["bytes_per_token"]
            known = "prepared"
        else:
            budgets = [r.config["data"]["token_budget"] or r.config["train"]["tokens"] or 0 for r in runs if r.dataset == name]
            tokens = expected_tokens.get(name) or max(budgets, default=0)
            text_per_token = spec.expected.get("bytes_per_token")
            known = "expected.dataset_tokens" if name in expected_tokens else "at least the largest budget"
        shards = tokens * (2 if vocab[name] <= 2**16 else 4)  # uint16 token ids up to 65536 (data/shards.py)
        data_bytes += shards
        text = f", ~{memory.format_bytes(tokens * text_per_token)} of text at {text_per_token:.2f} bytes/token" if text_per_token else ""
        lines.append(f"{name}: {tokens:,.0f} tokens ({known}) -> {memory.format_bytes(shards)} of shards{text}")
    stdout.print(f"disk: {memory.format_bytes(ckpt + data_bytes)} = checkpoints {memory.format_bytes(ckpt)} (train.keep_checkpoints "
                 f"per run, fp32 weights + optimizer state) + datasets {memory.format_bytes(data_bytes)} ({'; '.join(lines)})")  # fmt: skip
    if estimates:
        name, kind, est = max(estimates, key=lambda e: e[2].peak)
        available, source = memory.available_memory(kind)
        device = f"{memory.format_bytes(available)} ({source})" if available else source
        stdout.print(f"peak memory per device: at most {memory.format_bytes(est.peak)} (run {name}, at {est.phase.replace('_', ' ')}); "
                     f"device: {device}")  # fmt: skip


def _pool_hours(hours: list[float], devices: int) -> float:
    """Wall-clock of independent runs on `devices` devices, each next run (longest first) on the
    device that frees up first: what the pool executor and a SLURM array do."""
    loads = [0.0] * devices
    for h in sorted(hours, reverse=True):
        loads[loads.index(min(loads))] += h
    return max(loads, default=0.0)


def _plan_power(watts: float | None) -> tuple[float, str] | None:
    """(W per device, where that figure comes from) for `study plan`; None without CodeCarbon and --watts."""
    from smallscale.energy import machine_watts

    if watts is not None:
        if watts <= 0:
            raise UserError(f"--watts must be positive, got {watts:g}")
        return watts, "--watts"
    try:
        power, how = machine_watts()
    except UserError:
        return None
    return power, f"this machine at full load as CodeCarbon models it: {how}"


def _plan_grid(energy: dict, grids: dict[tuple[str | None, str | None], float | None]) -> float | None:
    """g CO2eq/kWh for a run's train.energy (country, region), computed once per grid; None
    without CodeCarbon (where the intensities come from)."""
    from smallscale.energy import carbon_intensity_g_per_kwh

    key = (energy.get("country"), energy.get("region"))
    if key not in grids:
        try:
            grids[key] = carbon_intensity_g_per_kwh(*key)
        except UserError:
            grids[key] = None
    return grids[key]


@study_app.command("status")
def study_status(
    study_dir: Annotated[Path, typer.Argument(help="a study directory")],
    watch: Annotated[bool, typer.Option("--watch", help="follow the study live (as `study run` shows it) until no run is left running")] = False,
    every: Annotated[float, typer.Option(help="with --watch and output that is not a terminal: seconds between progress lines", min=1)] = 30.0,
) -> None:
    """Each run's state (done / running / interrupted / failed / pending), with the reason; for a
    running run, the process that owns it (pid, host, since) and how its liveness is known.
    With --watch: the study's progress, from its files, while other processes train it."""
    from smallscale.lock import owner
    from smallscale.study.executors import load_runs, read_status

    if watch:
        from smallscale.study.progress import watch as watch_study

        watch_study(study_dir, load_runs(study_dir), every_s=every)

    table = Table("run", "state", "stage / error", "val_bpb", "attempts", "owner")
    totals: dict[str, int] = {}
    for spec in load_runs(study_dir):
        st = read_status(study_dir, spec.id)
        totals[st["state"]] = totals.get(st["state"], 0) + 1
        detail = st.get("error") or (st.get("stage") or "" if st["state"] == "running" else "")
        bpb = f"{st['val_bpb']:.4f}" if isinstance(st.get("val_bpb"), float) else "-"
        who = f"{st['owner']} ({st['owner_liveness']})" if st["state"] == "running" else ""
        table.add_row(spec.id, st["state"], detail or "", bpb, str(st.get("attempts", 0)), who)
    stdout.print(table)
    stdout.print(", ".join(f"{n} {state}" for state, n in totals.items()))
    holder = owner(study_dir)
    if holder is not None:
        stdout.print(f"study directory in use: {holder.purpose} by {holder.describe()} ({holder.liveness})")


@study_app.command("sync")
def study_sync(
    study_dir: Annotated[Path, typer.Argument(help="a study directory")],
    to: Annotated[list[str], typer.Option("--to", help="tensorboard | wandb | trackio | mlflow (repeatable)")],
    project: Annotated[Optional[str], typer.Option(help="W&B / trackio project or MLflow experiment (default: each run's train.tracker_project)")] = None,
) -> None:
    """Replay the study's finished runs into trackers after the fact: each done run's metrics.jsonl,
    summary.json and eval results, with the study's name as the group and its axis values as tags.

    TensorBoard: RUN_DIR/tensorboard is written anew (view all with `tensorboard --logdir STUDY_DIR/runs`).
    W&B: a new run per study run, offline without an API key (upload with `wandb sync`).
    """
    from smallscale.study.executors import MANIFEST, load_runs, read_status, run_dir
    from smallscale.train.trackers import TRACKERS, RunLabels, replay

    for name in to:
        if name not in TRACKERS:
            raise UserError(f"--to {name!r} is not a tracker; choose from {', '.join(TRACKERS)}")
    runs = load_runs(study_dir)
    study_name = json.loads((study_dir / MANIFEST).read_text(encoding="utf-8")).get("name")
    done = [spec for spec in runs if read_status(study_dir, spec.id)["state"] == "done"]
    if not done:
        raise UserError(f"{str(study_dir)!r} has no finished runs to sync; see `smallscale study status {study_dir}`")
    took = dict.fromkeys(to, 0)
    for spec in done:
        tracker_project = project or spec.config.get("train", {}).get("tracker_project") or "smallscale"
        for name in replay(run_dir(study_dir, spec.id), list(to), tracker_project, RunLabels(group=study_name, tags=spec.axes)):
            took[name] += 1
    stdout.print(", ".join(f"{name}: {n} of {len(done)} finished runs" for name, n in took.items())
                 + (f" ({len(runs) - len(done)} not finished, left out)" if len(runs) > len(done) else ""))  # fmt: skip


@study_app.command("results")
def study_results(study_dir: Annotated[Path, typer.Argument(help="a study directory")]) -> None:
    """(Re)write results.csv and results.parquet from the run directories."""
    _finish_study(study_dir, report=False)


@study_app.command("report")
def study_report(
    study_dir: Annotated[Path, typer.Argument(help="a study directory")],
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the scaling-law intervals")] = 200,
) -> None:
    """(Re)write the results table and the report (report/index.html, report/report.md)."""
    if n_boot < 0:
        raise UserError(f"--n-boot must be 0 or more, got {n_boot}")
    _finish_study(study_dir, report=True, n_boot=n_boot)


@app.command("fit")
def fit_cmd(
    table: Annotated[Path, typer.Argument(help="CSV or Parquet with one row per run")],
    form: Annotated[str, typer.Option(help="chinchilla: L(N, D) = E + A/N^a + B/D^b;  n: L(N);  d: L(D)")] = "chinchilla",
    n_col: Annotated[Optional[str], typer.Option(help="parameter-count column")] = "params",
    d_col: Annotated[Optional[str], typer.Option(help="training-token column")] = "tokens_seen",
    loss_col: Annotated[str, typer.Option(help="loss column (nats; one tokenizer)")] = "val_loss",
    flop_col: Annotated[Optional[str], typer.Option(help="derive D = FLOP / 6N from this column instead of --d-col")] = None,
    drop_highest: Annotated[int, typer.Option(help="drop this many highest-loss rows")] = 0,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for intervals (0: none)")] = 200,
    scale: Annotated[str, typer.Option(help="chinchilla: 'fixed' Huber(1e-3) as published, or 'fitted' (Epoch's free-scale Huber likelihood)")] = "fixed",
    out: Annotated[Optional[Path], typer.Option(help="write the fit as JSON here")] = None,
) -> None:
    """Fit a scaling law to a results table (e.g. STUDY_DIR/results.csv), with bootstrap intervals."""
    from smallscale.io import atomic_write_json
    from smallscale.study.scaling import fit_table

    if form not in ("chinchilla", "n", "d"):
        raise UserError(f"--form must be chinchilla, n or d, got {form!r}")
    if scale not in ("fixed", "fitted"):
        raise UserError(f"--scale must be fixed or fitted, got {scale!r}")
    result = fit_table(table, form=form, n_col=n_col, d_col=None if flop_col else d_col, loss_col=loss_col,  # type: ignore[arg-type]
                       flop_col=flop_col, drop_highest=drop_highest, n_boot=bootstrap, scale=scale)  # type: ignore[arg-type]  # fmt: skip
    stdout.print_json(json.dumps(result, default=float))
    if out is not None:
        atomic_write_json(out, result)


def main() -> None:
    if len(sys.argv) > 1 and (sys.argv[1] in ("train", "resume", "quickstart") or sys.argv[1:3] == ["study", "run"]):
        from smallscale.launch import ensure_cpu_allocator_env

        ensure_cpu_allocator_env()  # re-exec once with glibc malloc thresholds raised (CPU speed)
    try:
        app()
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except Stopped as exc:
        console.print(str(exc), highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        line = no_space_message(exc)
        if line is None:
            raise
        _no_space_exit(line)


def _no_space_exit(line: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(line)}", highlight=False)
    sys.exit(1)


if __name__ == "__main__":
    main()
