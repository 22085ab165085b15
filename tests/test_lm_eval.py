"""lm-evaluation-harness against `flashmoe serve` (issue 20), as docs/QUALITY.md tells a user to run it.

Two real `flashmoe serve` processes of the small real model (flashmoe/data/real-moe-22m-q8_0.gguf): one
in RAM (`--policy stock`), one streaming its routed experts through an 8-of-32-slot cache (a stream
policy); the real `lm_eval` command (its `local-completions` model, the server's own tokenizer through
/tokenize) runs the three local tasks of scripts/lm_eval/tasks on each: a multiple-choice cloze scored by
log-likelihood (echo + logprobs), a greedy generate_until task, and rolling log-likelihood perplexity.
Both must give the same scores, document by document, and the scores must be real ones (the cloze far
above chance). lm-eval comes with the `eval` extra (`pip install -e '.[eval]'`; ./run installs it).
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO_ROOT, serve_cli
from flashmoe.demo import DEMO_MODEL

httpx = pytest.importorskip("httpx")

TASKS = ["flashmoe_cloze", "flashmoe_next_word", "flashmoe_paragraphs"]
LIMIT = 16  # documents per task


def _lm_eval() -> str:
    exe = Path(sys.executable).parent / "lm_eval"
    assert exe.exists(), ("lm-evaluation-harness is not installed: pip install -e '.[eval]' "
                          "(./run test installs it)")
    return str(exe)


def _run_lm_eval(url: str, out: Path) -> dict:
    """``lm_eval`` against the server at ``url``; -> {"results": ..., "samples": {task: [per document]}}."""
    env = dict(os.environ)
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(out / "hf"),
               TOKENIZERS_PARALLELISM="false")
    cmd = [_lm_eval(), "--model", "local-completions",
           "--model_args", f"base_url={url}/v1/completions,tokenizer_backend=remote,model=real-moe,max_retries=1",
           "--include_path", "scripts/lm_eval/tasks", "--tasks", ",".join(TASKS), "--limit", str(LIMIT),
           "--output_path", str(out / "results"), "--log_samples"]
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    (res,) = glob.glob(str(out / "results" / "**" / "results_*.json"), recursive=True)
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(str(out / "results" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        samples[task] = sorted(((r["doc_id"], r["filtered_resps"]) for r in rows), key=lambda x: x[0])
    with open(res, encoding="utf-8") as f:
        return {"results": json.load(f)["results"], "samples": samples}


def test_lm_eval_scores_are_the_same_streamed_and_in_ram(llama_cpp, tmp_path):
    _lm_eval()  # installed (a clear failure, not a skip, when it is not)
    pol = tmp_path / "stream-8.yaml"
    pol.write_text("version: 1\nname: stream-8\nrules:\n"
                   "  - match: \"blk.*.ffn_{gate,up,down,gate_up}_exps.weight\"\n    place: stream\n"
                   "  - match: \"*\"\n    place: ram\n"
                   "expert_cache:\n  mode: cache\n  cache_slots: 8\n")
    common = ["-m", str(DEMO_MODEL), "--threads", "1", "--no-weight-repack", "--log-level", "warning"]
    with serve_cli(*common, "--policy", "stock") as (_p1, ram_url, ram_seen), \
            serve_cli(*common, "--policy", pol) as (_p2, stream_url, stream_seen):
        assert any("stock llama.cpp" in line for line in ram_seen)
        assert any("8 slots/layer" in line for line in stream_seen)
        with ThreadPoolExecutor(2) as ex:
            ram_f = ex.submit(_run_lm_eval, ram_url, tmp_path / "ram")
            stream_f = ex.submit(_run_lm_eval, stream_url, tmp_path / "stream")
            ram, stream = ram_f.result(), stream_f.result()
        st = httpx.get(stream_url + "/flashmoe/stats", timeout=30).json()["stats"]["total"]
        assert st["misses"] > 0 and st["evictions"] > 0  # the experts really were streamed

    # the same scores, and the same answers and log-likelihoods document by document
    assert stream["samples"] == ram["samples"]
    for task in TASKS:
        assert stream["results"][task] == ram["results"][task], task
        assert len(ram["samples"][task]) == LIMIT
    r = ram["results"]
    # real scores: the cloze far above chance (1 in 4), some next words right, a finite perplexity
    assert r["flashmoe_cloze"]["acc,none"] >= 0.6, r["flashmoe_cloze"]
    assert 0 < r["flashmoe_next_word"]["exact_match,first_word"] < 1, r["flashmoe_next_word"]
    wppl = r["flashmoe_paragraphs"]["word_perplexity,none"]
    assert math.isfinite(wppl) and 1 < wppl < 1000, r["flashmoe_paragraphs"]
