"""`smallscale human-eval serve|invite|raters|revoke|results`: collect blind pairwise votes from
invited raters, then analyse them.

Mounted by smallscale/cli.py as `human-eval`; also runnable alone as `python -m smallscale.humaneval.cli`.
"""

from __future__ import annotations

import signal
import sys
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from smallscale.errors import UserError

humaneval_app = typer.Typer(no_args_is_help=True, help="Blind pairwise human evaluation of generated text.")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080
PathsArg = Annotated[list[Path] | None, typer.Argument(help="the paths given to `serve` (a study dir), to find its vote database")]
DbOption = Annotated[Path | None, typer.Option(help="vote database (default: STUDY_DIR/human_eval.sqlite, else ./human_eval.sqlite)")]


def _db_path(paths: list[Path] | None, db: Path | None) -> Path:
    from smallscale.humaneval.items import default_db

    return db if db is not None else default_db(paths or [])


def _existing_db(paths: list[Path] | None, db: Path | None) -> Path:
    path = _db_path(paths, db)
    if not path.is_file():
        raise UserError(f"there is no vote database at {str(path)!r}; give the study dir or --db, or invite a rater first")
    return path


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _when(timestamp: str | None) -> str:
    """A stored ISO 8601 UTC timestamp to the minute, for people: '2026-11-29 19:26 UTC'."""
    return "never" if timestamp is None else f"{timestamp[:16].replace('T', ' ')} UTC"


@humaneval_app.command("serve")
def serve_cmd(
    paths: Annotated[list[Path], typer.Argument(help="a study dir, or run dirs with eval/samples.jsonl")],
    host: Annotated[str, typer.Option(help="interface to listen on (default: this machine only)")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one")] = DEFAULT_PORT,
    db: DbOption = None,
    threads: Annotated[int, typer.Option(help="server worker threads")] = 8,
) -> None:
    """Serve the rater web app to invited raters; votes go to SQLite and survive restarts."""
    from smallscale.humaneval import store
    from smallscale.humaneval.app import LOCAL_HOSTS, create_server
    from smallscale.humaneval.items import load_pool

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; use 1-65535 (or 0 for any free one)")
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    pool = load_pool(paths)
    db_path = _db_path(paths, db)
    try:
        server = create_server(pool, db_path, host=host, port=port, threads=threads)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host") from None
    with closing(store.connect(db_path)) as conn:
        n_active = sum(r.revoked_at is None for r in store.list_raters(conn))
    print(
        f"{len(pool.systems)} systems ({', '.join(pool.systems)}), {len(pool.items)} prompts, "
        f"{len(pool.comparisons)} comparisons per rater; votes go to {db_path}"
    )
    if n_active == 0:
        print(f"no raters invited yet: invite each with `smallscale human-eval invite NAME --db {db_path}`")
    if host not in LOCAL_HOSTS:
        print(f"warning: listening on {host} over plain HTTP: invite links and votes cross the network unencrypted")
    print(f"serving on http://{_url_host(host)}:{server.effective_port}/  (Ctrl-C to stop)", flush=True)
    # SIGTERM (kill, systemd, a scheduler) stops it as Ctrl-C does. A process started in the
    # background by a script inherits SIGINT ignored, and Python then leaves Ctrl-C ignored: without
    # this, such a server could only be killed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@humaneval_app.command("invite")
def invite_cmd(
    name: Annotated[str, typer.Argument(help="the rater's name, shown to them and in the results (not a secret)")],
    paths: PathsArg = None,
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="host in the link: the address raters reach `serve` at")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="port in the link: serve's --port")] = DEFAULT_PORT,
    days: Annotated[int | None, typer.Option(help="days until the link stops working (default: never)")] = None,
) -> None:
    """Invite a rater: print their personal link, once. Only a hash of it is stored."""
    from smallscale.humaneval import store

    try:
        name = store.valid_rater_name(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; give serve's port (1-65535)")
    if days is not None and days < 1:
        raise UserError(f"--days must be >= 1, got {days}; leave it out for a link that does not expire")
    db_path = _db_path(paths, db)
    store.init_db(db_path)
    expires_at = datetime.now(UTC) + timedelta(days=days) if days is not None else None
    with closing(store.connect(db_path)) as conn:
        rater, token = store.add_rater(conn, name, expires_at)
    until = f", valid until {_when(store.iso(expires_at))}" if expires_at is not None else ""
    print(f"invited {rater.name} as rater {rater.id} in {db_path}{until}")
    print(f"their personal link (shown only now; send it to them alone): http://{_url_host(host)}:{port}/r/{token}")


@humaneval_app.command("raters")
def raters_cmd(paths: PathsArg = None, db: DbOption = None) -> None:
    """List the invited raters (never their links) with their status and vote counts."""
    from smallscale.humaneval import store

    db_path = _existing_db(paths, db)
    store.init_db(db_path)
    with closing(store.connect(db_path)) as conn:
        raters = store.list_raters(conn)
    if not raters:
        print(f"no raters invited in {db_path} yet; invite one with `smallscale human-eval invite NAME --db {db_path}`")
        return
    now = store.now_iso()
    width = max(len(r.name) for r in raters)
    print(f"{'id':>4}  {'name':<{width}}  {'votes':>5}  {'status':<8}  {'invited':<20}  expires")
    for r in raters:
        status = "revoked" if r.revoked_at else "expired" if r.expires_at and r.expires_at <= now else "active"
        print(f"{r.id:>4}  {r.name:<{width}}  {r.n_votes:>5}  {status:<8}  {_when(r.created_at):<20}  {_when(r.expires_at)}")


@humaneval_app.command("revoke")
def revoke_cmd(
    rater_id: Annotated[int, typer.Argument(help="the rater's id, as `raters` lists it")],
    paths: PathsArg = None,
    db: DbOption = None,
) -> None:
    """Revoke a rater's link: it and their open sessions stop working at once; their votes stay counted."""
    from smallscale.humaneval import store

    db_path = _existing_db(paths, db)
    store.init_db(db_path)
    with closing(store.connect(db_path)) as conn:
        rater = store.revoke_rater(conn, rater_id)
    if rater is None:
        raise UserError(f"there is no rater {rater_id} in {str(db_path)!r}; `smallscale human-eval raters` lists their ids")
    print(f"revoked rater {rater.id} ({rater.name}); their {rater.n_votes} vote(s) stay in the results")


@humaneval_app.command("results")
def results_cmd(
    path: Annotated[Path, typer.Argument(help="a study dir (with human_eval.sqlite) or a vote database file")],
    out: Annotated[Path | None, typer.Option(help="output folder (default: human_eval/ beside the database)")] = None,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the Bradley-Terry intervals")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    include_uninvited: Annotated[
        bool, typer.Option(help="also count votes from before rater invites in win rates and Bradley-Terry (never in agreement)")
    ] = False,
) -> None:
    """Win rates, Bradley-Terry scores and rater agreement: printed, and written as JSON/Markdown/HTML/PNG."""
    from smallscale.humaneval.results import results_for, summary_markdown

    summary, files = results_for(path, out, n_boot=n_boot, seed=seed, include_uninvited=include_uninvited)
    print(summary_markdown(summary))
    for file in files:
        print(f"wrote {file}")


if __name__ == "__main__":
    try:
        humaneval_app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
