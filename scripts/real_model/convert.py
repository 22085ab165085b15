#!/usr/bin/env python3
"""Convert the recipe's Hugging Face checkpoint to GGUF with llama.cpp's own converter, then
quantize the routed experts with `flashmoe quantize`.

1. Unpacks `vendor/llama.cpp/convert_hf_to_gguf.py`, its `conversion/` package and `gguf-py/` from
   the cached llama-cpp-python source package (~/.cache/flashmoe/sdist/llama_cpp_python-0.3.36.tar.gz,
   the same llama.cpp that flashmoe builds) into a cache folder. Nothing in them is edited.
2. Runs the converter (in this process, `--outtype f16` by default) on the checkpoint:
   model-f16.gguf. Its `get_vocab_base_pre` recognises a BPE pre-tokenizer by hashing the token
   IDs of a test string; those IDs depend on the vocabulary, so a newly trained vocabulary matches
   no entry of its table even with Qwen2's pre-tokenizer. Here the method is wrapped: when the
   table does not know the hash AND the checkpoint's tokenizer.json carries exactly Qwen2's
   normalizer / pre-tokenizer / decoder (tokenizer.py's `qwen2_pretokenizer_spec`), the answer is
   "qwen2", which llama.cpp implements with the same regex; any other tokenizer still fails as the
   converter would. check.py then compares llama.cpp's tokens with the HF tokenizer's on real text.
3. `flashmoe quantize model-f16.gguf -o model-q8_0.gguf --experts Q8_0 --dense keep`: routed
   experts in Q8_0, attention / embeddings / output left in F16, router and norms in F32, written in
   flashmoe's streaming layout.

Needs torch, transformers (with tokenizers), numpy and pyyaml (the converter's imports; env.sh
installs them), and the project's flashmoe for step 3.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SDIST = Path(os.environ.get("FLASHMOE_SDIST",
                            Path.home() / ".cache/flashmoe/sdist/llama_cpp_python-0.3.36.tar.gz"))
MEMBERS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
           "vendor/llama.cpp/gguf-py/", "vendor/llama.cpp/LICENSE")


MODEL_NAME = "flashmoe-real-qwen3moe-22m"


def log(msg: str) -> None:
    print(f"[convert] {msg}", flush=True)


def check_imports() -> None:
    missing = []
    for mod in ("torch", "transformers", "tokenizers", "numpy", "yaml"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        sys.exit(f"[convert] missing Python packages for llama.cpp's converter: {', '.join(missing)}; "
                 f"run `source scripts/real_model/env.sh` and use $RM_PY (torch: pip install torch==2.13.0)")


def unpack_converter(cache: Path) -> Path:
    if not SDIST.exists():
        sys.exit(f"[convert] {SDIST} not found: `flashmoe build` caches it (or set FLASHMOE_SDIST)")
    key = hashlib.sha256(SDIST.read_bytes()).hexdigest()[:16]
    dest = cache / f"llama.cpp-{key}"
    marker = dest / ".complete"
    if marker.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    tmp = cache / f".tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with tarfile.open(SDIST) as tf:
        top = tf.getmembers()[0].name.split("/")[0]
        wanted = [m for m in tf.getmembers()
                  if any(m.name == f"{top}/{w}" or m.name.startswith(f"{top}/{w}") for w in MEMBERS)]
        for m in wanted:
            if not (m.isfile() or m.isdir()):
                continue
            rel = Path(m.name).relative_to(f"{top}/vendor/llama.cpp")
            target = tmp / rel
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(m) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
    (tmp / ".complete").write_text(f"{SDIST.name}\n")
    tmp.rename(dest)
    return dest


def run_converter(conv_dir: Path, ckpt: Path, out: Path, outtype: str) -> str:
    """Run convert_hf_to_gguf.main() in this process; return the pre-tokenizer name it wrote."""
    sys.path.insert(0, str(conv_dir))
    sys.path.insert(1, str(conv_dir / "gguf-py"))
    import importlib.util

    sys.path.insert(0, str(HERE))
    from tokenizer import has_qwen2_pretokenizer

    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", conv_dir / "convert_hf_to_gguf.py")
    conv = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["convert_hf_to_gguf"] = conv
    spec.loader.exec_module(conv)  # type: ignore[union-attr]
    import gguf

    if not str(Path(gguf.__file__).resolve()).startswith(str(conv_dir.resolve())):
        sys.exit(f"[convert] imported gguf from {gguf.__file__}, not the sdist's gguf-py")
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre
    chosen: dict = {}

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            res = original(self, tokenizer)
            chosen.update(name=res, how="the converter's hash table")
            return res
        except NotImplementedError:
            tj = json.loads((Path(self.dir_model) / "tokenizer.json").read_text())
            if not has_qwen2_pretokenizer(tj):
                raise
            chosen.update(name="qwen2", how="tokenizer.json carries exactly Qwen2's pre-tokenizer")
            return "qwen2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre  # type: ignore[method-assign]
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(ckpt), "--outfile", str(out), "--outtype", outtype,
                "--model-name", MODEL_NAME]
    try:
        conv.main()
    finally:
        sys.argv = argv
        TextModel.get_vocab_base_pre = original  # type: ignore[method-assign]
    return f"{chosen.get('name')} ({chosen.get('how')})"


def flashmoe_exe() -> list[str]:
    exe = shutil.which("flashmoe")
    venv_exe = REPO / ".venv/bin/flashmoe"
    if venv_exe.exists():
        return [str(venv_exe)]
    if exe:
        return [exe]
    return [sys.executable, "-m", "flashmoe"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    work = REPO / "models/real_model"
    ap.add_argument("--ckpt", type=Path, default=work / "hf")
    ap.add_argument("--outdir", type=Path, default=work)
    ap.add_argument("--outtype", default="f16", choices=["f16", "f32", "bf16"])
    ap.add_argument("--experts", default="Q8_0", help="routed-expert type for flashmoe quantize")
    ap.add_argument("--dense", default="keep", help="type of the other matrices for flashmoe quantize")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache/real_model/converter")
    ap.add_argument("--threads", type=int, default=1, help="quantization threads")
    a = ap.parse_args()

    check_imports()
    conv_dir = unpack_converter(a.cache)
    log(f"llama.cpp converter unpacked from {SDIST.name} -> {conv_dir}")
    a.outdir.mkdir(parents=True, exist_ok=True)
    f16 = a.outdir / f"model-{a.outtype}.gguf"
    qname = a.experts.lower() if a.dense == "keep" else f"{a.experts.lower()}-{a.dense.lower()}"
    q = a.outdir / f"model-{qname}.gguf"
    t0 = time.time()
    pre = run_converter(conv_dir, a.ckpt, f16, a.outtype)
    log(f"converted {a.ckpt} -> {f16} ({f16.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f} s; "
        f"tokenizer.ggml.pre = {pre}")
    cmd = flashmoe_exe() + ["quantize", str(f16), "-o", str(q), "--experts", a.experts, "--dense", a.dense,
                            "--threads", str(a.threads), "--force", "--no-progress"]
    log("$ " + " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True)
    log(f"quantized -> {q} in {time.time() - t0:.1f} s")
    for p in (f16, q):
        log(f"{p.name}: {p.stat().st_size:,} bytes ({p.stat().st_size / 2**20:.1f} MiB)")
    (a.outdir / "convert.json").write_text(json.dumps({
        "sdist": SDIST.name, "outtype": a.outtype, "pre_tokenizer": pre,
        "gguf": {f16.name: f16.stat().st_size, q.name: q.stat().st_size},
        "quantize": {"experts": a.experts, "dense": a.dense},
    }, indent=2) + "\n")
    print(q)


if __name__ == "__main__":
    main()
