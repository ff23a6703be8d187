"""OpenAI response pieces: finish reasons, stop trimming, usage, and log-probabilities in the two formats the
`openai` package reads (completions' legacy `Logprobs`, chat's `ChoiceLogprobs` of `ChatCompletionTokenLogprob`).

Log-probabilities are those of the distribution each token was drawn from (after temperature/top-k/top-p and
penalties; the model's own for greedy decoding), as TGI reports them. No web framework types.
"""
from __future__ import annotations

from app.engine.handle import TokenEvent
from app.server.generation import Generation

FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop", "cancelled": "stop"}


def finish_reason(g: Generation) -> str:
    return FINISH.get(g.finish_reason, "stop")


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def trim_stop(text: str, stop: list[str], reason: str | None) -> str:
    """OpenAI leaves the stop sequence out of the text (TGI keeps it)."""
    if reason == "stop_sequence":
        for s in stop:
            if text.endswith(s):
                return text[: -len(s)]
    return text


def usage(prompt_tokens: int, generations: list[Generation]) -> dict:
    completion = sum(len(g.tokens) for g in generations)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


class Logprobs:
    """Renders tokens' log-probabilities; token strings are each token decoded alone (as vLLM and TGI do), their
    `bytes` the token's own bytes from the vocabulary (app/engine/token_bytes.py): a token holding part of a
    character decodes alone to U+FFFD, but its bytes joined with its neighbours' give the text back."""

    def __init__(self, tokenizer, token_bytes):
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes  # token id -> bytes

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def completion(self, tokens: list[TokenEvent], k: int, *, offset: int, prompt: Generation | None = None) -> dict:
        """Legacy completions `logprobs` ({tokens, token_logprobs, top_logprobs, text_offset}); `offset` is where
        the first token's text starts in the choice's text. With `prompt` (echo) the prompt's tokens come first,
        from offset 0 (the first has no log-probability; prompt positions list only their own token)."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if prompt is not None:
            logprobs = [None, *(prompt.prompt_logprobs or [None] * (len(prompt.prompt_ids) - 1))]
            at = 0
            for token_id, lp in zip(prompt.prompt_ids, logprobs):
                s = self.text(token_id)
                out["tokens"].append(s)
                out["token_logprobs"].append(lp)
                out["top_logprobs"].append(None if lp is None else {s: lp})
                out["text_offset"].append(at)
                at += len(s)
        for t in tokens:
            s = self.text(t.token_id)
            out["tokens"].append(s)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append(self._top_dict(t.top_tokens[:k]) if k else {s: t.logprob})
            out["text_offset"].append(offset)
            offset += len(t.text)
        return out

    def _top_dict(self, top) -> dict[str, float]:
        """{token text: logprob}, most likely first; tokens that decode alike keep the most likely's value."""
        out: dict[str, float] = {}
        for token_id, logprob in top:
            out.setdefault(self.text(token_id), logprob)
        return out

    def _entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.text(token_id), "logprob": logprob, "bytes": list(self.token_bytes(token_id))}

    def chat(self, tokens: list[TokenEvent], k: int) -> dict:
        """Chat `logprobs`: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
        content = [{**self._entry(t.token_id, t.logprob),
                    "top_logprobs": [self._entry(i, lp) for i, lp in t.top_tokens[:k]]} for t in tokens]
        return {"content": content, "refusal": None}
