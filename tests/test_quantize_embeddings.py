"""Compact embeddings: int8 / binary codes (numpy only), equality with sentence-transformers, range reuse,
and retrieval over a quantised corpus on hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe2edge.data import quantize as qz
from moe2edge.data.evaluate import evaluate_dense, evaluate_quantized, index_info
from moe2edge.data.readers import RetrievalDataset


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- codes


def test_codes_shape_dtype_and_packbits_order():
    rng = np.random.default_rng(0)
    for d in (384, 12):  # 12: not a multiple of 8 -> each row padded with zero bits
        e = _unit(rng, 50, d)
        ub = qz.quantize(e, "ubinary")
        assert ub.dtype == np.uint8 and ub.shape == (50, (d + 7) // 8)
        assert (qz.unpack_bits(ub, d) == (e > 0)).all()
        b = qz.quantize(e, "binary")
        assert b.dtype == np.int8 and (b.astype(np.int16) + 128 == ub).all()
        assert (qz.unpack_bits(b, d) == (e > 0)).all()
        i8 = qz.quantize(e, "int8")
        assert i8.dtype == np.int8 and i8.shape == (50, d)
        assert qz.quantize(e, "uint8").dtype == np.uint8
    one = np.full((1, 16), -1.0, dtype=np.float32)
    one[0, 0] = one[0, 9] = 1.0  # dims 0 and 9 positive: the high bit of byte 0 and bit 6 of byte 1
    assert qz.quantize(one, "ubinary").tolist() == [[0b10000000, 0b01000000]]
    assert qz.code_bytes(1000, 384, "ubinary") == 48_000 and qz.code_bytes(1000, 384, "int8") == 384_000
    assert qz.code_bytes(1000, 384, "float32") == 1_536_000


def test_int8_round_trip_within_one_step():
    rng = np.random.default_rng(1)
    e = _unit(rng, 300, 64)
    r = qz.calibration_ranges(e)
    assert r.shape == (2, 64) and r.dtype == np.float32
    c = qz.quantize(e, "int8", ranges=r)
    step = (r[1] - r[0]) / 255
    back = r[0] + (c.astype(np.float64) + 128) * step
    # the cast truncates toward zero (as ST's): codes >= 0 are a bucket's lower edge, codes < 0 its upper edge
    err = e - back
    assert (np.abs(err) <= step + 1e-6).all()
    assert (err[c > 0] >= -1e-6).all() and (err[c < 0] <= 1e-6).all()
    assert c.min() == -128 and c.max() == 127  # the calibrated extremes use the whole code range


def test_equal_to_sentence_transformers_quantize_embeddings():
    st_quant = pytest.importorskip("sentence_transformers.quantization")
    rng = np.random.default_rng(2)
    e = _unit(rng, 500, 384)
    for p in qz.PRECISIONS:
        ours, theirs = qz.quantize(e, p), st_quant.quantize_embeddings(e, p)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), p
    r = qz.calibration_ranges(e[:300])
    for p in qz.SCALAR:
        assert np.array_equal(qz.quantize(e[:300], p, ranges=r), st_quant.quantize_embeddings(e[:300], p, ranges=r))
        # queries outside the corpus's ranges: ST's float->int cast wraps (undefined in C); ours clips
        x = (e[300:] - r[0]) / ((r[1] - r[0]) / 255)
        inside = (x >= 0) & (x <= 255)
        ours, theirs = qz.quantize(e[300:], p, ranges=r), st_quant.quantize_embeddings(e[300:], p, ranges=r)
        assert (~inside).any() and np.array_equal(ours[inside], theirs[inside])
        lo, hi = (-128, 127) if p == "int8" else (0, 255)
        assert set(np.unique(ours[~inside])) <= {lo, hi}


def test_ranges_save_load_and_validation(tmp_path):
    r = qz.calibration_ranges(_unit(np.random.default_rng(3), 200, 8))
    path = qz.save_ranges(tmp_path / "c.ranges.npy", r)
    assert np.array_equal(qz.load_ranges(path, 8), r)
    with pytest.raises(ValueError, match="8-d embeddings, these are 16-d"):
        qz.load_ranges(path, 16)
    with pytest.raises(ValueError, match="rows swapped"):
        qz.check_ranges(r[::-1])
    with pytest.raises(ValueError, match=r"shape \(2, D\)"):
        qz.check_ranges(r[0])
    with pytest.raises(FileNotFoundError, match="ranges file not found"):
        qz.load_ranges(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="must be float"):
        qz.quantize(qz.quantize(r, "int8"), "int8")  # quantising codes again
    with pytest.raises(ValueError, match="unknown precision"):
        qz.quantize(r, "int4")
    assert qz.default_ranges_path("out/corpus.npy") == Path("out/corpus.ranges.npy")


# ------------------------------------------------------------------------ hand-computed search

# ubinary, D = 8. The query's sign bits are 11100000; each document's bits and its Hamming distance:
#   d0 11000000 -> 1 (7 equal bits)   d1 00100000 -> 2 (6)   d2 11111111 -> 5 (3)   d3 00000000 -> 3 (5)
# Binary ranking: d0, d1, d3, d2. Rescoring the top 2 with the float query against the 0/1 bits:
#   d0: 0.1 + 0.1 = 0.2,  d1: 0.9  ->  d1, d0, then d3, d2 (not rescored).
Q_BIN = np.array([[0.1, 0.1, 0.9, -0.2, -0.2, -0.2, -0.2, -0.2]], dtype=np.float32)
D_BIN = np.array([[.3, .3, -.3, -.3, -.3, -.3, -.3, -.3],
                  [-.3, -.3, .3, -.3, -.3, -.3, -.3, -.3],
                  [.3, .3, .3, .3, .3, .3, .3, .3],
                  [-.3, -.3, -.3, -.3, -.3, -.3, -.3, -.3]], dtype=np.float32)

# int8, D = 3, ranges min -1, max 0.9921875: step = 2^-7 exactly, so code = trunc(128 x).
#   q [0.5, 0.25, -0.5] -> [64, 32, -64]
#   d0 [64, -64, 32] . q = 4096 - 2048 - 2048 = 0       d1 [32, 32, -32] . q = 2048 + 1024 + 2048 = 5120
#   d2 [-64, 64, 64] . q = -4096 + 2048 - 4096 = -6144  d3 [64, 0, 0] . q = 4096
# int8 ranking: d1, d3, d0, d2.
RANGES = np.array([[-1.0] * 3, [0.9921875] * 3], dtype=np.float32)
Q_I8 = np.array([[0.5, 0.25, -0.5]], dtype=np.float32)
D_I8 = np.array([[0.5, -0.5, 0.25], [0.25, 0.25, -0.25], [-0.5, 0.5, 0.5], [0.5, 0.0, 0.0]], dtype=np.float32)


def test_hand_computed_binary_and_int8_search():
    codes = qz.quantize(D_BIN, "ubinary")
    assert codes[:, 0].tolist() == [0b11000000, 0b00100000, 0b11111111, 0]
    assert qz.scores(qz.quantize(Q_BIN, "ubinary"), codes, "ubinary").tolist() == [[7, 6, 3, 5]]
    assert qz.search(Q_BIN, codes, "ubinary", 10).tolist() == [[0, 1, 3, 2]]
    assert qz.search(Q_BIN, codes, "ubinary", 10, rescore=2).tolist() == [[1, 0, 3, 2]]
    assert qz.search(Q_BIN, qz.quantize(D_BIN, "binary"), "binary", 10, rescore=2).tolist() == [[1, 0, 3, 2]]
    # rescoring the top 4 against other codes: the float corpus itself gives the float order
    # q.d: d0 0.03 + 0.03 - 0.27 + 0.30 = 0.09, d1 0.51, d2 0.33 - 0.30 = 0.03, d3 -0.33 + 0.30 = -0.03
    assert qz.search(Q_BIN, codes, "ubinary", 10, rescore=4, rescore_with=(D_BIN, "float32", None)).tolist() == \
        [[1, 0, 2, 3]]
    # ... and it is those codes that rank, not the index's bits: the negated corpus reverses the order
    assert qz.search(Q_BIN, codes, "ubinary", 10, rescore=4, rescore_with=(-D_BIN, "float32", None)).tolist() == \
        [[3, 2, 0, 1]]

    c = qz.quantize(D_I8, "int8", ranges=RANGES)
    assert c.tolist() == [[64, -64, 32], [32, 32, -32], [-64, 64, 64], [64, 0, 0]]
    cq = qz.quantize(Q_I8, "int8", ranges=RANGES)
    assert qz.scores(cq, c, "int8", int8_scoring="codes").tolist() == [[0, 5120, -6144, 4096]]
    # code 0 stands for 0 here (min + 128 * step = 0), so the dequantised dot is the code dot / 128^2
    assert qz.scores(cq, c, "int8", ranges=RANGES).tolist() == [[0, 5120 / 16384, -6144 / 16384, 4096 / 16384]]
    for scoring in qz.INT8_SCORING:
        assert qz.search(Q_I8, c, "int8", 3, ranges=RANGES, int8_scoring=scoring).tolist() == [[1, 3, 0]]
    assert qz.quantize(np.array([[1.5, -2.0, 0.0]], dtype=np.float32), "int8", ranges=RANGES).tolist() == [[127, -128, 0]]
    with pytest.raises(ValueError, match="needs the corpus's ranges"):
        qz.search(Q_I8, c, "int8", 3)


def test_int8_code_dot_and_dequantised_dot_disagree_by_hand():
    """Ranges not centred on 0: the raw code dot (ST's usearch ranking) centres dimension 0 on its midpoint 1.0
    and flips the order; the dequantised dot keeps the float order.
      dim 0: min 0, max 1.9921875 (step 2^-7, code 0 = 1.0); dim 1: min -1, max 0.9921875 (code 0 = 0.0)
      q  [1.5, 0.5]  -> codes [64, 64]
      d0 [1.0, 0.75] -> codes [0, 96]:  code dot 6144, dequantised 1.5 * 1.0 + 0.5 * 0.75 = 1.875 (= float)
      d1 [1.75, -.25]-> codes [96, -32]: code dot 4096, dequantised 2.625 - 0.125 = 2.5 (= float)"""
    ranges = np.array([[0.0, -1.0], [1.9921875, 0.9921875]], dtype=np.float32)
    q = np.array([[1.5, 0.5]], dtype=np.float32)
    d = np.array([[1.0, 0.75], [1.75, -0.25]], dtype=np.float32)
    c, cq = qz.quantize(d, "int8", ranges=ranges), qz.quantize(q, "int8", ranges=ranges)
    assert c.tolist() == [[0, 96], [96, -32]] and cq.tolist() == [[64, 64]]
    assert qz.scores(cq, c, "int8", int8_scoring="codes").tolist() == [[6144, 4096]]
    assert qz.scores(cq, c, "int8", ranges=ranges).tolist() == [[1.875, 2.5]]
    np.testing.assert_allclose(qz.dequantize(c, "int8", ranges), d)
    assert qz.search(q, c, "int8", 2, ranges=ranges, int8_scoring="codes").tolist() == [[0, 1]]
    assert qz.search(q, c, "int8", 2, ranges=ranges).tolist() == [[1, 0]]
    # ST's rescoring, float query . integer codes: d0 1.5 * 0 + 0.5 * 96 = 48, d1 1.5 * 96 - 0.5 * 32 = 128
    assert qz.rescore_scores(q, c[None], "int8", 2, int8_scoring="codes").tolist() == [[48, 128]]
    assert qz.search(q, c, "int8", 2, ranges=ranges, int8_scoring="codes", rescore=2).tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="int8_scoring must be one of"):
        qz.scores(cq, c, "int8", ranges=ranges, int8_scoring="float")


def test_ties_fall_to_trec_eval_order():
    """Equal Hamming scores: trec_eval ranks ties by doc id descending; the quantised search does too."""
    d = np.array([[1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]], dtype=np.float32)  # docs 0 and 1 identical
    q = np.array([[1.0, -1.0]], dtype=np.float32)
    codes = qz.quantize(d, "ubinary")
    assert qz.search(q, codes, "ubinary", 3).tolist() == [[1, 0, 2]]
    assert qz.search(q, codes, "ubinary", 3, tiebreak=np.array([5, 2, 0])).tolist() == [[0, 1, 2]]


class TableEncoder:
    """Returns fixed embeddings per text: the hand-computed cases above as a model."""

    name = "table"

    def __init__(self, table):
        self.table = table
        self.dim = len(next(iter(table.values())))

    def encode(self, texts, *, prompt=None, dim=None, batch_size=32):
        return np.array([self.table[t] for t in texts], dtype=np.float32).reshape(len(texts), self.dim)


def _dataset(q, docs, relevant):
    corpus = {f"d{i}": {"title": "", "text": f"doc {i}"} for i in range(len(docs))}
    ds = RetrievalDataset(name="hand", corpus=corpus, queries={"q0": "query"}, qrels={"q0": {relevant: 1}},
                          languages={"q0": "en"})
    table = {"query": q[0], **{f"doc {i}": v for i, v in enumerate(docs)}}
    return ds, TableEncoder(table)


def test_quantised_eval_matches_the_hand_computed_metrics():
    ds, enc = _dataset(Q_BIN, D_BIN, "d1")
    base, emb = evaluate_dense(enc, ds, return_embeddings=True)
    assert base["metrics"]["overall"]["mrr@10"] == 1.0  # float: q.d1 = 0.33 is the best score
    res = evaluate_quantized(base, ds, emb, precision="ubinary")  # d1 at rank 2 (Hamming)
    o = res["metrics"]["overall"]
    assert o["mrr@10"] == 0.5 and o["ndcg@10"] == pytest.approx(1 / np.log2(3)) and o["recall@100"] == 1.0
    assert res["model"]["name"] == "table [ubinary]" and res["index"]["bytes"] == 4 and res["index"]["bytes_per_doc"] == 1
    res = evaluate_quantized(base, ds, emb, precision="ubinary", rescore=2)
    assert res["metrics"]["overall"]["ndcg@10"] == 1.0 and res["model"]["name"] == "table [ubinary+rescore2]"
    # rescoring against int8 codes of the corpus (on disk beside the binary index): q.d0 0.09 < q.d1 0.51
    res = evaluate_quantized(base, ds, emb, precision="ubinary", rescore=2, rescore_with="int8")
    assert res["metrics"]["overall"]["ndcg@10"] == 1.0 and res["model"]["name"] == "table [ubinary+rescore2(int8)]"
    assert res["index"]["bytes"] == 4 and res["index"]["rescore_bytes"] == 4 * 8 + 2 * 8 * 4

    ds, enc = _dataset(Q_I8, D_I8, "d3")
    base, emb = evaluate_dense(enc, ds, return_embeddings=True)
    for scoring in ("dequantized", "codes"):
        res = evaluate_quantized(base, ds, emb, precision="int8", ranges=RANGES, int8_scoring=scoring)  # d1, d3, ..
        assert res["metrics"]["overall"]["mrr@10"] == 0.5 and res["index"]["ranges"] == "given"
    assert res["model"]["name"] == "table [int8 codes]" and res["index"]["int8_scoring"] == "codes"
    assert res["index"]["bytes"] == 4 * 3 + 2 * 3 * 4  # codes + the float32 ranges
    # float32 through the quantised path is the float evaluation itself
    same = evaluate_quantized(base, ds, emb, precision="float32")
    assert same["metrics"] == base["metrics"]
    assert index_info(4, 3, "float32")["bytes"] == 48


# ------------------------------------------------------------------------------------- CLI


def test_cli_precision_choices_are_the_module_precisions():
    from moe2edge.compile.cli import build_parser

    p = build_parser()
    embed = p._subparsers._group_actions[0].choices["embed"]
    choices = next(a.choices for a in embed._actions if a.dest == "precision")
    assert tuple(choices) == qz.PRECISIONS


@pytest.mark.slow
def test_cli_embed_int8_ranges_reused_for_queries(tmp_path, moe2edge):
    """The corpus's ranges land beside its codes; queries quantised with them equal quantize(ranges=...)."""
    from moe2edge.teacher import load_embedder, minilm_path

    model = str(minilm_path())
    docs = ["a tool to read pdf files", "web browser with tabs", "compress files into zip archives"] * 40
    queries = ["pdf viewer", "zip"]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    r = moe2edge("embed", "--model", model, "--input", str(tmp_path / "docs.txt"), "--output",
                  str(tmp_path / "docs.npy"), "--precision", "int8")
    assert r.returncode == 0, r.stderr
    ranges_file = tmp_path / "docs.ranges.npy"
    assert ranges_file.exists() and f"--ranges {ranges_file}" in r.stdout
    r = moe2edge("embed", "--model", model, "--input", str(tmp_path / "q.txt"), "--output", str(tmp_path / "q.npy"),
                  "--precision", "int8", "--ranges", str(ranges_file))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "q.ranges.npy").exists()  # reused, not recomputed
    emb = load_embedder(model)
    ranges = np.load(ranges_file)
    d_float, q_float = emb.encode(docs), emb.encode(queries)
    assert np.array_equal(ranges, qz.calibration_ranges(d_float))
    q_codes = np.load(tmp_path / "q.npy")
    assert q_codes.dtype == np.int8 and q_codes.shape == (2, 384)
    assert np.array_equal(q_codes, qz.quantize(q_float, "int8", ranges=ranges))
    r = moe2edge("embed", "--model", model, "--input", str(tmp_path / "q.txt"), "--output", str(tmp_path / "b.npy"),
                  "--precision", "ubinary")
    assert r.returncode == 0 and np.load(tmp_path / "b.npy").shape == (2, 48)
    r = moe2edge("embed", "--model", model, "--input", str(tmp_path / "q.txt"), "--output", str(tmp_path / "x.npy"),
                  "--precision", "ubinary", "--ranges", str(ranges_file))
    assert r.returncode == 2 and "--ranges applies to --precision int8|uint8" in r.stderr
    r = moe2edge("embed", "--model", model, "--input", str(tmp_path / "q.txt"), "--output", str(tmp_path / "x.npy"),
                  "--precision", "int8", "--ranges", str(tmp_path / "nope.npy"))
    assert r.returncode == 2 and "ranges file not found" in r.stderr and not (tmp_path / "x.npy").exists()


@pytest.mark.slow
def test_cli_eval_adds_quantised_rows(tmp_path, moe2edge):
    from moe2edge.data.debian import BuildConfig, build_debian
    from moe2edge.teacher import minilm_path

    fixture = Path(__file__).parent / "fixtures" / "debian-lists"
    build_debian(lists_dir=fixture, out_dir=tmp_path / "deb", cfg=BuildConfig(test_fraction=0.4, min_queries_per_lang=1))
    out = tmp_path / "res.json"
    r = moe2edge("eval", "--model", str(minilm_path()), "--name", "minilm", "--data", str(tmp_path / "deb" / "benchmark"),
                  "--no-latency", "--threads", "1", "--precision", "int8,ubinary", "--rescore", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["runs"]
    names = [x["model"]["name"] for x in runs]
    assert names == ["minilm", "minilm [int8]", "minilm [int8+rescore8]", "minilm [ubinary]", "minilm [ubinary+rescore8]"]
    n, d = runs[0]["dataset"]["n_docs"], runs[0]["index"]["dim"]
    assert [x["index"]["bytes"] for x in runs] == [4 * n * d, n * d + 8 * d, n * d + 8 * d, n * d // 8, n * d // 8]
    for x in runs[1:]:  # quantisation costs little on real text (a broken search would score near 0)
        assert x["metrics"]["overall"]["ndcg@10"] > runs[0]["metrics"]["overall"]["ndcg@10"] - 0.15
    r = moe2edge("eval", "--model", "bm25", "--data", str(tmp_path / "deb" / "benchmark"), "--precision", "int4")
    assert r.returncode == 2 and "--precision: unknown int4" in r.stderr


def test_quantize_needs_no_torch(tmp_path):
    """The edge runtime has no torch: quantising, saving ranges and searching must not import it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"  # torch made unimportable
            "import numpy as np\nfrom moe2edge.data import quantize as qz\n"
            "e = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)\n"
            f"r = qz.load_ranges(qz.save_ranges({str(tmp_path / 'r.npy')!r}, qz.calibration_ranges(e)), 16)\n"
            "c = qz.quantize(e, 'int8', ranges=r)\n"
            "assert qz.search(e[:2], c, 'int8', 3, ranges=r, rescore=3).shape == (2, 3)\n"
            "assert qz.search(e[:2], qz.quantize(e, 'ubinary'), 'ubinary', 3).shape == (2, 3)\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
