"""Read documents from local files, Hugging Face datasets and the built-in corpora.

A *document* is a `str`: the unit that gets deduplicated, assigned to train or validation and
closed with an end-of-text token downstream. The same rules make documents out of every format:

- `split_by='file'`: the whole file; for record formats (JSONL, Parquet, HF datasets) the whole
  text of one record. This is the default for every local source.
- `split_by='line'`: each line without its line terminator (`\\n` or `\\r\\n`).
- `split_by='paragraph'`: each block of lines between blank (whitespace-only) lines, joined by `\\n`.

Built-ins may use two more modes internally: `'sentence'` and `'wikitext_article'` (see
`builtins.py`). A document with no non-whitespace character is skipped; no other stripping happens.

`resolve_parts` validates a source and cuts it into `Part`s, independent and picklable units of
reading work (a file, a byte range of a large file, a Parquet row group, a shard of an HF dataset)
so that `shards.py` reads a 100 GB corpus in parallel processes without holding it in memory.
Reading the parts in order gives exactly the documents of `iter_documents`, in a fixed order.

A NUL byte never occurs in text. A file with one in its first 8 KiB (after decompression) looks
binary, as git decides: named alone it is a `UserError`, in a folder or glob it is skipped. A NUL
further in is found while reading, when the file's first documents may already be read, so it is a
`UserError` naming the file and the byte offset, wherever the file was named.

Invalid UTF-8 is replaced by U+FFFD and counted in `ReadStats`, never fatal; so is a lone surrogate
that a JSON string spells as an escape (`"\\ud800"`), which no UTF-8 text can hold. Nothing here raises
for a source without documents (one part alone may well be empty): the caller counts documents and
calls `check_nonempty`.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
import gzip
import io
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from glob import glob, has_magic
from pathlib import Path
from typing import IO, Any, Literal

import zstandard

from smallscale.errors import UserError

SplitBy = Literal["file", "line", "paragraph"]
SPLIT_MODES: tuple[str, ...] = ("file", "line", "paragraph")

_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
# Modes whose documents never span a newline, so a file can be cut at any newline.
_LINE_LOCAL_MODES = ("line", "sentence")
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class SourceOptions:
    split_by: SplitBy | None = None  # None: 'file' for local sources, the entry's own for builtins
    text_field: str = "text"  # JSONL field / Parquet column / HF dataset column
    hf_config: str | None = None
    hf_split: str = "train"
    streaming: bool = False
    data_root: str | None = None  # where builtin:NAME files are looked up first
    part_bytes: int = 64 * 2**20  # target size of one byte-range part of a large line-based file


@dataclass(frozen=True)
class Part:
    """One unit of reading work. Plain fields only, so it pickles cheaply to worker processes."""

    kind: str  # 'text' | 'jsonl' | 'json_array' | 'parquet' | 'hf' | 'hf_disk' | 'ces_xml'
    path: str  # a file, a local dataset folder or file, or an HF Hub dataset name
    split_by: str = "file"
    text_field: str = "text"
    byte_start: int = 0  # text/jsonl: the part owns the lines whose first byte lies in
    byte_end: int | None = None  # [byte_start, byte_end); None means to the end of the file
    index: int = 0  # parquet: row group; hf: shard index
    num_shards: int = 1  # hf: number of contiguous shards the dataset is cut into (streaming: its files)
    hf_config: str | None = None
    hf_split: str = "train"
    streaming: bool = False


@dataclass
class ReadStats:
    replaced_chars: int = 0  # invalid UTF-8 sequences replaced by U+FFFD while reading


# ---------------------------------------------------------------------------------------------
# Resolving a source string into parts


def resolve_parts(source: str, opts: SourceOptions = SourceOptions()) -> list[Part]:
    """Validate `source` and list its parts in reading order. Raises `UserError` on bad input."""
    _check_options(opts)
    if source.startswith("builtin:"):
        return _builtin_parts(source.removeprefix("builtin:"), opts)
    if source.startswith("hf:"):
        return _hf_parts(source.removeprefix("hf:"), opts)
    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        return _hf_parts(str(path), opts)
    split_by = opts.split_by or "file"
    return [part for file in _local_files(source) for part in _file_parts(file, split_by, opts)]


def read_part(part: Part, stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the documents of one part, in order."""
    readers = {
        "text": _read_text,
        "jsonl": _read_jsonl,
        "json_array": _read_json_array,
        "parquet": _read_parquet,
        "hf": _read_hf,
        "hf_disk": _read_hf,
        "ces_xml": _read_ces_xml,
    }
    assert part.kind in readers, part.kind
    with _decompression_errors(part.path):
        yield from readers[part.kind](part, stats)


def iter_documents(source: str, opts: SourceOptions = SourceOptions(), stats: ReadStats | None = None) -> Iterator[str]:
    """All documents of `source`: the parts of `resolve_parts`, read in order in this process."""
    for part in resolve_parts(source, opts):
        yield from read_part(part, stats)


def check_nonempty(source: str, num_documents: int) -> None:
    """Raise `UserError` if reading `source` gave no documents (the caller does the counting)."""
    if num_documents == 0:
        raise UserError(f"source {source!r} contains no documents; check the path, split_by and text_field")


def _check_options(opts: SourceOptions) -> None:
    if opts.split_by is not None and opts.split_by not in SPLIT_MODES:
        raise UserError(f"split_by {opts.split_by!r} is unknown; use one of {', '.join(SPLIT_MODES)}")
    if opts.part_bytes <= 0:
        raise UserError(f"part_bytes must be positive, got {opts.part_bytes}; use e.g. 67108864")
    if not opts.text_field:
        raise UserError("text_field is empty; name the field or column that holds the text")


def _builtin_parts(name: str, opts: SourceOptions) -> list[Part]:
    from smallscale.data import builtins  # builtins does not import this module

    entry = builtins.get_builtin(name)
    split_by = opts.split_by or entry.split_by
    paths = builtins.builtin_paths(entry.name, opts.data_root)
    if entry.format == "ces_xml":
        return [Part("ces_xml", str(path), split_by) for path in paths]
    return [part for path in paths for part in _file_parts(path, split_by, opts)]


def _local_files(source: str) -> list[Path]:
    """The readable files a local source names, in a fixed order (hidden files skipped)."""
    path = Path(source).expanduser()
    if path.is_file():
        if _looks_binary(path):
            raise UserError(
                f"{source} is not a text, JSONL, Parquet, .gz or .zst file (it contains NUL "
                "bytes); convert it to UTF-8 text or pass a supported format"
            )
        return [path]
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise UserError(
                f"folder {source} has no readable files (text, JSONL, Parquet, .gz, .zst); "
                "point to a folder that holds the corpus"
            )
        return files
    if not has_magic(source):
        raise UserError(f"no such file or folder: {source}; check the path, or use hf:NAME or builtin:NAME")
    files = []
    for match in sorted(glob(os.path.expanduser(source), recursive=True)):
        match_path = Path(match)
        if match_path.is_dir():
            files += _walk(match_path)
        elif match_path.is_file() and not _looks_binary(match_path):
            files.append(match_path)
    if not files:
        raise UserError(
            f"the pattern {source!r} matches no readable files; check it (and quote it so that "
            "the shell does not expand it)"
        )
    return files


def _walk(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root, n) for n in names if not n.startswith(".")]
    readable = [f for f in files if f.is_file() and not _looks_binary(f)]
    return sorted(readable, key=lambda f: f.relative_to(folder).parts)


def _compression(path: Path | str) -> str | None:
    return _COMPRESSION.get(Path(path).suffix.lower())


def _inner_suffix(path: Path) -> str:
    """The format suffix under any compression suffix: 'a.jsonl.zst' -> '.jsonl'."""
    name = path.name.lower()
    if _compression(path):
        name = name[: -len(path.suffix)]
    return Path(name).suffix


def _looks_binary(path: Path) -> bool:
    """Binary (not readable as text) if the (decompressed) file has a NUL byte near its start, as git decides."""
    if _inner_suffix(path) == ".parquet":
        return False
    with _decompression_errors(path), _open_binary(path) as f:
        return b"\0" in f.read(_SNIFF_BYTES)


def _check_no_nul(data: bytes, path: str, offset: int) -> None:
    """Raise if `data`, which starts at byte `offset` of the (decompressed) file, holds a NUL byte."""
    at = data.find(b"\0")
    if at >= 0:
        where = "of its decompressed content " if _compression(path) else ""
        raise UserError(
            f"{path} has a NUL byte at byte offset {offset + at:,} {where}so it is binary or corrupted, not "
            "text; remove it from the source or delete its NUL bytes"
        )


def _file_parts(path: Path, split_by: str, opts: SourceOptions) -> list[Part]:
    with _decompression_errors(path):
        return _file_parts_unchecked(path, split_by, opts)


def _file_parts_unchecked(path: Path, split_by: str, opts: SourceOptions) -> list[Part]:
    suffix = _inner_suffix(path)
    compressed = _compression(path) is not None
    if suffix == ".parquet" and not compressed:
        return _parquet_parts(path, split_by, opts.text_field)
    if suffix in _JSON_SUFFIXES:
        if suffix == ".json" and _first_char(path) == "[":
            return [Part("json_array", str(path), split_by, opts.text_field)]
        _check_first_record(path, opts.text_field)
        kind, splittable = "jsonl", True
    else:
        kind, splittable = "text", split_by in _LINE_LOCAL_MODES
    size = path.stat().st_size
    if compressed or not splittable or size <= opts.part_bytes:
        return [Part(kind, str(path), split_by, opts.text_field)]
    return [
        Part(
            kind,
            str(path),
            split_by,
            opts.text_field,
            byte_start=start,
            byte_end=min(start + opts.part_bytes, size),
        )
        for start in range(0, size, opts.part_bytes)
    ]


def _first_char(path: Path) -> str:
    with _open_binary(path) as f:
        head = f.read(_SNIFF_BYTES).lstrip(b"\xef\xbb\xbf \t\r\n")
    return chr(head[0]) if head else ""


def _check_first_record(path: Path, field: str) -> None:
    """Fail in the main process, before any worker starts, if the text field is missing."""
    part = Part("jsonl", str(path), "file", field)
    for record, where in _jsonl_records(part, None):
        _record_value(record, part, where)
        return


def _parquet_parts(path: Path, split_by: str, field: str) -> list[Part]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e}); replace it") from None
    schema = parquet_file.schema_arrow
    if field not in schema.names:
        raise UserError(
            f"{path} has no column {field!r} (columns: {', '.join(schema.names)}); "
            "set text_field to the column that holds the text"
        )
    column_type = schema.field(field).type
    if not (
        pa.types.is_string(column_type)
        or pa.types.is_large_string(column_type)
        or pa.types.is_binary(column_type)
        or pa.types.is_large_binary(column_type)
    ):
        raise UserError(f"column {field!r} of {path} holds {column_type}, not text; set text_field to a string column")
    return [Part("parquet", str(path), split_by, field, index=i) for i in range(parquet_file.num_row_groups)]


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    saved_dataset = (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    return saved_dataset or (folder / "dataset_dict.json").is_file()


def _hf_parts(name: str, opts: SourceOptions) -> list[Part]:
    local = Path(name).expanduser()
    if local.exists():
        name = str(local)
    elif name.startswith(("/", ".", "~")):
        raise UserError(f"no such dataset file or folder: {name}; check the path after hf:")
    kind = "hf_disk" if local.is_dir() and _is_saved_dataset(local) else "hf"
    split_by = opts.split_by or "file"
    base = Part(
        kind,
        name,
        split_by,
        opts.text_field,
        hf_config=opts.hf_config,
        hf_split=opts.hf_split,
        streaming=opts.streaming,
    )
    dataset = _load_hf(base)
    columns = dataset.column_names  # None for some streaming datasets: checked while reading
    if columns is not None and opts.text_field not in columns:
        raise UserError(
            f"dataset {name!r} has no column {opts.text_field!r} (columns: {', '.join(columns)}); "
            "set text_field to the column that holds the text"
        )
    if opts.streaming:  # one part per file (shard) of the stream, read by whichever worker takes it
        num_shards = max(1, dataset.num_shards)
        return [dataclasses.replace(base, index=i, num_shards=num_shards) for i in range(num_shards)]
    num_shards = max(1, min(dataset.num_rows, math.ceil(dataset.data.nbytes / opts.part_bytes)))
    return [
        Part(
            kind,
            name,
            split_by,
            opts.text_field,
            index=i,
            num_shards=num_shards,
            hf_config=opts.hf_config,
            hf_split=opts.hf_split,
        )
        for i in range(num_shards)
    ]


# ---------------------------------------------------------------------------------------------
# Reading parts


@contextlib.contextmanager
def _decompression_errors(path: Path | str) -> Iterator[None]:
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zstandard.ZstdError) as e:
        raise UserError(f"{path} could not be decompressed ({e}); replace it with a complete file") from None


def _open_binary(path: Path | str) -> IO[bytes]:
    compression = _compression(path)
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        return io.BufferedReader(zstandard.open(path, "rb"))
    return open(path, "rb")


_REPLACEMENT_UTF8 = "\ufffd".encode()


def _decode(data: bytes, stats: ReadStats | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        if stats is not None:  # U+FFFD already present in the input is not a replacement
            stats.replaced_chars += text.count("\ufffd") - data.count(_REPLACEMENT_UTF8)
        return text


def _raw_lines(part: Part) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line with terminator) for the lines whose first byte lies in the part.

    A part that starts inside a line skips to the next newline; the line it skipped belongs to
    the part before, which reads past its own end to finish it (as Hadoop splits text).
    """
    with _open_binary(part.path) as f:
        offset = 0
        if part.byte_start > 0:
            f.seek(part.byte_start - 1)
            offset = part.byte_start - 1 + len(f.readline())
        for line in f:
            if part.byte_end is not None and offset >= part.byte_end:
                break
            _check_no_nul(line, part.path, offset)
            yield offset, line
            offset += len(line)


def _lines(part: Part, stats: ReadStats | None) -> Iterator[tuple[int, str]]:
    """(byte offset, decoded line without its terminator); a leading byte-order mark is dropped."""
    for offset, raw in _raw_lines(part):
        text = _decode(raw, stats).rstrip("\r\n")
        yield offset, (text.removeprefix("\ufeff") if offset == 0 else text)


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at `offset`; only computed for error messages."""
    newlines = 0
    with _open_binary(path) as f:
        while offset > 0:
            chunk = f.read(min(offset, 2**20))
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            offset -= len(chunk)
    return newlines + 1


def _read_text(part: Part, stats: ReadStats | None) -> Iterator[str]:
    if part.split_by == "file":
        with _open_binary(part.path) as f:
            data = f.read()
        _check_no_nul(data, part.path, 0)
        text = _decode(data, stats).removeprefix("\ufeff")
        if text.strip():
            yield text
        return
    yield from _split_lines((line for _, line in _lines(part, stats)), part.split_by)


def _split_text(text: str, split_by: str) -> Iterator[str]:
    """Documents of one text (a record's value); the same rules as for files."""
    if split_by == "file":
        if text.strip():
            yield text
        return
    yield from _split_lines((line.rstrip("\r") for line in text.split("\n")), split_by)


def _split_lines(lines: Iterable[str], split_by: str) -> Iterator[str]:
    """Documents from lines without terminators, for every mode except 'file'."""
    if split_by == "line":
        yield from (line for line in lines if line.strip())
    elif split_by == "paragraph":
        block: list[str] = []
        for line in lines:
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)
    elif split_by == "sentence":
        for line in lines:
            yield from split_sentences(line)
    elif split_by == "wikitext_article":
        yield from _wikitext_articles(lines)
    else:
        raise AssertionError(f"unknown split mode {split_by!r}")


# Sentence end: [.!?] (and any closing quotes or brackets) followed by whitespace.
_SENTENCE_END = re.compile(r'[.!?]+["\'”’»)\]]*(?=\s)')
# A period after a title or an initial does not end a sentence ("Bw. Anthony", "J. Kikwete").
_ABBREVIATION = re.compile(r'(?:^|[\s"“(])(?:[A-Z]|Bw|Bi|Dk|Dkt|Dr|Mhe|Mh|Prof|Sh|St|Mr|Mrs|Ms|Jr)$')


def split_sentences(text: str) -> Iterator[str]:
    """Sentences of one line of running text, each stripped of surrounding whitespace.

    A sentence ends at [.!?] (plus closing quotes or brackets) followed by whitespace, except
    a single period after a common title (Bw., Bi., Dk., Mhe., Prof., Dr., ...) or a one-letter
    initial. Abbreviations outside that short list split; no sentence spans a line break.
    """
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if match.group() == "." and _ABBREVIATION.search(text, max(0, match.start() - 8), match.start()):
            continue
        sentence = text[start : match.end()].strip()
        if sentence:
            yield sentence
        start = match.end()
    rest = text[start:].strip()
    if rest:
        yield rest


# A top-level WikiText heading is ' = Title = '; sections are ' = = Section = = '.
_WIKITEXT_TITLE = re.compile(r" = [^=].* = ")


def _wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """One document per article: from its ` = Title = ` line up to the next title.

    Blank lines at the start and end of an article are dropped, blank lines inside are kept.
    """
    article: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE.fullmatch(line) and article:
            yield from _trimmed_block(article)
            article = []
        article.append(line)
    yield from _trimmed_block(article)


def _trimmed_block(lines: list[str]) -> Iterator[str]:
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    if nonblank:
        yield "\n".join(lines[nonblank[0] : nonblank[-1] + 1])


def _record_docs(value: Any, part: Part, where: Callable[[], str], stats: ReadStats | None) -> Iterator[str]:
    """Documents of one record's text; `where()` names the record, only for error messages."""
    if value is None:
        return
    if isinstance(value, bytes):
        value = _decode(value, stats)
    if not isinstance(value, str):
        raise UserError(
            f"{part.text_field!r} of {where()} is a {type(value).__name__}, not text; "
            "set text_field to a field that holds strings"
        )
    yield from _split_text(_replace_surrogates(value, stats), part.split_by)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_surrogates(text: str, stats: ReadStats | None) -> str:
    """Lone surrogates (only JSON escapes make them; json.loads joins valid pairs) -> U+FFFD, counted."""
    if not _SURROGATE.search(text):
        return text
    text, replaced = _SURROGATE.subn("\ufffd", text)
    if stats is not None:
        stats.replaced_chars += replaced
    return text


def _record_value(record: Any, part: Part, where: Callable[[], str]) -> Any:
    if not isinstance(record, dict):
        raise UserError(
            f"{where()} is a JSON {type(record).__name__}, not an object with a "
            f"{part.text_field!r} field; write one JSON object per record"
        )
    if part.text_field not in record:
        raise UserError(
            f"{where()} has no field {part.text_field!r} (fields: {', '.join(map(str, record))}); "
            "set text_field to the field that holds the text"
        )
    return record[part.text_field]


def _jsonl_records(part: Part, stats: ReadStats | None) -> Iterator[tuple[Any, Callable[[], str]]]:
    """(parsed record, its description) for each non-blank line of the part."""
    for offset, line in _lines(part, stats):
        if not line.strip():
            continue
        where = functools.partial(_describe_line, part.path, offset)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where()} is not valid JSON ({e.msg}); fix or remove that line") from None
        yield record, where


def _describe_line(path: str, offset: int) -> str:
    return f"line {_line_number(path, offset)} of {path}"


def _read_jsonl(part: Part, stats: ReadStats | None) -> Iterator[str]:
    for record, where in _jsonl_records(part, stats):
        yield from _record_docs(_record_value(record, part, where), part, where, stats)


def _read_json_array(part: Part, stats: ReadStats | None) -> Iterator[str]:
    """The records of a JSON array file, parsed as a stream (ijson): memory stays at one record
    whatever the file's size, where json.loads held the whole text and every record at once.

    ijson's C backend (~2 GB/s) turns a lone surrogate escape ("\\ud800") into "?"; a file with
    any surrogate escape is parsed by its pure-Python backend (~15 MB/s), which keeps it, so that
    it is replaced and counted as everywhere else (`_replace_surrogates`)."""
    import ijson

    parser = ijson.get_backend("python") if _has_surrogate_escape(part.path) else ijson
    with _open_binary(part.path) as f:
        records = parser.items(_CleanUtf8(f, part.path, stats), "item", use_float=True)
        i = 0
        while True:
            try:
                record = next(records, _END)
            except ijson.JSONError as e:
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                raise UserError(f"{part.path} is not valid JSON after record {i} ({reason}); fix the file") from None
            if record is _END:
                return
            where = functools.partial(str, f"record {i} of {part.path}")
            yield from _record_docs(_record_value(record, part, where), part, where, stats)
            i += 1


_END = object()
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_surrogate_escape(path: str) -> bool:
    tail = b""
    with _open_binary(path) as f:
        while chunk := f.read(2**22):
            if _SURROGATE_ESCAPE.search(tail + chunk):
                return True
            tail = chunk[-5:]
    return False


class _CleanUtf8(io.RawIOBase):
    """A binary file as ijson should see it: NUL bytes refused (as in every text source), invalid
    UTF-8 replaced by U+FFFD and counted in `stats`, a leading byte-order mark dropped."""

    def __init__(self, raw: IO[bytes], path: str, stats: ReadStats | None):
        self.raw, self.path, self.stats = raw, path, stats
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors=_COUNTING_REPLACE)
        self.offset, self.pending = 0, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            chunk = self.raw.read(2**20)
            _check_no_nul(chunk, self.path, self.offset)
            before = _REPLACED[0]
            text = self.decoder.decode(chunk, final=not chunk)
            if self.stats is not None:
                self.stats.replaced_chars += _REPLACED[0] - before
            if self.offset == 0:
                text = text.removeprefix("\ufeff")
            self.offset += len(chunk)
            self.pending = text.encode("utf-8")
            if not chunk:
                break
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


# Python's "replace" handler, counting what it replaces (U+FFFD already in the input is not counted).
_REPLACED = [0]
_COUNTING_REPLACE = "smallscale.count_replace"


def _count_replace(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    _REPLACED[0] += 1
    return "\ufffd", error.end


codecs.register_error(_COUNTING_REPLACE, _count_replace)


PARQUET_BATCH_ROWS = 1024


def _read_parquet(part: Part, stats: ReadStats | None) -> Iterator[str]:
    """The row group's texts, PARQUET_BATCH_ROWS at a time: Python strings for a whole row group at
    once (often 100+ MB) would set the worker's peak memory by the writer's row-group size. Arrow's
    memory pool (mimalloc) keeps freed buffers for reuse; they are handed back after the part, so a
    worker's resident memory stays flat over its parts (it grew by ~130 MB otherwise)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = functools.partial(str, f"row group {part.index} of {part.path}")
    try:
        file = pq.ParquetFile(part.path)
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[part.index], columns=[part.text_field]):
            for value in batch.column(0).to_pylist():
                yield from _record_docs(value, part, where, stats)
    finally:
        pa.default_memory_pool().release_unused()


def _hf_description(part: Part) -> str:
    return f"Hugging Face dataset {part.path!r} (config {part.hf_config!r}, split {part.hf_split!r})"


def _load_hf(part: Part) -> Any:
    return _load_hf_cached(part.kind, part.path, part.hf_config, part.hf_split, part.streaming)


@functools.lru_cache(maxsize=4)
def _load_hf_cached(kind: str, path: str, config: str | None, split: str, streaming: bool) -> Any:
    """Each worker loads the dataset (memory-mapped, or the stream's description) once, not once per shard."""
    return _load_hf_uncached(kind, path, config, split, streaming)


_HF_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def _load_hf_uncached(kind: str, path: str, config: str | None, split: str, streaming: bool) -> Any:
    import datasets

    part = Part(kind, path, hf_config=config, hf_split=split, streaming=streaming)
    if kind == "hf_disk":
        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise UserError(
                    f"{path} has no split {split!r} (splits: {', '.join(dataset)}); set hf_split to one of them"
                )
            dataset = dataset[split]
        return dataset.to_iterable_dataset() if streaming else dataset
    local_file = Path(path)
    try:
        if local_file.is_file():
            builder = _HF_FILE_BUILDERS.get(_inner_suffix(local_file))
            if builder is None:
                raise UserError(
                    f"hf:{path} has a suffix datasets cannot load; use one of "
                    f"{', '.join(_HF_FILE_BUILDERS)}, or drop the hf: prefix"
                )
            return datasets.load_dataset(builder, data_files=path, split=split, streaming=streaming)
        return datasets.load_dataset(path, config, split=split, streaming=streaming)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{_hf_description(part)} could not be loaded ({reason}); check the name, hf_config and hf_split"
        ) from None


def _read_hf(part: Part, stats: ReadStats | None) -> Iterator[str]:
    dataset = _load_hf(part)
    where = functools.partial(_hf_description, part)
    if part.streaming:
        shard = dataset.shard(part.num_shards, part.index) if part.num_shards > 1 else dataset
        for record in shard:
            yield from _record_docs(_record_value(record, part, where), part, where, stats)
        return
    shard = dataset.shard(part.num_shards, part.index, contiguous=True)
    for batch in shard.select_columns([part.text_field]).iter(batch_size=1000):
        for value in batch[part.text_field]:
            yield from _record_docs(value, part, where, stats)


def _read_ces_xml(part: Part, stats: ReadStats | None) -> Iterator[str]:
    """A Corpus Encoding Standard bible: verses are lines, chapters paragraphs, the book a file."""
    chapters = ("\n".join(verses) for verses in _ces_chapters(part.path) if verses)
    if part.split_by == "file":
        text = "\n\n".join(chapters)
        if text:
            yield text
    elif part.split_by == "paragraph":
        yield from chapters
    elif part.split_by == "line":
        yield from (verse for chapter in chapters for verse in chapter.split("\n"))
    else:
        raise AssertionError(f"split mode {part.split_by!r} is not defined for CES XML")


def _ces_chapters(path: str) -> Iterator[list[str]]:
    """The verse texts of each `<div type="chapter">`, streamed so memory stays flat."""
    try:
        for _, element in ET.iterparse(path, events=("end",)):
            if element.tag == "div" and element.get("type") == "chapter":
                verses = [(seg.text or "").strip() for seg in element.iter("seg")]
                yield [verse for verse in verses if verse]
                element.clear()
    except ET.ParseError as e:
        raise UserError(f"{path} is not well-formed XML ({e}); restore the original file") from None
