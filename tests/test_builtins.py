"""The built-in corpora, read from the real files in ../shared/data, and how their files are found."""

import hashlib
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from smallscale.data import builtins
from smallscale.data.builtins import (
    BUILTINS,
    builtin_paths,
    fetch,
    list_builtins,
    resolve_data_root,
)
from smallscale.data.sources import SourceOptions, iter_documents, resolve_parts
from smallscale.errors import UserError

pytestmark = pytest.mark.data

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / "../shared/data").resolve()

# Documents per entry with its own split mode. The counts in the PROVENANCE files agree where
# they count the same thing (lines, sentence pairs, 60/62 WikiText articles).
EXPECTED_DOCUMENTS = {
    "tinyshakespeare": 7_222,  # speeches
    "tinystories": 4_302,  # blank-line separated paragraphs (4,356 non-empty lines)
    "wikitext2": 60,  # articles
    "wikitext2-test": 62,
    "maneno-yetu": 95_359,  # sentences
    "swahili-nt": 256,  # chapters: this copy lacks Philippians (4 chapters of the usual 260)
    "mafand-swa": 30_782,
    "mafand-en": 30_782,
    "mafand-swa-dev": 1_791,
    "mafand-en-dev": 1_791,
    "mafand-swa-test": 1_835,
    "mafand-en-test": 1_835,
    "flores-swh": 997,
    "flores-eng": 997,
    "flores-swh-devtest": 1_012,
    "flores-eng-devtest": 1_012,
}


@pytest.fixture(autouse=True)
def default_resolution(tmp_path, monkeypatch):
    """Default data root (found from the repo root), an empty cache, and no network."""
    monkeypatch.delenv("SMALLSCALE_DATA_ROOT", raising=False)
    monkeypatch.setenv("SMALLSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the working directory has no ../shared/data

    def no_network(url, *args, **kwargs):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_default_data_root_is_shared_data_next_to_the_repo():
    assert resolve_data_root(None) == SHARED_DATA


def test_default_data_root_can_also_be_found_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert resolve_data_root(None) == tmp_path / "shared" / "data"


def test_explicit_root_wins_over_the_environment(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    (tmp_path / "explicit").mkdir()
    monkeypatch.setenv("SMALLSCALE_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_missing_data_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data root '.*nowhere' is not a folder"):
        resolve_data_root(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name", sorted(EXPECTED_DOCUMENTS))
def test_builtin_yields_the_expected_number_of_documents(name):
    found = list(iter_documents(f"builtin:{name}", SourceOptions()))
    assert len(found) == EXPECTED_DOCUMENTS[name]
    assert all(doc.strip() for doc in found)


def test_every_entry_is_tested_and_listed():
    assert set(BUILTINS) == set(EXPECTED_DOCUMENTS)
    rows = list_builtins()
    assert [row["name"] for row in rows] == list(BUILTINS)
    assert {row["use"] for row in rows} == {"train", "eval"}


@pytest.mark.parametrize("entry", BUILTINS.values(), ids=list(BUILTINS))
def test_files_are_pinned_to_a_commit_and_match_the_shared_copies(entry):
    for file in entry.files:
        assert re.fullmatch(r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/.+", file.url)
        assert file.url.endswith("/" + file.name)
        local = SHARED_DATA / entry.folder / file.name
        assert local.stat().st_size == file.size_bytes
        assert sha256(local) == file.sha256


def test_swahili_nt_verses_are_the_lines_of_its_chapters():
    chapters = list(iter_documents("builtin:swahili-nt", SourceOptions()))
    verses = list(iter_documents("builtin:swahili-nt", SourceOptions(split_by="line")))
    assert chapters[0].startswith("Yesu Kristo alikuwa mzawa wa Daudi")
    assert len(verses) == sum(len(c.split("\n")) for c in chapters) == 7_853


def test_wikitext_documents_are_whole_articles():
    articles = list(iter_documents("builtin:wikitext2", SourceOptions()))
    assert articles[0].startswith(" = Homarus gammarus = \n")
    title = re.compile(r"^ = [^=].* = $", re.MULTILINE)
    assert all(len(title.findall(article)) == 1 and title.match(article) for article in articles)


def test_maneno_yetu_sentences_end_at_punctuation_but_not_after_titles():
    sentences = list(iter_documents("builtin:maneno-yetu", SourceOptions()))
    assert sentences[0].startswith("Mahafali hayo") and sentences[0].endswith("nchi.")
    assert not any(s.endswith((" Bw.", " Bi.", " Dk.")) for s in sentences)
    assert sum(s[-1] in '.!?"' for s in sentences) / len(sentences) > 0.95


def test_parallel_entries_stay_aligned():
    swahili = list(iter_documents("builtin:flores-swh-devtest", SourceOptions()))
    english = list(iter_documents("builtin:flores-eng-devtest", SourceOptions()))
    assert len(swahili) == len(english)
    assert english[1].startswith("Dr. Ehud Ur") and swahili[1].startswith("Dak. Ehud Ur")


def test_split_by_overrides_an_entry_default():
    lines = list(iter_documents("builtin:tinyshakespeare", SourceOptions(split_by="line")))
    assert lines[:2] == ["First Citizen:", "Before we proceed any further, hear me speak."]


def test_builtin_parts_point_at_verified_local_files():
    parts = resolve_parts("builtin:maneno-yetu", SourceOptions())
    assert [Path(p.path).parent for p in parts] == [SHARED_DATA / "maneno-yetu-swa"] * 7


# --- checksums, cache and download ---------------------------------------------------------------


def copy_into_root(root, entry_name):
    entry = BUILTINS[entry_name]
    (root / entry.folder).mkdir(parents=True)
    for file in entry.files:
        shutil.copyfile(SHARED_DATA / entry.folder / file.name, root / entry.folder / file.name)
    return root / entry.folder / entry.files[0].name


def test_files_are_read_from_an_explicit_data_root(tmp_path):
    copied = copy_into_root(tmp_path / "root", "flores-swh")
    assert builtin_paths("flores-swh", tmp_path / "root") == [copied]
    found = list(iter_documents("builtin:flores-swh", SourceOptions(data_root=str(tmp_path / "root"))))
    assert len(found) == 997


def test_altered_file_in_data_root_is_a_checksum_error(tmp_path):
    copied = copy_into_root(tmp_path / "root", "tinyshakespeare")
    assert builtin_paths("tinyshakespeare", tmp_path / "root") == [copied]  # verified and cached
    copied.write_bytes(copied.read_bytes().replace(b"First Citizen", b"Fir5t Citizen", 1))
    stat = copied.stat()  # an edit changes the mtime even where the clock is coarse
    os.utime(copied, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    expected = BUILTINS["tinyshakespeare"].files[0].sha256
    with pytest.raises(
        UserError,
        match=f"checksum mismatch for .*input.txt: expected sha256 {expected}, got {sha256(copied)}",
    ):
        list(iter_documents("builtin:tinyshakespeare", SourceOptions(data_root=str(tmp_path / "root"))))


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """A 'remote' file served through urlopen from a temporary file:// URL."""
    path = tmp_path / "remote" / "corpus.txt"
    path.parent.mkdir()
    path.write_text("remote text\n", encoding="utf-8")
    calls = []

    def urlopen(url, *args, **kwargs):
        calls.append(url)
        return urllib.request.build_opener().open(url)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    (tmp_path / "empty-root").mkdir()
    return path, path.as_uri(), sha256(path), calls


def test_missing_file_is_downloaded_into_the_cache_once(tmp_path, remote):
    path, url, digest, calls = remote
    got = fetch("my-task", "corpus.txt", digest, url, tmp_path / "empty-root")
    assert got == tmp_path / "cache" / "data" / "my-task" / "corpus.txt"
    assert got.read_text(encoding="utf-8") == "remote text\n"
    assert fetch("my-task", "corpus.txt", digest, url, tmp_path / "empty-root") == got
    assert calls == [url]
    assert [p.name for p in got.parent.iterdir()] == ["corpus.txt"]  # no temporary file left


def test_damaged_cache_entry_is_downloaded_again(tmp_path, remote):
    path, url, digest, calls = remote
    cached = fetch("my-task", "corpus.txt", digest, url, tmp_path / "empty-root")
    cached.write_text("damaged", encoding="utf-8")
    assert fetch("my-task", "corpus.txt", digest, url, tmp_path / "empty-root") == cached
    assert cached.read_text(encoding="utf-8") == "remote text\n"
    assert len(calls) == 2


def test_download_with_wrong_checksum_is_rejected_and_not_cached(tmp_path, remote):
    path, url, digest, calls = remote
    wrong = "0" * 64
    with pytest.raises(UserError, match=f"checksum mismatch for {url}: expected sha256 {wrong}, got {digest}"):
        fetch("my-task", "corpus.txt", wrong, url, tmp_path / "empty-root")
    assert list((tmp_path / "cache" / "data" / "my-task").iterdir()) == []


def test_failed_download_is_a_user_error_naming_the_fix(tmp_path, remote):
    path, url, digest, calls = remote
    with pytest.raises(UserError, match="downloading .*missing.txt failed .*--data-root"):
        fetch("my-task", "missing.txt", digest, url.replace("corpus", "missing"), tmp_path / "empty-root")


def test_builtin_name_maps_to_its_folder_in_the_cache(tmp_path, remote, monkeypatch):
    path, url, digest, calls = remote
    got = fetch("wikitext2-test", "corpus.txt", digest, url, tmp_path / "empty-root")
    assert got == tmp_path / "cache" / "data" / "wikitext2" / "corpus.txt"
    assert builtins.cache_root() == tmp_path / "cache" / "data"
