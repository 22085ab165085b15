"""Log-probabilities from `flashmoe serve` (issue 20): /v1/completions `logprobs` + `echo` (OpenAI's legacy
format, what lm-evaluation-harness reads) and /v1/chat/completions `logprobs` / `top_logprobs`.

The small real model (flashmoe/data/real-moe-22m-q8_0.gguf), served from RAM (stock) and with its experts
streamed through an 8-of-32-slot cache, each by a real uvicorn server on a loopback port. Every number
is checked against the engine itself: the logits of its ordinary generation path (``Engine.generate``,
one prefix at a time, not the server's batch evaluation), put through a float64 log-softmax written here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from flashmoe.demo import DEMO_MODEL

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = str(DEMO_MODEL)
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
N_GEN = 6
TOP = 5
TOL = 2e-3  # batch vs one-row evaluation: logits differ by ~1e-4 (float32 sums in another order)


def _ref_logprobs(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    z = x - x.max()
    return z - np.log(np.exp(z).sum())


def _engine(stream: bool):
    from flashmoe.engine import Engine
    from flashmoe.settings import StreamSettings

    kw = dict(stream=StreamSettings(mode="cache", cache_slots=8)) if stream else dict(policy="stock")
    return Engine(MODEL, use_extra_bufts=False, n_ctx=1024, n_threads=1, **kw)


@pytest.fixture(scope="module", params=["stock", "stream"])
def served(request, llama_cpp):
    """(engine, server, reference, app): the reference is computed on the engine before it serves."""
    from flashmoe.server import ServerThread, create_app

    eng = _engine(request.param == "stream")
    toks = eng.tokenize(TEXT, add_bos=False)
    # the logits predicting each prompt token i >= 1, from the prefix before it (Engine.generate's path)
    prompt_rows = [eng.generate(toks[:i], 1, return_logits=True, stop_at_eos=False).logits[0]
                   for i in range(1, len(toks))]
    g = eng.generate(toks, N_GEN, return_logits=True, stop_at_eos=False)
    ref = {"tokens": toks, "prompt_rows": prompt_rows, "gen_tokens": g.tokens, "gen_rows": g.logits}
    app = create_app(eng, model_name="real")
    with ServerThread(app, host="127.0.0.1", port=0) as s:
        yield eng, s, ref, app
    eng.close()


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def _check_position(lp_value, top: dict, row: np.ndarray, tok: int, texts) -> None:
    ref = _ref_logprobs(row)
    assert lp_value == pytest.approx(ref[tok], abs=TOL)
    best = np.argsort(-ref)[:TOP]
    want = {texts(int(t)): float(ref[t]) for t in best}
    for t, v in want.items():  # the N most likely (the chosen token may be listed besides)
        assert top[t] == pytest.approx(v, abs=TOL), (t, top)
    assert len(top) in (TOP, TOP + 1)


def test_completion_logprobs_are_the_engines(served):
    eng, server, ref, app = served
    toks = ref["tokens"]
    r = _post(server, "/v1/completions", {"prompt": toks, "max_tokens": N_GEN, "temperature": 0, "echo": True,
                                          "logprobs": TOP})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    lp = ch["logprobs"]
    n = len(toks)
    texts = lambda t: eng.llama.detokenize([t], special=True).decode("utf-8")  # noqa: E731 (whole words here)
    # the prompt: no log-probability for the first token, then each token given those before it
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][:n] == [texts(t) for t in toks]
    for i in range(1, n):
        _check_position(lp["token_logprobs"][i], lp["top_logprobs"][i], ref["prompt_rows"][i - 1], toks[i], texts)
    # the answer: greedy, so the engine's own tokens; each one's log-probability under its logits
    gen = lp["tokens"][n:n + N_GEN]
    assert gen == [texts(t) for t in ref["gen_tokens"]]
    for j, tok in enumerate(ref["gen_tokens"]):
        _check_position(lp["token_logprobs"][n + j], lp["top_logprobs"][n + j], ref["gen_rows"][j], tok, texts)
        assert lp["token_logprobs"][n + j] == max(lp["top_logprobs"][n + j].values())  # greedy: the most likely
    assert len(lp["tokens"]) == n + N_GEN and ch["finish_reason"] == "length"
    # text_offset: where each token starts in the text (echo: the prompt's text first)
    assert ch["text"] == eng.detokenize(toks) + eng.detokenize(ref["gen_tokens"])
    assert all(ch["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]))
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_stream_and_ram_give_the_same_numbers(llama_cpp):
    """Streamed experts (8 slots of 32: misses and evictions) give bit-identical logits: identical JSON."""
    from flashmoe.server import ServerThread, create_app

    body = {"prompt": TEXT, "max_tokens": 8, "temperature": 0, "echo": True, "logprobs": 3}
    chat = {"messages": [{"role": "user", "content": "Who is Mr. Bingley?"}], "max_tokens": 8, "temperature": 0,
            "logprobs": True, "top_logprobs": 4}
    got = {}
    for kind in ("stock", "stream"):
        eng = _engine(kind == "stream")
        try:
            with ServerThread(create_app(eng), host="127.0.0.1", port=0) as s:
                got[kind] = (_post(s, "/v1/completions", body).json()["choices"][0],
                             _post(s, "/v1/chat/completions", chat).json()["choices"][0])
            if kind == "stream":
                st = eng.stats()["total"]
                assert st["misses"] > 0 and st["evictions"] > 0
        finally:
            eng.close()
    assert got["stream"] == got["stock"]
    assert len(got["stock"][0]["logprobs"]["tokens"]) > 8 and len(got["stock"][1]["logprobs"]["content"]) > 0


def test_echo_with_max_tokens_0_scores_the_prompt_only(served):
    eng, server, ref, app = served
    toks = ref["tokens"]
    r = _post(server, "/v1/completions", {"prompt": [toks], "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ch = body["choices"][0]
    assert body["usage"]["completion_tokens"] == 0 and ch["finish_reason"] == "length"
    assert ch["text"] == eng.detokenize(toks)
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == len(toks)
    for i in range(1, len(toks)):  # logprobs 0: only the chosen token is listed
        want = _ref_logprobs(ref["prompt_rows"][i - 1])[toks[i]]
        assert lp["token_logprobs"][i] == pytest.approx(want, abs=TOL)
        assert list(lp["top_logprobs"][i].values()) == [lp["token_logprobs"][i]]


def test_text_offsets_follow_special_tokens(served):
    """A token prompt that starts with the end-of-text token (lm-evaluation-harness's rolling
    log-likelihood windows do): the echo spells it out and the offsets point into that text."""
    eng, server, ref, app = served
    prompt = [eng.llama.token_eos()] + ref["tokens"]
    ch = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1,
                                           "temperature": 0}).json()["choices"][0]
    lp = ch["logprobs"]
    assert ch["text"].startswith("<|endoftext|>" + TEXT) and lp["tokens"][0] == "<|endoftext|>"
    assert lp["text_offset"][1] == len("<|endoftext|>")
    assert all(ch["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]))


def test_an_answer_ending_at_end_of_text_lists_that_token(served):
    """lm-evaluation-harness sends echo + max_tokens 1 and drops the last entry: there must be one after
    the prompt's even when the model's next token ends the text (it does, greedily, after this line)."""
    eng, server, ref, app = served
    prompt = '"Ah, you do not know what I suffer."'
    r = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1,
                                          "temperature": 0}).json()
    ch = r["choices"][0]
    n = len(eng.tokenize(prompt, add_bos=False))
    assert ch["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 0 and ch["text"] == prompt
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == n + 1 and lp["tokens"][-1] == "<|endoftext|>"
    assert lp["text_offset"][-1] == len(prompt)
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # greedy: the most likely
    # the chat endpoint does not list the end of the turn
    c = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40,
                                               "temperature": 0, "logprobs": True}).json()
    assert len(c["choices"][0]["logprobs"]["content"]) == c["usage"]["completion_tokens"]


def test_streamed_completion_carries_the_same_logprobs(served):
    eng, server, ref, app = served
    body = {"prompt": TEXT, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 2}
    plain = _post(server, "/v1/completions", body).json()["choices"][0]
    text, lps = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ch = json.loads(line[6:])["choices"][0]
            text += ch["text"]
            for k, v in (ch["logprobs"] or {}).items():
                lps[k] += v
    assert text == plain["text"] and lps == plain["logprobs"]


def test_chat_logprobs(served):
    eng, server, ref, app = served
    model_msgs = [{"role": "user", "content": "Tell me about Mr. Bennet."}]
    body = {"messages": model_msgs, "max_tokens": N_GEN, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    content = ch["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] and ch["logprobs"]["refusal"] is None
    assert b"".join(bytes(c["bytes"]) for c in content).decode("utf-8", "replace") == ch["message"]["content"]
    # the same numbers as the completion endpoint's for the same prompt tokens (checked against the engine)
    from flashmoe.chat import normalize_messages

    # the server's own template and tokenizer (what plan_chat does)
    m = app.state.model
    prompt = m.tokenize(m.template.render(normalize_messages(model_msgs)))
    c = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": N_GEN, "temperature": 0,
                                          "logprobs": 3}).json()["choices"][0]["logprobs"]
    assert [x["logprob"] for x in content] == c["token_logprobs"][:len(content)]
    for x, top in zip(content, c["top_logprobs"]):
        assert len(x["top_logprobs"]) == 3
        assert {t["token"]: t["logprob"] for t in x["top_logprobs"]} == {k: v for k, v in top.items()
                                                                        if k in {t["token"] for t in x["top_logprobs"]}}
        assert x["top_logprobs"][0]["logprob"] >= x["top_logprobs"][-1]["logprob"]
    # without top_logprobs: the chosen tokens only; streamed: the same list, in the last chunk
    r2 = _post(server, "/v1/chat/completions", {**body, "top_logprobs": None})
    assert [x["top_logprobs"] for x in r2.json()["choices"][0]["logprobs"]["content"]] == [[]] * len(content)
    got = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                got += (json.loads(line[6:])["choices"][0]["logprobs"] or {}).get("content", [])
    assert got == content


@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs", "from 0 to 20"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs", "from 0 to 20"),
    ("/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs", "integer"),
    ("/v1/completions", {"prompt": "a", "logprobs": "5"}, "logprobs", "integer"),
    ("/v1/completions", {"prompt": "a", "logprobs": 2.5}, "logprobs", "integer"),
    ("/v1/completions", {"prompt": "a", "echo": "yes"}, "echo", "true or false"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt", "one prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 9], "logprobs": 1}, "prompt", "ids in"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": 3}, "logprobs",
     "true or false"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs",
     "needs logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True,
                              "top_logprobs": 50}, "top_logprobs", "from 0 to 20"),
])
def test_bad_logprobs_requests_are_400s(served, path, body, param, needle):
    eng, server, ref, app = served
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_huge_echo_requests_are_bounded(served):
    """A prompt filling the context, echoed with 20 alternatives per token, is answered (the log-softmax
    runs a block of rows at a time); one past the context is refused before any work."""
    eng, server, ref, app = served
    n_ctx = eng.llama.n_ctx()
    r = _post(server, "/v1/completions", {"prompt": [ref["tokens"][1]] * (n_ctx - 1), "max_tokens": 0,
                                          "echo": True, "logprobs": 20})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == n_ctx - 1 and all(len(t) <= 21 for t in lp["top_logprobs"][1:])
    r = _post(server, "/v1/completions", {"prompt": [ref["tokens"][1]] * n_ctx, "max_tokens": 0, "echo": True,
                                          "logprobs": 20})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_tokenizer_endpoints(served):
    """vLLM's /tokenize, /detokenize and /tokenizer_info: lm-evaluation-harness's `remote` tokenizer."""
    eng, server, ref, app = served
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == eng.llama.n_ctx()
    r = _post(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False}).json()
    assert r["tokens"] == ref["tokens"] and r["count"] == len(ref["tokens"])
    assert _post(server, "/tokenize", {"prompt": "<|endoftext|>", "add_special_tokens": False}).json()["tokens"] \
        == [eng.llama.token_eos()]
    assert _post(server, "/detokenize", {"tokens": ref["tokens"]}).json()["prompt"] == TEXT
    bad = _post(server, "/detokenize", {"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert _post(server, "/tokenize", {"text": "x"}).status_code == 422
