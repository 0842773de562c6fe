"""Train the project's two reference MoE language models (zoo/tiny-mixtral, zoo/tiny-qwenmoe).

Three stages, so the GPU machine (no network, no corpus packages) only trains:

  1. prepare (CPU):  corpus splits -> byte-level BPE tokenizer (train split only) -> token ids in out/refdata/
        python benchmarks/train_reference.py prepare
     also writes moequant/data/calib_en.txt (train split), moequant/data/eval_en.txt (test split)
     and zoo/splits.json (the split, with a sha256 per document).
  2. train (GPU):  `all` runs several `train` processes side by side on one GPU (tiny models leave it
     mostly idle) and keeps per model the best on validation; out/refdata must travel with the command.
        python benchmarks/train_reference.py all --out RUN
        python benchmarks/train_reference.py train --model mixtral --out DIR [--steps N]   # one run
  3. package (CPU): RUN -> zoo/<name>/ with tokenizer files and TRAINING.md
        python benchmarks/train_reference.py package --run RUN

Routing during training: the models' own routers choose the experts; the experts run through a
dense registered experts implementation (every expert on every token, times a routing weight that is
zero off the top-k): the same function as the sparse one, with no host syncs, at E/k times the
expert FLOPs, affordable at this size. (`--experts grouped` is a sparse grouped-GEMM path, checked
against the dense one at start; the shipped models were trained with the dense one.) Load balancing:
the Switch-Transformer loss (transformers' `load_balancing_loss_func`) per MoE layer, averaged over
layers, times `router_aux_loss_coef` (transformers' built-in sums the counts over layers first,
which lets one layer's imbalance hide behind another's).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"
VOCAB_SIZE = 8192
SEQ_LEN = 512
SEED = 0

# Sizes: each fits in 16 MB as bf16 safetensors; every linear input dim is a multiple of 128.
# The fine-grained model uses hidden 128: 32 experts x 3 x 256 x 128 is 3.1M parameters a layer, so
# hidden 256 would leave room for a single MoE layer under 16 MB.
MODELS = {
    "mixtral": dict(
        name="tiny-mixtral", arch="MixtralForCausalLM", model_type="mixtral",
        config=dict(hidden_size=256, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
                    router_aux_loss_coef=0.01, rms_norm_eps=1e-5),
        lr=2e-3,
    ),
    "qwenmoe": dict(
        name="tiny-qwenmoe", arch="Qwen2MoeForCausalLM", model_type="qwen2_moe",
        config=dict(hidden_size=128, intermediate_size=512, moe_intermediate_size=128,
                    shared_expert_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, num_experts=32, num_experts_per_tok=4,
                    norm_topk_prob=False, qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[],
                    router_aux_loss_coef=0.01, rms_norm_eps=1e-6),
        lr=3e-3,
    ),
}


# ----------------------------------------------------------------------------------------------- prepare
def train_tokenizer(texts, vocab_size: int, out_dir: str):
    """Byte-level BPE on `texts`; saves tokenizer.json + tokenizer_config.json (AutoTokenizer-loadable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
                   "unk_token": EOS, "pad_token": EOS, "model_max_length": SEQ_LEN,
                   "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False},
                  f, indent=1)
    return tok


def prepare(args):
    from moequant.data import corpus

    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.zoo, exist_ok=True)
    splits = {s: corpus.load_split(s) for s in corpus.SPLITS}
    t0 = time.time()
    tok = train_tokenizer((d.text for d in splits["train"]), VOCAB_SIZE, args.work)
    print(f"tokenizer: {tok.get_vocab_size()} tokens in {time.time() - t0:.1f}s")
    eos_id = tok.token_to_id(EOS)
    stats = {}
    for s, docs in splits.items():
        ids = []
        for enc in tok.encode_batch([d.text for d in docs]):
            ids.extend(enc.ids)
            ids.append(eos_id)                                  # documents separated by EOS
        arr = np.asarray(ids, dtype=np.uint16)
        np.save(os.path.join(args.work, f"{s}.npy"), arr)
        chars = sum(len(d.text) for d in docs)
        stats[s] = {"docs": len(docs), "chars": chars, "tokens": int(arr.size)}
        print(f"{s:<10} {len(docs):4d} docs {chars:>11,d} chars {arr.size:>10,d} tokens "
              f"({chars / arr.size:.2f} chars/token)")
    slices = corpus.write_text_slices()
    for name, info in slices.items():
        path = os.path.join(corpus.DATA_DIR, name)
        n_tok = len(tok.encode(open(path, encoding="utf-8").read()).ids)
        info.update(bytes=os.path.getsize(path), tokens=n_tok)
        print(f"{name}: {info['bytes']:,d} bytes, {n_tok:,d} tokens, {len(info['docs'])} docs of the {info['split']} split")
    shutil.copy(corpus.EVAL_FILE, os.path.join(args.work, "eval_en.txt"))   # the work folder is all `train` reads
    m = corpus.manifest()
    m["tokens"] = stats
    m["text_slices"] = slices
    with open(os.path.join(args.zoo, "splits.json"), "w") as f:
        json.dump(m, f, indent=1)
    with open(os.path.join(args.work, "data_stats.json"), "w") as f:
        json.dump(m, f, indent=1)


# ----------------------------------------------------------------------------------------------- model
def make_config(kind: str, eos_id: int, tiny: bool = False):
    from transformers import AutoConfig

    spec = MODELS[kind]
    sizes = dict(spec["config"])
    if tiny:
        sizes.update({k: v for k, v in dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=128,
                                            num_hidden_layers=2, shared_expert_intermediate_size=128,
                                            head_dim=32).items() if k in sizes})
    cfg = AutoConfig.for_model(
        spec["model_type"], vocab_size=VOCAB_SIZE, max_position_embeddings=SEQ_LEN, tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_cache=True,
        output_router_logits=False, **sizes)
    cfg.architectures = [spec["arch"]]
    return cfg


def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """All experts on all tokens, weighted by the routing weights scattered to [T, E] (zero off the top-k).
    Same function as the sparse experts forward; for training only (E/k times the expert FLOPs)."""
    w = torch.zeros(hidden_states.shape[0], self.num_experts, device=hidden_states.device,
                    dtype=torch.float32).scatter(1, top_k_index, top_k_weights.float())
    gu = torch.matmul(hidden_states.unsqueeze(0), self.gate_up_proj.transpose(1, 2))    # [E, T, 2I]
    h = self._apply_gate(gu)                                                           # [E, T, I]
    y = torch.matmul(h, self.down_proj.transpose(1, 2))                                # [E, T, H]
    out = torch.einsum("eth,te->th", y.float(), w)
    return out.to(hidden_states.dtype)


def grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Sparse experts through torch's grouped GEMM on bf16 copies of the (fp32 master) weights, no host syncs."""
    t, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.histc(flat.int() if flat.is_cuda else flat.float(), bins=self.num_experts, min=0,
                         max=self.num_experts - 1)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = hidden_states[order // k].to(torch.bfloat16)
    gu = torch.nn.functional.grouped_mm(x, self.gate_up_proj.to(torch.bfloat16).transpose(1, 2), offs=offs)
    h = self._apply_gate(gu)
    y = torch.nn.functional.grouped_mm(h, self.down_proj.to(torch.bfloat16).transpose(1, 2), offs=offs)
    y = y.float() * top_k_weights.reshape(-1)[order].float().unsqueeze(-1)
    out = torch.empty_like(y).index_copy_(0, order, y).view(t, k, -1).sum(1)     # back to token order
    return out.to(hidden_states.dtype)


def register_train_experts():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    ALL_EXPERTS_FUNCTIONS.register("moequant_dense_train", dense_experts_forward)
    ALL_EXPERTS_FUNCTIONS.register("moequant_grouped_train", grouped_experts_forward)


def pick_train_experts(experts_module, device) -> str:
    """The grouped (sparse) training path if it runs here and matches the dense one (forward and gradients,
    bf16 tolerance), else the dense path."""
    torch.manual_seed(1234)
    e = copy.deepcopy(experts_module).to(device)
    h = e.gate_up_proj.shape[-1]
    x = torch.randn(256, h, device=device)
    logits = torch.randn(256, e.num_experts, device=device)
    w, idx = torch.topk(logits.softmax(-1), 2 if e.num_experts <= 8 else 4, dim=-1)
    outs = []
    try:
        for fn in (dense_experts_forward, grouped_experts_forward):
            e.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                y = fn(e, x, idx, w)
            (y.float() * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
            outs.append((y.float(), e.gate_up_proj.grad.clone(), e.down_proj.grad.clone()))
    except Exception as exc:                                  # no grouped GEMM (or its backward) here
        print(f"grouped experts path unavailable ({type(exc).__name__}: {exc}); training with the dense path")
        return "moequant_dense_train"
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(outs[1], outs[0])]
    ok = all(err < 2e-2 for err in errs)
    print(f"grouped vs dense experts: rel err out/dgate_up/ddown {['%.1e' % v for v in errs]} -> "
          f"{'grouped' if ok else 'dense'}")
    return "moequant_grouped_train" if ok else "moequant_dense_train"


def routers(model):
    """The router modules in layer order (their forward returns (logits, scores, indices))."""
    return [m for n, m in model.named_modules() if type(m).__name__.endswith("TopKRouter")]


def balance_loss(router_logits, num_experts: int, top_k: int):
    """Switch-Transformer load-balancing loss per layer, averaged over layers."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    return sum(load_balancing_loss_func((lg,), num_experts, top_k) for lg in router_logits) / len(router_logits)


# ----------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = SEQ_LEN, batch: int = 32, max_tokens: int | None = None):
    """exp(mean NLL) over non-overlapping windows of seq_len tokens (each scored on its own)."""
    n = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    n_win = n // seq_len
    if n_win == 0:
        raise ValueError(f"need at least {seq_len} tokens, got {n}")
    windows = ids[: n_win * seq_len].view(n_win, seq_len)
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, n_win, batch):
        x = windows[i:i + batch].to(dev).long()
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def tokens_per_expert(model, ids: torch.Tensor, num_experts: int, seq_len: int = SEQ_LEN, batch: int = 32):
    """Top-k selections per expert per MoE layer over ids -> int64 [layers, experts]."""
    rs = routers(model)
    counts = torch.zeros(len(rs), num_experts, dtype=torch.long)

    def hook(li):
        def count(mod, inp, out):      # out = (logits, scores, indices); returns None: output unchanged
            counts[li] += torch.bincount(out[2].reshape(-1).cpu(), minlength=num_experts)
        return count

    hooks = [r.register_forward_hook(hook(li)) for li, r in enumerate(rs)]
    try:
        n_win = ids.numel() // seq_len
        windows = ids[: n_win * seq_len].view(n_win, seq_len)
        dev = next(model.parameters()).device
        for i in range(0, n_win, batch):
            model(input_ids=windows[i:i + batch].to(dev).long())
    finally:
        for h in hooks:
            h.remove()
    return counts


def balance_stats(counts: torch.Tensor) -> dict:
    """Per-layer usage shares and the paper's sigma (MoEQuant Eqs. 3-4: std of shares, 1/(E-1), mean over layers)."""
    share = counts.double() / counts.sum(1, keepdim=True)
    e = counts.shape[1]
    sigma_l = share.std(1, unbiased=True)
    return {
        "sigma_per_layer": [round(v, 5) for v in sigma_l.tolist()],
        "sigma": round(sigma_l.mean().item(), 5),
        "max_share_x_uniform": [round(v * e, 3) for v in share.max(1).values.tolist()],
        "min_share_x_uniform": [round(v * e, 3) for v in share.min(1).values.tolist()],
        "cv_per_layer": [round(v, 4) for v in (share.std(1, unbiased=False) * e).tolist()],
    }


# ----------------------------------------------------------------------------------------------- train
def train(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = torch.device(args.device if args.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = MODELS[args.model]
    tok = AutoTokenizer.from_pretrained(args.work)
    eos_id = tok.convert_tokens_to_ids(EOS)
    # --tiny: CPU smoke test of this same code at toy sizes
    cfg = make_config(args.model, eos_id, tiny=args.tiny)
    if args.aux_coef is not None:
        cfg.router_aux_loss_coef = args.aux_coef
    model = AutoModelForCausalLM.from_config(cfg).to(dev)
    register_train_experts()
    experts_impl = "moequant_dense_train"
    if args.experts == "grouped":
        experts_impl = pick_train_experts(next(m for m in model.modules() if type(m).__name__.endswith("Experts")), dev)
    model.set_experts_implementation(experts_impl)
    n_params = sum(p.numel() for p in model.parameters())
    num_experts = cfg.num_local_experts if args.model == "mixtral" else cfg.num_experts
    top_k = cfg.num_experts_per_tok
    print(f"[{args.model}] {spec['arch']} params {n_params:,d} ({n_params * 2 / 1e6:.2f} MB bf16) device {dev}", flush=True)

    train_ids = torch.from_numpy(np.load(os.path.join(args.work, "train.npy")).astype(np.int64))
    val_ids = torch.from_numpy(np.load(os.path.join(args.work, "validation.npy")).astype(np.int64))
    test_ids = torch.from_numpy(np.load(os.path.join(args.work, "test.npy")).astype(np.int64))
    eval_text = open(os.path.join(args.work, "eval_en.txt"), encoding="utf-8").read()
    eval_ids = torch.tensor(tok(eval_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if args.eval_tokens:
        val_ids = val_ids[: args.eval_tokens]
    train_gpu = train_ids.to(dev)

    tokens_per_step = args.batch * args.seq
    max_steps = args.steps or int(args.max_epochs * train_ids.numel() / tokens_per_step)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n or n.endswith("bias") else decay).append(p)
    lr = args.lr or spec["lr"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=(dev.type == "cuda"))
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=(dev.type == "cuda"))

    def lr_at(step, progress):
        # linear warmup over steps, then cosine to 10% over progress in [0, 1]
        return lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def evaluate():
        model.eval()
        with torch.autocast(**amp):
            v = perplexity(model, val_ids, args.seq, args.eval_batch)
        model.train()
        return v

    # Progress is the larger of steps/max_steps and seconds/time_limit, so the schedule always decays
    # fully inside the time budget; the step count reached is recorded (--steps N reproduces it).
    log, best = [], (float("inf"), None, -1)
    t_start = time.time()
    model.train()
    step, progress = 0, 0.0
    while progress < 1.0:
        starts = torch.randint(0, train_ids.numel() - args.seq - 1, (args.batch,), generator=gen).to(dev)
        chunk = train_gpu[starts[:, None] + torch.arange(args.seq + 1, device=dev)[None]]
        x, y = chunk[:, :-1], chunk[:, 1:]
        cur_lr = lr_at(step, progress)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        with torch.autocast(**amp):
            out = model(input_ids=x, output_router_logits=True)
            ce = torch.nn.functional.cross_entropy(out.logits.float().view(-1, cfg.vocab_size), y.reshape(-1))
            aux = balance_loss(out.router_logits, num_experts, top_k)
            loss = ce + cfg.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        progress = step / max_steps
        if args.time_limit and not args.steps:
            progress = max(progress, (time.time() - t_start) / args.time_limit)
        if step % args.log_every == 0 or progress >= 1.0:
            rec = {"step": step, "ce": round(ce.item(), 4), "aux": round(aux.item(), 4), "gnorm": round(gnorm.item(), 3),
                   "lr": float(f"{cur_lr:.4g}"), "t": round(time.time() - t_start, 1)}
            if step % args.eval_every == 0 or progress >= 1.0:
                rec["val_ppl"] = round(evaluate(), 3)
                if rec["val_ppl"] < best[0]:
                    best = (rec["val_ppl"], {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, step)
            log.append(rec)
            print(f"[{args.model}] " + " ".join(f"{k}={v}" for k, v in rec.items()), flush=True)
    train_s = time.time() - t_start

    model.load_state_dict(best[1])
    model.eval()
    # What ships is bf16: measure that (weights rounded to bf16, arithmetic in fp32).
    model = model.to(torch.bfloat16).float()
    model.set_experts_implementation("eager")        # transformers' own sparse loop, any dtype
    if args.eval_tokens:
        test_ids, eval_ids = test_ids[: args.eval_tokens], eval_ids[: args.eval_tokens]
    val_ppl = perplexity(model, val_ids, args.seq, args.eval_batch)
    test_ppl = perplexity(model, test_ids, args.seq, args.eval_batch)
    eval_ppl = perplexity(model, eval_ids, args.seq, args.eval_batch)
    eval_ppl_head = perplexity(model, eval_ids, args.seq, args.eval_batch, max_tokens=2 * args.seq)
    counts = tokens_per_expert(model, val_ids, num_experts, args.seq, args.eval_batch)

    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False
    model.config.dtype = "bfloat16"
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    metrics = {
        "model": spec["name"], "architecture": spec["arch"], "params": n_params, "seed": args.seed,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "steps": step, "best_step": best[2], "batch": args.batch, "seq_len": args.seq,
        "tokens_seen": step * tokens_per_step, "epochs": round(step * tokens_per_step / train_ids.numel(), 2),
        "lr": lr, "warmup": args.warmup, "weight_decay": args.weight_decay, "clip": args.clip,
        "router_aux_loss_coef": cfg.router_aux_loss_coef, "train_seconds": round(train_s, 1),
        "train_experts_impl": experts_impl,
        "train_tokens": int(train_ids.numel()), "val_tokens": int(val_ids.numel()), "test_tokens": int(test_ids.numel()),
        "val_ppl": round(val_ppl, 3), "test_ppl": round(test_ppl, 3),
        "eval_en_ppl": round(eval_ppl, 3), "eval_en_tokens": int(eval_ids.numel()),
        "eval_en_ppl_first_1024": round(eval_ppl_head, 4),
        "tokens_per_expert_val": counts.tolist(), "balance_val": balance_stats(counts),
        "bound": "time" if (args.time_limit and not args.steps and step < max_steps) else "steps",
        "command": " ".join(["python"] + [a.replace(ROOT + os.sep, "") for a in sys.argv]),
        "reproduce": f"python benchmarks/train_reference.py train --model {args.model} --out DIR --seed {args.seed} "
                     f"--batch {args.batch} --lr {lr} --aux-coef {cfg.router_aux_loss_coef} --steps {step}",
        "log": log,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"[{args.model}] done: val_ppl {val_ppl:.2f} test_ppl {test_ppl:.2f} eval_en_ppl {eval_ppl:.2f} "
          f"best_step {best[2]}/{step} train {train_s:.0f}s sigma {metrics['balance_val']['sigma']}", flush=True)
    print(f"[{args.model}] tokens per expert (val):\n{counts}", flush=True)


# ----------------------------------------------------------------------------------------------- package
def training_md(m: dict, cfg: dict, siblings: dict | None = None) -> str:
    counts = m["tokens_per_expert_val"]
    e = len(counts[0])
    bal = m["balance_val"]
    lines = [
        f"# {m['model']}: training record", "",
        f"`{m['architecture']}`, {m['params']:,d} parameters, stored as bf16 safetensors. Trained from scratch by "
        f"`benchmarks/train_reference.py` on the project's English corpus (State of the Union addresses + "
        f"Shakespeare, split by document: see ../README.md).", "",
        "| | |", "|---|---|",
        f"| seed | {m['seed']} (torch, numpy and the batch sampler) |",
        f"| command | `{m['command']}` |",
        f"| device | {m['device']}, torch {m['torch']} |",
        f"| steps | {m['steps']} x {m['batch']} x {m['seq_len']} tokens ({m['epochs']} epochs of {m['train_tokens']:,d} train tokens); kept the step with the best validation perplexity: {m['best_step']} |",
        f"| optimizer | AdamW lr {m['lr']} (warmup {m['warmup']}, cosine to 10%), betas (0.9, 0.95), weight decay {m['weight_decay']}, clip {m['clip']}; bf16 autocast, fp32 master weights |",
        f"| load balancing | Switch loss per MoE layer, mean over layers, coefficient {m['router_aux_loss_coef']} |",
        f"| training time | {m['train_seconds']} s |",
        f"| **validation perplexity** | **{m['val_ppl']}** ({m['val_tokens']:,d} tokens, windows of {m['seq_len']}) |",
        f"| test perplexity | {m['test_ppl']} ({m['test_tokens']:,d} tokens) |",
        f"| `moequant/data/eval_en.txt` perplexity | {m['eval_en_ppl']} ({m['eval_en_tokens']:,d} tokens); first 1024 tokens: {m['eval_en_ppl_first_1024']} |",
        "", "Perplexities are of the shipped bf16 weights (computed in fp32), over non-overlapping windows of "
        f"{m['seq_len']} tokens, each window scored on its own.", "",
        f"Reproduce this run's schedule: `{m['reproduce']}` (the run itself was time-limited: its cosine "
        "schedule followed the larger of steps and seconds, so this replays it closely, not bit for bit).", "",
    ]
    if siblings:
        lines += ["## Selection", "",
                  "Trained side by side on one GPU with the runs below (one process each, sharing the GPU, so "
                  "each got fewer steps than it would alone); kept the best on validation perplexity.", "",
                  "| run | max epochs | steps | epochs | val PPL |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {r['command'].split('--max-epochs ')[1].split()[0] if '--max-epochs' in r['command'] else '-'} "
                  f"| {r['steps']} | {r['epochs']} | {r['val_ppl']} |" for n, r in sorted(siblings.items())]
        lines += [""]
    lines += [
        "## Config", "", "```json", json.dumps(cfg, indent=1), "```", "",
        "## Tokens per expert (validation split, top-k selections)", "",
        f"Balance: sigma (MoEQuant Eqs. 3-4, std of usage shares over experts, mean over layers) = {bal['sigma']}; "
        f"per layer {bal['sigma_per_layer']}. Busiest expert per layer, as a multiple of uniform: "
        f"{bal['max_share_x_uniform']}; idlest: {bal['min_share_x_uniform']}.", "",
    ]
    if e <= 8:
        lines += ["| layer | " + " | ".join(f"e{j}" for j in range(e)) + " |",
                  "|---|" + "---|" * e]
        lines += [f"| {li} | " + " | ".join(str(c) for c in row) + " |" for li, row in enumerate(counts)]
    else:
        lines += ["| layer | expert: tokens (sorted by id) |", "|---|---|"]
        lines += [f"| {li} | " + ", ".join(f"{j}:{c}" for j, c in enumerate(row)) + " |" for li, row in enumerate(counts)]
        lines += ["", "Sorted, busiest first:", ""]
        lines += [f"- layer {li}: " + ", ".join(str(c) for c in sorted(row, reverse=True)) for li, row in enumerate(counts)]
    lines += ["", "## Training log", "", "| step | train CE | aux | val PPL |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['ce']} | {r['aux']} | {r['val_ppl']} |" for r in m["log"] if "val_ppl" in r]
    return "\n".join(lines) + "\n"


def package(args):
    for kind, spec in MODELS.items():
        src = os.path.join(args.run, spec["name"])
        if not os.path.isdir(src):
            print(f"skip {spec['name']}: {src} missing")
            continue
        if os.path.isfile(os.path.join(src, "meta.tar")) and not os.path.isfile(os.path.join(src, "metrics.json")):
            import tarfile
            with tarfile.open(os.path.join(src, "meta.tar")) as tar:      # as `all` packs it
                tar.extractall(src, filter="data")
        dst = os.path.join(args.zoo, spec["name"])
        os.makedirs(dst, exist_ok=True)
        for f in ("config.json", "model.safetensors", "generation_config.json", "metrics.json"):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(args.work, f), os.path.join(dst, f))
        m = json.load(open(os.path.join(src, "metrics.json")))
        cfg = json.load(open(os.path.join(src, "config.json")))
        runs_dir = os.path.join(src, "runs")
        siblings = {f[:-5]: json.load(open(os.path.join(runs_dir, f)))
                    for f in sorted(os.listdir(runs_dir)) if f.endswith(".json")} if os.path.isdir(runs_dir) else None
        with open(os.path.join(dst, "TRAINING.md"), "w") as f:
            f.write(training_md(m, cfg, siblings))
        size = os.path.getsize(os.path.join(dst, "model.safetensors"))
        print(f"{dst}: model.safetensors {size / 1e6:.2f} MB, val ppl {m['val_ppl']}")


def collapsed(counts) -> bool:
    """Routing collapse, decided before looking at any run: in some layer an expert gets under a tenth of
    its uniform share, or over four times it."""
    c = torch.tensor(counts, dtype=torch.float64)
    share = c / c.sum(1, keepdim=True) * c.shape[1]
    return bool((share.min() < 0.1) or (share.max() > 4.0))


def usage(args):
    """Expert usage of the zoo models on the first --tokens tokens of each text file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("| model | text | tokens | sigma | busiest x uniform | idlest x uniform |\n|---|---|---|---|---|---|")
    for spec in MODELS.values():
        path = os.path.join(args.zoo, spec["name"])
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        num_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
        for text in args.texts:
            with open(text, encoding="utf-8") as f:
                ids = torch.tensor(tok(f.read(), add_special_tokens=False)["input_ids"][: args.tokens])
            b = balance_stats(tokens_per_expert(model, ids, num_experts, SEQ_LEN, 8))
            shown = os.path.relpath(text, ROOT)
            print(f"| {spec['name']} | {shown if not shown.startswith('..') else os.path.basename(text)} | {ids.numel() // SEQ_LEN * SEQ_LEN} | {b['sigma']:.4f} "
                  f"| {max(b['max_share_x_uniform']):.2f} | {min(b['min_share_x_uniform']):.2f} |")


def run_all(args, extra: list[str]):
    """Run the --jobs (model:max_epochs:aux_coef) side by side, one process each (the models are small: one
    process leaves the GPU mostly idle); keep per model the best run (no routing collapse, then lowest
    validation perplexity) and put it in OUT/<name>/ as model.safetensors + meta.tar (config, generation
    config, metrics, every run's metrics and log)."""
    import subprocess
    import tarfile

    os.makedirs(args.runs, exist_ok=True)
    jobs = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "2")      # several processes share the host's cores
    for job in args.jobs.split(","):
        kind, ep, coef = job.split(":")
        name = f"{kind}-e{ep}-c{coef}"
        cmd = [sys.executable, os.path.abspath(__file__), "train", "--work", args.work, "--model", kind,
               "--out", os.path.join(args.runs, name), "--max-epochs", ep, "--aux-coef", coef,
               "--time-limit", str(args.time_limit)] + extra
        log = open(os.path.join(args.runs, name + ".log"), "w")
        jobs.append((kind, name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        print("started:", " ".join(cmd[1:]), flush=True)
    deadline = time.time() + args.time_limit + args.grace
    for kind, name, proc, log in jobs:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:     # a run past its budget: stop it, keep the others
            proc.kill()
            rc = f"killed after {args.time_limit + args.grace:.0f}s"
        log.close()
        tail = open(log.name).read().splitlines()
        print(f"--- {name}: exit {rc}\n" + "\n".join(tail[-(6 if rc == 0 else 40):]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for kind, spec in MODELS.items():
        runs = []
        for k, name, _, _ in jobs:
            mpath = os.path.join(args.runs, name, "metrics.json")
            if k == kind and os.path.isfile(mpath):
                m = json.load(open(mpath))
                runs.append((collapsed(m["tokens_per_expert_val"]), m["val_ppl"], name))
        if not runs:
            print(f"no finished run for {kind}")
            continue
        _, _, best = min(runs)       # a run whose routing collapsed loses to any that did not, then val PPL
        summary[spec["name"]] = {"chosen": best, "val_ppl": {n: v for _, v, n in runs},
                                 "collapsed": {n: c for c, _, n in runs}}
        dst = os.path.join(args.out, spec["name"])
        os.makedirs(dst, exist_ok=True)
        src = os.path.join(args.runs, best)
        shutil.copy(os.path.join(src, "model.safetensors"), os.path.join(dst, "model.safetensors"))
        with tarfile.open(os.path.join(dst, "meta.tar"), "w") as tar:
            for f in ("config.json", "generation_config.json", "metrics.json"):
                tar.add(os.path.join(src, f), arcname=f)
            for _, _, name in runs:
                tar.add(os.path.join(args.runs, name, "metrics.json"), arcname=f"runs/{name}.json")
            for k, name, _, log in jobs:
                if k == kind:
                    tar.add(log.name, arcname=f"runs/{name}.log")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", default=os.path.join(ROOT, "out", "refdata"))
    p.add_argument("--zoo", default=os.path.join(ROOT, "zoo"))
    t = sub.add_parser("train")
    t.add_argument("--work", default=os.path.join(ROOT, "out", "refdata"))
    t.add_argument("--model", choices=sorted(MODELS), required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=SEED)
    t.add_argument("--steps", type=int, default=0, help="fixed step count (0: from --max-epochs and --time-limit)")
    t.add_argument("--max-epochs", type=float, default=12.0)
    t.add_argument("--aux-coef", type=float, default=None, help="load-balancing coefficient (default: the model's)")
    t.add_argument("--time-limit", type=float, default=0.0, help="seconds of training; 0: no limit")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq", type=int, default=SEQ_LEN)
    t.add_argument("--lr", type=float, default=0.0)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--eval-batch", type=int, default=32)
    t.add_argument("--eval-tokens", type=int, default=0, help="evaluate on the first N tokens only (smoke tests)")
    t.add_argument("--device", default="")
    t.add_argument("--experts", default="dense", choices=["dense", "grouped"],
                   help="training experts path: dense (every expert on every token, zero weight off the top-k; "
                        "the shipped models) or grouped (sparse grouped GEMM; checked against dense at start, "
                        "falls back to dense if it differs or fails; checked on CPU only so far)")
    t.add_argument("--tiny", action="store_true", help="toy sizes for a CPU smoke test")
    a = sub.add_parser("all", help="train several runs in parallel, keep the best per model; "
                                   "unknown options pass through to `train`")
    a.add_argument("--work", default=os.path.join(ROOT, "out", "refdata"))
    a.add_argument("--runs", default="/tmp/refruns")
    a.add_argument("--out", required=True)
    a.add_argument("--jobs", default="mixtral:4:0.01,mixtral:8:0.01,mixtral:16:0.01,"
                                     "qwenmoe:4:0.01,qwenmoe:8:0.01,qwenmoe:16:0.01",
                   help="comma-separated model:max_epochs:aux_coef (default: the call that trained the zoo)")
    a.add_argument("--time-limit", type=float, default=240.0, help="training seconds per run")
    a.add_argument("--grace", type=float, default=150.0, help="seconds past --time-limit before a run is killed")
    k = sub.add_parser("package")
    k.add_argument("--work", default=os.path.join(ROOT, "out", "refdata"))
    k.add_argument("--run", required=True, help="folder holding tiny-mixtral/ and tiny-qwenmoe/ from `train`")
    k.add_argument("--zoo", default=os.path.join(ROOT, "zoo"))
    u = sub.add_parser("usage", help="expert usage (sigma, busiest/idlest expert) of the zoo models on text files")
    u.add_argument("texts", nargs="+")
    u.add_argument("--tokens", type=int, default=4096)
    u.add_argument("--zoo", default=os.path.join(ROOT, "zoo"))
    args, extra = ap.parse_known_args()
    if extra and args.cmd != "all":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    sys.path.insert(0, ROOT)
    if args.cmd == "all":
        run_all(args, extra)
    else:
        {"prepare": prepare, "train": train, "package": package, "usage": usage}[args.cmd](args)


if __name__ == "__main__":
    main()
