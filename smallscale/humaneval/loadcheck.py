"""A bounded load check for a running rater app, and the synthetic study it runs on.

Used by tests/test_humaneval_server.py and bench/bench_humaneval.py. Each simulated rater is an
invited rater (`invite_raters`) and a thread with its own cookie session that goes through the real
pages (invite link, comparison page, vote form, following the redirects) with the standard library's
HTTP client; every `resubmit_every`th vote is posted twice, as a browser retry would, and must still
count once.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
from contextlib import closing
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import HTTPCookieProcessor, build_opener

from smallscale.humaneval import store
from smallscale.humaneval.store import ANSWERS

_HIDDEN = re.compile(r'<input type="hidden" name="(\w+)" value="([^"]*)">')


def write_synthetic_study(study_dir: str | Path, n_systems: int, n_prompts: int) -> list[str]:
    """STUDY_DIR/runs/run-XX/eval/samples.jsonl for n_systems runs continuing the same n_prompts prompts."""
    systems = [f"run-{i:02d}" for i in range(n_systems)]
    for s, system in enumerate(systems):
        samples = [
            {"doc_index": p, "prompt": f"Prompt number {p}: once upon a time", "continuation": f"{system} continues prompt {p} ({s * p})",
             "reference": "the truth", "settings": {"seed": 0}}
            for p in range(n_prompts)
        ]  # fmt: skip
        path = Path(study_dir) / "runs" / system / "eval" / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(x) + "\n" for x in samples), encoding="utf-8")
    return systems


def invite_raters(db: str | Path, names: list[str]) -> dict[int, str]:
    """Invite one rater per name into the vote database `db` (created if needed): rater id -> invite token."""
    store.init_db(db)
    with closing(store.connect(db)) as conn:
        invites = [store.add_rater(conn, name) for name in names]
    return {rater.id: token for rater, token in invites}


class RaterClient:
    """One rater's browser session, without a browser."""

    def __init__(self, base_url: str, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.opener = build_opener(HTTPCookieProcessor(CookieJar()))
        self.page = ""  # the HTML of the last page reached

    def open(self, path: str, form: dict[str, str] | None = None) -> str:
        data = urlencode(form).encode() if form is not None else None
        with self.opener.open(self.base_url + path, data, timeout=self.timeout_s) as response:
            self.page = response.read().decode("utf-8")
        return self.page

    def hidden(self, name: str) -> str | None:
        """A hidden form field of the current page (csrf, token)."""
        return dict(_HIDDEN.findall(self.page)).get(name)

    def join(self, invite_token: str) -> None:
        """Open the rater's invite link; it redirects to their first comparison."""
        self.open(f"/r/{invite_token}")

    def vote(self, answer: str, reason: str = "", times: int = 1) -> str:
        """Answer the comparison on the current page (posting the same form `times` times); its token."""
        token = self.hidden("token")
        assert token is not None, "no comparison on the current page"
        form = {"csrf": self.hidden("csrf"), "token": token, "answer": answer, "reason": reason}
        for _ in range(times):
            self.open("/vote", form)
        return token


def run_load(base_url: str, invites: dict[int, str], votes_per_rater: int, resubmit_every: int = 10) -> dict:
    """One thread per invited rater (id -> invite token) casts votes_per_rater votes; returns counts,
    the comparison tokens acknowledged per rater id, votes/s.

    A vote is acknowledged when its POST and the redirect to the next page both succeeded. A thread
    that hits a network error stops and reports it (the server may have been killed on purpose).
    """
    acknowledged: dict[int, list[str]] = {}
    errors: dict[int, str] = {}

    def rater(rater_id: int, invite_token: str) -> None:
        client, tokens = RaterClient(base_url), []
        acknowledged[rater_id] = tokens
        try:
            client.join(invite_token)
            for i in range(votes_per_rater):
                times = 2 if resubmit_every and (i + 1) % resubmit_every == 0 else 1
                tokens.append(client.vote(ANSWERS[(rater_id + i) % len(ANSWERS)], times=times))
        except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError, reset, cut-off reply
            errors[rater_id] = repr(exc)

    threads = [threading.Thread(target=rater, args=item) for item in invites.items()]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    n_votes = sum(len(tokens) for tokens in acknowledged.values())
    return {
        "raters": len(invites),
        "votes_per_rater": votes_per_rater,
        "votes_acknowledged": n_votes,
        "seconds": seconds,
        "votes_per_s": n_votes / seconds,
        "tokens": acknowledged,
        "errors": errors,
    }


def start_server(paths: list[Path], db: Path, threads: int = 8, timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """`python -m smallscale.humaneval.cli serve PATHS --port 0` in a subprocess; (process, base URL)."""
    cmd = [sys.executable, "-u", "-m", "smallscale.humaneval.cli", "serve", *map(str, paths),
           "--db", str(db), "--port", "0", "--threads", str(threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if match := re.search(r"serving on (http://\S+?)/ ", line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining the pipe
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("the server did not start:\n" + "".join(lines))
