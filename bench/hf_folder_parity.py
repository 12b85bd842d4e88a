"""A `moe2edge export hf` folder against the project's own model, on the frozen benchmark's real text.

    .venv/bin/python bench/hf_folder_parity.py --model runs/students/dense-6L-F224 --hf runs/hf/dense-6L-F224 [--n 1000]

Embeds the first N documents and N queries (all languages, with the model's document / query prompts
where it has them) with sentence-transformers (``SentenceTransformer(DIR)``, no custom code, offline),
with plain transformers (AutoModel + masked mean + L2) and with ``moe2edge.teacher.load_embedder``;
prints the max |difference| and the min cosine of each against ours.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the project's checkpoint folder")
    p.add_argument("--hf", required=True, help="its `moe2edge export hf` folder")
    p.add_argument("--data", default=str(ROOT / "benchmarks" / "debian-bookworm-v1"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    from moe2edge.data.readers import load_beir
    from moe2edge.teacher import load_embedder

    torch.set_num_threads(args.threads)
    ds = load_beir(args.data)
    # ST strips its inputs; the benchmark's texts have no outer whitespace to strip (checked here)
    docs = [t.strip() for t in ds.doc_texts()[: args.n]]
    queries = [t.strip() for t in list(ds.queries.values())[: args.n]]
    ours = load_embedder(args.model)
    st = SentenceTransformer(args.hf, device="cpu", local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(args.hf, local_files_only=True)
    hf = transformers.AutoModel.from_pretrained(args.hf, local_files_only=True).eval()

    def plain(texts, prefix):
        out = []
        for s in range(0, len(texts), 32):
            enc = tok([prefix + t for t in texts[s:s + 32]], padding=True, truncation=True,
                      max_length=ours.config.max_seq_length, return_tensors="pt")
            with torch.no_grad():
                h = hf(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
        return np.concatenate(out)

    for kind, texts, prompt in (("documents", docs, "search_document"), ("queries", queries, "search_query")):
        prompt = prompt if prompt in ours.config.prompts else None
        ref = ours.encode(texts, prompt=prompt)
        for name, got in (("sentence-transformers", st.encode(texts, prompt_name=prompt, batch_size=32)),
                          ("transformers", plain(texts, ours.prefix(prompt)))):
            print(f"{kind:9s} n={len(texts)} prompt={prompt} {name:21s} max |diff| {np.abs(got - ref).max():.2e} "
                  f"cos min {(got * ref).sum(1).min():.8f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
