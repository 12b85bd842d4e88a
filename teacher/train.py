"""Contrastive training of the (MoE) embedder, as in the paper (spec section 3), at any scale.

One loop serves single-process CPU runs, ``torchrun`` multi-process runs (DDP; gloo on CPU, NCCL on
GPU) and the students' distillation (student/ passes an extra loss term). Pieces:

* InfoNCE query -> document with in-batch negatives (+ optional hard negatives), logit scale
  1 / temperature (50), Matryoshka losses over ``matryoshka_dims``.
* Document embeddings (positives and hard negatives) are all-gathered across ranks WITH gradient
  (``torch.distributed.nn.functional.all_gather``, whose backward sums over ranks), so every rank's
  queries see every rank's documents. Then DDP's gradient averaging gives exactly the gradient of the
  global-batch mean loss; the spec's (authors') extra ``* world_size`` is ``loss_scale="world_size"``
  and multiplies every gradient by W (AdamW is nearly invariant to that; grad clipping is not).
* megablocks-form load-balancing loss, summed over the query and the document pass.
* AdamW with weight decay only on >= 2-D non-bias weights; warmup + cosine / linear / inverse-sqrt /
  constant; gradient clipping; bf16 autocast and activation checkpointing on GPU.
* GradCache: embed the batch in chunks without grad, take the loss gradient w.r.t. the cached
  embeddings, then re-forward each chunk with grad and back-propagate those gradients. Same
  gradients as the plain batch (tested), memory of one chunk.
* Atomic checkpoints (released HF format + optimizer / scheduler / RNG / data position) and exact
  resume: an interrupted and resumed run ends bit-identical to an uninterrupted one (tested).

Dimension legend: B queries per rank, G global batch (B * W), W world size, Nn hard negatives per
query, D hidden size, S sequence length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from moe2edge.teacher.embedder import Embedder
from moe2edge.teacher.losses import matryoshka_info_nce
from moe2edge.teacher.model import RouterStats, expert_load, load_balancing_loss, mean_pool

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Recipe of one training run (defaults: the paper's finetuning values where they fit a CPU)."""

    steps: int = 100
    batch_size: int = 64  # GLOBAL batch (queries); split evenly over ranks
    lr: float = 2e-5
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | inverse_sqrt | constant
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    temperature: float = 0.02  # logit scale 50
    hard_negatives: int = 0  # per query, taken from the pairs file's "negatives"
    matryoshka_dims: tuple[int, ...] = ()  # () -> the model's config.matryoshka_dims
    aux_loss_coef: float | None = None  # None -> the model's router_aux_loss_coef
    query_max_len: int = 32
    doc_max_len: int = 128
    query_prompt: str | None = "search_query"
    doc_prompt: str | None = "search_document"
    grad_cache_chunk: int = 0  # 0: off; else chunk size (sequences) for GradCache
    loss_scale: str = "world_size"  # "world_size" (spec/authors) | "none"
    bf16: bool = True  # autocast on CUDA only
    gradient_checkpointing: bool = False  # activation checkpointing per block (any device)
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    log_every: int = 10

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.loss_scale not in ("world_size", "none"):
            raise ValueError(f"loss_scale must be 'world_size' or 'none', got {self.loss_scale!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2 and self.hard_negatives == 0:
            raise ValueError("batch_size 1 with no hard negatives leaves InfoNCE no negative to contrast")
        self.betas = tuple(self.betas)
        self.matryoshka_dims = tuple(self.matryoshka_dims)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ schedules


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    W, T = max(cfg.warmup_steps, 0), cfg.steps

    def f(step: int) -> float:
        if W and step < W:
            return (step + 1) / W
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "inverse_sqrt":
            return math.sqrt(max(W, 1) / max(step + 1, 1))
        progress = min(1.0, (step - W) / max(1, T - W))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return f


SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on >= 2-D weights that are not biases (spec section 3)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.endswith("bias") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------ distributed


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank (rank order); the backward sums gradients over ranks."""
    rank, W = world()
    if W == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated name, still the autograd-aware gather in torch 2.13
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def init_distributed_from_env() -> bool:
    """Join a torchrun job if launched by one (gloo on CPU, NCCL on GPU). Returns True if distributed."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


# ------------------------------------------------------------------------------ data


class PairBatches:
    """Deterministic epochs of global batches over a list of Pair; position is resumable."""

    def __init__(self, pairs: list, batch_size: int, seed: int, hard_negatives: int):
        if not pairs:
            raise ValueError("the training pairs are empty")
        if batch_size > len(pairs):
            raise ValueError(f"batch_size {batch_size} is larger than the {len(pairs)} training pairs")
        if hard_negatives:
            short = sum(1 for p in pairs if len(p.negatives) < hard_negatives)
            if short:
                raise ValueError(
                    f"{short} of {len(pairs)} pairs have fewer than hard_negatives={hard_negatives} negatives; "
                    "mine more (moe2edge teacher mine) or lower --hard-negatives"
                )
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.pairs)))
        rng.shuffle(order)
        return order

    def next(self) -> list:
        if self.index + self.batch_size > len(self._order):  # drop the ragged tail: equal batches
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        idx = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return [self.pairs[i] for i in idx]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, st: dict) -> None:
        self.epoch, self.index = int(st["epoch"]), int(st["index"])
        self._order = self._perm(self.epoch)


# ------------------------------------------------------------------------------ the trainer


@dataclass
class StepResult:
    loss: float
    contrastive: float
    aux: float
    tokens: int
    load: np.ndarray | None = None  # (L, E) expert load fractions of this step


@dataclass
class Trainer:
    """Train ``embedder.model`` on pairs. ``extra_loss(q_pooled, d_pooled, batch)`` hooks distillation;
    ``extra_params`` (e.g. the distiller's projection head) train with the model: same optimizer and
    schedule (no weight decay), same start on every rank, gradients averaged over ranks as DDP does
    for the model's (outside DDP's module, so without the all-reduce they would diverge)."""

    embedder: Embedder
    cfg: TrainConfig
    out_dir: Path | None = None
    extra_loss: Callable | None = None
    history: list[dict] = field(default_factory=list)
    force_output: bool = False  # checkpoints may replace folders this tool did not write (--force)
    extra_params: list = field(default_factory=list)

    def __post_init__(self):
        from moe2edge._malloc import tune_malloc

        tune_malloc()  # see moe2edge/_malloc.py: flat memory over long CPU runs
        self.model = self.embedder.model
        mcfg = self.model.config
        self.dims = self.cfg.matryoshka_dims or mcfg.matryoshka_dims or (mcfg.hidden_size,)
        bad = [d for d in self.dims if not 1 <= d <= mcfg.hidden_size]
        if bad:
            raise ValueError(f"matryoshka dims {bad} exceed the model's hidden size {mcfg.hidden_size}")
        self.aux_coef = mcfg.router_aux_loss_coef if self.cfg.aux_loss_coef is None else self.cfg.aux_loss_coef
        self.rank, self.world = world()
        if self.cfg.batch_size % self.world:
            raise ValueError(f"global batch {self.cfg.batch_size} is not divisible by world size {self.world}")
        self.device = next(self.model.parameters()).device
        if self.cfg.gradient_checkpointing:
            self.model.config.gradient_checkpointing = True
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(PairEncoder(self.model), device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.extra_params = [p for p in self.extra_params if p.requires_grad]
        groups = param_groups(self.model, self.cfg.weight_decay)
        if self.extra_params:
            groups.append({"params": self.extra_params, "weight_decay": 0.0})
            if self.world > 1:  # DDP broadcasts the model from rank 0; do the same for these
                with torch.no_grad():
                    for p in self.extra_params:
                        dist.broadcast(p.data, src=0)
        self.opt = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(self.cfg))
        self.step = 0

    # -- tokenisation ------------------------------------------------------------------------
    def _tok(self, texts: list[str], prompt: str | None, max_len: int):
        tok = self.embedder.tokenizer
        old = tok.max_length
        tok.tok.enable_truncation(max_length=min(max_len, self.model.config.max_seq_length))
        try:
            pre = self.embedder.prefix(prompt)
            ids, mask, _ = tok([pre + t for t in texts])
        finally:
            tok.tok.enable_truncation(max_length=old)
        return ids.to(self.device), mask.to(self.device)

    def _local(self, batch: list) -> list:
        n = len(batch) // self.world
        return batch[self.rank * n : (self.rank + 1) * n]

    # -- forward pieces ------------------------------------------------------------------------
    def _encode(self, ids, mask, ids2=None, mask2=None):
        """[(pooled (B, D) fp32, router stats)] per input pair, one (DDP) forward, autocast on CUDA."""
        module = self.ddp or PairEncoder(self.model)
        use_bf16 = self.cfg.bf16 and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            outs = module(ids, mask, ids2, mask2)
        masks = (mask, mask2)
        up = lambda h: h.float() if h.dtype in (torch.bfloat16, torch.float16) else h  # noqa: E731  (fp32+ loss)
        return [(mean_pool(up(o.last_hidden_state), m), o.router_stats) for o, m in zip(outs, masks)]

    def _loss_from_pooled(self, q_pooled, d_pooled, batch_local):
        """Contrastive (+ extra) loss of this rank from pooled local embeddings; returns (total, contrastive)."""
        B = q_pooled.shape[0]
        Nn = self.cfg.hard_negatives
        d_all = gather_with_grad(d_pooled)  # (W * B * (1 + Nn), D), rank-major
        per_rank = B * (1 + Nn)
        # positives of rank r sit at r * per_rank + i; this rank's queries are offset by rank * per_rank
        labels = torch.arange(B, device=q_pooled.device) + self.rank * per_rank
        loss = matryoshka_info_nce(q_pooled, d_all, labels, 1.0 / self.cfg.temperature, self.dims)
        total = loss
        if self.extra_loss is not None:
            total = total + self.extra_loss(q_pooled, d_pooled, batch_local)
        return total, loss

    def _global_counts(self, stats) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per MoE layer (counts (E,), tokens ()) summed over ranks (no gradient flows through counts)."""
        out = []
        for st in stats:
            c, n = st.counts.clone(), st.num_tokens.clone()
            if self.world > 1:
                dist.all_reduce(c)
                dist.all_reduce(n)
            out.append((c, n))
        return out

    def _aux(self, stats_q, stats_d, counts_q=None, counts_d=None):
        """Load-balancing loss of the GLOBAL batch, query pass + document pass (spec: summed).

        The megablocks form sum_e count_e * meanprob_e is linear in the router probabilities once the
        (gradient-free) counts are fixed, so each rank (and each GradCache chunk) contributes
        ``counts_global . prob_sum_local / T_global^2``; times W to undo DDP's averaging. The sum over
        ranks is exactly the single-process loss of the whole batch, gradients included (tested).
        """
        if not self.model.config.moe_layers or self.aux_coef == 0:
            return torch.zeros((), device=self.device)
        counts_q = counts_q or self._global_counts(stats_q)
        counts_d = counts_d or self._global_counts(stats_d)
        cfg = self.model.config
        loss = 0.0
        for stats, counts in ((stats_q, counts_q), (stats_d, counts_d)):
            loss = loss + load_balancing_loss([RouterStats(c, s.prob_sum, n) for (c, n), s in zip(counts, stats)],
                                              cfg, self.aux_coef)
        return loss * self.world

    def _texts(self, batch_local):
        docs = [p.positive for p in batch_local]
        for p in batch_local:
            docs.extend(p.negatives[: self.cfg.hard_negatives])
        # order: [pos_0..pos_B-1, negs of q0, negs of q1, ...]: positives first keeps labels = arange
        return [p.query for p in batch_local], docs

    def _scale(self) -> float:
        return float(self.world) if self.cfg.loss_scale == "world_size" else 1.0

    # -- one optimisation step -----------------------------------------------------------------
    def compute_gradients(self, batch: list) -> StepResult:
        """Forward + backward for one GLOBAL batch (this rank's share); leaves .grad populated."""
        local = self._local(batch)
        q_texts, d_texts = self._texts(local)
        q_ids, q_mask = self._tok(q_texts, self.cfg.query_prompt, self.cfg.query_max_len)
        d_ids, d_mask = self._tok(d_texts, self.cfg.doc_prompt, self.cfg.doc_max_len)
        tokens = int(q_mask.sum() + d_mask.sum())
        if self.cfg.grad_cache_chunk:
            res = self._grad_cache_step(local, q_ids, q_mask, d_ids, d_mask, tokens)
        else:
            (q_pooled, sq), (d_pooled, sd) = self._encode(q_ids, q_mask, d_ids, d_mask)
            total, contrastive = self._loss_from_pooled(q_pooled, d_pooled, local)
            aux = self._aux(sq, sd)
            (self._scale() * (total + aux)).backward()
            load = expert_load(sq + sd).cpu().numpy() if sq else None
            res = StepResult(total.item(), contrastive.item(), aux.item(), tokens, load)
        self._average_extra_grads()
        return res

    def _average_extra_grads(self) -> None:
        """Mean of the extra parameters' gradients over ranks (DDP's rule for the model's)."""
        if self.world == 1:
            return
        for p in self.extra_params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            p.grad = g / self.world

    def _grad_cache_step(self, local, q_ids, q_mask, d_ids, d_mask, tokens) -> StepResult:
        C = self.cfg.grad_cache_chunk
        chunks = lambda n: [slice(s, min(s + C, n)) for s in range(0, n, C)]  # noqa: E731
        # 1) embed everything without grad; keep full-batch router counts for the aux loss
        with torch.no_grad():
            qp, sq = zip(*[self._encode(q_ids[s], q_mask[s])[0] for s in chunks(len(q_ids))])
            dp, sd = zip(*[self._encode(d_ids[s], d_mask[s])[0] for s in chunks(len(d_ids))])
        q_cache = torch.cat(qp).requires_grad_(True)
        d_cache = torch.cat(dp).requires_grad_(True)

        def full_counts(stats_chunks):
            if not stats_chunks[0]:
                return None
            summed = [RouterStats(sum(c[layer].counts for c in stats_chunks), None,
                                  sum(c[layer].num_tokens for c in stats_chunks))
                      for layer in range(len(stats_chunks[0]))]
            return self._global_counts(summed)

        cq, cd = full_counts(sq), full_counts(sd)
        # 2) loss and its gradient w.r.t. the cached embeddings
        total, contrastive = self._loss_from_pooled(q_cache, d_cache, local)
        (self._scale() * total).backward()
        gq, gd = q_cache.grad, d_cache.grad
        # 3) re-forward each chunk with grad; inject the cached gradient (+ the exact aux-loss share)
        aux_total = 0.0
        module_sync = self.ddp.no_sync if self.ddp is not None else None
        pieces = [(q_ids, q_mask, gq, cq, "q"), (d_ids, d_mask, gd, cd, "d")]
        n_chunks = sum(len(chunks(len(ids))) for ids, *_ in pieces)
        k = 0
        for ids, mask, g, counts, kind in pieces:
            for s in chunks(len(ids)):
                k += 1
                ctx = module_sync() if (module_sync and k < n_chunks) else nullcontext()
                with ctx:  # DDP all-reduces once, on the last chunk's backward
                    pooled, st = self._encode(ids[s], mask[s])[0]
                    surrogate = (pooled * g[s]).sum()
                    if counts is not None and self.aux_coef:
                        aux = self.world * load_balancing_loss(
                            [RouterStats(c, x.prob_sum, n) for (c, n), x in zip(counts, st)],
                            self.model.config, self.aux_coef)
                        aux_total += aux.item()
                        surrogate = surrogate + self._scale() * aux
                    surrogate.backward()
        load = None
        if cq is not None:
            c = torch.stack([a for a, _ in cq]) + torch.stack([a for a, _ in cd])
            load = (c / c.sum(-1, keepdim=True).clamp(min=1)).cpu().numpy()
        return StepResult(total.item(), contrastive.item(), aux_total, tokens, load)

    def optimizer_step(self) -> float:
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)) \
            if self.cfg.grad_clip else float("nan")
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return gnorm

    # -- checkpoints -------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        keep = {k: v for k, v in self.cfg.to_dict().items() if k not in ("save_every", "log_every", "steps")}
        blob = json.dumps({"model": self.model.config.to_dict(), "train": keep}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def save_checkpoint(self, data: PairBatches, path: Path | None = None) -> Path | None:
        """Atomic: HF folder (loadable as a model) + trainer_state.pt. Only rank 0 writes."""
        path = Path(path or (self.out_dir / f"checkpoint-{self.step}"))
        if self.rank == 0:
            state = {
                "step": self.step, "fingerprint": self._fingerprint(), "train_config": self.cfg.to_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "data": data.state(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            }
            # The tokenizer/ST files come with the model folder; trainer_state.pt rides in the same rename.
            from moe2edge.teacher.checkpoint import save_pretrained

            def _state_writer(tmp: Path):
                torch.save(state, tmp / "trainer_state.pt")

            # Replaces an existing folder only if it is a checkpoint this tool wrote holding nothing else
            # (a user's files in OUT/final are never deleted) unless force_output (--force).
            save_pretrained(self.model, path, tokenizer_dir=self.embedder.tokenizer.dir, before_commit=_state_writer,
                            kind="checkpoint", force=self.force_output)
        if self.world > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path: str | Path, data: PairBatches) -> None:
        """Resume: check the run is the same recipe BEFORE any compute, then restore everything."""
        from moe2edge.teacher.checkpoint import CheckpointError, load_pretrained

        from moe2edge._integrity import check_folder

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: --resume needs a checkpoint folder (OUT/checkpoint-N or OUT/final)")
        st_file = path / "trainer_state.pt"
        if not st_file.exists():
            raise CheckpointError(f"{path}: no trainer_state.pt: not a training checkpoint")
        check_folder(path)  # sizes + sha256 before unpickling anything (load_pretrained below checks again, cached)
        try:
            state = torch.load(st_file, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - torch.load raises RuntimeError / EOFError / UnpicklingError
            raise CheckpointError(f"{st_file}: corrupt or truncated trainer state ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:160]}); resume from another checkpoint") from None
        if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "data", "rng"} <= set(state):
            raise CheckpointError(f"{st_file}: not a moe2edge trainer state (keys missing)")
        if state.get("fingerprint") != self._fingerprint():
            theirs = state.get("train_config", {})
            diff = sorted(k for k in set(theirs) | set(self.cfg.to_dict())
                          if k not in ("save_every", "log_every", "steps") and theirs.get(k) != self.cfg.to_dict().get(k))
            raise CheckpointError(
                f"{path}: checkpoint was made by another config (model or recipe differs"
                + (f"; train keys: {', '.join(diff)}" if diff else "; model config differs") + ")"
            )
        ckpt_model = load_pretrained(path)
        if ckpt_model.config != self.model.config:
            raise CheckpointError(f"{path}: model config differs from this run's")
        with torch.no_grad():
            for (n, p), q in zip(self.model.state_dict().items(), ckpt_model.state_dict().values()):
                p.copy_(q)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        data.load_state(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, pairs: list, *, resume_from: str | Path | None = None, stop_after: int | None = None,
            progress: bool = True) -> list[dict]:
        """Train for cfg.steps (or until ``stop_after`` steps, to simulate an interruption)."""
        data = PairBatches(pairs, self.cfg.batch_size, self.cfg.seed, self.cfg.hard_negatives)
        if resume_from is not None:
            self.load_checkpoint(resume_from, data)
        self.model.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", disable=not progress or self.rank != 0,
                   dynamic_ncols=True)
        t_last, tok_acc = time.perf_counter(), 0
        while self.step < self.cfg.steps:
            if stop_after is not None and self.step >= stop_after:
                break
            res = self.compute_gradients(data.next())
            gnorm = self.optimizer_step()
            if self.world > 1:  # log the global-batch loss, not this rank's share
                t = torch.tensor([res.loss, res.contrastive], dtype=torch.float64)
                dist.all_reduce(t)
                res.loss, res.contrastive = (t / self.world).tolist()
            tok_acc += res.tokens * self.world
            now = time.perf_counter()
            rec = {"step": self.step, "loss": res.loss, "contrastive": res.contrastive, "aux": res.aux,
                   "lr": self.sched.get_last_lr()[0], "grad_norm": gnorm, "tokens_per_s": tok_acc / max(now - t_last, 1e-9)}
            if res.load is not None:
                rec["load_min"], rec["load_max"] = float(res.load.min()), float(res.load.max())
                rec["load"] = res.load.round(4).tolist()
            self.history.append(rec)
            t_last, tok_acc = now, 0
            bar.update(1)
            post = {"loss": f"{res.loss:.3f}", "lr": f"{rec['lr']:.1e}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if res.load is not None:
                post["load"] = f"{rec['load_min']:.2f}-{rec['load_max']:.2f}"
            bar.set_postfix(post)
            if self.out_dir and self.cfg.save_every and self.step % self.cfg.save_every == 0:
                self.save_checkpoint(data)
        bar.close()
        self.model.eval()
        self._data = data
        return self.history


class PairEncoder(torch.nn.Module):
    """Both passes in ONE forward, so DDP sees each parameter's gradient ready exactly once."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, mask, ids2=None, mask2=None):
        a = self.model(ids, mask)
        return (a, self.model(ids2, mask2)) if ids2 is not None else (a,)
