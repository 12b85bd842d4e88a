"""Native ORT MoE / QMoE vs the e5 teacher's own MoE layers on real hidden states (12 texts, 3 languages):
relative max-abs and SQNR per MoE layer.  .venv/bin/python bench/ort_moe_real_layers.py
"""
import numpy as np, torch
from moe2edge.targets import ort_moe
from moe2edge.teacher.checkpoint import load_pretrained
from moe2edge.targets.runtime import Tokenizer
torch.set_num_threads(1)
ck="/work/shared-runs/e5-moe/final"
m=load_pretrained(ck).eval()
tok=Tokenizer(ck+"/tokenizer.json", max_length=128, pad_id=m.config.pad_token_id)
texts=["The quick brown fox jumps over the lazy dog.","Ein Werkzeug zum Komprimieren von Dateien im gzip-Format.","library for parsing JSON documents in C, with a small API and no dependencies"]*4
ids,mask,_=tok(texts)
moes=[b.mlp for b in m.encoder.layers if hasattr(b.mlp,"router")]
seen=[]
hs=[mo.register_forward_hook(lambda mod,a,o: seen.append((mod,a[0].detach(),o[0].detach()))) for mo in moes]
with torch.no_grad(): m.embed(torch.as_tensor(ids),torch.as_tensor(mask))
real=torch.as_tensor(mask).reshape(-1).bool()
for mod,x,y in seen:
    H=x.shape[-1]; x=x.reshape(-1,H)[real]; y=y.reshape(-1,H)[real]
    t=ort_moe.layer_tensors(mod)
    for q in (False,True):
        g=torch.as_tensor(ort_moe.run_layer(ort_moe.layer_graph(t,quantized=q),x.numpy()))
        print("int8" if q else "fp32", "rel max-abs %.2e"%float((g-y).abs().max()/y.abs().max()), "SQNR %.1f dB"%float(20*torch.log10(y.norm()/(g-y).norm())))
