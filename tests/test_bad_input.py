"""Bad input through the CLI (issue 16): a catalogue of refused inputs, each run in-process through
``moe2edge.compile.cli.main`` and checked for the same contract:

* the exit code (2: a user error; argparse errors too),
* exactly one error line, naming the culprit (file, key, line or flag) and what to do,
* no traceback,
* nothing lost or changed: every file that existed before is there with the same bytes,
* nothing half-written: no new files at all, no ``.X.tmp-*`` / ``.X.old-*`` beside an output, no
  ``moe2edge-build-*`` in the temp dir,
* checked before the heavy work: the functions that do it (compile_engine, the evaluation, training,
  the student build, the benchmark subprocesses, the Debian build, rendering) are tripwires here, so a
  check that came too late turns into an internal error and fails the case.

Fixtures are tiny and built once per module: a 158-token WordPiece tokenizer, a ``tiny-moe`` preset
checkpoint (save_pretrained), a static student and its compiled ONNX engine, real text from the frozen
Debian benchmark. Only SIGTERM / SIGINT and the torch-free runtime need real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "debian-bookworm-v1"
LISTS = ROOT / "tests" / "fixtures" / "debian-lists"


# ------------------------------------------------------------------------------------ fixtures


def tiny_tokenizer(path: Path) -> int:
    """A BERT-style WordPiece tokenizer.json with 158 tokens (ids 0..157 < tiny-moe's 512 rows)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ("the a an and or of to for in on with is are be this that it by from as at files file data library "
             "package tool tools python debian text search web server client support program development "
             "documentation utility utilities system network manager editor command line fast simple small").split()
    vocab = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits)
    vocab += list(string.punctuation) + ["##" + c for c in string.ascii_lowercase + string.digits] + words
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return len(vocab)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The world every case starts from (copied per case): checkpoint, static student + engine, texts."""
    from moe2edge.compile.cli import main
    from moe2edge.data.readers import load_beir
    from moe2edge.student.static import StaticConfig, StaticEmbedder
    from moe2edge.teacher import NomicMoE, get_preset, save_pretrained

    w = tmp_path_factory.mktemp("base")
    V = tiny_tokenizer(w / "tok" / "tokenizer.json")
    torch.manual_seed(0)
    save_pretrained(NomicMoE(get_preset("tiny-moe", max_seq_length=64)).eval(), w / "ckpt", tokenizer_dir=w / "tok")
    table = np.random.default_rng(0).standard_normal((V, 16)).astype(np.float32)
    StaticEmbedder(table, w / "tok" / "tokenizer.json", StaticConfig(vocab_size=V, hidden_size=16)).save(
        w / "static", manifest={"schema": "moe2edge.student/v1", "kind": "static"})
    ds = load_beir(BENCH)
    qids = [q for q in ds.qrels if ds.languages.get(q) == "en"][:40]
    real = [(ds.queries[q], ds.doc_texts([next(iter(ds.qrels[q]))])[0]) for q in qids]
    _jsonl(w / "verify.jsonl", [{"query": q, "document": d} for q, d in real[:20]])
    _jsonl(w / "pairs.jsonl", [{"query": q, "positive": d, "language": "en"} for q, d in real])
    _jsonl(w / "calib.jsonl", [{"text": t} for p in real for t in p])
    (w / "in.txt").write_text("a tool to search files\nweb server\n", encoding="utf-8")
    # a small BEIR folder: the first 10 English queries and their documents
    (w / "ds" / "qrels").mkdir(parents=True)
    docs = {d for q in qids[:10] for d in ds.qrels[q]}
    _jsonl(w / "ds" / "corpus.jsonl", [{"_id": d, "title": ds.corpus[d]["title"], "text": ds.corpus[d]["text"]}
                                        for d in sorted(docs)])
    _jsonl(w / "ds" / "queries.jsonl", [{"_id": q, "text": ds.queries[q], "language": "en"} for q in qids[:10]])
    (w / "ds" / "qrels" / "test.tsv").write_text(
        "".join(f"{q}\t{d}\t{r}\n" for q in qids[:10] for d, r in ds.qrels[q].items()))
    run = {"schema": "moe2edge.eval/v1", "model": {"name": "m", "kind": "dense"},
           "dataset": {"name": "ds", "n_docs": 5, "n_queries": 2, "n_evaluated": 2},
           "metrics": {"overall": {"ndcg@10": 0.5, "recall@100": 0.9, "mrr@10": 0.4, "n_queries": 2},
                       "per_language": {"en": {"ndcg@10": 0.5, "n_queries": 2}}}, "warnings": []}
    (w / "results.json").write_text(json.dumps({"schema": "moe2edge.eval/v1", "runs": [run]}))
    (w / "recipe.json").write_text(json.dumps({"init": {"checkpoint": str(w / "ckpt"), "upcycle": None},
                                               "data": {"pairs": str(w / "pairs.jsonl")},
                                               "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0}}))
    # the one success path compiled here: the static student -> a verified ONNX engine
    assert main(["-q", "compile", "--model", str(w / "static"), "--target", "onnx", "--out", str(w / "eng"),
                 "--verify-file", str(w / "verify.jsonl")]) == 0
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if any(m in p.name for m in (".tmp-", ".old-", "moe2edge-write-test"))]


# ------------------------------------------------------------------------------------ catalogue


@dataclass
class Case:
    id: str
    argv: str  # {w} = the case's world folder
    expect: tuple[str, ...]  # substrings of the error line (the culprit and the rule)
    setup: object = None  # callable(w) making the bad input
    rc: int = 2
    tripwire: bool = True


def _edit_json(rel, fn):
    def setup(w):
        p = w / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return setup


def _write(rel, data):
    def setup(w):
        p = w / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _overwrite_bytes(rel, at, n):
    """Overwrite ``n`` bytes in place (same size): only the hash can tell. ``at`` < 1: a fraction of the size
    (the middle of an ONNX file is weight data: the graph still loads and runs, with other numbers)."""
    def setup(w):
        p = w / rel
        with open(p, "r+b") as f:
            f.seek(int(at * p.stat().st_size) if at < 1 else at)
            f.write(b"\x55" * n)
    return setup


def _truncate(rel, frac=0.5):
    def setup(w):
        p = w / rel
        os.truncate(p, int(p.stat().st_size * frac))
    return setup


def _nan_weight(w):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(w / "ckpt" / "model.safetensors"))
    sd["emb_ln.weight"][0] = float("nan")
    save_file(sd, str(w / "ckpt" / "model.safetensors"), metadata={"format": "pt"})


def _foreign_tokenizer(w):
    from moe2edge.teacher import minilm_path

    shutil.copyfile(Path(minilm_path()) / "tokenizer.json", w / "ckpt" / "tokenizer.json")


def _engine_copy_with_user_file(w):
    shutil.copytree(w / "eng", w / "eng2")
    (w / "eng2" / "notes.txt").write_text("mine")


def _user_folder(w):
    (w / "user").mkdir()
    (w / "user" / "notes.txt").write_text("mine")


def _trained_final_with_user_file(w):
    shutil.copytree(w / "ckpt", w / "tr" / "final")
    (w / "tr" / "final" / "notes.txt").write_text("mine")


def _resume_truncated_state(w):
    shutil.copytree(w / "ckpt", w / "resume")
    (w / "resume" / "trainer_state.pt").write_bytes(b"PK\x03\x04 truncated")


def _start_from_final(w):
    """A recipe that starts from OUT/final: training into OUT would replace its own starting checkpoint."""
    shutil.copytree(w / "ckpt", w / "final")
    _edit_json("recipe.json", lambda d: {**d, "init": {"checkpoint": str(w / "final"), "upcycle": None}})(w)


def _lists_truncated(w):
    shutil.copytree(LISTS, w / "lists")
    _truncate("lists/fixture_debian_dists_bookworm_main_binary-amd64_Packages.gz", 0.5)(w)


def _dataset_copy(edit):
    def setup(w):
        shutil.copytree(w / "ds", w / "ds2")
        edit(w / "ds2")
    return setup


def _gz_truncated_corpus(d):
    import gzip

    data = gzip.compress((d / "corpus.jsonl").read_bytes())
    (d / "corpus.jsonl").unlink()
    (d / "corpus.jsonl.gz").write_bytes(data[: len(data) // 2])


_SKIP = "--skip-integrity-check"
C = "compile --model {w}/ckpt --target onnx --verify-file {w}/verify.jsonl"
CASES = [
    # --- compile: outputs are safe (never an input, never a folder this tool did not write)
    Case("compile-out-is-model", C + " --out {w}/ckpt", ("--out", "/ckpt is also an input")),
    Case("compile-out-is-model-force", C + " --out {w}/ckpt --force", ("is also an input",)),
    Case("compile-out-is-parent-of-model", C + " --out {w} --force", ("contains the input", "/ckpt")),
    Case("compile-out-user-folder", C + " --out {w}/user", ("/user", "did not write", "--force"), _user_folder),
    Case("compile-out-regular-file", C + " --out {w}/in.txt", ("in.txt is an existing file", "--force")),
    Case("compile-out-engine-holding-user-file", C + " --out {w}/eng2", ("notes.txt", "did not write"),
         _engine_copy_with_user_file),
    Case("compile-out-student-not-engine", C + " --out {w}/static", ("holds a moe2edge student, not an engine",)),
    Case("compile-out-under-a-file", C + " --out {w}/in.txt/eng", ("in.txt is a file",)),
    Case("compile-st-out-equals-out", C + " --out {w}/e --st-out {w}/e", ("--st-out", "--out", "same path")),
    # --- compile: arguments and thresholds before the build
    Case("compile-min-cos-5", C + " --out {w}/e --min-cos 5", ("--min-cos", "(0, 1]")),
    Case("compile-threads-negative", C + " --out {w}/e --threads -1", ("--threads", ">= 1")),
    Case("compile-threads-zero", C + " --out {w}/e --threads 0", ("--threads", ">= 1")),
    Case("compile-dim-zero", C + " --out {w}/e --dim 0", ("--dim", ">= 1")),
    Case("compile-dim-above-hidden", C + " --out {w}/e --dim 999", ("--dim 999", "hidden size 64")),
    Case("compile-verify-pairs-5", C + " --out {w}/e --verify-pairs 5", ("--verify-pairs 5", ">= 10")),
    Case("compile-model-is-a-file", "compile --model {w}/in.txt --target onnx --out {w}/e", ("in.txt", "is a file")),
    Case("compile-model-missing", "compile --model {w}/nope --target onnx --out {w}/e", ("/nope", "not found")),
    Case("compile-int8-without-calibration", C + " --out {w}/e --int8", ("--int8 needs --calibration",)),
    Case("compile-calibration-missing", C + " --out {w}/e --int8 --calibration {w}/nope.txt",
         ("nope.txt", "not found")),
    Case("compile-calibration-text-not-a-string", C + " --out {w}/e --int8 --calibration {w}/cal.jsonl",
         ("cal.jsonl:1", "field 'text' must be a string, got int"), _write("cal.jsonl", '{"text": 123}\n' * 40)),
    Case("compile-static-tensorrt", "compile --model {w}/static --target tensorrt --out {w}/e",
         ("static student", "TensorRT", "--target onnx")),
    Case("compile-static-missing-calibration", "compile --model {w}/static --target onnx --int8 --calibration "
         "{w}/nope.txt --out {w}/e", ("nope.txt", "not found")),
    # --- compile: verification texts are real
    Case("compile-verify-file-bad-json", C.replace("verify.jsonl", "v.jsonl") + " --out {w}/e",
         ("v.jsonl:2", "not valid JSON"), _write("v.jsonl", '{"query": "a b c", "document": "d e f"}\n{oops\n')),
    Case("compile-verify-whitespace-only", C.replace("verify.jsonl", "v.jsonl") + " --out {w}/e",
         ("v.jsonl:1", "'query' is empty or whitespace"), _write("v.jsonl", '{"query": "  ", "document": "\\t "}\n' * 12)),
    Case("compile-verify-duplicates", C.replace("verify.jsonl", "v.jsonl") + " --out {w}/e",
         ("v.jsonl", "11 of 12 queries are duplicates", "<= 20%"),
         _write("v.jsonl", '{"query": "a text editor", "document": "a small and fast text editor for the console"}\n' * 12)),
    Case("compile-verify-too-few", C.replace("verify.jsonl", "v.jsonl") + " --out {w}/e",
         ("v.jsonl", "5 pairs", ">= 10"),
         _write("v.jsonl", "".join(json.dumps({"query": f"tool {i}", "document": f"a useful tool number {i} for files"})
                                   + "\n" for i in range(5)))),
    # --- compile: the checkpoint (integrity first; hand-edited files with the check skipped)
    Case("compile-tampered-safetensors", C + " --out {w}/e", ("model.safetensors", "sha256 differs", _SKIP),
         _overwrite_bytes("ckpt/model.safetensors", 0.5, 64)),
    Case("compile-file-list-deleted", C + " --out {w}/e", ("moe2edge_files.json: missing",),
         lambda w: (w / "ckpt" / "moe2edge_files.json").unlink()),
    Case("compile-truncated-safetensors", C + f" --out {{w}}/e {_SKIP}", ("model.safetensors", "corrupt or truncated"),
         _truncate("ckpt/model.safetensors")),
    Case("compile-config-not-an-object", C + f" --out {{w}}/e {_SKIP}", ("config.json", "expected a JSON object"),
         _write("ckpt/config.json", "[1, 2]")),
    Case("compile-config-wrong-type", C + f" --out {{w}}/e {_SKIP}", ("config.json", "'n_embd' must be int", "'abc'"),
         _edit_json("ckpt/config.json", lambda d: {**d, "n_embd": "abc"})),
    Case("compile-config-missing-key", C + f" --out {{w}}/e {_SKIP}", ("config.json", "'n_head'"),
         _edit_json("ckpt/config.json", lambda d: {k: v for k, v in d.items() if k != "n_head"})),
    Case("compile-corrupt-tokenizer", C + f" --out {{w}}/e {_SKIP}", ("tokenizer.json", "not a valid tokenizer"),
         _write("ckpt/tokenizer.json", '{"version": "1.0", "model": 7')),
    Case("compile-tokenizer-larger-than-model", C + f" --out {{w}}/e {_SKIP}",
         ("tokenizer.json", "30522 tokens", "512 rows"), _foreign_tokenizer),
    Case("compile-edited-config-is-caught", C + " --out {w}/e", ("/ckpt/config.json", "moe2edge_files.json records"),
         _edit_json("ckpt/config.json", lambda d: {**d, "n_embd": "abc"})),
    # --- embed
    Case("embed-output-is-input", "embed --model {w}/ckpt --input {w}/in.txt --output {w}/in.txt",
         ("--output", "in.txt is also an input")),
    Case("embed-output-is-the-model", "embed --model {w}/ckpt --input {w}/in.txt --output {w}/ckpt",
         ("--output", "ckpt is a folder")),
    Case("embed-input-is-a-folder", "embed --model {w}/ckpt --input {w}/ds --output {w}/o.npy", ("/ds", "is a folder")),
    Case("embed-input-missing", "embed --model {w}/ckpt --input {w}/nope.txt --output {w}/o.npy",
         ("nope.txt", "not found")),
    Case("embed-input-not-utf8", "embed --model {w}/ckpt --input {w}/bad.txt --output {w}/o.npy",
         ("bad.txt", "line 2", "byte"), _write("bad.txt", b"fine\ncaf\xe9\n")),
    Case("embed-empty-input", "embed --model {w}/ckpt --input {w}/empty.txt --output {w}/o.npy",
         ("empty.txt", "no text lines"), _write("empty.txt", "\n  \n")),
    Case("embed-nan-weights", f"embed --model {{w}}/ckpt --input {{w}}/in.txt --output {{w}}/o.npy {_SKIP}",
         ("non-finite", "emb_ln.weight"), _nan_weight),
    Case("embed-tampered-engine", "embed --engine {w}/eng --input {w}/in.txt --output {w}/o.npy",
         ("eng/model.onnx", "sha256 differs"), _overwrite_bytes("eng/model.onnx", 0.5, 256)),
    Case("embed-truncated-engine-unchecked", f"embed --engine {{w}}/eng --input {{w}}/in.txt --output {{w}}/o.npy {_SKIP}",
         ("model.onnx", "ONNX Runtime cannot load"), _truncate("eng/model.onnx")),
    Case("embed-engine-json-malformed", f"embed --engine {{w}}/eng --input {{w}}/in.txt --output {{w}}/o.npy {_SKIP}",
         ("engine.json:1", "not valid JSON"), _write("eng/engine.json", "{bad")),
    Case("embed-engine-json-dim-type", f"embed --engine {{w}}/eng --input {{w}}/in.txt --output {{w}}/o.npy {_SKIP}",
         ("engine.json", "'dim' must be int", "str"), _edit_json("eng/engine.json", lambda d: {**d, "dim": "16"})),
    Case("embed-engine-json-missing-key", f"embed --engine {{w}}/eng --input {{w}}/in.txt --output {{w}}/o.npy {_SKIP}",
         ("engine.json", "missing key 'max_seq_length'"),
         _edit_json("eng/engine.json", lambda d: {k: v for k, v in d.items() if k != "max_seq_length"})),
    Case("embed-engine-without-manifest", "embed --engine {w}/eng --input {w}/in.txt --output {w}/o.npy",
         ("manifest.json: missing",), lambda w: (w / "eng" / "manifest.json").unlink()),
    Case("embed-unknown-prompt", "embed --engine {w}/eng --input {w}/in.txt --output {w}/o.npy --prompt bogus",
         ("--prompt 'bogus'", "no prompts")),
    Case("embed-batch-size-zero", "embed --model {w}/ckpt --input {w}/in.txt --output {w}/o.npy --batch-size 0",
         ("--batch-size", ">= 1")),
    Case("embed-threads-negative", "embed --engine {w}/eng --input {w}/in.txt --output {w}/o.npy --threads -1",
         ("--threads", ">= 1")),
    Case("embed-dim-above-engine", "embed --engine {w}/eng --input {w}/in.txt --output {w}/o.npy --dim 99",
         ("dim must be in [1, 16]",)),
    Case("embed-model-missing", "embed --model {w}/nope --input {w}/in.txt --output {w}/o.npy", ("/nope", "no such")),
    # --- eval (the output and the data are checked before any model is evaluated)
    Case("eval-out-unwritable", "eval --model {w}/eng --data {w}/ds --no-latency --out {w}/in.txt/r.json",
         ("--out", "in.txt is a file")),
    Case("eval-out-is-a-folder", "eval --model {w}/eng --data {w}/ds --no-latency --out {w}/ds", ("--out", "is a folder")),
    Case("eval-max-queries-zero", "eval --model {w}/eng --data {w}/ds --max-queries 0", ("--max-queries", ">= 1")),
    Case("eval-threads-zero", "eval --model {w}/eng --data {w}/ds --threads 0", ("--threads", ">= 1")),
    Case("eval-no-judged-query", "eval --model {w}/eng --data {w}/ds2 --no-latency", ("ds2", "nothing to evaluate"),
         _dataset_copy(lambda d: (d / "qrels" / "test.tsv").write_text("x1\ty1\t1\n"))),
    Case("eval-queries-not-utf8", "eval --model {w}/eng --data {w}/ds2 --no-latency",
         ("queries.jsonl:11", "not valid UTF-8"),
         _dataset_copy(lambda d: d.joinpath("queries.jsonl").write_bytes(
             d.joinpath("queries.jsonl").read_bytes() + b'{"_id": "q", "text": "caf\xe9"}\n'))),
    Case("eval-truncated-gz-corpus", "eval --model {w}/eng --data {w}/ds2 --no-latency",
         ("corpus.jsonl.gz", "truncated or corrupt"), _dataset_copy(_gz_truncated_corpus)),
    Case("eval-data-is-a-file", "eval --model {w}/eng --data {w}/in.txt --no-latency", ("in.txt", "is a file")),
    Case("eval-model-missing", "eval --model {w}/nope --data {w}/ds", ("--model", "nope", "neither a folder nor")),
    Case("eval-tampered-engine", "eval --model {w}/eng --data {w}/ds --no-latency", ("model.onnx", "sha256 differs"),
         _overwrite_bytes("eng/model.onnx", 0.5, 256)),
    # --- report
    Case("report-foreign-schema", "report {w}/r.json --out {w}/rep", ("r.json", "schema 'other/v2'"),
         _write("r.json", json.dumps({"schema": "other/v2", "runs": []}))),
    Case("report-nan-metric", "report {w}/r.json --out {w}/rep", ("r.json", "metrics.overall.ndcg@10 is nan"),
         lambda w: (w / "r.json").write_text((w / "results.json").read_text().replace('"ndcg@10": 0.5, "recall',
                                                                                     '"ndcg@10": NaN, "recall'))),
    Case("report-string-metric", "report {w}/r.json --out {w}/rep", ("r.json", "mrr@10 is 'high'"),
         lambda w: (w / "r.json").write_text((w / "results.json").read_text().replace('"mrr@10": 0.4', '"mrr@10": "high"'))),
    Case("report-out-is-a-file", "report {w}/results.json --out {w}/in.txt", ("--out", "in.txt is a file")),
    Case("report-results-missing", "report {w}/nope.json --out {w}/rep", ("nope.json",)),
    Case("report-results-is-a-folder", "report {w}/ds --out {w}/rep", ("/ds", "is a folder")),
    # --- bench (one line from the parent; checks before any subprocess)
    Case("bench-repeats-zero", "bench {w}/eng --repeats 0 0", ("--repeats", ">= 1")),
    Case("bench-threads-zero", "bench {w}/eng --threads 0", ("--threads", ">= 1")),
    Case("bench-tampered-engine", "bench {w}/eng", ("model.onnx", "sha256 differs"),
         _overwrite_bytes("eng/model.onnx", 0.5, 256)),
    Case("bench-engine-missing", "bench {w}/nope", ("/nope", "not found")),
    Case("bench-not-an-engine", "bench {w}/ckpt", ("ckpt", "no engine.json")),
    Case("bench-out-unwritable", "bench {w}/eng --out {w}/in.txt/b.json", ("--out", "in.txt is a file")),
    Case("bench-nothing", "bench", ("nothing to measure",)),
    # --- distill
    Case("distill-out-is-teacher", "distill --teacher {w}/ckpt --student static --out {w}/ckpt --pairs {w}/pairs.jsonl",
         ("--out", "is also an input")),
    Case("distill-out-user-folder", "distill --teacher {w}/ckpt --student static --out {w}/user --pairs {w}/pairs.jsonl",
         ("/user", "did not write"), _user_folder),
    Case("distill-out-contains-pairs", "distill --teacher {w}/ckpt --student static --out {w} --pairs {w}/pairs.jsonl "
         "--force", ("contains the input",)),
    Case("distill-steps-negative", "distill --teacher {w}/ckpt --student static --out {w}/s --steps -5",
         ("--steps", ">= 0")),
    Case("distill-layers-not-integers", "distill --teacher {w}/ckpt --student dense --out {w}/s --layers a,b",
         ("--layers", "comma-separated integers")),
    Case("distill-flag-of-another-kind", "distill --teacher {w}/ckpt --student static --out {w}/s --experts 2",
         ("--experts", "does not apply to a static student")),
    Case("distill-recipe-typo", "distill --teacher {w}/ckpt --student static --out {w}/s --config {w}/rc.json",
         ("config train", "stepz", "did you mean steps"),
         _write("rc.json", json.dumps({"student": {"kind": "static"}, "train": {"stepz": 3}}))),
    Case("distill-recipe-wrong-type", "distill --teacher {w}/ckpt --student static --out {w}/s --config {w}/rc.json",
         ("config student.dim", "expected", "'big'"),
         _write("rc.json", json.dumps({"student": {"kind": "static", "dim": "big"}}))),
    Case("distill-teacher-missing", "distill --teacher {w}/nope --student static --out {w}/s --pairs {w}/pairs.jsonl",
         ("--teacher", "nope", "not found")),
    # --- teacher
    Case("train-recipe-typo", "teacher train --config {w}/r.json --out {w}/tr", ("config train", "stepz", "did you mean"),
         _write("r.json", json.dumps({"train": {"stepz": 2}}))),
    Case("train-recipe-wrong-type", "teacher train --config {w}/r.json --out {w}/tr", ("config train.steps", "'two'"),
         _write("r.json", json.dumps({"train": {"steps": "two"}}))),
    Case("train-recipe-not-an-object", "teacher train --config {w}/r.json --out {w}/tr", ("r.json", "JSON object"),
         _write("r.json", "[]")),
    Case("train-final-holds-user-file", "teacher train --config {w}/recipe.json --out {w}/tr",
         ("tr/final", "notes.txt", "did not write"), _trained_final_with_user_file),
    Case("train-final-is-the-start-checkpoint", "teacher train --config {w}/recipe.json --out {w} --force",
         ("/final is also an input",), _start_from_final),
    Case("train-resume-truncated-state", "teacher train --config {w}/recipe.json --out {w}/tr --resume {w}/resume",
         ("trainer_state.pt", "corrupt or truncated"), _resume_truncated_state),
    Case("train-steps-zero", "teacher train --config {w}/recipe.json --out {w}/tr --steps 0", ("--steps", ">= 1")),
    Case("upcycle-out-is-model", "teacher upcycle --model {w}/ckpt --out {w}/ckpt", ("is also an input",)),
    Case("upcycle-experts-zero", "teacher upcycle --model {w}/ckpt --out {w}/u --experts 0", ("--experts", ">= 1")),
    Case("filter-out-is-pairs", "teacher filter --pairs {w}/pairs.jsonl --out {w}/pairs.jsonl --model {w}/ckpt",
         ("--out", "pairs.jsonl is also an input")),
    Case("filter-limit-zero", "teacher filter --pairs {w}/pairs.jsonl --out {w}/f.jsonl --limit 0", ("--limit", ">= 1")),
    Case("filter-pairs-is-a-folder", "teacher filter --pairs {w}/ds --out {w}/f.jsonl", ("/ds", "is a folder")),
    # --- data
    Case("data-test-fraction-zero", "data build --lists {w}/lists --out {w}/d --test-fraction 0",
         ("--test-fraction", "between 0 and 1")),
    Case("data-test-fraction-nan", "data build --lists {w}/lists --out {w}/d --test-fraction nan",
         ("--test-fraction", "finite")),
    Case("data-test-fraction-above-one", "data build --lists {w}/lists --out {w}/d --test-fraction 1.5",
         ("--test-fraction", "between 0 and 1")),
    Case("data-truncated-packages-gz", "data build --lists {w}/lists --out {w}/d",
         ("Packages.gz", "corrupt or truncated gzip"), _lists_truncated, tripwire=False),
    Case("data-lists-missing", "data build --lists {w}/nope --out {w}/d", ("--lists", "not found")),
]


def _tripwires(monkeypatch):
    """The heavy work of each command raises: a check that comes after it fails the case (internal error)."""
    def trip(name):
        def f(*a, **k):
            raise AssertionError(f"tripwire: {name} started before the input was checked")
        return f

    from moe2edge.data import debian, evaluate, report
    from moe2edge.student import recipe
    from moe2edge.targets import bench, build
    from moe2edge.teacher import train

    for mod, name in ((build, "compile_engine"), (evaluate, "evaluate_dense"), (evaluate, "evaluate_bm25"),
                      (recipe, "build_student"), (bench, "bench"), (debian, "fetch_lists"),
                      (debian, "build_debian"), (report, "render_report")):
        monkeypatch.setattr(mod, name, trip(f"{mod.__name__}.{name}"))
    # the first training step (fit itself first loads a --resume checkpoint: that is a check, not work)
    monkeypatch.setattr(train.Trainer, "compute_gradients", trip("Trainer.compute_gradients"))


@pytest.fixture
def world(base, tmp_path, monkeypatch):
    import tempfile

    w = tmp_path / "w"
    shutil.copytree(base, w, symlinks=True)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.setenv("MOE2EDGE_HASH_CACHE", str(tmp_path / "hash-cache.json"))
    return w, tmpdir


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from moe2edge.compile.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors exit
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_catalogue_is_big_enough():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, capsys, monkeypatch):
    w, tmpdir = world
    if case.setup:
        case.setup(w)
    before = snapshot(w)
    if case.tripwire:
        _tripwires(monkeypatch)
    argv = shlex.split(case.argv.format(w=w))
    rc, out, err = run_cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert rc == case.rc, f"rc {rc}, stderr:\n{err}"
    assert "Traceback" not in err + out and "internal error" not in err, err
    assert len(errors) == 1 and lines[-1] == errors[0], f"want one error line, last:\n{err}"
    for s in case.expect:
        assert s.replace("{w}", str(w)) in errors[0], f"{s!r} not in: {errors[0]}"
    after = snapshot(w)
    lost = {k for k, v in before.items() if after.get(k) != v}
    assert not lost, f"files lost or changed: {sorted(lost)}"
    assert set(after) == set(before), f"new files: {sorted(set(after) - set(before))}"
    assert not leftovers(w) and not list(tmpdir.iterdir()), (leftovers(w), list(tmpdir.iterdir()))


# ------------------------------------------------------------------------------------ one error path


def test_a_bug_is_called_a_bug_not_a_user_error(world, capsys, monkeypatch):
    """An unexpected exception is not dressed up as the user's mistake: 'internal error' + where, exit 1;
    -v shows the traceback (for user errors too)."""
    from moe2edge.data import report

    w, _ = world

    def broken(paths):
        return [][0]  # a real bug: IndexError

    monkeypatch.setattr(report, "load_results", broken)
    rc, out, err = run_cli(["report", str(w / "results.json"), "--out", str(w / "rep")], capsys)
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error" in err and "IndexError" in err and "tests/test_bad_input.py:" in err and "-v" in err
    rc, out, err = run_cli(["-v", "report", str(w / "results.json"), "--out", str(w / "rep")], capsys)
    assert rc == 1 and "Traceback" in err and "return [][0]" in err
    rc, out, err = run_cli(["-v", "embed", "--model", str(w / "nope"), "--input", str(w / "in.txt"),
                            "--output", str(w / "o.npy")], capsys)
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("moe2edge embed: error:")


def test_full_disk_is_refused_before_the_build(world, capsys, monkeypatch):
    import collections

    w, _ = world
    _tripwires(monkeypatch)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    rc, _, err = run_cli(shlex.split(C.format(w=w) + f" --out {w}/e"), capsys)
    assert rc == 2 and "needs about 2 MB, only 0 MB free" in err and not (w / "e").exists()


def test_immutable_output_folder_fails_before_the_build(world, capsys, monkeypatch):
    w, _ = world
    ro = w / "ro"
    ro.mkdir()
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here (needs CAP_LINUX_IMMUTABLE); the regular-file parent case "
                    "in the catalogue covers unwritable outputs")
    try:
        _tripwires(monkeypatch)
        rc, _, err = run_cli(shlex.split(C.format(w=w) + f" --out {ro}/e"), capsys)
        assert rc == 2 and f"cannot write in {ro}" in err and "Traceback" not in err
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=True)
    assert not list(ro.iterdir())


# ------------------------------------------------------------------------------------ output rules


def test_safe_output_rules(world):
    from moe2edge._io import atomic_dir, safe_output
    from moe2edge.errors import OutputError

    w, _ = world
    safe_output(w / "eng", kinds=("engine",))  # an engine folder this tool wrote: replaceable
    safe_output(w / "ckpt", kinds=("checkpoint",))
    (w / "empty").mkdir()
    safe_output(w / "empty", kinds=("engine",))  # an empty folder loses nothing
    _user_folder(w)
    with pytest.raises(OutputError, match="did not write"):
        safe_output(w / "user", kinds=("engine",))
    safe_output(w / "user", kinds=("engine",), force=True)  # --force: the user said so
    with pytest.raises(OutputError, match="is also an input"):
        safe_output(w / "ckpt", kinds=("checkpoint",), inputs=[w / "ckpt"], force=True)  # never an input
    with pytest.raises(OutputError, match="contains the input"):
        safe_output(w, inputs=[w / "ckpt" / "model.safetensors"], force=True)
    # a checkpoint written before file lists existed: ours if it holds only what save_pretrained writes
    legacy = w / "legacy"
    shutil.copytree(w / "ckpt", legacy)
    (legacy / "moe2edge_files.json").unlink()
    safe_output(legacy, kinds=("checkpoint",))
    (legacy / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"notes\.txt"):
        safe_output(legacy, kinds=("checkpoint",))
    # something appearing at the output during the work: checked again at the rename, the new files kept
    with pytest.raises(OutputError, match="did not write"):
        with atomic_dir(w / "late", kinds=("engine",)) as tmp:
            (tmp / "x").write_text("new")
            (w / "late").mkdir()
            (w / "late" / "mine.txt").write_text("mine")
    assert (w / "late" / "mine.txt").read_text() == "mine" and not leftovers(w)


def test_training_never_deletes_a_users_file_in_final(world, capsys):
    """teacher train used to replace OUT/final wholesale; a final that is ours and clean is still replaced."""
    from moe2edge.teacher import NomicMoE, get_preset, save_pretrained
    from moe2edge.errors import OutputError

    w, _ = world
    m = NomicMoE(get_preset("tiny-moe", max_seq_length=64)).eval()
    save_pretrained(m, w / "tr" / "final", tokenizer_dir=w / "tok")
    save_pretrained(m, w / "tr" / "final", tokenizer_dir=w / "tok")  # ours, nothing else inside: replaced
    (w / "tr" / "final" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        save_pretrained(m, w / "tr" / "final", tokenizer_dir=w / "tok")
    assert (w / "tr" / "final" / "notes.txt").read_text() == "mine" and not leftovers(w)


# ------------------------------------------------------------------------------------ integrity


def test_hash_cache_follows_the_file_state(tmp_path, monkeypatch):
    from moe2edge import _integrity as integ

    monkeypatch.setenv("MOE2EDGE_HASH_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setattr(integ, "_memory", {})
    monkeypatch.setattr(integ, "_disk", None)
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(2 << 20))
    real = hashlib.sha256(f.read_bytes()).hexdigest()
    assert integ.file_sha256(f) == real
    assert os.path.realpath(f) not in integ._memory  # written < 2 s ago: never cached (coarse timestamps)
    key = os.path.realpath(f)
    integ._memory[key] = (integ._state(f.stat()), "cached")
    assert integ.file_sha256(f) == "cached"  # same size, mtime, ctime, inode: the cache answers
    time.sleep(0.05)
    with open(f, "r+b") as fh:  # same size, new bytes: ctime moves, the cache entry no longer applies
        fh.write(b"\0" * 64)
    assert integ.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() != real
    # the on-disk cache (for big files, across processes)
    monkeypatch.setattr(integ, "_RACY_S", -1.0)
    integ.file_sha256(f)
    disk = json.loads((tmp_path / "cache.json").read_text())
    assert disk[key][1] == hashlib.sha256(f.read_bytes()).hexdigest()
    disk[key][1] = "from-disk"
    (tmp_path / "cache.json").write_text(json.dumps(disk))
    monkeypatch.setattr(integ, "_memory", {})
    monkeypatch.setattr(integ, "_disk", None)
    assert integ.file_sha256(f) == "from-disk"


def test_an_unsigned_checkpoint_loads_and_says_so_at_debug_level(caplog):
    """A released / HF checkpoint this tool did not write has no file list: loaded as before."""
    import logging

    from moe2edge.teacher import minilm_path
    from moe2edge.teacher.checkpoint import load_pretrained

    with caplog.at_level(logging.DEBUG, logger="moe2edge._integrity"):
        m = load_pretrained(minilm_path())
    assert m.integrity == {"status": "unsigned"}
    assert any("no file list" in r.message and r.levelno == logging.DEBUG for r in caplog.records)


def test_eval_and_bench_report_the_check(world, capsys):
    w, _ = world
    rc, out, err = run_cli(["eval", "--model", str(w / "eng"), "--data", str(w / "ds"), "--no-latency",
                            "--out", str(w / "r.json")], capsys)
    assert rc == 0, err
    run = json.loads((w / "r.json").read_text())["runs"][0]
    assert run["model"]["integrity"]["status"] == "verified" and run["model"]["integrity"]["files"] == 3
    assert "files verified (3 files" in out
    rc, out, err = run_cli(["bench", str(w / "eng"), "--threads", "1", "--repeats", "2", "2", "--out",
                            str(w / "b.json")], capsys)
    assert rc == 0, err
    assert json.loads((w / "b.json").read_text())["results"][0]["integrity"]["status"] == "verified"
    assert "files verified" in out
    rc, out, err = run_cli(["eval", "--model", str(w / "eng"), "--data", str(w / "ds"), "--no-latency",
                            "--skip-integrity-check"], capsys)
    assert rc == 0 and "files NOT checked" in out


# ------------------------------------------------------------------------------------ real processes


def _runtime_python() -> Path | None:
    venv = os.environ.get("MOE2EDGE_RUNTIME_VENV") or str(ROOT / ".venv-runtime")
    py = Path(venv) / "bin" / "python"
    return py if py.exists() else None


@pytest.mark.skipif(_runtime_python() is None, reason="needs the torch-free .venv-runtime (make setup builds it)")
def test_torch_free_runtime_refuses_a_tampered_engine(world):
    w, _ = world
    py = str(_runtime_python())
    code = ("import importlib.util\nassert importlib.util.find_spec('torch') is None\n"
            "from moe2edge.targets.runtime import load_engine\n"
            "e = load_engine(__import__('sys').argv[1])\nprint(e.integrity['status'], e.encode(['a web server']).shape)")
    ok = subprocess.run([py, "-c", code, str(w / "eng")], capture_output=True, text=True, cwd="/")
    assert ok.returncode == 0 and ok.stdout.split()[0] == "verified", ok.stderr
    _overwrite_bytes("eng/model.onnx", 0.5, 256)(w)
    bad = subprocess.run([py, "-c", code, str(w / "eng")], capture_output=True, text=True, cwd="/")
    assert bad.returncode != 0 and "IntegrityError" in bad.stderr and "model.onnx: sha256 differs" in bad.stderr
    # and the CLI of the runtime-only install: one line, exit 2
    cli = subprocess.run([py, "-m", "moe2edge.compile.cli", "embed", "--engine", str(w / "eng"), "--input",
                          str(w / "in.txt"), "--output", str(w / "o.npy")], capture_output=True, text=True, cwd="/")
    assert cli.returncode == 2 and "Traceback" not in cli.stderr and "sha256 differs" in cli.stderr
    assert not (w / "o.npy").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_compile_leaves_nothing_behind(world, sig, rc):
    """Killed while the engine is being built (temp output folder and build folder both exist): both are
    removed, no output appears, one line on stderr."""
    w, tmpdir = world
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moe2edge.compile.cli", "-q", *shlex.split(C.format(w=w)),
                             "--out", str(w / "e")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(w.glob(".e.tmp-*")) and list(tmpdir.glob("moe2edge-build-*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"compile ended before it could be interrupted: {proc.communicate()}"
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("(temporary files and folders were removed)")
    # (a library's telemetry may leave a `.ses` session file in TMPDIR: not ours to clean)
    assert not (w / "e").exists() and not leftovers(w) and not list(tmpdir.glob("moe2edge-*"))
