"""End to end, the way a user runs it: CLI prepare of a real corpus, CLI training, real numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from smallscale.data.shards import load_manifest, read_split
from tests.conftest import REPO

CLI = [sys.executable, "-m", "smallscale.cli"]


def unigram_bpb(dataset) -> float:
    """Bits per byte of the val split under the train split's add-one unigram distribution."""
    manifest = load_manifest(dataset)
    train = np.concatenate([np.asarray(a) for a in read_split(dataset, "train")])
    val = np.concatenate([np.asarray(a) for a in read_split(dataset, "val")])
    counts = np.bincount(train, minlength=manifest["vocab_size"]).astype(np.float64) + 1.0
    nll = -np.log(counts[val] / counts.sum()).sum()
    return nll / (math.log(2) * manifest["splits"]["val"]["bytes"])


@pytest.mark.slow
@pytest.mark.data
def test_cpu_preset_on_tinyshakespeare_beats_the_unigram_level(tmp_path):
    # The quickstart's settings: cpu-2m, 1M tokens (about 3 epochs), about two minutes on 2 cores.
    dataset, run = tmp_path / "ts", tmp_path / "run"
    subprocess.run([*CLI, "data", "prepare", "builtin:tinyshakespeare", "--out", str(dataset), "--vocab-size", "4096"], check=True, capture_output=True)
    subprocess.run(
        [*CLI, "train", str(REPO / "configs" / "quickstart-train.yaml"), f"out={run}", f"data.path={dataset}", "--no-progress"],
        check=True, capture_output=True,
    )  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    level = unigram_bpb(dataset)
    assert 2.0 < level < 3.5
    assert summary["val_bpb"] < 0.85 * level, (summary["val_bpb"], level)
    evals = [json.loads(line)["val_bpb"] for line in (run / "metrics.jsonl").read_text().splitlines() if "val_bpb" in line]
    assert evals == sorted(evals, reverse=True)  # val bpb falls at every eval
