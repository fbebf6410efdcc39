"""The rater web app: one prompt, two hidden systems' continuations, four answers.

A Flask app served by waitress (multi-threaded, production-grade, pure Python). Pages:
  GET  /r/TOKEN a rater's invite link (`smallscale human-eval invite`): binds this browser's session
                to that rater, then redirects to /rate so that the token leaves the address bar
  GET  /rate    the rater's open comparison, or a new one drawn uniformly at random from the
                (prompt, system pair) comparisons they have not been shown; sides are a coin flip
  POST /vote    answer a, b, tie or bad (+ optional one-line reason) for the form's token
  GET  /        redirects to /rate
Only invited raters vote: /rate and /vote answer 403 unless the signed session names a rater whose
invite is neither revoked nor expired (checked on every request), and votes are stored against the
rater's id, so a display name grants nothing. Safety: model output is untrusted, so templates
autoescape and the CSP allows scripts and styles from this origin only (no inline script, no
handlers); every POST must carry the session's CSRF token and, when the browser sends one, a
same-origin Origin; the session cookie is signed, HttpOnly and SameSite=Strict. Bad input gets a
4xx page that says what was wrong.
"""

from __future__ import annotations

import hmac
import random
import secrets
import sqlite3
import threading
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from flask import Flask, Response, abort, redirect, request, session
from jinja2 import DictLoader, Environment, StrictUndefined
from werkzeug.exceptions import HTTPException

from smallscale.humaneval import pages, store
from smallscale.humaneval.items import Pool

MAX_REASON = 280  # characters
MAX_REQUEST_BYTES = 64 * 1024  # request body; the vote form is well under 1 KiB
MAX_HEADER_BYTES = 32 * 1024  # request line + headers; cookies of other apps on this host count too
# (value stored, button label, keyboard shortcuts); A is the left side, B the right
ANSWERS = (("a", "A better", ("1", "a")), ("b", "B better", ("2", "b")), ("tie", "Tie", ("3", "t")), ("bad", "Both bad", ("4", "x")))
ANSWER_VALUES = tuple(value for value, _, _ in ANSWERS)
assert ANSWER_VALUES == store.ANSWERS
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
NO_INVITE = (
    "Voting is by invitation: open the personal link the study owner sent you. "
    "If you have none, or it no longer works, ask the study owner for a link."
)
BAD_LINK = "This invite link is not valid: it is mistyped, revoked or expired. Ask the study owner for a new link."

Comparison = tuple[str, str, str]  # (item_id, system_lo, system_hi)


def clean_reason(raw: str) -> str:
    """The reason on one line (whitespace runs collapsed); ValueError if too long or with control characters."""
    reason = " ".join(raw.split())
    if len(reason) > MAX_REASON:
        raise ValueError(f"the reason has {len(reason)} characters; use at most {MAX_REASON}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in reason):
        raise ValueError("the reason contains control characters")
    return reason


def draw_comparison(comparisons: Sequence[Comparison], seen: set[Comparison], rng: random.Random) -> Comparison | None:
    """Uniformly at random among `comparisons` not in `seen`; None when all were seen.

    Rejection sampling (uniform over the rest, fast while most are unseen), then an explicit list.
    """
    for _ in range(32):
        pick = comparisons[rng.randrange(len(comparisons))]
        if pick not in seen:
            return pick
    rest = [c for c in comparisons if c not in seen]
    return rng.choice(rest) if rest else None


def next_assignment(conn: sqlite3.Connection, pool: Pool, current: frozenset[Comparison], rater: store.Rater, rng: random.Random) -> store.Assignment | None:
    """The rater's open assignment, else a new one; one transaction, so concurrent tabs get the same."""
    with store.transaction(conn):
        assignment = store.open_assignment(conn, rater.id)
        if assignment is not None and assignment.comparison not in current:  # its run or prompt is no longer served
            store.drop_assignment(conn, assignment.token)
            assignment = None
        if assignment is None:
            pick = draw_comparison(pool.comparisons, store.seen_comparisons(conn, rater.id), rng)
            if pick is not None:
                item, lo, hi = pick
                left, right = (lo, hi) if rng.random() < 0.5 else (hi, lo)
                assignment = store.add_assignment(conn, rater, item, left, right)
    return assignment


def create_app(pool: Pool, db_path: str | Path, allowed_hosts: frozenset[str] | None = LOCAL_HOSTS) -> Flask:
    """The app for `pool`, voting into `db_path`. Requests whose Host header names another host than
    `allowed_hosts` (None: any) are refused, so that a web page cannot reach a local server by DNS
    rebinding."""
    db_path = Path(db_path)
    secret = store.init_db(db_path)
    app = Flask(__name__, static_folder=None)
    app.config.update(
        SECRET_KEY=secret,
        SESSION_COOKIE_NAME="humaneval_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        MAX_CONTENT_LENGTH=MAX_REQUEST_BYTES,
        VOTE_DB=db_path,
    )
    env = Environment(
        loader=DictLoader(pages.TEMPLATES), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    current = frozenset(pool.comparisons)
    rng = random.SystemRandom()
    per_thread = threading.local()

    def db() -> sqlite3.Connection:
        # One long-lived connection per server thread: closing the last connection to a WAL
        # database checkpoints it, which would cost milliseconds on every request.
        if getattr(per_thread, "conn", None) is None:
            per_thread.conn = store.connect(db_path)
        return per_thread.conn

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        return session["csrf"]

    def render(template: str, status: int = 200, **context) -> Response:
        html = env.get_template(template).render(csrf=csrf_token(), **context)
        return Response(html, status=status, mimetype="text/html")

    def current_rater() -> store.Rater | None:
        """The invited rater this browser's signed session names, while their invite is valid."""
        rater_id = session.get("rater_id")
        return store.active_rater(db(), rater_id) if isinstance(rater_id, int) else None

    def field(name: str) -> str:
        value = request.form.get(name)
        if value is None:
            abort(400, f"the form has no {name!r} field; reload the page and try again")
        return value

    @app.before_request
    def same_origin_only():
        if allowed_hosts is not None and request.host.rsplit(":", 1)[0].strip("[]") not in allowed_hosts:
            abort(400, f"unexpected Host {request.host[:80]!r}; open the app at http://127.0.0.1:PORT/")
        if request.method != "POST":
            return
        origin = request.headers.get("Origin")
        if origin is not None and origin != request.host_url.rstrip("/"):
            abort(403, f"form posted from {origin!r}, not from this site; votes are accepted from this site's pages only")
        if request.headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
            abort(403, "cross-site form submission refused; vote from this site's pages")
        sent, expected = request.form.get("csrf", ""), session.get("csrf", "")
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            abort(403, "the form's security token is missing or out of date; reload the page and try again")

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return render("error.html", status=exc.code or 500, code=exc.code, name=exc.name, message=exc.description)

    @app.get("/")
    def index():
        return redirect("/rate", code=303)

    @app.get("/r/<token>")
    def join(token: str):
        rater = store.rater_for_token(db(), token)
        if rater is None:
            return render("invite.html", status=403, message=BAD_LINK)
        session.clear()  # whoever used this browser before: their session and CSRF token go
        session["rater_id"] = rater.id
        return redirect("/rate", code=303)

    @app.get("/rate")
    def rate():
        rater = current_rater()
        if rater is None:
            return render("invite.html", status=403, message=NO_INVITE)
        assignment = next_assignment(db(), pool, current, rater, rng)
        done = store.count_votes(db(), rater.id)
        total = len(pool.comparisons)
        if assignment is None:
            return render("done.html", rater=rater.name, done=done, total=total)
        item = pool.items[assignment.item_id]
        return render(
            "rate.html", rater=rater.name, done=done, total=total, token=assignment.token, prompt=item.prompt,
            left=item.continuations[assignment.system_left], right=item.continuations[assignment.system_right],
            answers=ANSWERS, max_reason=MAX_REASON,
        )  # fmt: skip

    @app.post("/vote")
    def vote():
        rater = current_rater()
        if rater is None:
            return render("invite.html", status=403, message=NO_INVITE)
        token, answer = field("token"), field("answer")
        if answer not in ANSWER_VALUES:
            abort(400, f"answer {answer[:20]!r} is not one of {', '.join(ANSWER_VALUES)}")
        try:
            reason = clean_reason(request.form.get("reason", ""))
        except ValueError as exc:
            abort(400, str(exc))
        outcome = store.record_vote(db(), token[:100], rater.id, answer, reason)
        if outcome == store.UNKNOWN_TOKEN:
            abort(400, "this comparison is unknown to the server; reload the page for a new one")
        if outcome == store.OTHER_RATER:
            abort(403, "this comparison was given to another rater; reload the page for your own")
        return redirect("/rate", code=303)  # RECORDED, or DUPLICATE: a retried POST, the first vote stands

    @app.get("/static/<name>")
    def static_file(name: str):
        if name not in pages.STATIC:
            abort(404, f"no static file {name[:40]!r}")
        mimetype, body = pages.STATIC[name]
        response = Response(body, mimetype=mimetype)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/favicon.ico")
    def favicon():
        return Response(status=204)

    return app


def create_server(pool: Pool, db_path: str | Path, host: str = "127.0.0.1", port: int = 8080, threads: int = 8):
    """A waitress server for the app, listening but not yet serving (call .run()); port 0 picks a free one."""
    import waitress

    app = create_app(pool, db_path, allowed_hosts=LOCAL_HOSTS if host in LOCAL_HOSTS else None)
    return waitress.create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        ident="smallscale",
        # waitress answers 413 as soon as the headers declare a body this size or larger (and stops a
        # chunked one there), so a body the app would refuse is never read, let alone spooled to disk
        max_request_body_size=MAX_REQUEST_BYTES + 1,
        # every body that passes (plus one 8 KiB read past the limit for a chunked one) stays in memory
        inbuf_overflow=2 * MAX_REQUEST_BYTES,
        max_request_header_size=MAX_HEADER_BYTES,  # larger: 431
        connection_limit=100,  # open connections (a browser keeps up to 6); beyond it, new ones wait
        channel_timeout=30,  # seconds without traffic before a connection is dropped (checked every 30 s)
    )
