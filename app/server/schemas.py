"""Request/response bodies of TGI/LoRAX `/generate` (the OpenAI ones are in app/server/openai_schemas.py)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _valid_unicode(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800") that no tokenizer can encode: refuse it here (422)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: lone surrogate at position {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # every text that reaches the tokenizer or a stop check


MAX_BEST_OF = 4  # TGI's default max_best_of is 2; best_of runs that many sequences at once
# Every list a request may carry has a bound in its schema, so parsing is bounded work too (the settings bound
# further, after parsing: `max_merge_sources` <= MAX_MERGE_SOURCES, `max_input_tokens` <= MAX_PROMPT_IDS).
MAX_MERGE_SOURCES = 64  # ids of one merge (merged_adapters, POST /adapters/merge): the setting's ceiling
MAX_PROMPT_IDS = 1 << 16  # a prompt given as token ids


class MergedAdapters(BaseModel):
    """LoRAX's per-request merge: combine several adapters into one for this request."""
    ids: list[str] = Field(min_length=1, max_length=MAX_MERGE_SOURCES)
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(None, max_length=MAX_MERGE_SOURCES)
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] | None = None  # None: linear (LoRAX)
    density: float | None = Field(None, gt=0, le=1)
    majority_sign_method: Literal["total", "frequency"] | None = None  # None: total (LoRAX)

    @model_validator(mode="after")
    def _check(self):
        self.merge_strategy = self.merge_strategy or "linear"
        self.majority_sign_method = self.majority_sign_method or "total"
        if self.weights is not None and len(self.weights) != len(self.ids):
            raise ValueError("merged_adapters.weights must have one weight per id")
        if self.merge_strategy != "linear" and self.density is None:
            raise ValueError(f"merged_adapters.density is required for merge_strategy {self.merge_strategy!r}")
        return self


class Grammar(BaseModel):
    """TGI's guided generation (accepted in the schema; a non-null grammar is refused)."""
    type: Literal["json", "regex", "json_schema"]
    value: object = None


class GenerateParameters(BaseModel):
    """Every field of TGI's `GenerateParameters` (docs/openapi.json) and of lorax-client's `Parameters`.
    Fields we cannot honour are accepted at their default and refused (422) otherwise: `watermark`, `grammar`,
    `response_format`, `api_token`, `adapter_source` other than local. null means the default everywhere (clients
    such as huggingface_hub send every field, null when unset)."""
    model_config = ConfigDict(extra="forbid")
    adapter_id: str | None = None
    adapter_source: Literal["local", "hub", "s3", "pbase"] | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False)  # < 1e-5 with do_sample: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    typical_p: float | None = Field(None, gt=0, le=1)
    do_sample: bool | None = False
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[Text] | None = Field(default_factory=list, max_length=8)
    repetition_penalty: float | None = Field(None, ge=1e-2, le=1e2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    truncate: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)
    watermark: bool | None = False
    details: bool | None = False
    decoder_input_details: bool | None = False
    return_full_text: bool | None = False
    ignore_eos_token: bool | None = False
    top_n_tokens: int | None = Field(None, ge=0, le=20)
    return_k_alternatives: int | None = Field(None, ge=1, le=20)
    grammar: Grammar | None = None
    response_format: dict | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Text
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False
    alternative_tokens: list[AlternativeToken] | None = None  # LoRAX's return_k_alternatives


FinishReason = Literal["length", "eos_token", "stop_sequence", "cancelled"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prompt_tokens: int
    adapter_id: str | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    input_length: int  # TGI's name
    prompt_tokens: int  # LoRAX's name


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorBody(BaseModel):
    error: str
    error_type: str
