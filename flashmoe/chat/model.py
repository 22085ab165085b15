"""A loaded model with its chat template, and the one generation loop that chat and the server share.

``ChatModel.generate`` runs llama.cpp's token loop (``flashmoe.llama.tokens``) after a prompt, reusing
the KV cache's common prefix with the previous call; stop strings are held back while streaming; a
grammar-constrained answer is carried on past ``max_tokens`` until its JSON is complete. With
``logprobs`` / ``prompt_logprobs`` it also reports the log-probabilities the model gives each token
(``flashmoe.chat.logprobs``). One generation runs at a time on a model: callers serialize.
"""
from __future__ import annotations

import codecs
import dataclasses
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from flashmoe import llama as llama_api
from flashmoe.chat.errors import ContextOverflow, RequestError
from flashmoe.chat.logprobs import TokenLogprob, pick
from flashmoe.chat.template import ChatTemplate
from flashmoe.chat.vocab import VocabFacts

# How many tokens past max_tokens a constrained (grammar) answer may take to close its JSON.
CLOSE_EXTRA_TOKENS = 256


@dataclass
class Sampling(llama_api.Sampling):
    """The token loop's sampling settings, with chat's default temperature."""

    temperature: float = 0.8


@dataclass
class GenResult:
    text: str
    tokens: List[int]
    finish_reason: str  # "stop" (end of turn / stop string / grammar complete), "length", "interrupted"
    prompt_tokens: int
    prompt_evaluated: int  # prompt tokens run through the model (the others were reused from the KV cache)
    seconds: float = 0.0
    stopped_by_string: bool = False
    logprobs: Optional[List[TokenLogprob]] = None  # one per token of ``tokens`` (when asked for)
    prompt_logprobs: Optional[List[TokenLogprob]] = None  # one per prompt token (when asked for)
    end_logprob: Optional[TokenLogprob] = None  # the end-of-generation token that ended the answer

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prompt_evaluated


class _StopFilter:
    """Streams text while holding back anything that could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def push(self, piece: str) -> Tuple[str, bool]:
        self.text += piece
        if self.stops:
            # a stop string cannot start before `sent`: whatever could begin one is held back
            hit = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)
            if hit >= 0:
                out = self.text[self.sent:hit]
                self.text = self.text[:hit]
                self.sent = hit
                return out, True
        safe = len(self.text)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        safe = max(safe, self.sent)
        out = self.text[self.sent:safe]
        self.sent = safe
        return out, False

    def flush(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out



class _Answer:
    """One answer being generated: its tokens, its text (through the stop filter, streamed to
    ``on_text``), their log-probabilities when asked for, and how it ended."""

    def __init__(self, model: "ChatModel", stops: Sequence[str], on_text: Optional[Callable[[str], None]],
                 top_n: Optional[int]):
        self.model = model
        self.on_text = on_text
        self.top_n = top_n
        self.out: List[int] = []
        self.logprobs: Optional[List[TokenLogprob]] = [] if top_n is not None else None
        self.end: Optional[TokenLogprob] = None
        self.filt = _StopFilter(stops)
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finish = "length"
        self.by_string = False

    def _logprob(self, step: llama_api.Step) -> TokenLogprob:
        assert step.logits is not None and self.top_n is not None
        return pick(step.logits[None, :], [step.token], self.top_n)[0]

    def take(self, step: llama_api.Step) -> bool:
        """Adds the picked token; True when the answer is finished (end of turn, or a stop string)."""
        tok = step.token
        if self.model.is_eog(tok):
            if self.top_n is not None:
                self.end = self._logprob(step)
            self.finish = "stop"
            return True
        self.out.append(tok)
        if self.logprobs is not None:
            self.logprobs.append(self._logprob(step))
        piece = self.dec.decode(self.model.llama.detokenize([tok]))
        if piece:
            emit, hit = self.filt.push(piece)
            if emit and self.on_text:
                self.on_text(emit)
            if hit:
                self.finish, self.by_string = "stop", True
                return True
        return False

    def close(self) -> None:
        """The text held back (an incomplete UTF-8 character, a possible stop string's start) goes out."""
        if self.by_string:
            return
        tail = self.dec.decode(b"", final=True)
        if tail:
            self.filt.text += tail
        rest = self.filt.flush()
        if rest and self.on_text:
            self.on_text(rest)


class ChatModel:
    """A loaded model (an Engine or a llama_cpp.Llama) with its chat template.

    Not thread-safe: one generation at a time.
    """

    def __init__(self, engine_or_llama, name: Optional[str] = None):
        from flashmoe.engine import Engine

        if isinstance(engine_or_llama, Engine):
            self.engine: Optional[Engine] = engine_or_llama
            self.llama = engine_or_llama.llama
            path = engine_or_llama.model_path
        else:
            self.engine = None
            self.llama = engine_or_llama
            path = getattr(engine_or_llama, "model_path", "model")
        self.name = name or os.path.splitext(os.path.basename(str(path)))[0]
        self.template = ChatTemplate.from_llama(self.llama)
        self.vocab = VocabFacts(self.llama)
        self.n_evaluated = 0  # tokens run through the model since load (prompt + generated)
        self._install_eval_counter()

    # --- plumbing
    def _install_eval_counter(self):
        L = self.llama
        orig = L.eval

        def counting_eval(tokens):
            self.n_evaluated += len(tokens)
            try:
                return orig(tokens)
            except RuntimeError as e:  # a failed decode: the hook says why (an expert read error, ...)
                raise self._decode_error(e) from None

        L.eval = counting_eval  # instance attribute: Llama.generate calls self.eval

    def _decode_error(self, e: RuntimeError) -> Exception:
        return self.engine.decode_error(e) if self.engine is not None else e

    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    def tokenize(self, text: str) -> List[int]:
        return self.llama.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=True)

    def tokenize_data(self, text: str, spans) -> List[int]:
        """Tokens of ``text`` whose ``spans`` [(start, end)] are data (a client's message content): special
        tokens are parsed in the template's text only, so a message that spells one out stays text."""
        out: List[int] = []
        pos = 0
        for a, e in list(spans) + [(len(text), len(text))]:
            if a > pos:
                out += self.tokenize(text[pos:a])
            if e > a:
                out += self.llama.tokenize(text[a:e].encode("utf-8", "replace"), add_bos=False, special=False)
            pos = e
        return out

    def min_tokens(self, text: str, limit: int) -> int:
        """A lower bound of ``len(self.tokenize(text))`` in linear time (``VocabFacts.min_tokens``)."""
        return self.vocab.min_tokens(text, limit)

    def is_eog(self, tok: int) -> bool:
        return llama_api.is_eog(self.llama, tok)

    def grammar_for_schema(self, schema: Optional[dict], what: str = "response_format"):
        """A llama.cpp grammar for JSON matching ``schema`` (None: any JSON object).

        Strings exclude raw control characters, so that the output is strict JSON.
        """
        from llama_cpp.llama_grammar import LlamaGrammar

        from flashmoe.schemas import SchemaProblem, schema_to_grammar

        # the schema is checked (metaschema, impossible or unsupported constructs) and the grammar is
        # parsed by a pure-Python mirror of llama.cpp's parser first: a grammar llama.cpp cannot parse
        # would crash the process (llama-cpp-python adds the NULL sampler it gets)
        try:
            gbnf = schema_to_grammar(schema, what)
        except SchemaProblem as e:
            raise RequestError(str(e), param="tools" if "tool" in what else "response_format") from None
        return LlamaGrammar.from_string(gbnf, verbose=False)

    # --- log-probabilities of a prompt
    def score_prompt(self, tokens: Sequence[int], top_n: int) -> List[TokenLogprob]:
        """The log-probability of each prompt token given the tokens before it (the first one: None, with
        no alternatives), with the ``top_n`` most likely tokens at each position. One evaluation of the
        whole prompt from an empty context with logits for every position (``llama.eval_all_rows``, the
        batch decode flashmoe.quality uses); the KV cache then holds the prompt with its last logits
        current, so that generate() on the same prompt goes on from there without evaluating again."""
        toks = [int(t) for t in tokens]
        out = [TokenLogprob(toks[0], None, [])]

        def take(first: int, rows) -> None:
            # row i predicts token first+i+1; the prompt's last row predicts the first generated token
            n = min(len(rows), len(toks) - 1 - first)
            if n > 0:
                out.extend(pick(rows[:n], toks[first + 1:first + 1 + n], top_n))

        self.n_evaluated += len(toks)
        try:
            llama_api.eval_all_rows(self.llama, toks, take)
        except RuntimeError as e:
            raise self._decode_error(e) from None
        return out

    # --- the one generation loop
    def generate(
        self,
        prompt_tokens: List[int],
        *,
        max_tokens: int,
        sampling: Sampling,
        grammar=None,
        must_complete: bool = False,
        stop: Sequence[str] = (),
        on_text: Optional[Callable[[str], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        logprobs: Optional[int] = None,
        prompt_logprobs: Optional[int] = None,
    ) -> GenResult:
        """Generate after ``prompt_tokens`` (the common prefix with the previous call is reused from
        the KV cache). ``must_complete``: a grammar answer is carried on past ``max_tokens`` (favouring
        closing tokens) until the grammar is complete, at most CLOSE_EXTRA_TOKENS more. ``max_tokens``
        0 generates nothing. ``logprobs`` (a number of alternatives, 0-20): the log-probability of each
        generated token; ``prompt_logprobs``: the same for each prompt token (``score_prompt``)."""
        n_prompt = len(prompt_tokens)
        if n_prompt == 0:
            raise RequestError("the prompt is empty", param="messages")
        room = self.n_ctx() - n_prompt
        if room < 1:
            raise ContextOverflow(f"the prompt is {n_prompt} tokens; this model's context is {self.n_ctx()} tokens "
                                  f"(serve/chat with a larger --ctx, or shorten the conversation)")
        max_tokens = max(0, min(int(max_tokens), room))
        cap = min(room, max_tokens + CLOSE_EXTRA_TOKENS) if (grammar is not None and must_complete) else max_tokens
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=random.getrandbits(31))
        t0 = time.perf_counter()
        ev0 = self.n_evaluated
        scored = self.score_prompt(prompt_tokens, prompt_logprobs) if prompt_logprobs is not None else None
        ans = _Answer(self, () if grammar is not None else stop, on_text, logprobs)  # a grammar ends the answer
        prompt_eval = None
        if max_tokens > 0:
            processors = self._processors(grammar, must_complete, max_tokens, ans.out)
            prompt_eval = self._token_loop(ans, prompt_tokens, sampling, grammar, processors, cap, should_stop, ev0)
        ans.close()
        if prompt_eval is None:
            prompt_eval = self.n_evaluated - ev0
        return GenResult(text=ans.filt.text, tokens=ans.out, finish_reason=ans.finish, prompt_tokens=n_prompt,
                         prompt_evaluated=prompt_eval, seconds=time.perf_counter() - t0,
                         stopped_by_string=ans.by_string, logprobs=ans.logprobs, prompt_logprobs=scored,
                         end_logprob=ans.end)

    def _token_loop(self, ans: _Answer, prompt_tokens: List[int], sampling: Sampling, grammar, processors,
                    cap: int, should_stop: Optional[Callable[[], bool]], ev0: int) -> int:
        """Runs the token loop until the answer ends, ``cap`` tokens, or ``should_stop()``; returns the
        number of prompt tokens that were evaluated (the rest came from the KV cache)."""
        prompt_eval = None
        # the one token loop (flashmoe/llama.py); the KV cache's common prefix with the last call is reused
        gen = llama_api.tokens(self.llama, prompt_tokens, sampling, grammar=grammar, logits_processor=processors,
                               keep_prefix=True, with_logits=ans.top_n is not None)
        try:
            for step in gen:
                if prompt_eval is None:
                    prompt_eval = self.n_evaluated - ev0
                if ans.take(step):
                    break
                if len(ans.out) >= cap:
                    ans.finish = "length"
                    break
                if should_stop is not None and should_stop():
                    ans.finish = "interrupted"
                    break
        finally:
            gen.close()
        return self.n_evaluated - ev0 if prompt_eval is None else prompt_eval

    def _processors(self, grammar, must_complete: bool, max_tokens: int, out: List[int]):
        """The logits processors of a constrained answer: closing tokens favoured in the last quarter of
        the budget (``must_complete``), and its bytes kept valid UTF-8; None for a free answer."""
        from llama_cpp import LogitsProcessorList

        if grammar is None:
            return None
        procs = []
        if must_complete:
            ids, bias = self.vocab.closing_bias()
            wrap_from = max(0, max_tokens - min(16, max_tokens // 4))

            def close_json(_input_ids, scores):
                if len(out) >= wrap_from and len(ids):
                    scores[ids] += bias
                return scores

            procs.append(close_json)
        # a constrained answer is strict JSON: its bytes must be valid UTF-8 too (llama.cpp's grammar
        # accepts surrogates and overlong forms that byte-level tokens can spell, which decode to
        # U+FFFD and break length limits)
        procs.append(self.vocab.utf8_guard(out))
        return LogitsProcessorList(procs)
