"""`flashmoe serve`: the OpenAI-compatible server, for real.

A real uvicorn server on a free loopback port, on the tiny synthetic model loaded in the streaming
engine with an expert cache smaller than the model's experts (2 slots per layer, 8 experts, 2 used
per token), driven by the official `openai` client (and raw HTTP for malformed requests).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import serve_cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO_ROOT = str(Path(__file__).resolve().parents[1])
KEY = "test-key-123"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
        },
    },
}
CALC = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic operation",
        "parameters": {
            "type": "object",
            "properties": {
                "op": {"enum": ["add", "sub", "mul", "div"]},
                "operands": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
                "exact": {"type": "boolean"},
            },
            "required": ["op", "operands", "exact"],
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CALC)}
ASK = [{"role": "system", "content": "You can call tools."},
       {"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def engine(llama_cpp, tiny_model):
    from flashmoe.engine import Engine
    from flashmoe.settings import StreamSettings

    eng = Engine(tiny_model, stream=StreamSettings(mode="cache", cache_slots=2), n_ctx=1024)
    assert eng.settings.stream.mode == "cache"
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    from flashmoe.server import ServerThread, create_app

    app = create_app(engine, api_key=KEY, model_name="tiny-moe")
    with ServerThread(app, host="127.0.0.1", port=0) as s:
        assert s.url.startswith("http://127.0.0.1:")
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=180)


def _post(server, path, body, key=KEY, raw=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers, timeout=180)


def _still_serving(client):
    r = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "ping"}],
                                       max_tokens=4, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1


def _check_call(call, name=None):
    assert call.type == "function" and call.id
    if name:
        assert call.function.name == name
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


# ------------------------------------------------------------------------------------------ basics


def test_health_and_models(server, client):
    r = httpx.get(server.url + "/health", timeout=30)  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-moe"]
    assert client.models.retrieve("tiny-moe").owned_by == "flashmoe"


def test_plain_chat_completion(client):
    r = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "Hello!"}],
                                       max_tokens=16, temperature=0)
    ch = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny-moe"
    assert ch.message.role == "assistant" and isinstance(ch.message.content, str)
    assert ch.finish_reason in ("stop", "length") and not ch.message.tool_calls
    assert 1 <= r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_completion_matches_the_plain_one(client):
    msgs = [{"role": "user", "content": "Tell me something."}]
    plain = client.chat.completions.create(model="tiny-moe", messages=msgs, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model="tiny-moe", messages=msgs, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage, roles, n = "", None, None, [], 0
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:
            usage = chunk.usage
            continue
        d = chunk.choices[0].delta
        if d.role:
            roles.append(d.role)
        text += d.content or ""
        finish = chunk.choices[0].finish_reason or finish
        n += 1
    assert roles == ["assistant"] and n >= 3  # streamed in pieces
    assert text == plain.choices[0].message.content  # greedy: the same answer
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 1  # same prompt: from the KV cache


# ------------------------------------------------------------------------------------------ tools


@pytest.mark.parametrize("temperature,max_tokens", [(0.0, 24), (1.0, 16), (1.6, 48)])
def test_tool_call_named_function(client, temperature, max_tokens):
    r = client.chat.completions.create(
        model="tiny-moe", messages=ASK, tools=[WEATHER, CALC], max_tokens=max_tokens, temperature=temperature,
        seed=7, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    _check_call(call, "get_weather")


def test_tool_call_required_picks_one_of_several(client):
    names = set()
    for seed in range(4):
        r = client.chat.completions.create(model="tiny-moe", messages=ASK, tools=[WEATHER, CALC],
                                           tool_choice="required", max_tokens=32, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = r.choices[0].message.tool_calls
        _check_call(call)
        names.add(call.function.name)
    assert names <= {"get_weather", "calculate"}


def test_tool_call_streamed(client):
    stream = client.chat.completions.create(
        model="tiny-moe", messages=ASK, tools=[WEATHER, CALC], max_tokens=24, temperature=0.8, seed=1,
        tool_choice={"type": "function", "function": {"name": "calculate"}}, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        ch = chunk.choices[0]
        for tc in ch.delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "calculate" and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["calculate"])


def test_tool_round_trip_and_auto(client):
    """A call, its result sent back as a tool message, then tool_choice auto (the random model
    answers in text; had it written a <tool_call> block, it would come back parsed)."""
    r = client.chat.completions.create(model="tiny-moe", messages=ASK, tools=[WEATHER], max_tokens=24,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    msgs = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})}]
    r2 = client.chat.completions.create(model="tiny-moe", messages=msgs, tools=[WEATHER], max_tokens=16,
                                        tool_choice="auto")
    ch = r2.choices[0]
    if ch.finish_reason == "tool_calls":
        for c in ch.message.tool_calls:
            _check_call(c)
    else:
        assert isinstance(ch.message.content, str)
    assert r2.usage.prompt_tokens_details.cached_tokens > 0
    r3 = client.chat.completions.create(model="tiny-moe", messages=msgs, tools=[WEATHER], max_tokens=8,
                                        tool_choice="none")
    assert r3.choices[0].finish_reason in ("stop", "length") and not r3.choices[0].message.tool_calls


def test_legacy_functions_are_tools(client):
    r = client.chat.completions.create(model="tiny-moe", messages=ASK, functions=[WEATHER["function"]],
                                       function_call={"name": "get_weather"}, max_tokens=24)
    (call,) = r.choices[0].message.tool_calls
    _check_call(call, "get_weather")


# ------------------------------------------------------------------------------------------ JSON output


def test_response_format_json_schema(client):
    schema = {"type": "object",
              "properties": {"city": {"type": "string"}, "population": {"type": "integer", "minimum": 0},
                             "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["city", "population", "tags"], "additionalProperties": False}
    for seed, temperature in [(1, 0.0), (2, 1.2)]:
        r = client.chat.completions.create(
            model="tiny-moe", messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=20,
            temperature=temperature, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "JSON please."}],
                                       max_tokens=16, response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    assert isinstance(json.loads(text), dict)


# ------------------------------------------------------------------------------------------ completions


def test_completions(client):
    r = client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=12, temperature=0)
    ch = r.choices[0]
    assert r.object == "text_completion" and ch.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 12
    s = client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=12, temperature=0,
                                  stream=True)
    assert "".join(c.choices[0].text for c in s) == ch.text
    e = client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=12, temperature=0,
                                  echo=True)
    assert e.choices[0].text == "Once upon a time" + ch.text
    stop = client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=12, temperature=0,
                                     stop=[ch.text[2:4]] if len(ch.text) > 4 else None)
    if len(ch.text) > 4:
        assert stop.choices[0].text == ch.text[:ch.text.find(ch.text[2:4])]
        assert stop.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------------ load and errors


def test_concurrent_requests_are_queued(client, server):
    """8 requests at once (plain, streamed, tool calls): all complete, correctly."""
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait(timeout=60)
        if i % 3 == 0:
            r = client.chat.completions.create(
                model="tiny-moe", messages=ASK, tools=[WEATHER, CALC], max_tokens=24, temperature=0.9, seed=i,
                tool_choice={"type": "function", "function": {"name": "calculate"}})
            assert r.choices[0].finish_reason == "tool_calls"
            _check_call(r.choices[0].message.tool_calls[0], "calculate")
            return "call"
        if i % 3 == 1:
            s = client.chat.completions.create(model="tiny-moe", max_tokens=16, temperature=0.9, seed=i, stream=True,
                                               messages=[{"role": "user", "content": f"Request number {i}."}])
            chunks = list(s)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            return "stream"
        r = client.chat.completions.create(model="tiny-moe", max_tokens=16, temperature=0.9, seed=i,
                                           messages=[{"role": "user", "content": f"Request number {i}."}])
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
        return "plain"

    t0 = time.time()
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    assert sorted(results) == sorted(["call", "stream", "plain", "call", "stream", "plain", "call", "stream"])
    assert time.time() - t0 < 170
    st = httpx.get(server.url + "/flashmoe/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert st["server"]["queued"] == 0


def test_client_leaving_a_stream_frees_the_model(server, client):
    """A streamed answer whose client disconnects stops at its next token: the model moves on."""
    def stats():
        return httpx.get(server.url + "/flashmoe/stats", headers={"Authorization": f"Bearer {KEY}"},
                         timeout=30).json()["server"]

    before = stats()["tokens_evaluated"]
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 900,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data:")
            if n >= 4:
                break
    _still_serving(client)
    st = stats()
    assert st["queued"] == 0
    assert st["tokens_evaluated"] - before < 300  # not the 900 tokens asked for


def test_malformed_requests_get_clear_status_codes(server, client):
    chat = "/v1/chat/completions"
    cases = [
        (dict(raw=b'{"messages": [{"role": "user", "content": "hi"}'), 400, "not valid JSON"),
        (dict(raw=b""), 400, "empty"),
        (dict(raw=b"[1, 2]"), 400, "JSON object"),
        (dict(body={"model": "tiny-moe"}), 422, "messages: Field required"),
        (dict(body={"messages": []}), 422, "messages"),
        (dict(body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}), 422, "max_tokens"),
        (dict(body={"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), 422, "temperature"),
        (dict(body={"messages": [{"role": "pirate", "content": "arr"}]}), 400, "unknown role"),
        (dict(body={"messages": [{"role": "user", "content": "hi"}], "n": 2}), 400, "n > 1"),
        (dict(body={"messages": ASK, "tools": [WEATHER],
                    "tool_choice": {"type": "function", "function": {"name": "launch_rockets"}}}), 400,
         "not among the tools"),
        (dict(body={"messages": ASK, "response_format": {"type": "xml"}}), 400, "response_format"),
        (dict(body={"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 8}), 400,
         "context is 1024 tokens"),
    ]
    for kw, status, msg in cases:
        r = _post(server, chat, kw.get("body"), raw=kw.get("raw"))
        assert r.status_code == status, (kw, r.text)
        err = r.json()["error"]
        assert msg in err["message"], (kw, err)
        assert err["type"] == "invalid_request_error"
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    r = _post(server, chat, {"messages": [{"role": "user", "content": "word " * 3000}]})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = _post(server, "/v1/completions", {"prompt": "word " * 3000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = _post(server, "/v1/completions", {"prompt": ["a", "b"]})
    assert r.status_code == 400
    # the official client sees the same errors
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "word " * 3000}])
    assert e.value.status_code == 400 and "context" in str(e.value)
    _still_serving(client)


def test_api_key_is_required(server, client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for key in (None, "wrong-key", KEY + "x"):
        r = _post(server, "/v1/chat/completions", body, key=key)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/models", "/flashmoe/stats"):
        assert httpx.get(server.url + path, timeout=30).status_code == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"x-api-key": KEY}, timeout=60)
    assert r.status_code == 200
    assert httpx.get(server.url + "/nope", timeout=30).status_code == 404
    _still_serving(client)


def test_stats_show_the_expert_cache_at_work(server, client):
    client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "Warm up."}],
                                   max_tokens=8)
    r = httpx.get(server.url + "/flashmoe/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200
    st = r.json()
    assert "2 slots/layer" in st["mode"]
    tot = st["stats"]["total"]
    assert tot["misses"] > 0 and tot["evictions"] > 0 and tot["bytes_read"] > 0
    assert len(st["stats"]["layers"]) == 4
    assert st["server"]["served"] >= 5 and st["server"]["tokens_evaluated"] > 0


# ------------------------------------------------------------------------------------------ the CLI


def test_serve_cli(llama_cpp, tiny_model, tmp_path):
    """`flashmoe serve` as a user runs it: streaming policy, a free port, an API key; SIGTERM stops it."""
    pol = tmp_path / "tiny-stream.yaml"
    pol.write_text("version: 1\nname: tiny-stream\nrules:\n"
                   "  - match: \"blk.*.ffn_{gate,up,down,gate_up}_exps.weight\"\n    place: stream\n"
                   "  - match: \"*\"\n    place: ram\n"
                   "expert_cache:\n  mode: cache\n  cache_slots: 2\n")
    with serve_cli("-m", tiny_model, "--policy", pol, "--api-key", KEY, "--ctx", "1024",
                   "--log-level", "warning") as (p, url, seen):
        assert any("2 slots/layer" in l for l in seen)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        r = c.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], max_tokens=24,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
        _check_call(r.choices[0].message.tool_calls[0], "get_weather")
        st = httpx.get(url + "/flashmoe/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
        assert st["stats"]["total"]["misses"] > 0 and st["stats"]["total"]["evictions"] > 0
        p.terminate()  # uvicorn shuts down gracefully, then re-raises SIGTERM (the conventional exit status)
        assert p.wait(timeout=60) in (0, -15)


def test_serve_cli_errors(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "flashmoe", "serve", "-m", str(tmp_path / "none.gguf")],
                       capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert p.returncode != 0 and "no such model file" in p.stderr and "Traceback" not in p.stderr


def test_serve_cli_experts_per_token_and_tokenizer(llama_cpp, tiny_model):
    """`--experts-per-token` (shown in the mode line, as the output differs), `--threads`,
    `--no-weight-repack`; the tokenizer endpoints answer with the model's own tokens."""
    with serve_cli("-m", tiny_model, "--policy", "stock", "--experts-per-token", "1", "--threads", "1",
                   "--no-weight-repack", "--ctx", "512", "--log-level", "warning") as (p, url, seen):
        assert any("EXPERTS PER TOKEN OVERRIDDEN: 1 of 2" in line and "no weight repacking" in line
                   for line in seen), seen
        toks = httpx.post(url + "/tokenize", json={"prompt": "Once upon a time", "add_special_tokens": False},
                          timeout=60).json()["tokens"]
        assert toks and httpx.post(url + "/detokenize", json={"tokens": toks}, timeout=60).json()["prompt"] \
            == "Once upon a time"
        r = httpx.post(url + "/v1/completions", json={"prompt": toks, "max_tokens": 4, "temperature": 0,
                                                      "logprobs": 2, "echo": True}, timeout=120).json()
        lp = r["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(toks) + r["usage"]["completion_tokens"] + \
            (r["choices"][0]["finish_reason"] == "stop")
        assert all(v <= 0 for v in lp["token_logprobs"][1:]) and lp["token_logprobs"][0] is None
