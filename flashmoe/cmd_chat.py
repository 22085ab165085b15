"""`flashmoe chat`: an interactive chat in the terminal, with tool calls, on the streaming engine.

Reads one message per line (a terminal or a pipe). The model's answer streams to stdout; status
lines go to stderr. The conversation and the KV cache are kept between turns: each turn only
evaluates its new tokens.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import List, Optional

import click

from flashmoe.errors import FlashMoEError

MAX_TOOL_ROUNDS = 8  # model answers per user message (each tool result gets the model an answer)
TOOL_TIMEOUT_S = 120

HELP = """commands:
  /reset        start a new conversation (the system prompt stays)
  /stats        expert-cache and I/O figures of the streaming engine, context use
  /tools        the tools the model may call
  /help         this help
  /exit, /quit  leave (also Ctrl-D)
Ctrl-C stops the answer being written; the conversation goes on.
When the model calls a tool you give the result (one line of text or JSON); /cancel declines the call."""


class _EndOfInput(Exception):
    pass


class _Console:
    """Line input from a terminal (with editing) or a pipe; prompts go to stderr when piped."""

    def __init__(self):
        self.interactive = sys.stdin.isatty()
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass

    def read(self, prompt: str) -> str:
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                click.echo("", err=True)
                raise _EndOfInput()
        if prompt:
            sys.stderr.write(prompt)
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise _EndOfInput()
        return line.rstrip("\r\n")

    def say(self, text: str = "", nl: bool = True):
        sys.stdout.write(text + ("\n" if nl else ""))
        sys.stdout.flush()

    def note(self, text: str):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


class _StopFlag:
    """Ctrl-C while an answer is being written sets the flag (the answer stops at the next token)."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        self.set = False
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, *_):
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def __call__(self) -> bool:
        return self.set


def _format_stats(engine, session) -> str:
    from flashmoe.report import fmt_bytes

    L = engine.llama
    rows = [("mode", engine.mode_line()),
            ("context", f"{L.n_tokens} of {L.n_ctx()} tokens in the KV cache; {len(session.messages)} messages"),
            ("tokens evaluated", f"{session.model.n_evaluated} since load")]
    st = engine.stats() or {}
    c = st.get("total")
    if c:
        acc = c["hits"] + c["misses"]
        rows += [
            ("expert cache", f"hit rate {100 * c['hit_rate']:.1f}% ({c['hits']} hits, {c['misses']} misses of {acc}), "
                             f"{c['evictions']} evictions"),
            ("expert reads", f"{fmt_bytes(c['bytes_read'])}, read time {c['read_s']:.3f} s, "
                             f"stall {c['stall_s']:.3f} s"),
        ]
        info = st.get("info") or {}
        if info.get("n_slots"):
            rows.append(("cache slots", f"{info['n_slots']} per layer"))
    else:
        rows.append(("expert cache", "none (experts are not streamed with this policy)"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _run_tool_cmd(cmd: str, call) -> str:
    """Runs the hook: the call as JSON on stdin ({"id", "name", "arguments"}), the result from stdout."""
    try:
        argv = shlex.split(cmd)
    except ValueError as e:
        return f"error: --tool-cmd cannot be parsed: {e}"
    env = dict(os.environ, FLASHMOE_TOOL_NAME=call.name, FLASHMOE_TOOL_ARGUMENTS=call.arguments,
               FLASHMOE_TOOL_CALL_ID=call.id)
    payload = json.dumps({"id": call.id, "name": call.name, "arguments": call.args()}, ensure_ascii=False)
    try:
        p = subprocess.run(argv, input=payload, capture_output=True, text=True, env=env, timeout=TOOL_TIMEOUT_S)
    except FileNotFoundError:
        return f"error: tool command not found: {argv[0] if argv else cmd}"
    except subprocess.TimeoutExpired:
        return f"error: the tool command took more than {TOOL_TIMEOUT_S} s"
    except KeyboardInterrupt:
        return "error: the tool command was interrupted by the user"
    out = p.stdout.strip()
    if p.returncode != 0:
        err = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
        return f"error: the tool command exited with status {p.returncode}" + (f": {err[0]}" if err else "") \
            + (f"\n{out}" if out else "")
    return out


def _tool_result(con: _Console, call, tool_cmd: Optional[str], yes: bool) -> str:
    if tool_cmd:
        run = yes
        if not yes:
            ans = con.read(f"run `{tool_cmd}` for {call.name}? [y/N] ").strip().lower()
            run = ans in ("y", "yes")
        if run:
            res = _run_tool_cmd(tool_cmd, call)
            con.say(f"[tool result] {res}")
            return res
    line = con.read(f"result of {call.name} (one line; /cancel to decline)> ")
    if line.strip() == "/cancel":
        res = "The user declined to run this tool."
        con.say(f"[tool result] {res}")
        return res
    return line


@click.command("chat")
@click.option("-m", "--model", "model_path", required=True, help="The GGUF model (first shard of a split model).")
@click.option("--policy", default=None, help="Placement policy: a shipped name (stream, stock, ...) or a YAML file. Default: auto (in RAM when the model fits, else stream).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--tools", "tools_file", default=None,
              help="JSON file of tools the model may call (OpenAI 'tools' list, or bare function objects).")
@click.option("--tool-choice", default="auto", show_default=True,
              help="auto, none, required, or a function name (forced calls are grammar-constrained). "
                   "Applies to the first answer after each message of yours.")
@click.option("--tool-cmd", default=None,
              help="Command that runs a tool call: gets the call as JSON on stdin, prints the result. "
                   "Asked for confirmation each time unless --yes.")
@click.option("--yes", is_flag=True, help="Run --tool-cmd without asking.")
@click.option("-n", "--max-tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="Most tokens per answer.")
@click.option("--temp", default=0.7, show_default=True, type=click.FloatRange(min=0.0), help="Temperature (0: greedy).")
@click.option("--seed", default=None, type=int, help="Sampling seed.")
@click.option("--ctx", "--n-ctx", "n_ctx", type=click.IntRange(min=64), default=None,
              help="Context size in tokens (default: the policy's). --n-ctx is the older spelling.")
@click.option("--verbose", is_flag=True, help="llama.cpp's own logging.")
def chat(model_path, policy, system, tools_file, tool_choice, tool_cmd, yes, max_tokens, temp, seed, n_ctx,
             verbose):
    """Chat with MODEL in the terminal (or from a pipe: one message per line).

    Nothing runs without your say-so: tool calls are shown, and you type their results, or
    confirm each run of --tool-cmd (--yes confirms them all).
    """
    from flashmoe.chat import ChatModel, ChatSession, RequestError, Sampling, load_tools_file, normalize_tool_choice

    if not os.path.isfile(model_path):
        raise FlashMoEError(f"no such model file: {model_path}")
    tools: List[dict] = load_tools_file(tools_file) if tools_file else []
    if tool_cmd and not tools:
        raise FlashMoEError("--tool-cmd needs --tools")
    if tools:
        try:
            normalize_tool_choice(tool_choice, tools)
        except RequestError as e:
            raise FlashMoEError(f"--tool-choice: {e}")
    elif tool_choice not in ("auto", "none"):
        raise FlashMoEError("--tool-choice needs --tools")
    from flashmoe.engine import Engine

    con = _Console()
    engine = Engine(model_path, policy=policy, n_ctx=n_ctx, verbose=verbose)
    try:
        model = ChatModel(engine)
        session = ChatSession(model, system=system, tools=tools, tool_choice=tool_choice if tools else "none",
                              max_tokens=max_tokens, sampling=Sampling(temperature=temp, seed=seed))
        con.note(f"model {os.path.basename(model_path)}: {engine.mode_line()}")
        if not model.template.from_model:
            con.note("note: the model has no chat template; using ChatML")
        if tools:
            con.note(f"tools: {', '.join(t['function']['name'] for t in tools)} (tool choice: {tool_choice})")
        con.note("/help for commands, Ctrl-D or /exit to leave")
        _loop(con, engine, session, tool_cmd, yes)
    finally:
        engine.close()


def _loop(con: _Console, engine, session, tool_cmd: Optional[str], yes: bool):
    from flashmoe.chat import ContextOverflow

    while True:
        try:
            line = con.read("> " if con.interactive else "")
        except _EndOfInput:
            return
        except KeyboardInterrupt:
            con.note("\n(Ctrl-D or /exit to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit", "/bye"):
                return
            if cmd == "/reset":
                session.reset()
                con.note("(new conversation)")
            elif cmd == "/stats":
                con.say(_format_stats(engine, session))
            elif cmd == "/tools":
                if not session.tools:
                    con.say("no tools (start with --tools FILE)")
                for t in session.tools:
                    fn = t["function"]
                    con.say(f"{fn['name']}: {fn.get('description', '')}".rstrip(": ")
                            + f"\n  parameters: {json.dumps(fn['parameters'], ensure_ascii=False)}")
            elif cmd == "/help":
                con.say(HELP)
            else:
                con.note(f"unknown command {cmd} (/help)")
            continue
        n_before = len(session.messages)
        session.add_user(line)
        try:
            _answer(con, session, tool_cmd, yes)
        except ContextOverflow as e:
            del session.messages[n_before:]
            con.note(f"error: {e}; /reset starts a new conversation")
        except _EndOfInput:
            return


def _answer(con: _Console, session, tool_cmd: Optional[str], yes: bool):
    choice = None  # the session's tool choice for the first answer, then auto
    for _round in range(MAX_TOOL_ROUNDS):
        wrote = [False]

        def show(piece: str):
            wrote[0] = True
            con.say(piece, nl=False)

        t0 = time.perf_counter()
        with _StopFlag() as stop:
            turn = session.respond(tool_choice=choice, on_content=show, should_stop=stop)
        dt = time.perf_counter() - t0
        out = turn.outcome
        if wrote[0]:
            con.say("")
        if out.finish_reason == "interrupted":
            con.say("[stopped]")
        g = out.gen
        rate = f", {g.completion_tokens / g.seconds:.1f} tok/s" if g.seconds > 0 and g.completion_tokens else ""
        con.note(f"[prompt {turn.prompt_tokens} tokens: {turn.reused_tokens} reused from the KV cache, "
                 f"{turn.prompt_evaluated} evaluated; {g.completion_tokens} generated in {dt:.2f} s{rate}; "
                 f"finish: {out.finish_reason}]")
        if not out.tool_calls or out.finish_reason == "interrupted":
            return
        for call in out.tool_calls:
            con.say(f"[tool call] {call.name} {call.arguments}")
        for call in out.tool_calls:
            try:
                result = _tool_result(con, call, tool_cmd, yes)
            except KeyboardInterrupt:
                result = "The user declined to run this tool."
                con.say(f"[tool result] {result}")
            session.add_tool_result(call, result)
        choice = "auto"
    con.note(f"(stopped after {MAX_TOOL_ROUNDS} tool rounds)")
