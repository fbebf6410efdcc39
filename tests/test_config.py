"""Reading configs: YAML within bounds (size, aliases, nesting, value types), overrides as bounded as
files, and validation errors that name the key the user wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smallscale.config import MAX_YAML_BYTES, parse_overrides, read_yaml, validate
from smallscale.errors import UserError
from smallscale.train.trainer import RunConfig, load_run_config

from conftest import REPO
from test_study_safety import assert_one_line_error, cli_in_process

# "Billion laughs": 9**9 strings from about 400 bytes. Before the bound, the repr of this value in
# the error message for `model.preset` was the hang.
LAUGHS = "[" + ", ".join(
    ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
     *(f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True))]
) + "]"  # fmt: skip


def one_line_error(call, *args, seconds: float = 2.0) -> str:
    started = time.perf_counter()
    with pytest.raises(UserError) as info:
        call(*args)
    assert time.perf_counter() - started < seconds
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, text: str | bytes, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- item 10: YAML within bounds
def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    path = write(tmp_path, f"out: r\ndata: {{path: d}}\ntrain: {{steps: 1}}\nmodel: {{preset: {LAUGHS}}}\n")
    assert path.stat().st_size < 900
    assert "expands to more than 100,000 values" in one_line_error(read_yaml, path)


def test_ordinary_anchors_aliases_and_merge_keys_still_work(tmp_path):
    text = "common: &c {lr: 0.001, name: adamw}\noptim: {<<: *c, lr: 0.002}\nagain: *c\n"
    assert read_yaml(write(tmp_path, text)) == {
        "common": {"lr": 0.001, "name": "adamw"}, "optim": {"lr": 0.002, "name": "adamw"}, "again": {"lr": 0.001, "name": "adamw"},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a: &a [1, *a]\n", "alias inside its own anchor"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nests more than 64 levels deep"),
        ("a: &a [1]\n" + "".join(f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i - 1}'}]\n" for i in range(70)), "nests more than 64"),
        ("a: !!binary aGVsbG8=\n", "uses the tag 'tag:yaml.org,2002:binary'"),
        ("a: !!python/name:os.system\n", "uses the tag"),
        ("a: !!set {x, y}\n", "uses the tag"),
        ("a: 1" + ":59" * 200_000 + "\n", "more than 100 characters"),  # base-60: quadratic time
        ("a: " + "9" * 5000 + "\n", "more than 100 characters"),  # Python refuses int('9' * 5000)
        ('a: !!int ""\n', "cannot be read (IndexError"),  # PyYAML's constructors fail on these,
        ("a: !!bool maybe\n", "cannot be read (KeyError"),  # found by test_config_properties.py
        ("a: [1\n", "not valid YAML"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
        ("- 1\n", "must hold a mapping"),
    ],
)
def test_yaml_that_could_hang_or_crash_is_a_one_line_error(tmp_path, text, words):
    assert words in one_line_error(read_yaml, write(tmp_path, text))


def test_a_config_file_over_the_size_cap_is_refused_without_reading_it_all(tmp_path):
    path = write(tmp_path, "# " + "x" * MAX_YAML_BYTES + "\n")
    assert "larger than 1,048,576 bytes" in one_line_error(read_yaml, path)


def test_a_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    assert "not UTF-8 text (byte 6)" in one_line_error(read_yaml, write(tmp_path, b"name: \xff\xfe\n"))


def test_unquoted_dates_are_text_and_impossible_dates_are_no_traceback(tmp_path):
    assert read_yaml(write(tmp_path, "a: 2024-01-31\nb: 2024-13-45\n")) == {"a": "2024-01-31", "b": "2024-13-45"}


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("optim.betas=" + "[" * 5000, "nests more than 64"),
        ("optim.betas=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b],"
         " &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e]]", "expands to more than"),
        ("optim.lr=[", "override 'optim.lr' is not valid YAML"),
        ("optim.lr=!!binary aGk=", "uses the tag"),
        ("optim..lr=1", "dotted names"),
        (".".join(["a"] * 5000) + "=1", "at most 16 parts"),
        ("optim.lr=" + "x" * (MAX_YAML_BYTES + 1), "longer than"),
    ],
)
def test_override_values_are_bounded_like_config_files(override, words):
    assert words in one_line_error(parse_overrides, [override])


def test_overrides_still_read_yaml_values():
    assert parse_overrides(["optim.lr=3.0e-4", "optim.betas=[0.9, 0.95]", "model.preset=cpu-2m", "train.compile=auto"]) == {
        "optim": {"lr": 3e-4, "betas": [0.9, 0.95]}, "model": {"preset": "cpu-2m"}, "train": {"compile": "auto"},
    }  # fmt: skip


def test_cli_refuses_a_yaml_alias_bomb_in_one_line(tmp_path):
    write(tmp_path, f"out: r\ndata: {{path: d}}\ntrain: {{steps: 1}}\nmodel: {{preset: {LAUGHS}}}\n", "bomb.yaml")
    proc = subprocess.run([sys.executable, "-m", "smallscale.cli", "train", str(tmp_path / "bomb.yaml")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert_one_line_error(proc, "expands to more than 100,000 values")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "{tmp}/deep.yaml"], "nests more than 64"),
        (["train", "{tmp}/latin1.yaml"], "not UTF-8 text"),
        (["train", "optim.lr=[", "out={tmp}/r"], "not valid YAML"),
        (["train", "optim..lr=1", "out={tmp}/r"], "dotted names"),
        (["train", "train.compile=maybe", "data.path={tmp}", "out={tmp}/r", "train.steps=1"], "'train.compile'"),
    ],
)
def test_cli_reports_bad_config_files_and_overrides_in_one_line(tmp_path, monkeypatch, capsys, args, words):
    write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")
    write(tmp_path, "name: caf\xe9\n".encode("latin-1"), "latin1.yaml")
    proc = cli_in_process(*(a.format(tmp=tmp_path) for a in args), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(proc, words)


# ----------------------------------------------------------------------------- item 11: the key in an error
@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["train.compile=maybe"], "invalid value for 'train.compile' (got 'maybe'): Input should be a valid boolean or 'auto'"),
        (["train.compile=3"], "invalid value for 'train.compile' (got 3)"),
        (["model.position=rotary"], "'model.position' (got 'rotary')"),
        (["optim.betas=[0.9]"], "'optim.betas.1'"),
        (["train.tokens=-5"], "'train.tokens' (got -5): Input should be greater than 0"),
    ],
)
def test_run_config_errors_name_the_key_the_user_wrote(tmp_path, overrides, words):
    base = [f"data.path={tmp_path}", f"out={tmp_path / 'r'}", "train.steps=1"]
    message = one_line_error(load_run_config, None, [*base, *overrides])
    assert words in message
    assert ".bool" not in message and "literal[" not in message


def test_a_bad_value_is_reported_before_a_key_left_out():
    message = one_line_error(load_run_config, None, ["train.compile=maybe"])  # `out` and `data` are missing too
    assert "'train.compile'" in message


def test_a_mapping_of_many_unknown_keys_is_reported_quickly():
    from smallscale.study.grid import StudySpec

    data = {"name": "s", "datasets": {"d": {"path": "d"}}, "evals": [{"task": "heldout", **{f"k{i}": 1 for i in range(50_000)}}]}
    assert "unknown key 'evals.0.k0'" in one_line_error(validate, StudySpec, data)


def test_union_keys_of_mappings_name_the_key(tmp_path):
    from smallscale.eval.tasks.generic import GenericSpec

    data = {"type": "multiple_choice", "data": "x.jsonl", "choices_field": "c", "label_field": "l", "label_map": {1.5: 0}}
    message = one_line_error(validate, GenericSpec, data)
    assert "invalid key 'label_map.1.5' (got 1.5): Input should be a valid string or a valid integer" in message


def test_run_config_from_a_file_names_the_file_and_key(tmp_path):
    path = write(tmp_path, f"out: {tmp_path / 'r'}\ndata: {{path: {tmp_path}}}\ntrain: {{steps: 1, compile: sometimes}}\n")
    assert one_line_error(load_run_config, path, []).startswith(f"{path}: invalid value for 'train.compile'")
    assert isinstance(load_run_config(path, ["train.compile=auto"]), RunConfig)


def test_overriding_steps_over_a_config_with_tokens_says_how():
    from smallscale.train.trainer import load_run_config

    with pytest.raises(UserError, match=r"train.tokens \(4096\) and train.steps \(40\); to override one, also set the other to null"):
        load_run_config(None, ["data.path=x", "out=y", "train.tokens=4096", "train.steps=40"])
    assert load_run_config(None, ["data.path=x", "out=y", "train.tokens=null", "train.steps=40"]).train.steps == 40
