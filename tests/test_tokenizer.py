"""Tokenizer training: BPE and Unigram (byte fallback) on Swahili; specials; HF loadability."""

from __future__ import annotations

import pytest

from smallscale.data.tokenizer import BOS, EOS, PAD, UNK, load_tokenizer, to_transformers, train_tokenizer
from smallscale.errors import UserError
from tests.conftest import SHARED_DATA


def swahili_lines(n_bytes: int = 600_000) -> list[str]:
    text = (SHARED_DATA / "maneno-yetu-swa" / "maneno-yetu-corpora-002-20250609-210103.txt").read_text(encoding="utf-8")
    return [s for s in text[:n_bytes].split(". ") if s]


TRICKY = "Habari za asubuhi,  Bw. Ngaiza!\n\tŞ ß 😀 <|eos|> mwisho"


@pytest.mark.data
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_swahili_tokenizer_is_lossless_with_specials_and_fertility(kind, tmp_path):
    lines = swahili_lines()
    tok = train_tokenizer(lines, kind, vocab_size=4000)
    assert tok.get_vocab_size() <= 4000
    assert [tok.token_to_id(t) for t in (PAD, BOS, EOS)] == [0, 1, 2]
    if kind == "unigram":
        assert tok.token_to_id(UNK) == 3 and tok.token_to_id("<0xF0>") is not None
    ids = tok.encode(TRICKY).ids
    assert tok.token_to_id(EOS) not in ids  # literal "<|eos|>" text is not the special token
    assert tok.decode(ids, skip_special_tokens=False) == TRICKY
    held_out = lines[-300:]
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(held_out))
    fertility = n_tokens / sum(len(s.split()) for s in held_out)
    assert 1.0 < fertility < 2.5  # a 4k Swahili vocabulary: 1-2.5 tokens per word
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = to_transformers(path)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (2, 0, 2)  # EOS starts a text, as GPT-2's
    ids = load_tokenizer(path).encode(TRICKY).ids
    assert hf(TRICKY)["input_ids"] == [2, *ids]  # after the EOS every training document follows
    assert hf(TRICKY, add_special_tokens=False)["input_ids"] == ids


def test_unknown_kind_and_tiny_vocab_are_user_errors():
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        train_tokenizer(["a b c"], "wordpiece", 1000)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["a b c"], "bpe", 100)


def test_missing_tokenizer_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
