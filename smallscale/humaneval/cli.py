"""`smallscale human-eval serve|results`: collect blind pairwise votes, then analyse them.

Mounted by smallscale/cli.py as `human-eval`; also runnable alone as `python -m smallscale.humaneval.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from smallscale.errors import UserError

humaneval_app = typer.Typer(no_args_is_help=True, help="Blind pairwise human evaluation of generated text.")


@humaneval_app.command("serve")
def serve_cmd(
    paths: Annotated[list[Path], typer.Argument(help="a study dir, or run dirs with eval/samples.jsonl")],
    host: Annotated[str, typer.Option(help="interface to listen on (default: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one")] = 8080,
    db: Annotated[Path | None, typer.Option(help="vote database (default: STUDY_DIR/human_eval.sqlite, else ./human_eval.sqlite)")] = None,
    threads: Annotated[int, typer.Option(help="server worker threads")] = 8,
) -> None:
    """Serve the rater web app; votes go to SQLite and survive restarts."""
    from smallscale.humaneval.app import LOCAL_HOSTS, create_server
    from smallscale.humaneval.items import default_db, load_pool

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; use 1-65535 (or 0 for any free one)")
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    pool = load_pool(paths)
    db_path = db if db is not None else default_db(paths)
    try:
        server = create_server(pool, db_path, host=host, port=port, threads=threads)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host") from None
    print(
        f"{len(pool.systems)} systems ({', '.join(pool.systems)}), {len(pool.items)} prompts, "
        f"{len(pool.comparisons)} comparisons per rater; votes go to {db_path}"
    )
    if host not in LOCAL_HOSTS:
        print(f"warning: listening on {host}: anyone who can reach it can vote (there are no passwords)")
    shown_host = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown_host}:{server.effective_port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@humaneval_app.command("results")
def results_cmd(
    path: Annotated[Path, typer.Argument(help="a study dir (with human_eval.sqlite) or a vote database file")],
    out: Annotated[Path | None, typer.Option(help="output folder (default: human_eval/ beside the database)")] = None,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the Bradley-Terry intervals")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
) -> None:
    """Win rates, Bradley-Terry scores and rater agreement: printed, and written as JSON/Markdown/HTML/PNG."""
    from smallscale.humaneval.results import results_for, summary_markdown

    summary, files = results_for(path, out, n_boot=n_boot, seed=seed)
    print(summary_markdown(summary))
    for file in files:
        print(f"wrote {file}")


if __name__ == "__main__":
    try:
        humaneval_app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
