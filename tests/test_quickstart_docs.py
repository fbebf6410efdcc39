"""Docs that cannot drift: what the quickstart study runs is stated once, in its study file, and the
numbers there are those of the grid it expands to; `smallscale quickstart --help` points to it."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO
from typer.testing import CliRunner

from smallscale.cli import app
from smallscale.study.grid import expand, load_study

QUICKSTART = REPO / "configs" / "studies" / "quickstart.yaml"


def test_quickstart_header_counts_are_those_of_its_grid(tmp_path):
    header = " ".join(line.lstrip("# ") for line in QUICKSTART.read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    spec = load_study(QUICKSTART)
    runs = expand(spec, tmp_path, {name: ds.vocab_size for name, ds in spec.datasets.items()})
    sizes = re.search(r"(\d+) runs on .*?: (\d+) model sizes x (\d+) data sizes", header)
    assert sizes is not None, header
    first = spec.grids[0].grid  # block 1: data efficiency x model size
    assert [int(n) for n in sizes.groups()] == [len(runs), len(first["model.preset"]), len(first["tokens"])]


def test_quickstart_help_names_the_study_file_and_states_no_counts():
    result = CliRunner().invoke(app, ["quickstart", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "configs/studies/quickstart.yaml" in text and "smallscale study plan" in text
    assert not re.search(r"\d+ runs|\d+ sizes|\d+ data sizes", text), text
    assert Path(QUICKSTART).is_file()
