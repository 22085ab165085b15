#!/usr/bin/env python3
"""Train the recipe's small Qwen3-MoE (about 22M parameters) on corpus.txt for a wall-clock budget.

Model: transformers' Qwen3MoeForCausalLM, 6 layers, hidden 256, 4 attention heads of 64 with 2 KV
heads (GQA), every layer a MoE of 32 experts (SwiGLU, moe_intermediate_size 128), 4 routed per token
with normalised top-k weights, no shared expert, untied input/output embeddings, vocabulary 4096.

Training: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then a cosine decay
over the *time* budget (the learning rate reaches its floor when --minutes run out, whatever the
speed of the machine), gradient clipping at 1.0, random 256-token windows of the corpus, bf16
autocast on CUDA and fp32 on the CPU, a load-balancing loss on each layer's router (weight 0.01). The held-out loss is
measured during training and the weights of the best held-out loss are the ones saved (a 10 MB
corpus is seen many times over in five minutes on a GPU: this keeps an over-fitted end out).

Writes to --out: config.json, generation_config.json, model*.safetensors (bf16 by default, in
shards of at most 15 MB so that they come back from the lent GPU machine), the tokenizer files,
train_log.json, and routing.json (held-out routing statistics of the saved weights: per layer how
many of a token's experts the next token reuses, expert popularity, and the hit rate of small LRU
expert caches, the quantity flashmoe's streaming cache lives on).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

SEP = "<|endoftext|>"


def log(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


def model_config(vocab_size: int, eos_id: int, seq_len: int, aux_coef: float):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,          # unused: every layer is a MoE layer
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        hidden_act="silu",
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        router_aux_loss_coef=0.001,     # transformers' own pooled loss: unused (train.py balances per layer)
        output_router_logits=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )


def tokenize_file(tok, path: Path, eos_id: int):
    import numpy as np

    text = path.read_text(encoding="utf-8")
    docs = [d.strip("\n") for d in text.split(f"\n{SEP}\n")]
    docs = [d for d in docs if d]
    encs = tok.encode_batch(docs)
    parts = []
    for e in encs:
        parts.append(np.asarray(e.ids, dtype=np.int32))
        parts.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(parts)


def count_params(model, cfg) -> dict:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
    return {"total": total, "routed_experts": experts, "active_per_token": active,
            "embeddings": model.model.embed_tokens.weight.numel(),
            "output": model.lm_head.weight.numel()}


def balance_loss(router_logits, k: int, n_experts: int):
    """Switch-Transformer load-balancing loss, per layer, summed over layers: for each layer
    E * sum_i f_i * P_i / k, with f_i the share of the layer's top-k picks that go to expert i and
    P_i its mean router probability (1.0 for a perfectly even layer). transformers' own aux_loss
    pools all layers' router logits before balancing, which lets single layers keep dead experts."""
    import torch

    total = 0.0
    for rl in router_logits:
        probs = torch.softmax(rl.float(), dim=-1)
        top = torch.topk(probs, k, dim=-1).indices
        f = torch.zeros_like(probs).scatter_(1, top, 1.0).mean(0)
        total = total + n_experts * (f * probs.mean(0)).sum() / k
    return total


def lm_and_aux_loss(model, x, amp):
    """Next-token cross-entropy of windows x [B, T+1] (inputs x[:, :-1], targets x[:, 1:]) and the
    per-layer load-balancing loss. (transformers' own `labels=` shifts the labels itself, so the
    targets are computed here instead of passed.)"""
    import torch

    cfg = model.config
    with amp():
        out = model(input_ids=x[:, :-1], use_cache=False, output_router_logits=True)
    logits = out.logits.float()
    lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    aux = balance_loss(out.router_logits, cfg.num_experts_per_tok, cfg.num_experts)
    return lm, aux


def evaluate(model, data, seq_len: int, device, amp, max_windows: int) -> float:
    import torch

    n = min(max_windows, (len(data) - 1) // seq_len)
    if n <= 0:
        return float("nan")
    model.eval()
    losses = []
    bs = 32
    with torch.no_grad():
        for i in range(0, n, bs):
            m = min(bs, n - i)
            idx = (torch.arange(i, i + m, device=device)[:, None] * seq_len
                   + torch.arange(seq_len + 1, device=device)[None, :])
            batch = data[idx].long()
            with amp():
                out = model(input_ids=batch[:, :-1], use_cache=False)
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     batch[:, 1:].reshape(-1), reduction="sum")
            losses.append(loss.item())
    model.train()
    return sum(losses) / (n * seq_len)


def routing_stats(model, data, seq_len: int, device, amp, n_windows: int, cfg) -> dict:
    """Per layer: next-token expert reuse, popularity, LRU expert-cache hit rates (held-out text)."""
    import numpy as np
    import torch

    k, E = cfg.num_experts_per_tok, cfg.num_experts
    n = min(n_windows, (len(data) - 1) // seq_len)
    model.eval()
    per_layer_sel: list[list[np.ndarray]] = [[] for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        for i in range(0, n, 16):
            m = min(16, n - i)
            idx = (torch.arange(i, i + m, device=device)[:, None] * seq_len
                   + torch.arange(seq_len, device=device)[None, :])
            batch = data[idx].long()
            with amp():
                out = model(input_ids=batch, use_cache=False, output_router_logits=True)
            for li, rl in enumerate(out.router_logits):
                probs = torch.softmax(rl.float(), dim=-1)
                top = torch.topk(probs, k, dim=-1).indices.reshape(m, seq_len, k)
                per_layer_sel[li].append(top.cpu().numpy())
    model.train()
    layers = []
    for li in range(cfg.num_hidden_layers):
        sel = np.concatenate(per_layer_sel[li], axis=0)  # [windows, T, k]
        onehot = np.zeros(sel.shape[:2] + (E,), dtype=bool)
        np.put_along_axis(onehot, sel, True, axis=-1)
        reuse = (onehot[:, 1:] & onehot[:, :-1]).sum(-1).mean() / k
        counts = onehot.sum((0, 1)).astype(np.float64)
        pop = counts / counts.sum()
        ent = float(-(pop[pop > 0] * np.log(pop[pop > 0])).sum() / math.log(E))
        hits = {}
        for slots in (4, 8, 16):
            h = tot = 0
            for w in range(sel.shape[0]):
                cache: list[int] = []  # most recent last
                for t in range(sel.shape[1]):
                    for e in sel[w, t]:
                        e = int(e)
                        tot += 1
                        if e in cache:
                            h += 1
                            cache.remove(e)
                        elif len(cache) >= slots:
                            cache.pop(0)
                        cache.append(e)
            hits[str(slots)] = h / tot
        layers.append({
            "layer": li,
            "next_token_reuse": float(reuse),
            "popularity": [round(float(p), 5) for p in pop],
            "popularity_max_over_uniform": float(pop.max() * E),
            "popularity_min_over_uniform": float(pop.min() * E),
            "experts_under_1pct": int((pop < 0.01).sum()),
            "normalized_entropy": ent,
            "lru_hit_rate": hits,
        })
    mean = lambda key: float(np.mean([L[key] for L in layers]))  # noqa: E731
    return {
        "tokens": int(n * seq_len),
        "experts": E, "experts_per_token": k,
        "uniform_random_baseline": {"next_token_reuse": k / E,
                                    "lru_hit_rate": {str(s): s / E for s in (4, 8, 16)}},
        "mean": {
            "next_token_reuse": mean("next_token_reuse"),
            "normalized_entropy": mean("normalized_entropy"),
            "lru_hit_rate": {s: float(np.mean([L["lru_hit_rate"][s] for L in layers])) for s in ("4", "8", "16")},
        },
        "layers": layers,
    }


def pick_experts_impl(model, cfg, data, seq_len, batch, device, amp, requested: str) -> str:
    """On CUDA, time a few training steps with each experts implementation and keep the fastest
    that runs; elsewhere keep transformers' choice unless one is asked for."""
    import torch

    if requested != "auto":
        model.set_experts_implementation(requested)
        return requested
    if device.type != "cuda":
        return getattr(model.config, "_experts_implementation", None) or "default"
    best, best_t = None, float("inf")
    state = copy.deepcopy(model.state_dict())
    for impl in ("grouped_mm", "batched_mm", "eager"):
        try:
            model.set_experts_implementation(impl)
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            idx = torch.randint(0, len(data) - seq_len - 1, (batch,), device=device)
            x = data[idx[:, None] + torch.arange(seq_len + 1, device=device)[None, :]].long()
            ts = []
            for _ in range(4):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                lm, aux = lm_and_aux_loss(model, x, amp)
                (lm + 0.01 * aux).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            t = min(ts[1:])
            log(f"experts implementation {impl}: {t * 1000:.1f} ms/step")
            if t < best_t:
                best, best_t = impl, t
        except Exception as e:  # noqa: BLE001 - any failure means: not this one
            log(f"experts implementation {impl} failed: {type(e).__name__}: {str(e)[:200]}")
    model.load_state_dict(state)
    if best is None:
        sys.exit("no experts implementation ran")
    model.set_experts_implementation(best)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parents[2]
    work = repo / "models/real_model"
    ap.add_argument("--corpus", type=Path, default=work / "corpus/corpus.txt")
    ap.add_argument("--heldout", type=Path, default=None, help="default: heldout.txt beside --corpus")
    ap.add_argument("--tokenizer", type=Path, default=work / "tokenizer")
    ap.add_argument("--out", type=Path, default=work / "hf")
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per step (default 64 on CUDA, 8 on CPU)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default 100 on CUDA, 10 on CPU")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-loss-coef", type=float, default=0.01,
                    help="weight of each layer's load-balancing loss (1.0 when the layer is even)")
    ap.add_argument("--eval-every", type=float, default=None,
                    help="seconds between held-out evaluations (default: budget/12 on CUDA, budget/6 on CPU)")
    ap.add_argument("--eval-windows", type=int, default=None,
                    help="held-out windows per evaluation (default 128 on CUDA, 16 on CPU)")
    ap.add_argument("--routing-windows", type=int, default=None,
                    help="held-out windows for routing.json (default 64 on CUDA, 16 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    ap.add_argument("--experts-impl", default="auto", help="auto, grouped_mm, batched_mm or eager")
    ap.add_argument("--save-dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--max-shard-size", default="15MB")
    a = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import Qwen3MoeForCausalLM

    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(a.threads or 1)
    elif a.threads:
        torch.set_num_threads(a.threads)
    batch_size = a.batch_size or (64 if cuda else 8)
    warmup = a.warmup_steps if a.warmup_steps is not None else (100 if cuda else 10)
    budget = a.minutes * 60.0
    eval_every = a.eval_every or (max(5.0, budget / 12) if cuda else max(10.0, budget / 6))
    a.eval_windows = a.eval_windows or (128 if cuda else 16)
    a.routing_windows = a.routing_windows or (64 if cuda else 16)
    heldout_p = a.heldout or a.corpus.with_name("heldout.txt")

    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from contextlib import nullcontext

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    t_setup = time.time()
    tok = Tokenizer.from_file(str(a.tokenizer / "tokenizer.json"))
    eos_id = tok.token_to_id(SEP)
    vocab = tok.get_vocab_size()
    train_np = tokenize_file(tok, a.corpus, eos_id)
    held_np = tokenize_file(tok, heldout_p, eos_id)
    log(f"corpus {a.corpus.stat().st_size:,} bytes -> {len(train_np):,} tokens; held-out {len(held_np):,} tokens "
        f"({time.time() - t_setup:.1f} s)")
    train_data = torch.from_numpy(train_np).to(device)
    held_data = torch.from_numpy(held_np).to(device)

    cfg = model_config(vocab, eos_id, a.seq_len, a.aux_loss_coef)
    model = Qwen3MoeForCausalLM(cfg).to(device)
    model.train()
    params = count_params(model, cfg)
    log(f"Qwen3MoeForCausalLM: {params['total'] / 1e6:.2f}M parameters "
        f"({params['active_per_token'] / 1e6:.2f}M active per token), device {device}, "
        f"{'bf16 autocast' if cuda else 'fp32'}, batch {batch_size}x{a.seq_len}, torch threads {torch.get_num_threads()}")

    impl = pick_experts_impl(model, cfg, train_data, a.seq_len, batch_size, device, amp, a.experts_impl)
    log(f"experts implementation: {impl}")
    torch.manual_seed(a.seed)  # the probe above drew random numbers

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "mlp.gate." not in n else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if cuda else {}))

    gen = torch.Generator(device=device)
    gen.manual_seed(a.seed)
    offs = torch.arange(a.seq_len + 1, device=device)[None, :]
    n_start = len(train_data) - a.seq_len - 1

    history, evals = [], []
    best = {"val_loss": float("inf"), "step": 0, "state": None}
    step, tokens_seen, ema = 0, 0, None
    acc, acc_n = None, 0
    log_every, print_every = (10, 100) if cuda else (1, 5)
    last_eval = 0.0
    t0 = time.time()
    log(f"training for {a.minutes} min (seed {a.seed})")

    def do_eval(elapsed: float) -> float:
        v = evaluate(model, held_data, a.seq_len, device, amp, a.eval_windows)
        evals.append({"step": step, "time_s": round(elapsed, 1), "val_loss": round(v, 4)})
        if v < best["val_loss"]:
            best.update(val_loss=v, step=step,
                        state={k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()})
        return v

    while True:
        elapsed = time.time() - t0
        if elapsed >= budget:
            break
        frac = min(1.0, elapsed / budget)
        if step < warmup:
            lr = a.lr * (step + 1) / warmup
        else:
            lr = a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_start, (batch_size,), device=device, generator=gen)
        x = train_data[starts[:, None] + offs].long()
        lm_loss, aux = lm_and_aux_loss(model, x, amp)
        loss = lm_loss + a.aux_loss_coef * aux
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch_size * a.seq_len
        # language-model loss (without the router's balancing term), summed on the device and read
        # every few steps, so that logging does not wait for the GPU at every step
        lm_loss = lm_loss.detach()
        acc = lm_loss if acc is None else acc + lm_loss
        acc_n += 1
        if step % log_every == 0:
            lm = (acc / acc_n).item()
            acc, acc_n = None, 0
            ema = lm if ema is None else 0.7 * ema + 0.3 * lm
            el = time.time() - t0
            history.append({"step": step, "time_s": round(el, 2), "loss": round(lm, 4),
                            "balance_loss_per_layer": round(float(aux.item()) / cfg.num_hidden_layers, 4),
                            "lr": lr, "grad_norm": round(float(gnorm), 3)})
            if step % print_every == 0:
                log(f"step {step:6d}  {el:6.1f}s  loss {lm:.4f}  lr {lr:.2e}  "
                    f"{tokens_seen / el / 1e3:,.0f}k tok/s  {el / step * 1000:.0f} ms/step")
        if time.time() - t0 - last_eval >= eval_every:
            last_eval = time.time() - t0
            v = do_eval(last_eval)
            log(f"step {step:6d}  held-out loss {v:.4f} (best {best['val_loss']:.4f} at step {best['step']})")
    train_time = time.time() - t0
    v = do_eval(train_time)
    log(f"end: step {step}, held-out loss {v:.4f}; best {best['val_loss']:.4f} at step {best['step']}")
    last_state_loss = v
    model.load_state_dict(best["state"])

    routing = routing_stats(model, held_data, a.seq_len, device, amp, a.routing_windows, cfg)
    log("routing (held-out): next-token reuse {:.3f} (random {:.3f}); LRU hit rate 4/8/16 slots "
        "{:.3f}/{:.3f}/{:.3f}; popularity entropy {:.3f}".format(
            routing["mean"]["next_token_reuse"], routing["uniform_random_baseline"]["next_token_reuse"],
            *[routing["mean"]["lru_hit_rate"][s] for s in ("4", "8", "16")], routing["mean"]["normalized_entropy"]))

    # save
    out_dir = a.out
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.config.output_router_logits = False
    save_model = model.to("cpu")
    if a.save_dtype == "bf16":
        save_model = save_model.to(torch.bfloat16)
        save_model.config.dtype = "bfloat16"
    else:
        save_model.config.dtype = "float32"
    save_model.generation_config.eos_token_id = eos_id
    save_model.generation_config.pad_token_id = eos_id
    save_model.save_pretrained(str(out_dir), max_shard_size=a.max_shard_size)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer_info.json"):
        if (a.tokenizer / f).exists():
            shutil.copy2(a.tokenizer / f, out_dir / f)

    train_log = {
        "model": "Qwen3MoeForCausalLM",
        "parameters": params,
        "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "moe_intermediate_size",
                                                "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "head_dim", "num_experts",
                                                "num_experts_per_tok", "norm_topk_prob",
                                                "tie_word_embeddings")},
        "balance_loss": {"kind": "Switch load-balancing loss per layer, summed over layers",
                         "coef": a.aux_loss_coef},
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else f" ({platform.processor() or platform.machine()})"),
        "precision": "bf16 autocast" if cuda else "fp32",
        "saved_dtype": a.save_dtype,
        "experts_implementation": impl,
        "torch_threads": torch.get_num_threads(),
        "seed": a.seed,
        "minutes": a.minutes,
        "batch_size": batch_size,
        "seq_len": a.seq_len,
        "lr": a.lr,
        "warmup_steps": warmup,
        "steps": step,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / len(train_np),
        "train_time_s": round(train_time, 1),
        "final_train_loss": round(ema, 4) if ema is not None else None,
        "final_val_loss": round(last_state_loss, 4),
        "best_val_loss": round(best["val_loss"], 4),
        "best_val_ppl": round(math.exp(best["val_loss"]), 2),
        "best_step": best["step"],
        "saved": "weights of the best held-out loss",
        "corpus_tokens": int(len(train_np)),
        "heldout_tokens": int(len(held_np)),
        "corpus_sha256": hashlib.sha256(a.corpus.read_bytes()).hexdigest(),
        "tokenizer_json_sha256": hashlib.sha256((a.tokenizer / "tokenizer.json").read_bytes()).hexdigest(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "evals": evals,
        "history": history,
    }
    (out_dir / "train_log.json").write_text(json.dumps(train_log, indent=1) + "\n")
    (out_dir / "routing.json").write_text(json.dumps(routing, indent=1) + "\n")
    files = sorted(p.name for p in out_dir.iterdir())
    log(f"saved {out_dir}: {', '.join(files)}")
    log(f"summary: {params['total'] / 1e6:.2f}M params, {step} steps, {tokens_seen / 1e6:.2f}M tokens "
        f"({train_log['epochs']:.2f} epochs), {train_time:.0f} s, train loss {train_log['final_train_loss']}, "
        f"best held-out loss {train_log['best_val_loss']} (ppl {train_log['best_val_ppl']})")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
