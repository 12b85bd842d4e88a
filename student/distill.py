"""Distillation fine-tune through the teacher's Trainer, and the student recipes end to end.

    student = build_student(teacher, kind="pruned", calib=calib, num_experts=4, top_k=1)
    history = distill(student, teacher, pairs, train=TrainConfig(steps=60), loss=DistillLoss())
    save_student(student, "runs/students/pruned", teacher_path=..., recipe=..., pairs=pairs)

The loss per batch is ``contrastive_weight * InfoNCE(student, real pairs)`` (the Trainer's own
loss, Matryoshka included) ``+ embedding_weight * cosine|mse(proj(student), teacher)`` on queries and
documents ``+ similarity_weight * KL(teacher || student)`` of the in-batch query->document score
distributions. The teacher's pooled embeddings are computed inside the Trainer's ``extra_loss``
hook under ``torch.no_grad`` on exactly the texts (prompts, truncation) the student sees, once per
distinct text (cached: later epochs cost only the student). A learned
linear projection maps the student onto the teacher's space when their dims differ (static student).

Dimension legend: B queries, N documents (positives + hard negatives), d student dim, D teacher dim.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from moe2edge.student.losses import EMBEDDING_LOSSES, embedding_loss, similarity_kl
from moe2edge.teacher.losses import matryoshka_info_nce
from moe2edge.teacher.model import mean_pool

log = logging.getLogger(__name__)

KINDS = ("pruned", "dense", "static")
MANIFEST = "student_manifest.json"


@dataclass
class DistillLoss:
    """Weights of the distillation terms (CLI strings map 1:1 onto these fields)."""

    contrastive_weight: float = 1.0  # InfoNCE on the real pairs (the Trainer's loss)
    embedding_weight: float = 1.0
    embedding_loss: str = "cosine"  # cosine | mse
    similarity_weight: float = 1.0  # KL between in-batch score distributions
    similarity_temperature: float = 0.05

    def __post_init__(self):
        if self.embedding_loss not in EMBEDDING_LOSSES:
            raise ValueError(f"embedding_loss must be one of {', '.join(EMBEDDING_LOSSES)}, got {self.embedding_loss!r}")
        for k in ("contrastive_weight", "embedding_weight", "similarity_weight"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.similarity_temperature <= 0:
            raise ValueError("similarity_temperature must be > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pooled(embedder, texts: list[str], prompt: str | None, max_len: int) -> torch.Tensor:
    """(N, D) masked-mean hidden states of ``embedder`` on ``texts``, tokenised like the Trainer does."""
    tok = embedder.tokenizer
    old = tok.max_length
    tok.tok.enable_truncation(max_length=min(max_len, embedder.model.config.max_seq_length))
    try:
        ids, mask, _ = tok([embedder.prefix(prompt) + t for t in texts])
    finally:
        tok.tok.enable_truncation(max_length=old)
    dev = next(embedder.model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    return mean_pool(embedder.model(ids, mask).last_hidden_state.float(), mask)


class Distiller(nn.Module):
    """The Trainer's ``extra_loss(q_pooled, d_pooled, batch_local)``: teacher targets + weighted terms."""

    def __init__(self, teacher, loss: DistillLoss, student_dim: int):
        super().__init__()
        self.teacher, self.loss = teacher, loss
        self.teacher.model.eval().requires_grad_(False)
        D = teacher.model.config.hidden_size
        self.proj = nn.Linear(student_dim, D, bias=False) if student_dim != D else None
        if self.proj is not None:
            nn.init.orthogonal_(self.proj.weight)
        self.trainer = None  # set by distill(): its tokenisation settings and text order
        self.parts: list[dict] = []
        # Teacher targets by (prompt, max_len, text): the teacher is frozen and deterministic, so from
        # the second epoch on a step costs only the student's forward/backward (~20x cheaper for the
        # static student). 384 floats per text: 16k pairs x 2 texts ~ 50 MB.
        self.cache: dict[tuple, torch.Tensor] = {}
        self.cache_hits = 0

    def targets(self, texts: list[str], prompt: str | None, max_len: int) -> torch.Tensor:
        """(N, D) teacher embeddings of ``texts``; computes only the ones not seen before."""
        keys = [(prompt, max_len, t) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            with torch.no_grad():
                new = pooled(self.teacher, [k[2] for k in todo], prompt, max_len)
            self.cache.update(zip(todo, new.cpu()))
        self.cache_hits += len(keys) - len(todo)
        dev = next(self.teacher.model.parameters()).device
        return torch.stack([self.cache[k] for k in keys]).to(dev)

    def forward(self, q_pooled, d_pooled, batch_local):
        tr, L = self.trainer, self.loss
        q_texts, d_texts = tr._texts(batch_local)  # the Trainer's order: positives, then hard negatives
        t_q = self.targets(q_texts, tr.cfg.query_prompt, tr.cfg.query_max_len)  # (B, D)
        t_d = self.targets(d_texts, tr.cfg.doc_prompt, tr.cfg.doc_max_len)  # (N, D)
        total = q_pooled.new_zeros((), dtype=torch.float32)
        parts = {}
        if L.embedding_weight:
            sq = self.proj(q_pooled) if self.proj is not None else q_pooled
            sd = self.proj(d_pooled) if self.proj is not None else d_pooled
            e = 0.5 * (embedding_loss(sq, t_q, L.embedding_loss) + embedding_loss(sd, t_d, L.embedding_loss))
            total = total + L.embedding_weight * e
            parts["embedding"] = float(e.detach())
        if L.similarity_weight:
            k = similarity_kl(q_pooled, d_pooled, t_q, t_d, L.similarity_temperature)
            total = total + L.similarity_weight * k
            parts["similarity_kl"] = float(k.detach())
        if L.contrastive_weight != 1.0:
            # The Trainer always adds InfoNCE with weight 1; add (w - 1) x the same loss (single process:
            # d_pooled is the whole pool, labels are arange) so the effective weight is w.
            labels = torch.arange(q_pooled.shape[0], device=q_pooled.device)
            nce = matryoshka_info_nce(q_pooled, d_pooled, labels, 1.0 / tr.cfg.temperature, tr.dims)
            total = total + (L.contrastive_weight - 1.0) * nce
        self.parts.append(parts)
        return total


def distill(student, teacher, pairs: list, *, train, loss: DistillLoss | None = None, out_dir=None,
            progress: bool = True) -> list[dict]:
    """Fine-tune ``student`` (an Embedder: NomicMoE or StaticModel inside) towards ``teacher`` on
    ``pairs`` with the teacher's Trainer; returns the history (Trainer records + distillation parts)."""
    from moe2edge.teacher.train import Trainer, world

    loss = loss or DistillLoss()
    if world()[1] > 1 and loss.contrastive_weight != 1.0:
        raise ValueError("contrastive_weight != 1 is only supported in a single process")
    if student.tokenizer.tok.get_vocab_size() != teacher.tokenizer.tok.get_vocab_size():
        raise ValueError("student and teacher tokenizers differ: distillation feeds both the same texts")
    distiller = Distiller(teacher, loss, student.model.config.hidden_size)
    # The projection learns with the student: same optimizer and schedule, no decay, and under torchrun
    # the same start and rank-averaged gradients (Trainer.extra_params), so ranks stay identical.
    trainer = Trainer(student, train, out_dir=Path(out_dir) if out_dir else None, extra_loss=distiller,
                      extra_params=list(distiller.proj.parameters()) if distiller.proj is not None else [])
    distiller.trainer = trainer
    t0 = time.perf_counter()
    history = trainer.fit(pairs, progress=progress)
    for rec, parts in zip(history, distiller.parts):
        rec.update(parts)
    log.info("distilled %d steps in %.0f s (teacher targets: %d computed, %d reused)", len(history),
             time.perf_counter() - t0, len(distiller.cache), distiller.cache_hits)
    student.model.eval()
    return history


# ------------------------------------------------------------------------------------ lineage


def pairs_hash(pairs: list) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.query, p.positive, list(p.negatives)], ensure_ascii=False).encode())
    return h.hexdigest()


def manifest(*, kind: str, teacher_path, recipe: dict, pairs: list | None, calibration: dict | None,
             history: list[dict] | None, student_model=None, extra: dict | None = None) -> dict:
    """Lineage of a student: teacher identity, recipe, data identity, what the build measured."""
    from moe2edge.student.dense import active_non_embedding_parameters
    from moe2edge.teacher.checkpoint import checkpoint_hash

    m = {
        "schema": "moe2edge.student/v1",
        "kind": kind,
        "teacher": {"path": str(teacher_path), "checkpoint_hash": checkpoint_hash(teacher_path)},
        "recipe": recipe,
        "data": ({"pairs": len(pairs), "pairs_sha256": pairs_hash(pairs)} if pairs else None),
        "calibration": calibration,
        "versions": {"torch": torch.__version__},
    }
    if student_model is not None and hasattr(student_model, "num_active_parameters"):
        m["params"] = {"total": int(sum(p.numel() for p in student_model.parameters())),
                       "active_non_embedding": active_non_embedding_parameters(student_model)}
    if history:
        last = history[-1]
        m["train"] = {"steps": len(history), "final": {k: last[k] for k in ("loss", "contrastive", "embedding",
                                                                             "similarity_kl") if k in last}}
    for attr in ("pruning", "densify"):
        if student_model is not None and hasattr(student_model, attr):
            m[attr] = getattr(student_model, attr)
    if extra:
        m.update(extra)
    return m


def save_student(student, path, *, manifest_dict: dict, extra_files: dict | None = None, force: bool = False) -> Path:
    """NomicMoE-family students: the released HF folder + manifest; static: its own small format. Either way
    one atomic folder whose files are all listed with size + sha256 (``extra_files``, e.g. the fine-tune
    history, land in the same rename). An existing ``path`` is replaced only if it is a student folder this
    tool wrote, unless ``force``."""
    from moe2edge.student.static import StaticEmbedder, StaticModel

    if isinstance(student, StaticEmbedder):
        return student.save(path, manifest=manifest_dict, extra_files=extra_files, force=force)
    if isinstance(student.model, StaticModel):  # a fine-tuned table: back to the numpy embedder
        from moe2edge.student.static import StaticEmbedder as SE

        se = SE(student.model.embeddings.weight.detach().cpu().numpy(), Path(student.tokenizer.dir) / "tokenizer.json",
                student.model.config)
        return se.save(path, manifest=manifest_dict, extra_files=extra_files, force=force)
    from moe2edge.teacher.checkpoint import save_pretrained

    return save_pretrained(student.model, path, tokenizer_dir=student.tokenizer.dir,
                           extra_files={MANIFEST: manifest_dict, **(extra_files or {})}, kind="student", force=force)


def load_student(path, *, check: bool | None = None):
    """Any student folder (or teacher folder): static -> StaticEmbedder, else the teacher's Embedder.

    Both expose ``encode(texts, *, prompt=None, dim=None, batch_size=32) -> (N, dim) float32``; their files
    are checked against the folder's size / sha256 list first (``check=False`` skips that).
    """
    from moe2edge.student.static import is_static, load_static

    if is_static(path):
        return load_static(path, check=check)
    from moe2edge.teacher import load_embedder

    return load_embedder(path, check=check)
