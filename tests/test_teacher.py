"""Teacher model, released checkpoint format, traps, upcycling, round trips and bad checkpoints."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moe2edge.teacher import NomicMoE, get_preset, load_balancing_loss, upcycle
from moe2edge.teacher.checkpoint import CheckpointError, load_pretrained, save_pretrained
from moe2edge.teacher.model import RouterStats
from tests.nomic_reference import reference_embed

# A small model with the released config's keys (spec section 2), written by hand: not by our writer.
TINY_HF_CONFIG = {
    "architectures": ["NomicBertModel"], "model_type": "nomic_bert", "n_embd": 64, "n_layer": 4, "n_head": 4,
    "n_inner": 128, "vocab_size": 320, "type_vocab_size": 1, "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu", "rotary_emb_fraction": 1.0, "rotary_emb_base": 10000,
    "rotary_emb_interleaved": False, "prenorm": False, "qkv_proj_bias": True, "mlp_fc1_bias": True,
    "mlp_fc2_bias": True, "moe_every_n_layers": 2, "num_experts": 8, "moe_top_k": 2,
    "moe_normalize_expert_weights": False, "num_shared_experts": 0, "ffn_div": 1, "router_aux_loss_coef": 0.1,
    "pad_token_id": 1, "n_positions": 2048, "causal": False,
}


def released_format_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the spec's exact names and shapes (148 at full size)."""
    g = torch.Generator().manual_seed(seed)
    H, Fd, E, V = cfg["n_embd"], cfg["n_inner"], cfg["num_experts"], cfg["vocab_size"]

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "embeddings.word_embeddings.weight": r(V, H, std=1.0),
        "embeddings.token_type_embeddings.weight": r(1, H),
        "emb_ln.weight": 1 + r(H, std=0.1), "emb_ln.bias": r(H, std=0.1),
    }
    for i in range(cfg["n_layer"]):
        p = f"encoder.layers.{i}."
        sd |= {
            p + "attn.Wqkv.weight": r(3 * H, H), p + "attn.Wqkv.bias": r(3 * H, std=0.1),
            p + "attn.out_proj.weight": r(H, H), p + "attn.out_proj.bias": r(H, std=0.1),
            p + "norm1.weight": 1 + r(H, std=0.1), p + "norm1.bias": r(H, std=0.1),
            p + "norm2.weight": 1 + r(H, std=0.1), p + "norm2.bias": r(H, std=0.1),
        }
        if i % 2 == 1:
            sd |= {
                p + "mlp.router.layer.weight": r(E, H, std=0.5),
                p + "mlp.experts.mlp.w1": r(E * Fd, H), p + "mlp.experts.mlp.w2": r(E * Fd, H),
                p + "mlp.experts.bias": r(H, std=0.5),
            }
        else:
            sd |= {
                p + "mlp.fc1.weight": r(Fd, H), p + "mlp.fc1.bias": r(Fd, std=0.1),
                p + "mlp.fc2.weight": r(H, Fd), p + "mlp.fc2.bias": r(H, std=0.1),
            }
    return sd


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("released")
    (d / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    save_file(released_format_tensors(TINY_HF_CONFIG), str(d / "model.safetensors"))
    return d


SEQS = [[0, 17, 250, 33, 91, 2], [0, 5, 2], [0, 300, 301, 302, 7, 8, 9, 10, 2]]


def batch(seqs, pad=1):
    S = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (S - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in seqs])
    return ids, mask


def np_state(d: Path):
    return {k: v.double().numpy() for k, v in load_file(str(d / "model.safetensors")).items()}


# ----------------------------------------------------------------------------------------------


def test_full_preset_parameter_counts_on_meta():
    with torch.device("meta"):
        m = NomicMoE(get_preset("nomic-embed-text-v2-moe"))
    assert m.num_parameters() == 475_292_928
    assert m.num_active_parameters() == 305_423_616
    sd = m.state_dict()
    assert len(sd) == 148
    # exact names/shapes of spec section 2 (spot checks incl. the [E*F, H] expert layout)
    assert tuple(sd["embeddings.word_embeddings.weight"].shape) == (250048, 768)
    assert tuple(sd["encoder.layers.1.mlp.experts.mlp.w1"].shape) == (24576, 768)
    assert tuple(sd["encoder.layers.1.mlp.experts.mlp.w2"].shape) == (24576, 768)
    assert tuple(sd["encoder.layers.11.mlp.router.layer.weight"].shape) == (8, 768)
    assert "encoder.layers.0.mlp.fc1.weight" in sd and "encoder.layers.1.mlp.fc1.weight" not in sd
    assert m.config.moe_layers == [1, 3, 5, 7, 9, 11]


def test_full_size_names_and_shapes_equal_the_spec_list():
    """Our parameter names/shapes == the spec's tensor list, at the released size."""
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in NomicMoE(get_preset("nomic-embed-text-v2-moe")).state_dict().items()}
    spec = {}
    H, Fd, E = 768, 3072, 8
    spec["embeddings.word_embeddings.weight"] = (250048, H)
    spec["embeddings.token_type_embeddings.weight"] = (1, H)
    spec["emb_ln.weight"] = spec["emb_ln.bias"] = (H,)
    for i in range(12):
        p = f"encoder.layers.{i}."
        spec |= {p + "attn.Wqkv.weight": (3 * H, H), p + "attn.Wqkv.bias": (3 * H,), p + "attn.out_proj.weight": (H, H),
                 p + "attn.out_proj.bias": (H,), p + "norm1.weight": (H,), p + "norm1.bias": (H,),
                 p + "norm2.weight": (H,), p + "norm2.bias": (H,)}
        if i % 2:
            spec |= {p + "mlp.router.layer.weight": (E, H), p + "mlp.experts.mlp.w1": (E * Fd, H),
                     p + "mlp.experts.mlp.w2": (E * Fd, H), p + "mlp.experts.bias": (H,)}
        else:
            spec |= {p + "mlp.fc1.weight": (Fd, H), p + "mlp.fc1.bias": (Fd,), p + "mlp.fc2.weight": (H, Fd),
                     p + "mlp.fc2.bias": (H,)}
    assert ours == spec


def test_released_format_matches_independent_per_token_reference(released_dir):
    model = load_pretrained(released_dir)
    sd = np_state(released_dir)
    ids, mask = batch(SEQS)
    with torch.no_grad():
        full = model.embed(ids, mask).embeddings.numpy()
        small = model.embed(ids, mask, dim=32).embeddings.numpy()
    for b, seq in enumerate(SEQS):
        ref = reference_embed(sd, TINY_HF_CONFIG, seq)
        assert np.abs(full[b] - ref).max() <= 1e-5
        ref32 = reference_embed(sd, TINY_HF_CONFIG, seq, dim=32)  # Matryoshka: truncate after pooling
        assert np.abs(small[b] - ref32).max() <= 1e-5


@pytest.mark.parametrize("trap", ["renormalize", "bias_inside", "w2_transposed_view", "tanh_gelu"])
def test_each_known_trap_changes_the_output(released_dir, trap):
    model = load_pretrained(released_dir)
    sd = np_state(released_dir)
    seq = SEQS[2]
    with torch.no_grad():
        ours = model.embed(torch.tensor([seq])).embeddings[0].numpy()
    wrong = reference_embed(sd, TINY_HF_CONFIG, seq, **{trap: True})
    # each trap must move the output well past the 1e-5 parity tolerance (tanh-GELU is the subtlest)
    assert np.abs(ours - wrong).max() > 5e-5, f"trap {trap} is indistinguishable from the released math"


def test_zeroed_pad_row_changes_the_output_and_is_never_zeroed(released_dir):
    model = load_pretrained(released_dir)
    row = load_file(str(released_dir / "model.safetensors"))["embeddings.word_embeddings.weight"][1]
    assert torch.equal(model.embeddings.word_embeddings.weight[1], row) and row.abs().sum() > 0
    seq = [0, 44, 1, 45, 2]  # the <pad> id appearing as a real (attended) token
    with torch.no_grad():
        before = model.embed(torch.tensor([seq])).embeddings
        model.embeddings.word_embeddings.weight[1].zero_()
        after = model.embed(torch.tensor([seq])).embeddings
    assert (before - after).abs().max() > 1e-3


def test_padding_does_not_change_real_tokens(released_dir):
    model = load_pretrained(released_dir)
    ids, mask = batch(SEQS)
    with torch.no_grad():
        together = model.embed(ids, mask).embeddings
        alone = torch.cat([model.embed(torch.tensor([s])).embeddings for s in SEQS])
    assert (together - alone).abs().max() <= 1e-5


def test_save_load_round_trip_is_bit_identical(released_dir, tmp_path):
    model = load_pretrained(released_dir)
    save_pretrained(model, tmp_path / "m")
    again = load_pretrained(tmp_path / "m")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == model.config
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    for k, v in TINY_HF_CONFIG.items():  # every released key written with the released value
        if k != "architectures":
            assert saved[k] == v, k
    assert json.loads((tmp_path / "m" / "modules.json").read_text())[1]["path"] == "1_Pooling"
    prompts = json.loads((tmp_path / "m" / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["search_query"] == "search_query: "
    ids, mask = batch(SEQS)
    with torch.no_grad():
        assert torch.equal(model.embed(ids, mask).embeddings, again.embed(ids, mask).embeddings)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint_is_a_clear_error(released_dir, tmp_path):
    d = _copy(released_dir, tmp_path / "t")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(corrupt|truncated)"):
        load_pretrained(d)


def test_missing_tensor_is_named(released_dir, tmp_path):
    d = _copy(released_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["encoder.layers.3.mlp.experts.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: encoder\.layers\.3\.mlp\.experts\.bias"):
        load_pretrained(d)


def test_wrong_shape_is_named(released_dir, tmp_path):
    d = _copy(released_dir, tmp_path / "s")
    sd = load_file(str(d / "model.safetensors"))
    sd["encoder.layers.1.mlp.experts.mlp.w2"] = sd["encoder.layers.1.mlp.experts.mlp.w2"][:-8]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.experts\.mlp\.w2: expected \(1024, 64\)"):
        load_pretrained(d)


@pytest.mark.parametrize(
    "change, match",
    [({"n_inner": 256}, "wrong shapes"), ({"num_experts": 4}, "wrong shapes"), ({"prenorm": True}, "prenorm"),
     ({"rotary_emb_interleaved": True}, "rotary_emb_interleaved"), ({"activation_function": "gelu_new"}, "activation"),
     ({"n_layer": 6}, "missing tensors"), ({"model_type": "llama"}, "model_type")],
)
def test_mismatched_config_is_named(released_dir, tmp_path, change, match):
    d = _copy(released_dir, tmp_path / "c")
    (d / "config.json").write_text(json.dumps(TINY_HF_CONFIG | change))
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(d)


def test_broken_config_json_and_missing_folder(released_dir, tmp_path):
    d = _copy(released_dir, tmp_path / "j")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json:1: not valid JSON"):
        load_pretrained(d)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_pretrained(tmp_path / "nope")
    (d / "config.json").write_text(json.dumps({k: v for k, v in TINY_HF_CONFIG.items() if k != "n_head"}))
    with pytest.raises(CheckpointError, match="'n_head'"):
        load_pretrained(d)


def test_failed_save_leaves_previous_folder_intact(released_dir, tmp_path):
    model = load_pretrained(released_dir)
    out = save_pretrained(model, tmp_path / "keep")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError):  # tokenizer source without tokenizer.json: fails mid-save
        save_pretrained(model, out, tokenizer_dir=tmp_path)
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keep.tmp")]


# ------------------------------------------------------------------------------ MoE layer pieces


def test_load_balancing_loss_equals_coef_at_perfect_balance():
    cfg = get_preset("tiny-moe")
    T, E, k = 64, cfg.num_experts, cfg.moe_top_k
    perfect = RouterStats(torch.full((E,), T * k / E), torch.full((E,), T / E), torch.tensor(float(T)))
    # collapse: every token picks experts 0 and 1 with probability 1/2 each
    skewed = RouterStats(torch.tensor([T, T] + [0.0] * (E - 2)), torch.tensor([T / 2, T / 2] + [0.0] * (E - 2)),
                         torch.tensor(float(T)))
    assert load_balancing_loss([perfect, perfect], cfg, coef=1.0).item() == pytest.approx(1.0)
    assert load_balancing_loss([skewed], cfg, coef=1.0).item() == pytest.approx(E / k)


def test_router_stats_come_from_forward_and_count_real_tokens():
    torch.manual_seed(0)
    model = NomicMoE(get_preset("tiny-moe")).eval()
    ids, mask = batch(SEQS)
    out = model(ids, mask)
    assert len(out.router_stats) == len(model.config.moe_layers)
    n_real = int(mask.sum())
    for st in out.router_stats:
        assert st.counts.sum().item() == n_real * model.config.moe_top_k
        assert st.prob_sum.sum().item() == pytest.approx(n_real, rel=1e-5)
        assert st.prob_sum.requires_grad


def test_upcycle_with_biases_and_renormalisation_equals_dense(minilm):
    dense = minilm.model
    moe = upcycle(dense, num_experts=8, top_k=2, keep_biases=True, normalize=True, router_std=1.0)
    ids, mask, _ = minilm.tokenizer(REAL_SENTENCES)
    with torch.no_grad():
        a = dense.embed(ids, mask).embeddings
        b = moe.embed(ids, mask).embeddings
    assert moe.config.moe_layers == [1, 3, 5]
    assert (a - b).abs().max() <= 1e-5


def test_upcycle_authors_default_is_gate_mass_times_biasless_ffn(minilm):
    """Authors' defaults: biases dropped, shared bias 0, no renormalisation -> f(h) = (w1+w2) * FFN_nobias(h)."""
    dense = minilm.model
    moe = upcycle(dense)  # defaults as the authors
    ids, mask, _ = minilm.tokenizer(REAL_SENTENCES)
    with torch.no_grad():
        h = torch.randn(37, dense.config.hidden_size)
        layer = moe.encoder.layers[1].mlp
        f, _ = layer(h[None])
        probs = torch.softmax(layer.router.layer(h).float(), -1)
        s = probs.topk(2, -1).values.sum(-1, keepdim=True)  # gate mass, < 1
        fc1, fc2 = dense.encoder.layers[1].mlp.fc1, dense.encoder.layers[1].mlp.fc2
        predicted = s * (torch.nn.functional.gelu(h @ fc1.weight.T) @ fc2.weight.T)
        assert (f[0] - predicted).abs().max() <= 1e-5
        assert (s < 1).all()
        # ... and so the embeddings differ from the dense model's
        assert (dense.embed(ids, mask).embeddings - moe.embed(ids, mask).embeddings).abs().max() > 1e-3


def test_upcycle_rejects_bad_arguments(minilm):
    with pytest.raises(ValueError, match="top_k"):
        upcycle(minilm.model, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="dense model"):
        upcycle(upcycle(minilm.model))
    with pytest.raises(ValueError, match="no MoE layer"):
        upcycle(minilm.model, every_n_layers=1)  # i % 1 == 1 never holds (released rule)


def test_upcycled_model_round_trips_with_tokenizer(minilm, tmp_path):
    from moe2edge.teacher import load_embedder

    moe = upcycle(minilm.model, keep_biases=True)
    minilm.__class__(moe, minilm.tokenizer).save(tmp_path / "moe")
    again = load_embedder(tmp_path / "moe")
    assert again.config.moe_expert_fc1_bias and again.config.position_embedding == "learned"
    a = minilm.__class__(moe, minilm.tokenizer).encode(REAL_SENTENCES)
    assert np.array_equal(a, again.encode(REAL_SENTENCES))


# ------------------------------------------------------------------------------ real MiniLM

REAL_SENTENCES = [
    "GNU C Library: Shared libraries",
    "Contains the standard libraries that are used by nearly all programs on the system.",
    "small, fast and powerful console music player for Unix-like operating systems",
    "Bibliothek zum Lesen und Schreiben von Bilddateien",
    "",
    "command-line interface for the apt package manager " * 60,  # longer than max_seq_length
]


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is the [interop] extra")
    from moe2edge.teacher import minilm_path

    ref = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(REAL_SENTENCES, normalize_embeddings=True)
    ours = minilm.encode(REAL_SENTENCES, batch_size=4)
    assert np.abs(ours - ref).max() <= 1e-5
    assert (ours * ref).sum(1).min() >= 0.99999


def test_encode_contract(minilm, caplog):
    with caplog.at_level(logging.INFO):
        e = minilm.encode(REAL_SENTENCES, batch_size=2)
    assert e.shape == (len(REAL_SENTENCES), 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert "1 of 6 texts were longer than max_seq_length=256" in caplog.text
    assert "1 of 6 texts are empty" in caplog.text
    # Matryoshka: truncate the pooled vector, then renormalise (not: truncate a normalised vector)
    d = minilm.encode(REAL_SENTENCES[:3], dim=128)
    ids, mask, _ = minilm.tokenizer(REAL_SENTENCES[:3])
    with torch.no_grad():
        pooled = minilm.model.embed(ids, mask).pooled[:, :128]
    assert np.abs(d - torch.nn.functional.normalize(pooled, dim=-1).numpy()).max() <= 1e-6
    # batching / ordering does not change results
    assert np.abs(minilm.encode(REAL_SENTENCES[::-1], batch_size=1)[::-1] - e).max() <= 1e-5
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        minilm.encode(["ok", b"\xff\xfe bad"])
    with pytest.raises(TypeError, match="list of strings"):
        minilm.encode("one string")
    with pytest.raises(ValueError, match="dim must be"):
        minilm.encode(["x"], dim=1000)


def test_prompts_prepend_their_prefix(released_dir, tmp_path):
    from moe2edge.teacher import load_embedder
    from moe2edge.teacher.embedder import Embedder, minilm_path

    emb = load_embedder(minilm_path())
    emb.model.config.prompts = {"search_query": "search_query: "}
    a = emb.encode(["find a pdf viewer"], prompt="search_query")
    b = emb.encode(["search_query: find a pdf viewer"])
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="unknown prompt"):
        emb.encode(["x"], prompt="nonsense")
    assert isinstance(emb, Embedder)


def test_cli_help_does_not_import_torch():
    code = (
        "import sys; from moe2edge.compile.cli import build_parser; build_parser().format_help(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
