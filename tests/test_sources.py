"""Reading documents from local files and datasets: every format gives the same notion of a document."""

import gzip
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from smallscale.data.sources import (
    Part,
    ReadStats,
    SourceOptions,
    check_nonempty,
    iter_documents,
    read_part,
    resolve_parts,
    split_sentences,
)
from smallscale.errors import UserError


def docs(source, **options):
    return list(iter_documents(str(source), SourceOptions(**options)))


def docs_by_part(source, **options):
    """Read each part on its own, as worker processes do."""
    parts = resolve_parts(str(source), SourceOptions(**options))
    return [list(read_part(pickle.loads(pickle.dumps(part)))) for part in parts]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache inside the test's folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


# --- split modes -------------------------------------------------------------------------------


def test_file_mode_is_the_default_and_keeps_the_text_whole(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  second para\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("other file", encoding="utf-8")
    assert docs(tmp_path) == ["first line\n\n  second para\n", "other file"]


def test_line_mode_yields_non_blank_lines_without_terminators(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes(b" leading space\r\nsecond\n\n   \n\ttab kept \nno newline at end")
    assert docs(path, split_by="line") == [" leading space", "second", "\ttab kept ", "no newline at end"]


def test_paragraph_mode_splits_at_blank_and_whitespace_only_lines(tmp_path):
    path = tmp_path / "paras.txt"
    path.write_bytes(b"\n\nA1\r\nA2\n\n\nB1\n   \nC1\nC2\nC3\n")
    assert docs(path, split_by="paragraph") == ["A1\nA2", "B1", "C1\nC2\nC3"]


def test_whitespace_only_files_give_no_documents(tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
    assert docs(tmp_path / "blank.txt") == []
    with pytest.raises(UserError, match="no documents"):
        check_nonempty(str(tmp_path / "blank.txt"), 0)
    check_nonempty(str(tmp_path / "blank.txt"), 1)


def test_a_leading_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffHello\nWorld\n".encode())
    assert docs(path, split_by="line") == ["Hello", "World"]


def test_sentence_split_keeps_titles_initials_and_closing_quotes():
    text = 'Bw. Anthony Ngaiza alifika Dar. "Sasa tuko tayari?" akauliza. Rais J. Kikwete alisema hivyo! Mwisho'
    assert list(split_sentences(text)) == [
        "Bw. Anthony Ngaiza alifika Dar.",
        '"Sasa tuko tayari?"',
        "akauliza.",
        "Rais J. Kikwete alisema hivyo!",
        "Mwisho",
    ]


def test_wikitext_articles_start_at_top_level_titles_only(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(
        " \n = One = \n \n Text one . \n \n = = Section = = \n More . \n \n = Two = \n Text two . \n \n",
        encoding="utf-8",
    )
    part = Part("text", str(path), "wikitext_article")
    assert list(read_part(part)) == [
        " = One = \n \n Text one . \n \n = = Section = = \n More . ",
        " = Two = \n Text two . ",
    ]


def test_ces_xml_verses_are_lines_and_chapters_are_paragraphs(tmp_path):
    path = tmp_path / "bible.xml"
    path.write_text(
        "<cesDoc><text><body>"
        '<div id="b.A" type="book"><div id="b.A.1" type="chapter">'
        '<seg id="b.A.1.1" type="verse">\n\tIn the beginning\n</seg>'
        '<seg id="b.A.1.2" type="verse">\tsecond verse </seg></div>'
        '<div id="b.A.2" type="chapter"><seg id="b.A.2.1" type="verse">third</seg></div>'
        "</div></body></text></cesDoc>",
        encoding="utf-8",
    )
    read = {mode: list(read_part(Part("ces_xml", str(path), mode))) for mode in ("paragraph", "line", "file")}
    assert read["paragraph"] == ["In the beginning\nsecond verse", "third"]
    assert read["line"] == ["In the beginning", "second verse", "third"]
    assert read["file"] == ["In the beginning\nsecond verse\n\nthird"]


# --- formats -----------------------------------------------------------------------------------


def test_jsonl_reads_the_text_field_and_skips_nulls(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"body": "one", "id": 1}, {"body": None, "id": 2}, {"body": "two\nlines", "id": 3}])
    assert docs(path, text_field="body") == ["one", "two\nlines"]
    assert docs(path, text_field="body", split_by="line") == ["one", "two", "lines"]


def test_json_array_files_are_read_as_records(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    assert docs(path) == ["a", "b"]


def test_a_json_array_is_read_as_a_stream(tmp_path):
    # records come one at a time: the first is read before the broken tail is reached, which
    # json.loads of the whole file (memory: the file and all its records at once) could not do
    path = tmp_path / "data.json"
    path.write_text('[{"text": "first"}, {"text": "second"}, {"text": "unterminated}', encoding="utf-8")
    records = read_part(resolve_parts(str(path), SourceOptions())[0])
    assert next(records) == "first" and next(records) == "second"
    with pytest.raises(UserError, match=r"data.json is not valid JSON after record 2 \(.*\); fix the file$"):
        next(records)


def test_a_json_array_keeps_utf8_rules_of_every_source(tmp_path):
    # invalid UTF-8 and lone surrogate escapes become U+FFFD and are counted; real U+FFFD and
    # surrogate pairs are kept; a byte-order mark is dropped
    bad_bytes = tmp_path / "bytes.json"
    bad_bytes.write_bytes(b'\xef\xbb\xbf[{"text": "bad \xff byte \xef\xbf\xbd real"}]')
    surrogates = tmp_path / "escapes.json"
    surrogates.write_text(json.dumps([{"text": "lone \ud800 pair \U0001f600"}]), encoding="utf-8")
    for path, expected in ((bad_bytes, "bad \ufffd byte \ufffd real"), (surrogates, "lone \ufffd pair \U0001f600")):
        stats = ReadStats()
        assert list(read_part(resolve_parts(str(path), SourceOptions())[0], stats)) == [expected]
        assert stats.replaced_chars == 1, path


def test_parquet_row_groups_are_parts_in_order(tmp_path):
    path = tmp_path / "data.parquet"
    texts = [f"document {i}" for i in range(10)]
    pq.write_table(pa.table({"content": texts, "n": list(range(10))}), path, row_group_size=3)
    per_part = docs_by_part(path, text_field="content")
    assert [len(p) for p in per_part] == [3, 3, 3, 1]
    assert [d for p in per_part for d in p] == texts


def test_a_row_group_larger_than_a_read_batch_is_read_whole_and_in_order(tmp_path, monkeypatch):
    import smallscale.data.sources as sources_module

    monkeypatch.setattr(sources_module, "PARQUET_BATCH_ROWS", 4)  # row groups of 10: batches 4+4+2
    path = tmp_path / "data.parquet"
    texts = [f"document {i}" for i in range(25)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10)
    per_part = docs_by_part(path)
    assert [len(p) for p in per_part] == [10, 10, 5]
    assert [d for p in per_part for d in p] == texts


def test_gzip_and_zstd_files_are_read_as_one_part_each(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": f"gz {i}"}) + "\n" for i in range(50)))
    with zstandard.open(tmp_path / "b.txt.zst", "wt", encoding="utf-8") as f:
        f.write("".join(f"zst {i}\n" for i in range(50)))
    parts = resolve_parts(str(tmp_path), SourceOptions(split_by="line", part_bytes=16))
    assert [p.kind for p in parts] == ["jsonl", "text"]
    assert docs(tmp_path, split_by="line", part_bytes=16) == (
        [f"gz {i}" for i in range(50)] + [f"zst {i}" for i in range(50)]
    )


def test_corrupt_compressed_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.txt.gz").write_bytes(gzip.compress(b"hello\n" * 100)[:-20])
    with pytest.raises(UserError, match="bad.txt.gz could not be decompressed"):
        docs(tmp_path / "bad.txt.gz")
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd")
    with pytest.raises(UserError, match="bad.jsonl.zst could not be decompressed"):
        resolve_parts(str(tmp_path / "bad.jsonl.zst"), SourceOptions())


# --- folders and globs -------------------------------------------------------------------------


def test_folders_are_read_recursively_in_sorted_order_skipping_hidden_and_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.txt").write_text("b/z", encoding="utf-8")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "c.md").write_text("c", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / ".git" / "HEAD").write_text("hidden too", encoding="utf-8")
    (tmp_path / "model.bin").write_bytes(b"\x00\x01binary")
    assert docs(tmp_path) == ["a", "b/z", "c"]


def test_globs_match_files_recursively_in_sorted_order(tmp_path):
    for name in ["x/2.txt", "x/1.txt", "y/deep/0.txt", "y/skip.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name, encoding="utf-8")
    assert docs(f"{tmp_path}/**/*.txt") == ["x/1.txt", "x/2.txt", "y/deep/0.txt"]


# --- byte ranges -------------------------------------------------------------------------------


@pytest.mark.parametrize("part_bytes", [1, 7, 10, 64, 1000])
def test_byte_ranges_yield_every_line_once_in_order(tmp_path, part_bytes):
    lines = [f"line {i} " + "x" * (i * 7 % 23) for i in range(300)]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    per_part = docs_by_part(path, split_by="line", part_bytes=part_bytes)
    assert len(per_part) == -(-path.stat().st_size // part_bytes)
    assert [d for p in per_part for d in p] == lines


def test_byte_ranges_on_line_aligned_boundaries(tmp_path):
    path = tmp_path / "fixed.txt"
    path.write_text("".join(f"{i:09d}\n" for i in range(100)), encoding="utf-8")  # 10 bytes each
    per_part = docs_by_part(path, split_by="line", part_bytes=20)
    assert [len(p) for p in per_part] == [2] * 50
    assert [d for p in per_part for d in p] == [f"{i:09d}" for i in range(100)]


def test_large_jsonl_is_split_into_byte_ranges(tmp_path):
    path = tmp_path / "big.jsonl"
    write_jsonl(path, [{"text": f"record {i} " + "é" * (i % 5)} for i in range(200)])
    per_part = docs_by_part(path, part_bytes=500)
    assert len(per_part) > 5
    assert [d for p in per_part for d in p] == [f"record {i} " + "é" * (i % 5) for i in range(200)]


def test_paragraph_mode_is_never_cut_into_byte_ranges(tmp_path):
    path = tmp_path / "paras.txt"
    path.write_text("a\nb\n\n" * 100, encoding="utf-8")
    assert len(resolve_parts(str(path), SourceOptions(split_by="paragraph", part_bytes=10))) == 1


# --- encoding ----------------------------------------------------------------------------------


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"good\nbad \xff\xfe here\nreal \xef\xbf\xbd and \xff\ncut \xe2\x82\n")
    stats = ReadStats()
    found = list(iter_documents(str(path), SourceOptions(split_by="line"), stats))
    assert found == ["good", "bad \ufffd\ufffd here", "real \ufffd and \ufffd", "cut \ufffd"]
    assert stats.replaced_chars == 4  # the U+FFFD present in the input is not a replacement


def test_a_json_escaped_lone_surrogate_is_replaced_and_counted_like_invalid_utf8(tmp_path):
    path = tmp_path / "escapes.jsonl"
    path.write_text('{"text": "lone \\ud800 here"}\n{"text": "pair \\ud83d\\ude00 ok"}\n', encoding="utf-8")
    stats = ReadStats()
    found = list(iter_documents(str(path), SourceOptions(), stats))
    assert found == ["lone \ufffd here", "pair \U0001f600 ok"]
    assert stats.replaced_chars == 1


# --- Hugging Face datasets (local only: the Hub is not reachable from tests) --------------------


def test_saved_dataset_folder_is_read_in_contiguous_shards(tmp_path, hf_cache):
    texts = [f"row {i} " + "y" * 50 for i in range(40)]
    hf_cache.Dataset.from_dict({"text": texts, "n": list(range(40))}).save_to_disk(str(tmp_path / "saved"))
    for source in (str(tmp_path / "saved"), f"hf:{tmp_path / 'saved'}"):
        per_part = docs_by_part(source, part_bytes=500)
        assert len(per_part) > 1
        assert [d for p in per_part for d in p] == texts
        assert docs(source, streaming=True) == texts
        assert len(resolve_parts(source, SourceOptions(streaming=True))) == 1


def test_saved_dataset_dict_selects_the_split(tmp_path, hf_cache):
    splits = {
        "train": hf_cache.Dataset.from_dict({"text": ["t1", "t2"]}),
        "validation": hf_cache.Dataset.from_dict({"text": ["v1"]}),
    }
    hf_cache.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert docs(f"hf:{tmp_path / 'dd'}", hf_split="validation") == ["v1"]
    with pytest.raises(UserError, match="no split 'test'.*train, validation"):
        docs(f"hf:{tmp_path / 'dd'}", hf_split="test")


@pytest.mark.parametrize("streaming", [False, True])
def test_local_jsonl_through_hf_datasets(tmp_path, hf_cache, streaming):
    folder = tmp_path / "jsonl-dataset"
    folder.mkdir()
    write_jsonl(folder / "data.jsonl", [{"body": f"doc {i}", "id": i} for i in range(25)])
    expected = [f"doc {i}" for i in range(25)]
    for source in (f"hf:{folder}", f"hf:{folder / 'data.jsonl'}"):
        assert docs(source, text_field="body", streaming=streaming) == expected


def test_hf_missing_column_names_the_available_ones(tmp_path, hf_cache):
    hf_cache.Dataset.from_dict({"content": ["a"], "n": [1]}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(UserError, match="no column 'text'.*content, n"):
        resolve_parts(f"hf:{tmp_path / 's'}", SourceOptions())


def test_hf_unknown_split_is_a_user_error(tmp_path, hf_cache):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(UserError, match="split 'nope'.*could not be loaded"):
        resolve_parts(f"hf:{tmp_path / 'd.jsonl'}", SourceOptions(hf_split="nope"))


# --- errors ------------------------------------------------------------------------------------


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file or folder: .*nothing.txt"):
        resolve_parts(str(tmp_path / "nothing.txt"), SourceOptions())


def test_glob_matching_nothing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"matches no readable files"):
        resolve_parts(str(tmp_path / "*.jsonl"), SourceOptions())


def test_folder_without_readable_files_is_a_user_error(tmp_path):
    (tmp_path / ".hidden").write_text("x", encoding="utf-8")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="has no readable files"):
        resolve_parts(str(tmp_path), SourceOptions())


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown built-in corpus 'shakespeare'.*tinyshakespeare"):
        resolve_parts("builtin:shakespeare", SourceOptions())


def test_unknown_split_by_is_a_user_error(tmp_path):
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    with pytest.raises(UserError, match="split_by 'sentences' is unknown.*file, line, paragraph"):
        resolve_parts(str(tmp_path / "a.txt"), SourceOptions(split_by="sentences"))


def test_missing_jsonl_field_names_the_available_ones_before_reading(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"content": "a", "id": 1}])
    with pytest.raises(UserError, match=r"line 1 of .*d.jsonl has no field 'text' \(fields: content, id\)"):
        resolve_parts(str(tmp_path / "d.jsonl"), SourceOptions())


def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"r{i}"}) + "\n" for i in range(100)) + '{"text": broken\n',
        encoding="utf-8",
    )
    with pytest.raises(UserError, match=r"line 101 of .*d.jsonl is not valid JSON"):
        docs(path, part_bytes=300)  # the bad line is in a later byte range


def test_missing_parquet_column_names_the_available_ones(tmp_path):
    pq.write_table(pa.table({"content": ["a"], "id": [1]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"no column 'text' \(columns: content, id\)"):
        resolve_parts(str(tmp_path / "d.parquet"), SourceOptions())
