#!/usr/bin/env python3
"""Check the converted GGUF against the PyTorch checkpoint it came from.

For each GGUF given (default: model-f16.gguf and model-q8_0.gguf in models/real_model/):
  * tokenization: llama.cpp's tokens (tokenizer.ggml.pre = "qwen2") against the HF tokenizer's on
    held-out text, the converter's own pre-tokenizer test string and the prompts: must be equal;
  * logits: the same token IDs through flashmoe's Engine (llama.cpp, stock placement, every
    position's logits) and through transformers' Qwen3MoeForCausalLM in fp32; per prompt the max
    and mean absolute difference, top-1 agreement and the mean KL(PyTorch || llama.cpp);
    asserts a loose bound on top-1 agreement and on KL (F16 conversion: near exact; Q8_0 experts:
    small differences);
  * streaming: the same prompts through the Engine streaming routed experts from disk into a
    small per-layer cache (8 of 32 slots, LRU) must give logits identical to the stock run;
  * greedy generation: a sentence from each prompt with llama.cpp and with PyTorch.
Writes check.json beside the GGUF files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SEP = "<|endoftext|>"

PROMPTS = [
    "Once upon a time",
    "It is a truth universally acknowledged, that",
    "In the beginning God created",
    "Call me Ishmael. Some years ago",
    "Elizabeth looked at her sister and said,",
    "The whale",
]
# the test string of llama.cpp's convert_hf_to_gguf.get_vocab_base_pre (emoji, CJK, Khmer, spaces)
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
          '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 '
          '?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? '
          'I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

# loose bounds: (min top-1 agreement, max mean KL in nats) per kind of GGUF
BOUNDS = {"f32": (0.98, 1e-3), "f16": (0.97, 2e-3), "bf16": (0.97, 2e-3), "q8": (0.90, 2e-2)}


def log(msg: str) -> None:
    print(f"[check] {msg}", flush=True)


def kind_of(path: Path) -> str:
    n = path.name.lower()
    for k in ("f32", "bf16", "f16"):
        if f"-{k}." in n:
            return k
    return "q8"


def log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare(ref, cand) -> dict:
    import numpy as np

    lp, lq = log_softmax(ref), log_softmax(cand)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "positions": int(ref.shape[0]),
        "max_abs_diff": float(np.abs(ref - cand).max()),
        "mean_abs_diff": float(np.abs(ref - cand).mean()),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


class LlamaRunner:
    def __init__(self, path: Path, policy: str, threads: int, n_ctx: int, cache_slots: int = 0):
        from flashmoe.engine import Engine
        from flashmoe.settings import StreamSettings

        stream = StreamSettings(mode="cache", cache_slots=cache_slots, readers=2) if cache_slots else None
        self.engine = Engine(str(path), policy=None if stream else policy, stream=stream, n_ctx=n_ctx,
                             n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads)
        self.L = self.engine.llama

    def tokenize(self, text: str) -> list[int]:
        return list(self.L.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def logits(self, ids: list[int]):
        from flashmoe import llama as llama_api

        llama_api.clear_memory(self.L)
        rows = llama_api.decode_rows(self.L, ids, 0, lambda i: True)
        out = rows.copy()
        self.L.n_tokens = 0
        return out

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self.engine.generate(list(ids), n, temp=0.0, stop_at_eos=True).tokens

    def close(self) -> None:
        self.engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    work = REPO / "models/real_model"
    ap.add_argument("--ckpt", type=Path, default=work / "hf")
    ap.add_argument("gguf", type=Path, nargs="*")
    ap.add_argument("--heldout", type=Path, default=work / "corpus/heldout.txt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-gen", type=int, default=24)
    ap.add_argument("--heldout-chars", type=int, default=6000,
                    help="characters of held-out text used as an extra (long) prompt")
    ap.add_argument("--no-stream", action="store_true", help="skip the streamed-experts comparison")
    ap.add_argument("--cache-slots", type=int, default=8,
                    help="expert-cache slots per layer of the streamed run (of 32 experts)")
    ap.add_argument("--out", type=Path, default=None, help="check.json (default: beside the first GGUF)")
    a = ap.parse_args()
    ggufs = a.gguf or [work / "model-f16.gguf", work / "model-q8_0.gguf"]
    ggufs = [g for g in ggufs if g.exists()] or sys.exit(f"no GGUF found: {ggufs}")

    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3MoeForCausalLM

    torch.set_num_threads(a.threads)
    tok = Tokenizer.from_file(str(a.ckpt / "tokenizer.json"))
    eos_id = tok.token_to_id(SEP)
    model = Qwen3MoeForCausalLM.from_pretrained(str(a.ckpt), dtype=torch.float32)
    model.eval()
    log(f"PyTorch: {a.ckpt} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, fp32, "
        f"experts implementation {getattr(model.config, '_experts_implementation', None)})")

    held = a.heldout.read_text(encoding="utf-8") if a.heldout.exists() else ""
    held_doc = held.split(f"\n{SEP}\n")[0][: a.heldout_chars] if held else ""
    prompts = list(PROMPTS) + ([held_doc] if held_doc else [])
    prompt_ids = [tok.encode(p).ids for p in prompts]
    n_ctx = max(512, 1 << math.ceil(math.log2(max(len(i) for i in prompt_ids) + a.n_gen + 8)))

    hf_logits, hf_greedy = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            hf_logits.append(model(input_ids=x, use_cache=False).logits[0].float().numpy())
        for ids in prompt_ids[: len(PROMPTS)]:
            g = model.generate(torch.tensor([ids]), max_new_tokens=a.n_gen, do_sample=False,
                               eos_token_id=eos_id, pad_token_id=eos_id)
            hf_greedy.append(g[0, len(ids):].tolist())

    report = {"checkpoint": str(a.ckpt), "prompts": prompts[: len(PROMPTS)] + (["<held-out text>"] if held_doc else []),
              "ggufs": {}}
    failures = []
    for path in ggufs:
        kind = kind_of(path)
        min_top1, max_kl = BOUNDS[kind]
        log(f"=== {path.name} (bounds: top-1 >= {min_top1}, mean KL <= {max_kl})")
        run = LlamaRunner(path, "stock", a.threads, n_ctx)
        log(f"llama.cpp: {run.engine.mode_line()}")
        # tokenization
        # (the corpus's document separator is a special token for HF: leave it out of the text)
        tok_texts = {"held-out": held.replace(f"\n{SEP}\n", "\n\n")[:20000], "chktxt": CHKTXT, **{f"prompt{i}": p for i, p in enumerate(PROMPTS)}}
        tok_ok = {}
        for name, text in tok_texts.items():
            if not text:
                continue
            same = run.tokenize(text) == tok.encode(text).ids
            tok_ok[name] = same
            if not same:
                failures.append(f"{path.name}: tokenization differs on {name}")
        log(f"tokenization identical to the HF tokenizer: {sum(tok_ok.values())}/{len(tok_ok)} texts "
            f"({', '.join(k for k, v in tok_ok.items() if not v) or 'all'}{' differ' if not all(tok_ok.values()) else ''})")
        # logits
        rows = []
        stock_logits = []
        for p, ids, ref in zip(report["prompts"], prompt_ids, hf_logits):
            got = run.logits(ids)
            stock_logits.append(got)
            c = compare(ref, got)
            c["prompt"] = p if len(p) < 60 else p[:57] + "..."
            rows.append(c)
            log(f"  {c['prompt'][:44]:44s} n={c['positions']:4d} max|d|={c['max_abs_diff']:.4f} "
                f"mean|d|={c['mean_abs_diff']:.5f} top1={c['top1_agreement']:.3f} KL={c['kl_mean']:.2e}")
        allpos = compare(np.concatenate(hf_logits), np.concatenate(stock_logits))
        log(f"  all {allpos['positions']} positions: max|d|={allpos['max_abs_diff']:.4f} top-1 agreement "
            f"{allpos['top1_agreement']:.4f}, mean KL {allpos['kl_mean']:.2e} (max {allpos['kl_max']:.2e})")
        if allpos["top1_agreement"] < min_top1:
            failures.append(f"{path.name}: top-1 agreement {allpos['top1_agreement']:.4f} < {min_top1}")
        if allpos["kl_mean"] > max_kl:
            failures.append(f"{path.name}: mean KL {allpos['kl_mean']:.2e} > {max_kl}")
        # greedy generation
        gens = []
        for p, ids, hg in zip(PROMPTS, prompt_ids, hf_greedy):
            lg = run.greedy(ids, a.n_gen)
            same = 0
            for x, y in zip(lg, hg):
                if x != y:
                    break
                same += 1
            gens.append({"prompt": p, "llama_cpp": tok.decode(lg), "pytorch": tok.decode(hg),
                         "identical_leading_tokens": same, "n": min(len(lg), len(hg))})
            log(f"  greedy {p!r}")
            log(f"    llama.cpp: {tok.decode(lg)!r}")
            log(f"    PyTorch:   {tok.decode(hg)!r}  ({same}/{min(len(lg), len(hg))} leading tokens identical)")
        run.close()
        entry = {"kind": kind, "size_bytes": path.stat().st_size, "bounds": {"min_top1": min_top1, "max_kl": max_kl},
                 "tokenization_identical": tok_ok, "logits_all": allpos, "logits_per_prompt": rows, "greedy": gens}
        # streamed experts: must match the stock run exactly
        if not a.no_stream:
            srun = LlamaRunner(path, "stream", a.threads, n_ctx, cache_slots=a.cache_slots)
            mode = srun.engine.mode_line()
            diffs = [float(np.abs(srun.logits(ids) - s).max()) for ids, s in zip(prompt_ids, stock_logits)]
            st = srun.engine.stats()
            srun.close()
            entry["streamed"] = {"mode": mode, "max_abs_diff_vs_stock": max(diffs), "stats": st}
            log(f"streamed: {mode}")
            log(f"  logits vs stock: max |d| = {max(diffs)} ({'bit-identical' if max(diffs) == 0 else 'DIFFERENT'})")
            if max(diffs) != 0:
                failures.append(f"{path.name}: streamed logits differ from stock ({max(diffs)})")
        report["ggufs"][path.name] = entry

    out = a.out or ggufs[0].parent / "check.json"
    report["failures"] = failures
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    log(f"wrote {out}")
    if failures:
        for f in failures:
            log(f"FAIL: {f}")
        sys.exit(1)
    log("OK: llama.cpp matches PyTorch within the bounds")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
