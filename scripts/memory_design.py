"""Memory design sweep (centralised, one process): train the memory's rule + gate of SmolLM2-135M by layer-wise
attention transfer on random 512-token windows of training books, then score held-out books (``--nseq``
documents of ``--elen`` tokens) by position bin with the memory on, zeroed, and off (window + sinks alone).
``--baseline`` scores full attention instead. Prints one JSON line (and writes it to ``--out``).

Run from the repository root with the shared data beside it, e.g.::

    .venv/bin/python scripts/memory_design.py --design '{"write":"evicted","mix":"convex","gate_source":"query",
        "scale":1.0,"decay":true}' --steps 40 --nseq 6
    .venv/bin/python scripts/memory_design.py --baseline --nseq 6

This is the exploration that chose the ``memory-cpu`` design (docs/RESULTS.md); the federated experiment itself is
``fednl reproduce memory``.
"""
import argparse, json, time, sys
import torch, torch.nn.functional as F
from fednl.models import build_model, ModelConfig, MemoryConfig, LoraConfig, load_backbone
from fednl.models.groups import param_groups
from fednl.models.titans import attention_transfer, transfer_loss, set_memory_zero, set_gate_override

SH = "../shared/data/gutenberg-nltk/"
p = argparse.ArgumentParser()
p.add_argument("--design", default="{}")
p.add_argument("--steps", type=int, default=60)
p.add_argument("--seq", type=int, default=512)
p.add_argument("--lr", type=float, default=1e-2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--objective", default="at")
p.add_argument("--train", default="austen-emma,chesterton-ball,melville-moby_dick")
p.add_argument("--eval", default="austen-persuasion,chesterton-brown")
p.add_argument("--nseq", type=int, default=8)
p.add_argument("--elen", type=int, default=1024)
p.add_argument("--baseline", action="store_true")
p.add_argument("--out")
p.add_argument("--data", default=SH, help="folder of the Gutenberg .txt books")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
_, tok = load_backbone(ModelConfig(source="smollm2"))
def ids_of(names):
    return [torch.tensor(tok.encode(open(a.data.rstrip("/") + "/" + n + ".txt", encoding="latin-1").read()[5000:400000]), dtype=torch.long) for n in names.split(",")]
design = json.loads(a.design)
mcfg = MemoryConfig(attn_window=64, **design) if not a.baseline else MemoryConfig(attn_window=None)
model = build_model("titans", ModelConfig(source="smollm2"), mcfg, LoraConfig(), seed=a.seed)
g = param_groups(model)
train_names = g["rule"] | g["gate"]
for n, p_ in model.named_parameters():
    p_.requires_grad_(n in train_names)
params = [p_ for n, p_ in model.named_parameters() if n in train_names]
nparam = sum(p_.numel() for p_ in params)
ev = ids_of(a.eval)
eseqs = []
for i in range(a.nseq):
    t = ev[i % len(ev)]
    off = (i // len(ev) + 1) * (len(t) // (a.nseq // len(ev) + 1))
    eseqs.append(t[off: off + a.elen])
E = torch.stack(eseqs)
bins = [(0, 64), (64, 128), (128, 256), (256, 512), (512, a.elen - 1)]
def evaluate():
    model.eval()
    ce = torch.zeros(a.elen - 1, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, E.shape[0], 2):
            x = E[i:i + 2]
            lp = F.log_softmax(model(x).logits.float(), -1)
            nll = -lp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
            ce += nll.double().sum(0)
    ce /= E.shape[0]
    return {f"{s}-{e}": round(float(ce[s:e].mean()), 4) for s, e in bins}
res = {"design": design, "seed": a.seed, "steps": a.steps, "lr": a.lr, "params": nparam, "objective": a.objective}
if a.baseline:
    set_gate_override(model, 0.0)
    res["full_attention"] = evaluate()
    print(json.dumps(res)); sys.exit()
tr = ids_of(a.train)
gen = torch.Generator().manual_seed(a.seed)
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
t0 = time.time(); losses = []
model.train()
for step in range(a.steps):
    b = int(torch.randint(len(tr), (1,), generator=gen))
    o = int(torch.randint(len(tr[b]) - a.seq - 1, (1,), generator=gen))
    x = tr[b][o:o + a.seq + 1][None]
    opt.zero_grad()
    if a.objective == "at":
        with attention_transfer(model) as layers:
            model(x[:, :-1]); loss = transfer_loss(layers)
    else:
        lp = F.log_softmax(model(x[:, :-1]).logits.float(), -1)
        loss = -lp.gather(-1, x[:, 1:, None]).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); losses.append(loss.item())
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.4f} {time.time()-t0:.0f}s", file=sys.stderr, flush=True)
res["train_s"] = round(time.time() - t0, 1); res["loss_first_last"] = [losses[0], sum(losses[-5:]) / 5]
res["tok_per_s"] = round(a.steps * a.seq / (time.time() - t0), 1)
t1 = time.time()
res["memory_on"] = evaluate()
set_memory_zero(model, True); res["memory_zero"] = evaluate(); set_memory_zero(model, False)
set_gate_override(model, 0.0); res["sinks_only"] = evaluate(); set_gate_override(model, None)
res["eval_s"] = round(time.time() - t1, 1)
print(json.dumps(res))
if a.out:
    json.dump(res, open(a.out, "w"))
