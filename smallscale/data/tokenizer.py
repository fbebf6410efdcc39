"""Train or load tokenizers with Hugging Face `tokenizers`.

Two families, both lossless on any text in any language:
- `bpe`: byte-level BPE (GPT-2 style). Every string maps to bytes, so nothing is ever unknown.
- `unigram`: SentencePiece-style Unigram over whitespace-marked pieces, with byte fallback: a
  character the vocabulary lacks is spelled as `<0xNN>` byte pieces instead of `<unk>`.

Special tokens come first in the vocabulary: `<|pad|>`=0, `<|bos|>`=1, `<|eos|>`=2 (and `<unk>`=3
for Unigram, which the model requires even though byte fallback means it is never produced).
The saved `tokenizer.json` loads with `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smallscale.errors import UserError

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<unk>"
SPECIALS = [PAD, BOS, EOS]
META = "\u2581"  # SentencePiece's word-boundary mark, "▁"
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]

TokenizerKind = Literal["bpe", "unigram"]


def train_tokenizer(
    documents: Iterable[str], kind: TokenizerKind, vocab_size: int, show_progress: bool = False
) -> Tokenizer:
    """Train a tokenizer of `kind` with at most `vocab_size` entries on `documents` (streamed)."""
    if vocab_size < 300:
        raise UserError(f"vocab_size {vocab_size} is too small; use at least 300 (256 bytes + specials)")
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(documents, trainer=trainer)
    elif kind == "unigram":
        tok = _train_unigram(documents, vocab_size, show_progress)
    else:
        raise UserError(f"unknown tokenizer kind {kind!r}; choose 'bpe' or 'unigram', or give a tokenizer.json path")
    tok.encode_special_tokens = True  # text that spells "<|eos|>" is encoded as text, never as EOS
    return tok


def _train_unigram(documents: Iterable[str], vocab_size: int, show_progress: bool) -> Tokenizer:
    # prepend_scheme="never" keeps decode(encode(x)) == x exactly (no invented leading space).
    pre = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="never", split=True)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre
    # Leave room for the byte pieces added below, so the final size stays within vocab_size.
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - len(BYTE_PIECES),
        special_tokens=[*SPECIALS, UNK],
        unk_token=UNK,
        initial_alphabet=[chr(c) for c in range(33, 127)],  # ASCII punctuation always has a piece
        show_progress=show_progress,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    # `tokenizers` trains Unigram without byte pieces; rebuild the model with them appended so
    # byte_fallback can spell any character the vocabulary lacks.
    vocab: list[tuple[str, float]] = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
    have = {piece for piece, _ in vocab}
    floor = min(score for _, score in vocab) - 1.0
    vocab += [(piece, floor) for piece in BYTE_PIECES if piece not in have]
    # Special pieces must never be chosen when segmenting text (text spelling "<|eos|>" stays text).
    # Their score must stay finite: the unknown-character score is derived from the lowest score.
    vocab = [(piece, floor - 1000.0 if piece in (*SPECIALS, UNK) else score) for piece, score in vocab]
    unk_id = next(i for i, (piece, _) in enumerate(vocab) if piece == UNK)
    out = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=True))
    out.pre_tokenizer = pre
    out.decoder = decoders.Sequence([decoders.Replace(META, " "), decoders.ByteFallback(), decoders.Fuse()])
    out.add_special_tokens([*SPECIALS, UNK])
    return out


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json`; it must define the EOS special (`<|eos|>`, `</s>` or `<|endoftext|>`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {str(path)!r} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{str(path)!r} is not a valid tokenizer.json ({exc})") from None
    eos_id(tok)  # validates
    tok.encode_special_tokens = True
    return tok


def eos_id(tok: Tokenizer) -> int:
    for name in (EOS, "</s>", "<|endoftext|>"):
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    raise UserError("the tokenizer has no end-of-document token (<|eos|>, </s> or <|endoftext|>); add one")


def special_ids(tok: Tokenizer) -> dict[str, int | None]:
    return {"pad": tok.token_to_id(PAD), "bos": tok.token_to_id(BOS), "eos": eos_id(tok)}


def to_transformers(tok_path: str | Path):  # -> transformers.PreTrainedTokenizerFast
    """The same tokenizer as a `transformers` fast tokenizer (for export), which encodes text as a
    smallscale model reads it: after the EOS every training document follows. Like GPT-2's
    <|endoftext|>, EOS is also the BOS token, added in front of each text when special tokens are
    added (transformers' default, as in `pipeline` and `generate`)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tok_path))
    eos = eos_id(raw)
    eos_name = raw.id_to_token(eos)
    raw.post_processor = TemplateProcessing(single=f"{eos_name} $A", pair=f"{eos_name} $A {eos_name} $B", special_tokens=[(eos_name, eos)])
    roles = {"pad_token": PAD, "eos_token": eos_name, "unk_token": UNK}
    present = {role: name for role, name in roles.items() if raw.token_to_id(name) is not None}
    # split_special_tokens: like `encode_special_tokens` here, text spelling "<|eos|>" stays text.
    return PreTrainedTokenizerFast(tokenizer_object=raw, split_special_tokens=True, bos_token=eos_name, **present)
