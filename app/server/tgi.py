"""The TGI / LoRAX protocol: a request's `parameters` in the engine's terms, and finished generations as TGI's
`GenerateResponse` / `StreamResponse` bodies (field names from TGI's docs/openapi.json and lorax-client's types).

No web framework types: routers call these and return what they build.
"""
from __future__ import annotations

from app.engine.handle import TokenEvent
from app.engine.sampling import SamplingParams
from app.server.generation import Generation, UnsupportedOption, sampling_params
from app.server.schemas import (
    AlternativeToken,
    BestOfSequence,
    Details,
    GenerateParameters,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)


def check_supported(p: GenerateParameters, *, stream: bool) -> None:
    """Refuse (422) the non-default values of options this server cannot honour; never ignore them."""
    if p.adapter_source not in (None, "local"):
        raise UnsupportedOption(f"adapter_source {p.adapter_source!r} is not supported: this server never "
                                "downloads adapters; upload them with POST /adapters")
    if p.api_token is not None:
        raise UnsupportedOption("api_token is not supported: it authenticates adapter downloads, and this server "
                                "never downloads adapters (send null)")
    if p.watermark:
        raise UnsupportedOption("watermark: true is not supported: this server does not watermark (send false)")
    if p.grammar is not None:
        raise UnsupportedOption("grammar is not supported: this server has no guided generation (send null)")
    if p.response_format is not None:
        raise UnsupportedOption("response_format is not supported: this server has no guided generation "
                                "(send null)")
    if stream and p.decoder_input_details:  # the stream's details have no prefill field
        raise UnsupportedOption("decoder_input_details == true is not supported when streaming tokens (TGI's rule);"
                                " use /generate for the prompt tokens' log-probabilities")
    if p.merged_adapters is not None and p.adapter_id is not None:
        raise UnsupportedOption("give either adapter_id or merged_adapters, not both")
    if (p.best_of or 1) > 1:
        if stream:
            raise UnsupportedOption("best_of > 1 is not supported when streaming (TGI's rule)")
        if p.seed is not None:
            raise UnsupportedOption("seed must not be set when best_of > 1 (TGI's rule: each sequence gets its own)")
        if not sampling_params(max_new_tokens=1, default_max_new_tokens=1, **_sampling_fields(p)).do_sample:
            raise UnsupportedOption("best_of > 1 needs sampling (do_sample, temperature, top_k, top_p or typical_p)")


def _sampling_fields(p: GenerateParameters) -> dict:
    return dict(do_sample=bool(p.do_sample), temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                typical_p=p.typical_p)


def sampling(p: GenerateParameters, default_max_new_tokens: int) -> SamplingParams:
    return sampling_params(
        max_new_tokens=p.max_new_tokens, default_max_new_tokens=default_max_new_tokens, **_sampling_fields(p),
        repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty, seed=p.seed,
        stop=p.stop or [], ignore_eos=bool(p.ignore_eos_token),
        top_n_tokens=max(p.top_n_tokens or 0, p.return_k_alternatives or 0),
        prompt_logprobs=bool(p.decoder_input_details))


def body_adapter(ephemeral, p: GenerateParameters) -> tuple[str | None, bool]:
    """(the adapter the body names, whether it names one): `adapter_id`, a per-request merge, or the base."""
    if p.merged_adapters is not None:
        m = p.merged_adapters
        return ephemeral.adapter_id_for(m.ids, m.weights or [1.0] * len(m.ids), m.merge_strategy, m.density,
                                        m.majority_sign_method), True
    return p.adapter_id or None, bool(p.adapter_id)


class Renderer:
    """Turns one request's generations into TGI/LoRAX bodies; decodes top/prefill tokens one by one (as TGI)."""

    def __init__(self, tokenizer, p: GenerateParameters):
        self.tokenizer = tokenizer
        self.p = p
        self._special = set(getattr(tokenizer, "all_special_ids", ()))

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _top(self, t: TokenEvent) -> list[Token]:
        return [Token(id=i, text=self._text(i), logprob=lp, special=i in self._special)
                for i, lp in t.top_tokens[:self.p.top_n_tokens or 0]]

    def token(self, t: TokenEvent) -> Token:
        alternatives = None
        if self.p.return_k_alternatives:
            alternatives = [AlternativeToken(id=i, text=self._text(i), logprob=lp)
                            for i, lp in t.top_tokens[:self.p.return_k_alternatives]]
        return Token(id=t.token_id, text=t.text, logprob=t.logprob, special=t.special, alternative_tokens=alternatives)

    def prefill(self, g: Generation) -> list[PrefillToken]:
        if not self.p.decoder_input_details or g.prompt_logprobs is None:
            return []
        logprobs = [None, *g.prompt_logprobs]
        return [PrefillToken(id=i, text=self._text(i), logprob=lp) for i, lp in zip(g.prompt_ids, logprobs)]

    def generated_text(self, inputs: str, g: Generation) -> str:
        return (inputs + g.text) if self.p.return_full_text else g.text

    def details(self, inputs: str, best: Generation, others: list[Generation]) -> Details:
        top = [self._top(t) for t in best.tokens] if self.p.top_n_tokens else None
        sequences = None
        if others:
            sequences = [BestOfSequence(
                generated_text=self.generated_text(inputs, g), finish_reason=g.finish_reason,
                generated_tokens=len(g.tokens), seed=g.seed, prefill=self.prefill(g),
                tokens=[self.token(t) for t in g.tokens],
                top_tokens=[self._top(t) for t in g.tokens] if self.p.top_n_tokens else None) for g in others]
        return Details(finish_reason=best.finish_reason, generated_tokens=len(best.tokens), seed=best.seed,
                       prompt_tokens=best.prompt_tokens, adapter_id=self.p.adapter_id, prefill=self.prefill(best),
                       tokens=[self.token(t) for t in best.tokens], top_tokens=top, best_of_sequences=sequences)

    def stream_event(self, index: int, t: TokenEvent) -> StreamResponse:
        return StreamResponse(index=index, token=self.token(t),
                              top_tokens=self._top(t) if self.p.top_n_tokens else None)

    def stream_details(self, g: Generation) -> StreamDetails:
        return StreamDetails(finish_reason=g.finish_reason, generated_tokens=len(g.tokens), seed=g.seed,
                             input_length=g.prompt_tokens, prompt_tokens=g.prompt_tokens)


def best_of(generations: list[Generation]) -> tuple[Generation, list[Generation]]:
    """TGI's best_of: the sequence with the highest sum of token log-probabilities, and the others."""
    best = max(range(len(generations)), key=lambda i: generations[i].logprob_sum)
    return generations[best], [g for i, g in enumerate(generations) if i != best]
