"""Standard folders: a dense student written as BertModel + sentence-transformers loads with no custom code
(HF_HUB_OFFLINE=1, no trust_remote_code) and gives the project's own embeddings; what cannot be expressed is
refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe2edge._optional import has

torch = pytest.importorskip("torch")
# transformers / sentence-transformers are imported inside the tests, never at collection: importing them
# pulls in triton before tests/test_kernels.py sets TRITON_INTERPRET=1 (its kernels then fail to launch).
pytestmark = pytest.mark.skipif(not (has("transformers") and has("sentence_transformers")),
                                reason="needs the [interop] extra (transformers, sentence-transformers)")

from moe2edge.targets.hf_folder import HFExportError, check_exportable, write_hf_folder  # noqa: E402


def _hf():
    """(transformers, sentence_transformers), imported at test time."""
    import sentence_transformers
    import transformers

    return transformers, sentence_transformers

PROMPTS = {"search_query": "search_query: ", "search_document": "search_document: "}
ATOL = 1e-5


@pytest.fixture(scope="module")
def texts():
    """Real text: package descriptions (short and long, so batches pad), one over max_seq_length, non-ASCII."""
    from tests.fixture_text import fixture_descriptions

    t = [x for p in fixture_descriptions(limit=20) for x in p]
    return t + ["Bibliothèque d'accès aux données — für Übersetzungen, ½ naïve café", "word " * 200]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    """A dense learned-position checkpoint in the project's own format (what `distill --student dense` writes):
    all-MiniLM-L6-v2's first 2 layers (real weights, WordPiece), prompts and a 64-token max length."""
    from moe2edge.teacher import load_embedder, minilm_path

    e = load_embedder(minilm_path())
    e.model.encoder.layers = torch.nn.ModuleList(list(e.model.encoder.layers)[:2])
    e.model.config = e.model.config.replace(num_layers=2, max_seq_length=64, prompts=dict(PROMPTS))
    ckpt = tmp_path_factory.mktemp("dense") / "student"
    e.save(ckpt)
    return ckpt


def _auto_tokenizer(out: Path):
    """AutoTokenizer of the folder, asserting transformers raised no false "Mistral regex" alarm (it does for
    vocabularies > 100k when config.json has no transformers_version)."""
    import logging

    transformers, _ = _hf()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    tok_log = logging.getLogger("transformers.tokenization_utils_tokenizers")
    tok_log.addHandler(handler)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    finally:
        tok_log.removeHandler(handler)
    assert not [w for w in seen if "incorrect regex" in w], seen
    return tok


def _assert_standard_folder_matches(out: Path, ckpt: Path, texts, prompts=PROMPTS, *, automodel: bool = True):
    """ST and (with ``automodel``) a separate transformers.AutoModel load give our ids and embeddings."""
    from moe2edge.teacher import load_embedder

    transformers, st = _hf()
    ours = load_embedder(ckpt)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bert" and "auto_map" not in cfg  # nothing to trust_remote_code
    # sentence-transformers: modules, max length, prompts from the folder
    m = st.SentenceTransformer(str(out), device="cpu", local_files_only=True)
    assert [type(x).__name__ for x in m] == ["Transformer", "Pooling", "Normalize"]
    assert m.max_seq_length == ours.config.max_seq_length
    assert {k: m.prompts.get(k) for k in prompts} == prompts  # ST adds empty "query"/"document" of its own
    texts = [t.strip() for t in texts]  # ST strips its inputs
    assert type(m[0].auto_model).__name__ == "BertModel"
    for prompt in [None, *prompts]:
        got = m.encode(texts, prompt_name=prompt, batch_size=8, convert_to_numpy=True)
        np.testing.assert_allclose(got, ours.encode(texts, prompt=prompt), atol=ATOL, rtol=0)
    if not automodel:
        return ours, m
    # transformers alone: AutoTokenizer + AutoModel + masked mean + L2
    tok = _auto_tokenizer(out)
    model = transformers.AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    assert type(model).__name__ == "BertModel"
    enc = tok(texts, padding=True, truncation=True, max_length=ours.config.max_seq_length, return_tensors="pt")
    ids, mask, _ = ours.tokenizer(texts)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mm = enc["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((h * mm).sum(1) / mm.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(emb, ours.encode(texts), atol=ATOL, rtol=0)
    return ours, m


@pytest.mark.slow
def test_cli_export_hf_wordpiece_loads_in_st_and_transformers(dense_ckpt, texts, tmp_path, moe2edge):
    out = tmp_path / "hf"
    r = moe2edge("export", "hf", "--model", str(dense_ckpt), "--out", str(out), "--verify-texts", "32")
    assert r.returncode == 0, r.stderr
    assert "verified on 32 real texts: token ids equal" in r.stdout
    man = json.loads((out / "moe2edge_export.json").read_text())
    assert man["parity"]["max_abs"] <= ATOL and man["tokenizer_config"] == "copied"
    ours, _ = _assert_standard_folder_matches(out, dense_ckpt, texts)
    # the standard folder is also one of ours: the project's BERT loader gives the same embeddings
    from moe2edge.teacher import load_embedder

    back = load_embedder(out)
    np.testing.assert_allclose(back.encode(texts), ours.encode(texts), atol=1e-6, rtol=0)
    assert back.config.prompts == PROMPTS and back.config.layer_norm_eps == ours.config.layer_norm_eps


def _unigram_tokenizer(path: Path, texts: list[str]) -> Path:
    """An XLM-R-style SentencePiece Unigram tokenizer.json (<s>=0 <pad>=1 </s>=2 <unk>=3, Metaspace, NFKC),
    trained on real text; no tokenizer_config.json, so the export must write one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(texts * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.mark.slow
def test_sentencepiece_student_gets_a_tokenizer_config_and_matches(texts, tmp_path):
    from tests.fixture_text import fixture_descriptions
    from moe2edge.teacher.checkpoint import save_pretrained
    from moe2edge.teacher.model import NomicMoE, get_preset

    train = [x for p in fixture_descriptions(limit=200) for x in p]
    tok_dir = _unigram_tokenizer(tmp_path / "tok", train)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    cfg = get_preset("tiny-moe", num_experts=0, moe_every_n_layers=0, position_embedding="learned",
                     max_position_embeddings=128, vocab_size=vocab, type_vocab_size=2, pad_token_id=1,
                     layer_norm_eps=1e-5, max_seq_length=48, prompts={"query": "query: ", "passage": "passage: "})
    torch.manual_seed(0)
    model = NomicMoE(cfg).eval()
    with torch.no_grad():  # make every table row count: type row 0 and the pad row non-trivial
        model.embeddings.token_type_embeddings.weight[1].fill_(5.0)  # row 1 must NOT be used
    ckpt = save_pretrained(model, tmp_path / "sp-student", tokenizer_dir=tok_dir)
    out = tmp_path / "hf-sp"
    man = write_hf_folder(model, tokenizer_dir=ckpt, out_dir=out, verify_texts=texts)
    assert man["tokenizer_config"] == "generated" and man["parity"]["max_abs"] <= ATOL
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["pad_token"] == "<pad>" and tc["cls_token"] == "<s>" and tc["sep_token"] == "</s>"
    assert tc["unk_token"] == "<unk>" and tc["model_max_length"] == 48
    _assert_standard_folder_matches(out, ckpt, texts, prompts={"query": "query: ", "passage": "passage: "})


def test_moe_rotary_and_static_are_refused(tmp_path):
    from moe2edge.teacher.model import NomicMoE, get_preset

    with pytest.raises(HFExportError, match=r"MoE layers at \[1, 3\].*moe2edge distill --student dense"):
        check_exportable(NomicMoE(get_preset("tiny-moe")))
    rotary_dense = NomicMoE(get_preset("tiny-moe", num_experts=0, moe_every_n_layers=0))
    with pytest.raises(HFExportError, match="rotary positions: transformers' own nomic_bert class"):
        write_hf_folder(rotary_dense, tokenizer_dir=tmp_path, out_dir=tmp_path / "x", verify_texts=None)
    assert not (tmp_path / "x").exists()
    with pytest.raises(HFExportError, match="not a transformer of this project"):
        check_exportable(torch.nn.Linear(2, 2))


def test_native_nomic_bert_cannot_hold_our_layers():
    """The reason rotary models are refused, checked against the installed transformers: its nomic_bert
    layer has no q/k/v/out or MLP biases and a gated MLP. If this fails, revisit check_exportable."""
    transformers, _ = _hf()
    cfg = transformers.NomicBertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32)
    names = set(transformers.NomicBertModel(cfg).state_dict())
    attn = [n for n in names if ".self_attn." in n or ".attn" in n or "_proj" in n]
    assert attn and not [n for n in attn if n.endswith(".bias")], sorted(names)
    assert any("gate_proj" in n for n in names)


@pytest.mark.slow
def test_a_wrong_folder_is_refused_and_nothing_is_written(dense_ckpt, texts, tmp_path, monkeypatch, moe2edge):
    """The parity gate can fail: swap the query and key weights of layer 1 -> refused, folder absent."""
    from moe2edge.targets import hf_folder
    from moe2edge.teacher.checkpoint import load_pretrained

    real = hf_folder.bert_state_dict

    def swapped(model):
        sd = real(model)
        q, k = "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.attention.self.key.weight"
        sd[q], sd[k] = sd[k], sd[q]
        return sd

    monkeypatch.setattr(hf_folder, "bert_state_dict", swapped)
    with pytest.raises(HFExportError, match=r"max \|embedding diff\|"):
        write_hf_folder(load_pretrained(dense_ckpt), tokenizer_dir=dense_ckpt, out_dir=tmp_path / "bad",
                        verify_texts=texts[:16])
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp-*"))
    r = moe2edge("export", "hf", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "checkpoint folder" in r.stderr and "nope" in r.stderr


@pytest.mark.slow
def test_real_e5_small_exports_and_matches(texts, tmp_path, e5_dir):
    """Real weights with XLM-R's SentencePiece vocabulary (250k pieces): the e5-small import is dense and
    learned-position. The export's own gate checks AutoTokenizer + AutoModel; then sentence-transformers
    with the e5 prompts (query: / passage:). 470 MB of weights: one load per library, 16 texts."""
    out, E5 = tmp_path / "e5-hf", e5_dir
    from moe2edge.teacher.checkpoint import load_pretrained

    few = texts[:14] + texts[-2:]  # short and long package descriptions, the non-ASCII and the over-long text
    man = write_hf_folder(load_pretrained(E5), tokenizer_dir=E5, out_dir=out, verify_texts=few)
    assert man["parity"]["max_abs"] <= ATOL
    prompts = json.loads((E5 / "config_sentence_transformers.json").read_text())["prompts"]
    _assert_standard_folder_matches(out, E5, few, prompts={k: prompts[k] for k in ("search_query", "search_document")},
                                    automodel=False)
    _auto_tokenizer(out)
