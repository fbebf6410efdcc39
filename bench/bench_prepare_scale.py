"""`data prepare` at research scale (issue 13): a multi-GB corpus built here, prepared and measured.

The corpus is built from the shared real corpora (../shared/data: Swahili news, MAFAND, WikiText-2,
TinyStories, Shakespeare; nothing is copied into the repository): their sentences grouped into
documents of ~1.5 KB (log-normal sizes), then copied with per-copy perturbation (sentences shuffled,
~2% of words replaced by corpus words) so that dedup does not collapse it; every 40th document of a
copy is left as in copy 0, so ~2.5% are exact duplicates for dedup to remove. It is written as
eight files, alternately JSONL and Parquet (16 MB row groups).

Measured, each as one subcommand short enough to run alone under the shared benchmark lock
(`flock /tmp/bench.lock python bench/bench_prepare_scale.py SUBCOMMAND`):
  corpus      build a corpus of --size-mb (bench/.work/prepare_scale/corpus-<MB>/)
  tokenizer   train the BPE 8192 tokenizer as `data prepare` does (first 200 MB): time, peak RSS
  small       the 200 MB corpus, interleaved: the limit (bare `tokenizers` encode_batch, one
              thread, same tokenizer, same documents), `data prepare` with 1 and with 2 workers
  large       the >= 2 GB corpus: the limit, then `data prepare` with 2 workers
  kill        the >= 2 GB corpus: `data prepare` killed (SIGKILL) once half its parts are done,
              then run again: what was lost, how long the rerun took, and the same shards as `large`
  array       the >= 2 GB corpus with `--executor submitit-local` (2 array tasks): the same shards as `large`
  order       the merge's dedup + order pass alone, on a synthetic index of 4M documents
  report      bench/results/prepare_scale.json, with the projection to 100 GB on 16 and 64 cores
  clean       delete bench/.work/prepare_scale (sizes reported first)
Every `data prepare` runs the CLI in a subprocess with a given tokenizer (trained once, by
`tokenizer`), sampled every 0.2 s: the peak RSS of the process tree (sum, and the largest single
process), the dataset folder's size, and the phase boundaries (first part file; all parts done).
MB/s counts the corpus's UTF-8 text bytes (duplicates included: all of it is read and encoded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the limit is one thread, as one worker

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallscale.data import order, sources  # noqa: E402
from smallscale.io import atomic_write_json  # noqa: E402

WORK = REPO / "bench" / ".work" / "prepare_scale"
RECORDS = WORK / "records.jsonl"
RESULT = REPO / "bench" / "results" / "prepare_scale.json"
DATA = Path(os.environ.get("SMALLSCALE_DATA_ROOT", REPO.parent / "shared" / "data"))
SMALL_MB, LARGE_MB = 200, 2048
FILES = 8
ROW_GROUP_BYTES = 16 * 2**20
LIMIT_SAMPLE_MB = 48
TARGET_GB = 100


# ----------------------------------------------------------------------------- corpus
def base_documents(rng: random.Random) -> list[list[str]]:
    """Documents (each a list of sentences or paragraphs) from the shared corpora, in a fixed order."""
    streams: list[list[str]] = []
    for path in sorted((DATA / "maneno-yetu-swa").glob("*.txt")):
        streams.append(list(sources.split_sentences(path.read_text(encoding="utf-8"))))
    for name in ("train.swa", "train.en"):
        streams.append([s for s in (DATA / "mafand-mt-en-swa" / name).read_text(encoding="utf-8").splitlines() if s.strip()])
    stories = (DATA / "tinystories-val-subset" / "tinystories_val.txt").read_text(encoding="utf-8")
    streams.append([s for line in stories.splitlines() for s in sources.split_sentences(line)])
    plays = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    streams.append([p.strip() for p in plays.split("\n\n") if p.strip()])
    for name in ("valid.txt", "test.txt"):
        streams.append([s.strip() for s in (DATA / "wikitext2" / name).read_text(encoding="utf-8").splitlines() if s.strip()])
    docs = []
    for stream in streams:
        doc: list[str] = []
        size, target = 0, _doc_bytes(rng)
        for sentence in stream:
            doc.append(sentence)
            size += len(sentence) + 1
            if size >= target:
                docs.append(doc)
                doc, size, target = [], 0, _doc_bytes(rng)
        if doc:
            docs.append(doc)
    return docs


def _doc_bytes(rng: random.Random) -> int:
    return int(min(20_000, max(200, rng.lognormvariate(math.log(1500), 0.8))))


def perturbed(doc: list[str], copy: int, number: int, words: list[str]) -> str:
    """Copy `copy` of document `number`: copy 0 and every 40th document as they are, else sentences
    shuffled and ~2% of words replaced, both seeded by (copy, number)."""
    if copy == 0 or number % 40 == 0:
        return " ".join(doc)
    rng = random.Random(copy * 1_000_003 + number)
    sentences = list(doc)
    rng.shuffle(sentences)
    tokens = " ".join(sentences).split(" ")
    for _ in range(max(1, len(tokens) // 50)):
        tokens[rng.randrange(len(tokens))] = rng.choice(words)
    return " ".join(tokens)


def build_corpus(size_mb: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = WORK / f"corpus-{size_mb}"
    if meta_path(folder).exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(13)
    docs = base_documents(rng)
    words = [w for doc in docs[:2000] for s in doc for w in s.split(" ") if w][:50_000]
    target, per_file = size_mb * 2**20, size_mb * 2**20 // FILES
    total = documents = planted = 0
    copy = 0
    for k in range(FILES):
        parquet = k % 2 == 1
        path = folder / f"part-{k}.{'parquet' if parquet else 'jsonl'}"
        written, batch, batch_bytes = 0, [], 0
        writer = pq.ParquetWriter(path, pa.schema([("text", pa.string())])) if parquet else None
        jsonl = None if parquet else open(path, "w", encoding="utf-8")
        while written < per_file and total < target:
            for number, doc in enumerate(docs):
                text = perturbed(doc, copy, number, words)
                n = len(text.encode("utf-8"))
                planted += copy > 0 and number % 40 == 0
                if parquet:
                    batch.append(text)
                    batch_bytes += n
                    if batch_bytes >= ROW_GROUP_BYTES:
                        writer.write_table(pa.table({"text": batch}))
                        batch, batch_bytes = [], 0
                else:
                    jsonl.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                written += n
                total += n
                documents += 1
            copy += 1
        if parquet:
            if batch:
                writer.write_table(pa.table({"text": batch}))
            writer.close()
        else:
            jsonl.close()
    meta = {"size_mb": size_mb, "text_bytes": total, "documents": documents, "copies": copy,
            "exact_copies_planted": planted, "base_documents": len(docs), "files": FILES,
            "disk_bytes": sum(p.stat().st_size for p in folder.iterdir())}  # fmt: skip
    atomic_write_json(meta_path(folder), meta)
    return folder


def meta_path(folder: Path) -> Path:
    """Next to the corpus folder, not in it (it would be read as part of the corpus)."""
    return folder.with_name(f"{folder.name}.json")


def corpus_meta(folder: Path) -> dict:
    return json.loads(meta_path(folder).read_text())


# ----------------------------------------------------------------------------- measuring
def sample_documents(folder: Path, megabytes: float) -> list[str]:
    """The first documents of each file, `megabytes` in all, as `data prepare` reads them."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jsonl", ".parquet"))
    docs, budget = [], megabytes * 1e6 / len(files)
    for path in files:
        used = 0
        for part in sources.resolve_parts(str(path)):
            for doc in sources.read_part(part):
                docs.append(doc)
                used += len(doc.encode("utf-8"))
                if used >= budget:
                    break
            if used >= budget:
                break
    return docs


def limit_mb_per_s(docs: list[str], tokenizer: Path) -> float:
    """Bare `tokenizers` encode_batch (one thread, batches of 512), MB of text per second."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    start = time.perf_counter()
    for i in range(0, len(docs), 512):
        tok.encode_batch(docs[i : i + 512], add_special_tokens=False)
    return n_bytes / 1e6 / (time.perf_counter() - start)


def encode_step_mb_per_s(docs: list[str], tokenizer: Path) -> float:
    """`data prepare`'s per-batch encode work alone (NFC, tokens into an array, hashes, split,
    counts) on the same documents, without reading or writing: MB/s, one thread."""
    from smallscale.data import shards
    from smallscale.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    job = shards._EncodeJob(0, sources.Part("text", "-"), "-", str(tokenizer), True, 1234, 0.05, "<u2")

    class Sink:
        dtype = np.dtype(np.uint16)

        def write(self, tokens: np.ndarray) -> None:
            pass

    columns: dict[str, list[int]] = {"hash": [], "tokens": [], "bytes": [], "words": [], "val": []}
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    start = time.perf_counter()
    for i in range(0, len(docs), 512):
        batch = [shards.normalize(d, True) for d in docs[i : i + 512]]
        shards._encode_batch(tok, batch, Sink(), columns, job)
    return n_bytes / 1e6 / (time.perf_counter() - start)


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def run_prepare(corpus: Path, out: Path, tokenizer: Path, workers: int, executor: str = "local",
                kill_at: float | None = None, fresh: bool = True) -> dict:  # fmt: skip
    """One `data prepare` in a subprocess, sampled; `kill_at`: SIGKILL it once that fraction of its parts is done."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    n_parts = len(sources.resolve_parts(str(corpus)))
    cmd = [sys.executable, "-m", "smallscale.cli", "data", "prepare", str(corpus), "--out", str(out),
           "--tokenizer", str(tokenizer), "--workers", str(workers), "--executor", executor]  # fmt: skip
    log = open(WORK / f"log-{out.name}.txt", "a")  # noqa: SIM115
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, cwd=REPO)
    root = psutil.Process(proc.pid)
    peak_sum = peak_one = peak_main = peak_disk = 0
    first_part = all_parts = None
    killed: dict | None = None
    last_disk = 0.0
    work = out / "work"
    while proc.poll() is None:
        rss = []
        for p in tree(root):
            try:
                rss.append(p.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        if rss:
            peak_sum, peak_one, peak_main = max(peak_sum, sum(rss)), max(peak_one, max(rss)), max(peak_main, rss[0])
        now = time.perf_counter() - start
        if now - last_disk >= 1.0 and out.exists():
            last_disk = now
            peak_disk = max(peak_disk, folder_bytes(out))
        names = os.listdir(work) if work.is_dir() else []
        done = sum(n.endswith(".done.json") for n in names)
        if first_part is None and any(n.startswith(("part-", ".part-")) for n in names):
            first_part = now
        if all_parts is None and done == n_parts:
            all_parts = now
        if kill_at is not None and killed is None and done >= math.ceil(kill_at * n_parts):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            done = sum(n.endswith(".done.json") for n in os.listdir(work))
            killed = {"at_s": round(now, 1), "parts_done": done, "parts": n_parts, "parts_left": n_parts - done}
            break
        time.sleep(0.2)
    wall = time.perf_counter() - start
    log.close()
    record = {"workers": workers, "executor": executor, "parts": n_parts, "wall_s": round(wall, 2),
              "peak_rss_tree_mb": round(peak_sum / 2**20), "peak_rss_one_process_mb": round(peak_one / 2**20),
              "peak_rss_main_mb": round(peak_main / 2**20), "peak_disk_mb": round(peak_disk / 2**20)}  # fmt: skip
    if killed is not None:
        return {**record, "killed": killed}
    assert proc.returncode == 0, (WORK / f"log-{out.name}.txt").read_text()[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    record.update(
        startup_s=round(first_part, 2) if first_part is not None else None,
        encode_s=round(all_parts - first_part, 2) if all_parts is not None and first_part is not None else None,
        merge_s=round(wall - all_parts, 2) if all_parts is not None else None,
        dataset_mb=round(folder_bytes(out) / 2**20),
        documents_read=manifest["documents_read"], duplicates_removed=manifest["duplicates_removed"],
        train_tokens=manifest["splits"]["train"]["tokens"], val_tokens=manifest["splits"]["val"]["tokens"],
        val_cap=manifest["val_cap"], shard_sha256=[s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]],
    )  # fmt: skip
    return record


def add_rates(record: dict, text_bytes: int) -> dict:
    mb = text_bytes / 1e6
    record["mb_per_s"] = round(mb / record["wall_s"], 3)
    if record.get("encode_s"):
        record["encode_mb_per_s"] = round(mb / record["encode_s"], 3)
    return record


def save(kind: str, **fields: object) -> dict:
    record = {"kind": kind, "cpu": cpu_model(), "cores": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **fields}
    WORK.mkdir(parents=True, exist_ok=True)
    with open(RECORDS, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return record


def records(kind: str) -> list[dict]:
    if not RECORDS.exists():
        return []
    return [r for r in map(json.loads, RECORDS.read_text().splitlines()) if r["kind"] == kind]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def tokenizer_path() -> Path:
    return WORK / "tokenizer" / "tokenizer.json"


# ----------------------------------------------------------------------------- subcommands
def cmd_corpus(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    folder = build_corpus(args.size_mb)
    save("corpus", **corpus_meta(folder), build_s=round(time.perf_counter() - start, 1))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    """Train as `data prepare` does (its own function, in a subprocess with the CLI's default
    thread settings), on the large corpus's first 200 MB of train documents."""
    corpus = build_corpus(LARGE_MB)
    out = tokenizer_path().parent
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    script = ("import sys; from smallscale.data import shards, sources\n"
              f"cfg = shards.PrepareConfig(source={str(corpus)!r}, out={str(out)!r})\n"
              "shards._train_tokenizer_file(cfg, sources.resolve_parts(cfg.source, cfg.source_options()), False)\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    assert proc.returncode == 0
    save("tokenizer", train_bytes=200_000_000, vocab_size=8192, wall_s=round(time.perf_counter() - start, 1),
         peak_rss_mb=round(peak / 2**20))  # fmt: skip


def cmd_small(args: argparse.Namespace) -> None:
    corpus = build_corpus(SMALL_MB)
    meta = corpus_meta(corpus)
    docs = sample_documents(corpus, LIMIT_SAMPLE_MB)
    for rep in range(args.reps):
        save("limit", corpus_mb=SMALL_MB, rep=rep, sample_mb=LIMIT_SAMPLE_MB, mb_per_s=round(limit_mb_per_s(docs, tokenizer_path()), 3))
        save("encode_step", corpus_mb=SMALL_MB, rep=rep, sample_mb=LIMIT_SAMPLE_MB,
             mb_per_s=round(encode_step_mb_per_s(docs, tokenizer_path()), 3))  # fmt: skip
        for workers in (1, 2):
            record = run_prepare(corpus, WORK / f"out-{SMALL_MB}-w{workers}", tokenizer_path(), workers)
            save("prepare", corpus_mb=SMALL_MB, rep=rep, **add_rates(record, meta["text_bytes"]))
    for workers in (1, 2):
        shutil.rmtree(WORK / f"out-{SMALL_MB}-w{workers}", ignore_errors=True)


def cmd_large(args: argparse.Namespace) -> None:
    corpus = build_corpus(LARGE_MB)
    docs = sample_documents(corpus, LIMIT_SAMPLE_MB)
    save("limit", corpus_mb=LARGE_MB, rep=0, sample_mb=LIMIT_SAMPLE_MB, mb_per_s=round(limit_mb_per_s(docs, tokenizer_path()), 3))
    out = WORK / f"out-{LARGE_MB}"
    record = run_prepare(corpus, out, tokenizer_path(), args.workers)
    save("prepare", corpus_mb=LARGE_MB, rep=0, **add_rates(record, corpus_meta(corpus)["text_bytes"]))
    shutil.rmtree(out)


def cmd_kill(args: argparse.Namespace) -> None:
    corpus = build_corpus(LARGE_MB)
    out = WORK / f"out-{LARGE_MB}-kill"
    killed = run_prepare(corpus, out, tokenizer_path(), args.workers, kill_at=0.5)
    resumed = run_prepare(corpus, out, tokenizer_path(), args.workers, fresh=False)
    reference = [r for r in records("prepare") if r["corpus_mb"] == LARGE_MB and r["executor"] == "local"]
    same = bool(reference) and resumed["shard_sha256"] == reference[-1]["shard_sha256"]
    save("kill", corpus_mb=LARGE_MB, killed=killed, resumed=add_rates(resumed, corpus_meta(corpus)["text_bytes"]),
         same_shards_as_uninterrupted=same)  # fmt: skip
    shutil.rmtree(out)


def cmd_array(args: argparse.Namespace) -> None:
    corpus = build_corpus(LARGE_MB)
    out = WORK / f"out-{LARGE_MB}-array"
    record = run_prepare(corpus, out, tokenizer_path(), args.workers, executor="submitit-local")
    reference = [r for r in records("prepare") if r["corpus_mb"] == LARGE_MB and r["executor"] == "local"]
    same = bool(reference) and record["shard_sha256"] == reference[-1]["shard_sha256"]
    save("array", corpus_mb=LARGE_MB, **add_rates(record, corpus_meta(corpus)["text_bytes"]), same_shards_as_local=same)
    shutil.rmtree(out)


def cmd_order(args: argparse.Namespace) -> None:
    """The merge's pass over the index alone: read by key ranges, sort, mark first copies."""
    folder = WORK / "order"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n, parts = args.documents, 64
    paths = []
    for k in range(parts):
        index = np.zeros(n // parts, dtype=order.INDEX_DTYPE)
        index["key"] = rng.integers(0, 2**64 - 1, size=len(index), dtype=np.uint64, endpoint=True)
        index["key"][::40] = index["key"][0]  # some copies
        index["tokens"] = rng.integers(50, 2000, size=len(index))
        paths.append(folder / f"part-{k:06d}.index.npy")
        np.save(paths[-1], order.sort_index(index))
    proc = psutil.Process()
    base_rss = proc.memory_info().rss
    peak = 0
    start = time.perf_counter()
    kept = 0
    for records_, _ in order.ordered_records(paths):
        kept += int(order.first_copies(records_).sum())
        peak = max(peak, proc.memory_info().rss - base_rss)
    seconds = time.perf_counter() - start
    save("order", documents=n, parts=parts, seconds=round(seconds, 2), documents_per_s=round(n / seconds),
         kept=kept, peak_rss_above_start_mb=round(peak / 2**20))  # fmt: skip
    shutil.rmtree(folder)


def cmd_report(args: argparse.Namespace) -> None:
    def median(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    small = {w: [r for r in records("prepare") if r["corpus_mb"] == SMALL_MB and r["workers"] == w] for w in (1, 2)}
    large = [r for r in records("prepare") if r["corpus_mb"] == LARGE_MB and r["executor"] == "local"][-1]
    limits = [r["mb_per_s"] for r in records("limit")]
    limit = statistics.median(limits)
    one, two = median(small[1], "mb_per_s"), median(small[2], "mb_per_s")
    one_encode, two_encode = median(small[1], "encode_mb_per_s"), median(small[2], "encode_mb_per_s")
    tok = records("tokenizer")[-1]
    kill = records("kill")[-1]
    array = records("array")[-1]
    ordering = records("order")[-1]
    meta_large = corpus_meta(WORK / f"corpus-{LARGE_MB}") if (WORK / f"corpus-{LARGE_MB}").exists() else records("corpus")[-1]

    # 100 GB projection from per-core figures measured here (see README "Data at scale").
    text_mb = TARGET_GB * 1e3
    docs = text_mb * 1e6 / (meta_large["text_bytes"] / meta_large["documents"])
    scaling = two_encode / (2 * one_encode)  # parallel efficiency of encoding measured on 2 cores
    merge_mb_per_s = meta_large["text_bytes"] / 1e6 / large["merge_s"]
    order_s = docs / ordering["documents_per_s"]
    projection = {}
    for cores in (16, 64):
        encode_s = text_mb / (one_encode * cores * scaling)
        merge_s = text_mb / merge_mb_per_s
        steps = {"tokenizer_training_s": tok["wall_s"], "encoding_s": encode_s,
                 "merge_s (dedup + order + writing shards)": merge_s, "of which dedup_and_order_s": order_s}  # fmt: skip
        total = tok["wall_s"] + encode_s + merge_s
        projection[f"{cores}_cores"] = {**{k: round(v) for k, v in steps.items()}, "total_s": round(total),
                                        "total_h": round(total / 3600, 2),
                                        "dominant": max(("tokenizer training", tok["wall_s"]), ("encoding", encode_s),
                                                        ("merge", merge_s), key=lambda kv: kv[1])[0]}  # fmt: skip
    rss_small = median(small[2], "peak_rss_tree_mb")
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "note": "2 shared cores (other jobs running); medians of interleaved repetitions where repeated",
        "corpus": {"small": corpus_meta(WORK / f"corpus-{SMALL_MB}") if (WORK / f"corpus-{SMALL_MB}").exists() else None,
                   "large": meta_large},  # fmt: skip
        "limit_mb_per_s (bare encode_batch, 1 thread)": round(limit, 3),
        "limit_samples": limits,
        "encode_step_mb_per_s (prepare's per-batch work, 1 thread)": round(median(records("encode_step"), "mb_per_s"), 3),
        "prepare_mb_per_s": {"1_worker": one, "2_workers": two, "2_workers_large": large["mb_per_s"]},
        "encode_phase_mb_per_s": {"1_worker": one_encode, "2_workers": two_encode, "2_workers_large": large.get("encode_mb_per_s")},
        "prepare_over_limit_per_worker": {"end_to_end_1_worker": round(one / limit, 3),
                                          "encode_phase_1_worker": round(one_encode / limit, 3),
                                          "encode_phase_2_workers": round(two_encode / 2 / limit, 3)},  # fmt: skip
        "peak_rss_mb": {"small_2_workers": rss_small, "large_2_workers": large["peak_rss_tree_mb"],
                        "large_over_small": round(large["peak_rss_tree_mb"] / rss_small, 3),
                        "small_largest_process": median(small[2], "peak_rss_one_process_mb"),
                        "large_largest_process": large["peak_rss_one_process_mb"],
                        "small_main": median(small[2], "peak_rss_main_mb"), "large_main": large["peak_rss_main_mb"]},  # fmt: skip
        "disk_mb_large": {"corpus_on_disk": round(meta_large["disk_bytes"] / 2**20), "peak_during_prepare": large["peak_disk_mb"],
                          "dataset": large["dataset_mb"]},  # fmt: skip
        "phases_large_s": {k: large[k] for k in ("startup_s", "encode_s", "merge_s", "wall_s")},
        "tokenizer_training": tok,
        "kill_at_50_percent": {**kill, "resumed": {k: v for k, v in kill["resumed"].items() if k != "shard_sha256"},
                               # wall time the kill cost: killed run + rerun - an uninterrupted run
                               "lost_s": round(kill["killed"]["wall_s"] + kill["resumed"]["wall_s"] - large["wall_s"], 1),
                               # one part's encoding on one worker, for scale: the kill loses at most one per worker
                               "one_part_s": round(large["encode_s"] * large["workers"] / large["parts"], 1)},  # fmt: skip
        "array_submitit_local": {k: v for k, v in array.items() if k != "shard_sha256"},
        "order_pass": ordering,
        "runs": {"small": [{k: v for k, v in r.items() if k != "shard_sha256"} for w in (1, 2) for r in small[w]],
                 "large": {k: v for k, v in large.items() if k != "shard_sha256"}},
        "projection_100gb": {"documents": round(docs), "assumptions": "encoding scales over cores with the parallel "
                             f"efficiency measured on 2 cores ({scaling:.2f}); the merge is one process at the MB/s "
                             "measured at 2 GB; tokenizer training is fixed (200 MB)", **projection},  # fmt: skip
    }
    atomic_write_json(RESULT, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "corpus")}, indent=1))


def cmd_clean(args: argparse.Namespace) -> None:
    if WORK.exists():
        for child in sorted(WORK.iterdir()):
            print(f"{child.name}: {folder_bytes(child) / 2**20:.0f} MB" if child.is_dir() else f"{child.name}: {child.stat().st_size} B")
        keep = RECORDS.read_bytes() if RECORDS.exists() else b""
        shutil.rmtree(WORK)
        if keep and args.keep_records:
            WORK.mkdir(parents=True)
            RECORDS.write_bytes(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("corpus")
    p.add_argument("--size-mb", type=int, default=LARGE_MB)
    p.set_defaults(fn=cmd_corpus)
    sub.add_parser("tokenizer").set_defaults(fn=cmd_tokenizer)
    p = sub.add_parser("small")
    p.add_argument("--reps", type=int, default=1)
    p.set_defaults(fn=cmd_small)
    for name, fn in (("large", cmd_large), ("kill", cmd_kill), ("array", cmd_array)):
        p = sub.add_parser(name)
        p.add_argument("--workers", type=int, default=2)
        p.set_defaults(fn=fn)
    p = sub.add_parser("order")
    p.add_argument("--documents", type=int, default=4_000_000)
    p.set_defaults(fn=cmd_order)
    sub.add_parser("report").set_defaults(fn=cmd_report)
    p = sub.add_parser("clean")
    p.add_argument("--keep-records", action="store_true")
    p.set_defaults(fn=cmd_clean)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
