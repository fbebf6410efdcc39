"""The command line: user mistakes are one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "smallscale.cli"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["data", "prepare", "/no/such/path", "--out", "{tmp}/o"], "no such file"),
        (["data", "prepare", "builtin:nope", "--out", "{tmp}/o"], "unknown built-in corpus"),
        (["data", "prepare", "{tmp}/empty.txt", "--out", "{tmp}/o", "--split-by", "line"], "empty"),
        (["data", "prepare", "{tmp}/x.jsonl", "--out", "{tmp}/o", "--text-field", "body"], "body"),
        (["train", "data.path={tmp}/missing", "out={tmp}/r", "train.steps=1"], "not a prepared dataset"),
        (["train", "data.path={tmp}/missing", "train.steps=1"], "'out'"),
        (["train", "{tmp}/nope.yaml"], "does not exist"),
        (["resume", "{tmp}"], "not a run directory"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, args, words):
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    proc = subprocess.run([*CLI, *(a.format(tmp=tmp_path) for a in args)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], proc.stderr


def test_model_list_prints_exact_counts():
    proc = subprocess.run([*CLI, "model", "list", "--json"], capture_output=True, text=True, check=True)
    assert '"cpu-2m"' in proc.stdout and "2114944" in proc.stdout.replace(",", "").replace(" ", "")
