"""Shared pytest fixtures for flashmoe.

Fixtures (stable; other test modules rely on them):

``tiny_models`` (session): ``{arch: path}`` for "qwen3moe", "qwen2moe" and "qwen35moe": tiny
    synthetic random-weight models (``flashmoe synth --preset tiny --seed 0``, a few MB each,
    4 layers, 8 experts of which 2 used, embd 256, Q4_K experts, F16 dense), written once per test
    session into a temporary folder. Treat the files as read-only; copy them to modify.

``tiny_model`` (session): ``tiny_models["qwen3moe"]``.

``llama_cpp`` (session): the imported ``llama_cpp`` module; the test is skipped when it cannot be
    imported, unless FLASHMOE_REQUIRE_LLAMA=1 is set (then it fails).

``run_cli``: ``run_cli(*args) -> CliResult(code, stdout, stderr)``: runs ``python -m flashmoe ARGS``
    in a subprocess (the real entry point, exit codes and stderr as a user sees them).

Helpers importable by tests (``from conftest import ...``): ``REPO_ROOT``, ``TINY_ARCHES``,
``generate_greedy(llama_cpp, path, n, prompt=...) -> (prompt_tokens, tokens, llm)``,
``last_logits(llama_cpp, llm) -> numpy array``,
``serve_cli(*args, env=None) -> (process, url, stderr lines so far)``: a real ``flashmoe serve`` on a free
loopback port (a context manager that stops it).
"""
from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import namedtuple

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

TINY_ARCHES = ("qwen3moe", "qwen2moe", "qwen35moe")
TINY_SEED = 0

CliResult = namedtuple("CliResult", "code stdout stderr")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from gguf_tools.synth import make_spec, synth_model

    folder = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for arch in TINY_ARCHES:
        path = str(folder / f"tiny-{arch}.gguf")
        synth_model(path, make_spec(arch, "tiny", seed=TINY_SEED), progress=False)
        out[arch] = path
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_models):
    return tiny_models["qwen3moe"]


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        import llama_cpp as mod  # noqa: F401
    except Exception as e:  # ImportError, or OSError when the shared library is missing
        if os.environ.get("FLASHMOE_REQUIRE_LLAMA") == "1":
            raise
        pytest.skip(f"llama_cpp is not importable: {e}")
    return mod


def generate_greedy(llama_cpp, path, n, prompt="Hello world, this is a test", n_ctx=256):
    """Load ``path`` with llama.cpp and generate ``n`` tokens greedily; returns (prompt_tokens, tokens, llm)."""
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, verbose=False)
    toks = llm.tokenize(prompt.encode(), add_bos=False)
    out = []
    for tok in llm.generate(toks, top_k=1, temp=0.0):
        out.append(tok)
        if len(out) >= n:
            break
    return toks, out, llm


def last_logits(llama_cpp, llm):
    """The logits of the last evaluated position (a numpy copy)."""
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


@pytest.fixture
def run_cli():
    def run(*args, timeout=300, env=None):
        e = dict(os.environ)
        e["PYTHONPATH"] = REPO_ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        if env:
            e.update(env)
        p = subprocess.run([sys.executable, "-m", "flashmoe", *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=e, cwd=REPO_ROOT)
        return CliResult(p.returncode, p.stdout, p.stderr)

    return run


@contextlib.contextmanager
def serve_cli(*args, env=None, start_timeout=120):
    """Starts ``python -m flashmoe serve ARGS --port 0`` (with PYTHONPATH at this checkout), waits for its
    "listening on" line, yields (process, url, the stderr lines seen), and stops it (SIGTERM, then SIGKILL)."""
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = REPO_ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    p = subprocess.Popen([sys.executable, "-m", "flashmoe", "serve", *map(str, args), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=REPO_ROOT)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in p.stderr], daemon=True).start()
    try:
        url, seen, t0 = None, [], time.time()
        while url is None and time.time() - t0 < start_timeout:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert p.poll() is None, "".join(seen)
                continue
            seen.append(line)
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "".join(seen)
        yield p, url, seen
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def write_uniform_traces(models, folder, tokens=512, seed=7):
    """{name: trace path}: a uniform routing trace (seeded) for each model of ``{name: path}``, in folder."""
    from flashmoe.trace import gen_uniform, model_moe_layers, write_trace
    from gguf_tools.reader import open_model

    out = {}
    for name, path in models.items():
        with open_model(path) as m:
            tr = gen_uniform(model_moe_layers(m), m.n_expert, m.n_expert_used, tokens, seed=seed)
        out[name] = str(folder / f"{name}.trace")
        write_trace(out[name], tr)
    return out
