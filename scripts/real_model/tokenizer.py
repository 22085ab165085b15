#!/usr/bin/env python3
"""Train the recipe's 4096-token byte-level BPE on corpus.txt and save it as a Hugging Face
tokenizer folder (tokenizer.json, tokenizer_config.json with a ChatML chat template).

The pre-tokenizer, normalizer and decoder are exactly Qwen2's (the `Split` regex below, then
`ByteLevel` without its own regex; NFC; ByteLevel decoding), so llama.cpp tokenizes the text the
same way with `tokenizer.ggml.pre = "qwen2"`. llama.cpp's converter identifies a pre-tokenizer by
hashing the token IDs that the whole tokenizer gives for a test string, which also depends on the
vocabulary: no newly trained vocabulary can reproduce a listed hash, so convert.py names the
pre-tokenizer itself after checking that tokenizer.json carries this exact specification
(`qwen2_pretokenizer_spec()`), and check.py compares llama.cpp's tokens with these on real text.

The merges are learnt from the corpus in a fixed order, so the same corpus gives the same
tokenizer. Special tokens come last, as in Qwen's vocabularies: `<|endoftext|>` (4093),
`<|im_start|>` (4094), `<|im_end|>` (4095).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

VOCAB_SIZE = 4096
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SEP = "<|endoftext|>"

# Qwen2's pre-tokenizer split regex, as in its tokenizer.json (and quoted in llama.cpp's
# src/llama-vocab.cpp for LLAMA_VOCAB_PRE_TYPE_QWEN2).
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                     r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML, as Qwen2/Qwen3 instruct models use it (without tools or thinking blocks).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen2_pretokenizer_spec() -> dict:
    """tokenizer.json's normalizer / pre_tokenizer / decoder sections of Qwen2 (and Qwen2.5/3)."""
    return {
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    }


def has_qwen2_pretokenizer(tokenizer_json: dict) -> bool:
    spec = qwen2_pretokenizer_spec()
    return all(tokenizer_json.get(k) == v for k, v in spec.items())


def documents(path: Path):
    text = path.read_text(encoding="utf-8")
    for doc in text.split(f"\n{SEP}\n"):
        doc = doc.strip("\n")
        if doc:
            yield doc


def train(corpus: Path, out: Path) -> dict:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIALS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(documents(corpus), trainer=trainer)
    n = tok.get_vocab_size()
    if n != VOCAB_SIZE - len(SPECIALS):
        sys.exit(f"BPE learnt {n} tokens, expected {VOCAB_SIZE - len(SPECIALS)} (corpus too small?)")
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == VOCAB_SIZE
    ids = {s: tok.token_to_id(s) for s in SPECIALS}

    # before transformers wraps (and adjusts) the object. The Python binding's decoders.ByteLevel
    # takes no options and writes its defaults, which decoding ignores: write Qwen2's values.
    raw = json.loads(tok.to_str())
    raw["decoder"] = qwen2_pretokenizer_spec()["decoder"]
    raw_json = json.dumps(raw, indent=2, ensure_ascii=False)
    Tokenizer.from_str(raw_json)  # still valid
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    # transformers rewrites the decoder's options and adds an empty post-processor on save: keep
    # the tokenizers library's own file, which is what llama.cpp's converter and our check read.
    (out / "tokenizer.json").write_text(raw_json, encoding="utf-8")
    # the converter reads tokenizer_config.json; keep what it and llama.cpp look at explicit
    cfg_p = out / "tokenizer_config.json"
    cfg = json.loads(cfg_p.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg.setdefault("add_bos_token", False)
    cfg["errors"] = "replace"
    cfg_p.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    tj = json.loads((out / "tokenizer.json").read_text())
    if not has_qwen2_pretokenizer(tj):
        sys.exit("the saved tokenizer.json does not carry Qwen2's pre-tokenizer specification")
    # transformers must load it back to the same token IDs (the converter uses AutoTokenizer)
    from transformers import AutoTokenizer
    back = AutoTokenizer.from_pretrained(str(out))
    probe = "Once upon a time, 'twas 1811.\n\n  It's <|im_start|>user\nhi<|im_end|> \t done"
    if back.encode(probe, add_special_tokens=True) != Tokenizer.from_str(raw_json).encode(probe).ids:
        sys.exit("transformers' AutoTokenizer does not reproduce the tokenizers library's IDs")
    info = {
        "vocab_size": VOCAB_SIZE,
        "special_ids": ids,
        "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        "tokenizer_json_sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest(),
    }
    (out / "tokenizer_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parents[2]
    ap.add_argument("--corpus", type=Path, default=repo / "models/real_model/corpus/corpus.txt")
    ap.add_argument("--out", type=Path, default=repo / "models/real_model/tokenizer")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    info_p = a.out / "tokenizer_info.json"
    if not a.force and info_p.exists() and (a.out / "tokenizer.json").exists():
        info = json.loads(info_p.read_text())
        if info.get("corpus_sha256") == hashlib.sha256(a.corpus.read_bytes()).hexdigest():
            print(f"[tokenizer] {a.out} is up to date (vocab {info['vocab_size']}, "
                  f"tokenizer.json sha256 {info['tokenizer_json_sha256'][:16]})")
            return
    import time
    t0 = time.time()
    info = train(a.corpus, a.out)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(a.out / "tokenizer.json"))
    sample = a.corpus.read_text(encoding="utf-8")[:200_000]
    n = len(tok.encode(sample).ids)
    print(f"[tokenizer] trained in {time.time() - t0:.1f} s: vocab {info['vocab_size']}, specials {info['special_ids']}, "
          f"{len(sample.encode()) / n:.2f} bytes/token on the corpus's start; tokenizer.json sha256 "
          f"{info['tokenizer_json_sha256'][:16]}")
    enc = tok.encode("Once upon a time, it is a truth universally acknowledged.")
    print(f"[tokenizer] example: {enc.tokens}")


if __name__ == "__main__":
    main()
