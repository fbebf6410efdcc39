"""Named corpora (`builtin:NAME`) and the file resolution they share with evaluation tasks.

Every file of an entry is pinned by sha256 and found, in this order:

1. in the data root: `--data-root` / `SourceOptions.data_root`, else `$SMALLSCALE_DATA_ROOT`,
   else the first existing `../shared/data` relative to the working directory or to the
   repository root (see `resolve_data_root`), as `ROOT/FOLDER/FILE`;
2. in the cache: `$SMALLSCALE_CACHE/data/FOLDER/FILE` (default `~/.cache/smallscale/data/...`);
3. downloaded from its raw URL at the pinned commit of its origin repository, verified and then
   moved into the cache.

A file whose hash differs is never used. The texts are loaded, not redistributed: licenses vary
and some are research-only (see each entry's `license`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from smallscale.errors import UserError
from smallscale.io import sha256_file


@dataclass(frozen=True)
class BuiltinFile:
    name: str
    sha256: str
    url: str
    size_bytes: int


@dataclass(frozen=True)
class Builtin:
    name: str
    language: str  # ISO 639-1 code
    use: str  # 'train': text to pretrain on; 'eval': held out for evaluation
    documents: str  # what one document is, in words
    description: str
    license: str  # as stated by the origin; not legal advice
    folder: str  # folder name under the data root and the cache
    files: tuple[BuiltinFile, ...]
    split_by: str  # a split mode of sources.py: 'paragraph', 'line', 'sentence', 'wikitext_article'
    format: str = "text"  # 'text' or 'ces_xml'


def _github_raw(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


_CHAR_RNN = ("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e")
_TINYSTORIES = ("yuninxia/moe-routing-bench", "bb9bb0bd461aa77cf6ab89423b758f586a6f75d1")
_PYTORCH_EXAMPLES = ("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8")
_MANENO_YETU = ("maneno-yetu/data-raw", "c6dbfe034290b2df1edd768c9f2c2fbbd27b66d5")
_BIBLE_CORPUS = ("christos-c/bible-corpus", "44e5fca1bfb369a5da2ee23ebc6f421c88489c5c")
_LAFAND = ("masakhane-io/lafand-mt", "d441f8b063d63e95eafb72e84317359e27abf95e")
_OPENCOMPASS = ("genggui001/opencompass", "5649a0f7e3d246ed58ffaef865f8b818cd8e0044")


def _file(origin: tuple[str, str], path: str, sha256: str, size_bytes: int) -> BuiltinFile:
    return BuiltinFile(path.rsplit("/", 1)[-1], sha256, _github_raw(*origin, path), size_bytes)


_MANENO_FILES = tuple(
    _file(_MANENO_YETU, f"maneno-yetu-corpora-00{i}-20250609-210103.txt", sha, size)
    for i, sha, size in [
        (1, "133bae7191b92440e4e40139af2b122d6d688e7b528a68aab2b2bd298f56fc18", 2_638_061),
        (2, "46ed25b0c6cc21d11fc4994d5f01d5d6988a7a5245f95f0ff6675f3ab9b1f0e1", 1_132_208),
        (3, "005b9021f7de19791ed06ed9dabe9b8976a4621a85878ce173998b90754c3134", 1_208_439),
        (4, "fb2aab4f88e3606e68bccc8df6af42589577788b02259e8db2d7792de23c0bdb", 1_895_121),
        (5, "815910dc453492698ccf3e96ee47cc64c90d5d466bb577ab96117199ca6d6a3b", 2_383_773),
        (6, "1a89ee7ae2d22e7ba5a3a2469edf26a7b7f8e2c2468f033862087f1d4f13d1a1", 3_938_496),
        (7, "5eb94c05cdffd6aa2733e6dda5f6c5b39bf7873b6a46493b392a1597fc863bf9", 1_850_686),
    ]
)

_MAFAND_LICENSE = "CC-BY-NC-4.0 (data, per the repo README); train side from Global Voices (CC BY)"
_FLORES_LICENSE = "CC-BY-SA-4.0 (upstream FLORES-200)"
_WIKITEXT_LICENSE = "CC-BY-SA-3.0 (upstream WikiText)"


def _mafand(language: str, suffix: str, split: str, sha256: str, size_bytes: int) -> Builtin:
    side = "Kiswahili" if suffix == "swa" else "English"
    return Builtin(
        name=f"mafand-{suffix}" + ("" if split == "train" else f"-{split}"),
        language=language,
        use="train" if split == "train" else "eval",
        documents="one sentence (line)",
        description=f"MAFAND-MT en-swa news translation, {side} side of the {split} split "
        "(line i aligns across languages)",
        license=_MAFAND_LICENSE,
        folder="mafand-mt-en-swa",
        files=(_file(_LAFAND, f"data/text_files/en-swa/{split}.{suffix}", sha256, size_bytes),),
        split_by="line",
    )


def _flores(language: str, code: str, split: str, sha256: str, size_bytes: int) -> Builtin:
    return Builtin(
        name=f"flores-{code[:3]}" + ("" if split == "dev" else f"-{split}"),
        language=language,
        use="train" if split == "dev" else "eval",
        documents="one sentence (line)",
        description=f"FLORES-200 {code} {split} split"
        + (" (devtest is reserved for evaluation)" if split == "dev" else "")
        + "; line i aligns across languages",
        license=_FLORES_LICENSE,
        folder="flores200-swh-eng",
        files=(_file(_OPENCOMPASS, f"data/flores200_dataset/{split}/{code}.{split}", sha256, size_bytes),),
        split_by="line",
    )


# (language, file suffix, split, sha256, bytes)
_MAFAND_FILES = [
    ("sw", "swa", "train", "561e4e04014ad64ff6f1878cbcb461b08ad0b1128e4813d554ac0c9830409e67", 3_853_167),
    ("en", "en", "train", "bc6c6f0099aea15ad3a3ffa90d510815d55a004cf1a5c5ebdaba725b3fc52ff1", 3_463_084),
    ("sw", "swa", "dev", "7cc6dd699ac52b86d99ee79667a01dd9981149c484970cec92d679c065960ff6", 229_039),
    ("en", "en", "dev", "1424c085d0a628a3edf3ed683b89fb184811d2c21f7363f179d5b4305222770d", 216_957),
    ("sw", "swa", "test", "ec71f7403fb22ac71aba757c841a10ac9501efa2690045013449080a2821d98c", 254_670),
    ("en", "en", "test", "584837ea4a3f4729277e8d5ce8f3b65ab7ef2d5ac28451e0cdcf711266bc68a1", 231_424),
]
# (language, FLORES code, split, sha256, bytes)
_FLORES_FILES = [
    ("sw", "swh_Latn", "dev", "59c8ee7cb9a702f32ff3f3e6974f4465db63df0d7172fe0d53c8bd2405daa547", 132_843),
    ("en", "eng_Latn", "dev", "51a25f527fd81f428b6933d85a2f5e5544af92aa82042c7fbf0c4120327fba0a", 126_287),
    ("sw", "swh_Latn", "devtest", "834ce9e5f48893505f9d69dec24da2545be4323e841fb23440e36c62c5d61ee4", 139_322),
    ("en", "eng_Latn", "devtest", "612e9fbe87997617c0fa8fa8929654a4f49b728d96738112c2b86ef6a1d78d88", 133_108),
]

_ENTRIES: tuple[Builtin, ...] = (
    Builtin(
        name="tinyshakespeare",
        language="en",
        use="train",
        documents="one speech (blank-line separated block)",
        description="Tiny Shakespeare, 1.1 MB of plays (char-rnn)",
        license="MIT (char-rnn repo); the plays are public domain",
        folder="tinyshakespeare",
        files=(
            _file(
                _CHAR_RNN,
                "data/tinyshakespeare/input.txt",
                "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                1_115_394,
            ),
        ),
        split_by="paragraph",
    ),
    Builtin(
        name="tinystories",
        language="en",
        use="train",
        documents="one paragraph (blank-line separated; story boundaries are not marked)",
        description="TinyStories, first 0.8 MB of the validation split",
        license="CDLA-Sharing-1.0 (upstream TinyStories); MIT (copying repo)",
        folder="tinystories-val-subset",
        files=(
            _file(
                _TINYSTORIES,
                "data/tinystories_val.txt",
                "5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6",
                794_375,
            ),
        ),
        split_by="paragraph",
    ),
    Builtin(
        name="wikitext2",
        language="en",
        use="train",
        documents='one article (from a top-level " = Title = " heading to the next)',
        description="WikiText-2 (tokenised v1 form) validation split; train.txt is not "
        "available, wikitext2-test is the evaluation split",
        license=_WIKITEXT_LICENSE,
        folder="wikitext2",
        files=(
            _file(
                _PYTORCH_EXAMPLES,
                "word_language_model/data/wikitext-2/valid.txt",
                "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                1_121_681,
            ),
        ),
        split_by="wikitext_article",
    ),
    Builtin(
        name="wikitext2-test",
        language="en",
        use="eval",
        documents='one article (from a top-level " = Title = " heading to the next)',
        description="WikiText-2 (tokenised v1 form) test split, for perplexity",
        license=_WIKITEXT_LICENSE,
        folder="wikitext2",
        files=(
            _file(
                _PYTORCH_EXAMPLES,
                "word_language_model/data/wikitext-2/test.txt",
                "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                1_256_449,
            ),
        ),
        split_by="wikitext_article",
    ),
    Builtin(
        name="maneno-yetu",
        language="sw",
        use="train",
        # Each file is one line of sentence-shuffled text, so a sentence is the only unit
        # that carries meaning; see sources.split_sentences for the exact rule.
        documents='one sentence ([.!?] followed by whitespace; titles such as "Bw." kept)',
        description="Maneno Yetu Swahili web/news text, files 001-007 (15 MB, sentence-shuffled)",
        license="unclear; README says open for academic and research use (treat as research-only)",
        folder="maneno-yetu-swa",
        files=_MANENO_FILES,
        split_by="sentence",
    ),
    Builtin(
        name="swahili-nt",
        language="sw",
        use="train",
        documents="one chapter (its verses joined by '\\n')",
        description="Swahili New Testament from the multilingual Bible corpus (CES XML)",
        license="CC0-1.0",
        folder="bible-swahili-nt",
        files=(
            _file(
                _BIBLE_CORPUS,
                "bibles/Swahili-NT.xml",
                "a00ef6b173c586f40eb66f2b41aa48c010c7adce74338446686763de07efa17c",
                1_431_067,
            ),
        ),
        split_by="paragraph",
        format="ces_xml",
    ),
    *(_mafand(*row) for row in _MAFAND_FILES),
    *(_flores(*row) for row in _FLORES_FILES),
)
BUILTINS: dict[str, Builtin] = {entry.name: entry for entry in _ENTRIES}


def get_builtin(name: str) -> Builtin:
    if name not in BUILTINS:
        raise UserError(f"unknown built-in corpus {name!r}; known: {', '.join(BUILTINS)}")
    return BUILTINS[name]


def list_builtins() -> list[dict]:
    """One row per entry, for the CLI table (files, URLs and hashes are in `BUILTINS`)."""
    return [
        {
            "name": entry.name,
            "language": entry.language,
            "use": entry.use,
            "documents": entry.documents,
            "size_mb": round(sum(f.size_bytes for f in entry.files) / 1e6, 1),
            "license": entry.license,
            "description": entry.description,
        }
        for entry in _ENTRIES
    ]


def builtin_paths(name: str, data_root: str | Path | None = None) -> list[Path]:
    """Local, verified paths of all files of entry `name`, fetching the ones not found."""
    entry = get_builtin(name)
    return [fetch(entry.folder, f.name, f.sha256, f.url, data_root) for f in entry.files]


def resolve_data_root(explicit: str | Path | None) -> Path | None:
    """The folder that holds FOLDER/FILE for the corpora, or None if there is none.

    An explicit value or `$SMALLSCALE_DATA_ROOT` must exist; otherwise the first existing of
    `../shared/data` relative to the working directory and to the repository root is used.
    """
    for given, what in (
        (explicit, "data root"),
        (os.environ.get("SMALLSCALE_DATA_ROOT"), "SMALLSCALE_DATA_ROOT"),
    ):
        if given:
            root = Path(given).expanduser()
            if not root.is_dir():
                raise UserError(
                    f"{what} {str(given)!r} is not a folder; point it to the folder that holds "
                    "the corpora (e.g. ../shared/data)"
                )
            return root
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / "../shared/data", repo_root / "../shared/data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def cache_root() -> Path:
    """Where fetched corpus files are kept: `$SMALLSCALE_CACHE/data` or ~/.cache/smallscale/data."""
    base = os.environ.get("SMALLSCALE_CACHE") or Path.home() / ".cache" / "smallscale"
    return Path(base).expanduser() / "data"


def fetch(entry_or_folder: str, filename: str, sha256: str, url: str, data_root: str | Path | None = None) -> Path:
    """A verified local copy of one pinned file: from the data root, the cache, or downloaded.

    `entry_or_folder` is a built-in name (its folder is used) or a folder name under the data
    root and cache, so evaluation tasks resolve their files the same way as corpora.
    """
    folder = BUILTINS[entry_or_folder].folder if entry_or_folder in BUILTINS else entry_or_folder
    root = resolve_data_root(data_root)
    if root is not None and (root / folder / filename).is_file():
        return _verified(root / folder / filename, sha256)
    cached = cache_root() / folder / filename
    if cached.is_file():
        if _sha256_cached(cached) == sha256:
            return cached
        cached.unlink()  # a damaged cache entry is ours to replace
    try:
        _download(url, cached, sha256)
    except OSError as e:
        raise UserError(
            f"{folder}/{filename} is not in the data root ({root}) or the cache ({cache_root()}) "
            f"and downloading {url} failed ({e}); pass --data-root or set SMALLSCALE_DATA_ROOT "
            f"to a folder that holds {folder}/{filename}"
        ) from None
    return cached


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def _sha256_cached(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _verified(path: Path, sha256: str) -> Path:
    actual = _sha256_cached(path)
    if actual != sha256:
        raise UserError(_mismatch(path, sha256, actual) + "; restore the original file")
    return path


def _mismatch(path: Path | str, expected: str, actual: str) -> str:
    return f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}"


def _download(url: str, dest: Path, sha256: str) -> None:
    """Download to a temporary file next to `dest`, verify, then rename: never a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(2**20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise UserError(
                _mismatch(url, sha256, digest.hexdigest()) + "; the remote file changed, report "
                "it or pass --data-root to a folder that holds the original"
            )
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
