"""Request/response bodies: LoRAX/TGI `/generate` and the OpenAI-compatible endpoints."""
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


class MergedAdapters(BaseModel):
    """LoRAX's per-request merge: combine several adapters into one for this request."""
    ids: list[str] = Field(min_length=1)
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = None
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float | None = Field(None, gt=0, le=1)
    majority_sign_method: Literal["total", "frequency"] = "total"

    @model_validator(mode="after")
    def _check(self):
        if self.weights is not None and len(self.weights) != len(self.ids):
            raise ValueError("merged_adapters.weights must have one weight per id")
        if self.merge_strategy != "linear" and self.density is None:
            raise ValueError(f"merged_adapters.density is required for merge_strategy {self.merge_strategy!r}")
        return self


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_id: str | None = None
    adapter_source: Literal["local", "hub"] | None = None
    merged_adapters: MergedAdapters | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False)  # < 1e-5 with do_sample: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    do_sample: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[Text] = Field(default_factory=list, max_length=16)
    repetition_penalty: float | None = Field(None, ge=1e-2, le=1e2)
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    ignore_eos_token: bool = False


class GenerateRequest(BaseModel):
    inputs: Text
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "cancelled"]
    generated_tokens: int
    seed: int | None = None
    prompt_tokens: int
    adapter_id: str | None = None
    tokens: list[Token] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorBody(BaseModel):
    error: str
    error_type: str


# ---- OpenAI-compatible ---------------------------------------------------------------------------------
class _OpenAIRequest(BaseModel):
    """Fields /v1/completions and /v1/chat/completions share."""
    model: str
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extra parameter: generate max_tokens even past EOS (benchmarks)


class CompletionRequest(_OpenAIRequest):
    prompt: Text | list[Text]
    max_tokens: int | None = Field(16, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "olora-serve"
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
