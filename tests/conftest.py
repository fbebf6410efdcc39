"""Shared fixtures: the real-data root, synthetic corpora, and a tiny prepared dataset."""

from __future__ import annotations

import os
import random
import tempfile
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SMALLSCALE_DATA_ROOT", REPO.parent / "shared" / "data"))
os.environ.setdefault("SMALLSCALE_DATA_ROOT", str(SHARED_DATA))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One cache per test session (CPU matmul peaks, fetched files): tests never touch the user's ~/.cache.
os.environ.setdefault("SMALLSCALE_CACHE", tempfile.mkdtemp(prefix="smallscale-test-cache-"))


def pytest_collection_modifyitems(config, items):
    # A test marked `data` needs the real corpora; CI has them, so a missing root is an error there.
    if SHARED_DATA.is_dir() or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA}")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


WORDS = "the a cat dog sat ran on under mat tree big small red blue and then saw heard a bird sang".split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """Sentences from a tiny vocabulary: learnable, deterministic, and with a few non-ASCII words."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(rng.randint(1, 4))]
        if i % 7 == 0:
            sents.append("Caf\u0065\u0301 na\u00efve \u00fcber habari za asubuhi \u2014 ok.")  # NFD e + accent
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    models this small run fastest on one thread, and on a busy machine many times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder of 200 one-document files (with 10 exact duplicates)."""
    docs = synthetic_docs(200)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs + docs[:10]):
        (folder / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    return folder, docs


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared synthetic dataset (BPE 512) shared by loader and trainer tests."""
    from smallscale.data.shards import PrepareConfig, prepare

    tmp = tmp_path_factory.mktemp("tiny")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(synthetic_docs(3000, seed=1)), encoding="utf-8")
    out = tmp / "ds"
    prepare(PrepareConfig(source=str(corpus), out=str(out), split_by="line", vocab_size=512, workers=1, val_fraction=0.05), progress=False)
    return out
