"""Rater-app throughput: concurrent raters voting against the real server, counted and checked.

Setup: a synthetic study (4 systems x 20 prompts = 120 comparisons per rater) served by
`python -m smallscale.humaneval.cli serve` in a subprocess on 127.0.0.1 (waitress, --threads 8),
votes in SQLite in the system temp dir (WAL, synchronous=FULL: every acknowledged vote is fsynced). Each of
--raters threads in this process is one invited rater (invites written to the database before the
server starts) with its own cookie session going through the real pages: their invite link, then per
vote a POST /vote plus the redirected GET of the next comparison; every 10th vote is
posted twice, as a browser retry would, and must count once. votes/s = acknowledged votes / wall
time, from the first request to the last. Clients and server share the machine's cores, so this is
a floor, not the server's capacity; the load average at the start is recorded.

The run then checks the database: as many votes as were acknowledged, no token twice, and no
rater shown the same comparison twice.

Run: `bash dev.sh shell python bench/bench_humaneval.py [--raters 8] [--votes 50] [--threads 8]`
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path

from smallscale.humaneval.loadcheck import invite_raters, run_load, start_server, write_synthetic_study
from smallscale.humaneval.store import read_votes
from smallscale.io import atomic_write_json

N_SYSTEMS, N_PROMPTS = 4, 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raters", type=int, default=8, help="concurrent rater threads")
    parser.add_argument("--votes", type=int, default=50, help="votes per rater (at most 120)")
    parser.add_argument("--threads", type=int, default=8, help="server worker threads")
    parser.add_argument("--out", default="bench/results/humaneval.json")
    args = parser.parse_args()
    load_average_1min = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench_humaneval_") as tmp:
        study = Path(tmp) / "study"
        write_synthetic_study(study, N_SYSTEMS, N_PROMPTS)
        db = study / "human_eval.sqlite"
        invites = invite_raters(db, [f"rater{r}" for r in range(args.raters)])
        proc, url = start_server([study], db, threads=args.threads)
        try:
            load = run_load(url, invites, votes_per_rater=args.votes, resubmit_every=10)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        votes = read_votes(db)
    comparisons = {(v.rater_id, v.item_id, *sorted((v.system_left, v.system_right))) for v in votes}
    checks = {
        "votes_in_db": len(votes),
        "distinct_tokens": len({v.token for v in votes}),
        "distinct_rater_comparisons": len(comparisons),
        "client_errors": load["errors"],
    }
    ok = load["votes_acknowledged"] == len(votes) == checks["distinct_tokens"] == len(comparisons) and not load["errors"]

    print(f"{args.raters} raters x {args.votes} votes against {args.threads} server threads "
          f"(load average {load_average_1min:.1f} on {os.cpu_count()} cores)")  # fmt: skip
    print(f"{load['votes_acknowledged']} votes in {load['seconds']:.2f} s = {load['votes_per_s']:.0f} votes/s; "
          f"database: {len(votes)} votes, {checks['distinct_tokens']} distinct tokens -> {'OK' if ok else 'MISMATCH'}")  # fmt: skip
    result = {
        "setup": {"systems": N_SYSTEMS, "prompts": N_PROMPTS, "raters": args.raters, "votes_per_rater": args.votes,
                  "server_threads": args.threads, "resubmit_every": 10, "sqlite_synchronous": "FULL", "journal_mode": "WAL"},
        "votes_acknowledged": load["votes_acknowledged"],
        "seconds": load["seconds"],
        "votes_per_s": load["votes_per_s"],
        "checks": checks,
        "ok": ok,
        "environment": {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version, "cpu_count": os.cpu_count(),
                        "load_average_1min": load_average_1min, "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine()},
    }  # fmt: skip
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
