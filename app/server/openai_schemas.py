"""Request bodies of the OpenAI-compatible endpoints: every field of the `openai` package's
`CompletionCreateParams` and chat `CompletionCreateParams` (tests/test_openai_parity.py checks the list).

Unknown fields are refused (extra="forbid"). Known options this server cannot honour are accepted only at their
neutral values (`_ONLY`) and refused otherwise, naming the option: never silently ignored.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.engine.sampling import MAX_STOP_SEQUENCES
from app.server.schemas import MAX_PROMPT_IDS, Text

MAX_CHOICES = 8  # n (and best_of) per prompt
MAX_PROMPTS = 16  # prompts in one /v1/completions list
MAX_MESSAGES = 1024  # chat messages of one request (the prompt's token bound applies after the template)
MAX_CONTENT_PARTS = 1024  # text parts of one chat message
TokenIds = Annotated[list[int], Field(max_length=MAX_PROMPT_IDS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class OpenAIRequest(BaseModel):
    """Fields /v1/completions and /v1/chat/completions share."""
    model_config = ConfigDict(extra="forbid")
    _ONLY: ClassVar[dict[str, tuple]] = {"logit_bias": (None, {}), "stream_options.include_obfuscation":
                                         (None, False), "skip_special_tokens": (None, True),
                                         "no_stop_trim": (None, False), "return_hidden_states": (None, False)}

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping: changes nothing here
    ignore_eos: bool = False  # vLLM's extra parameter: generate max_tokens even past EOS (benchmarks)
    # vLLM / SGLang extras that vllm-router always forwards, at their defaults (what this server does anyway)
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    return_hidden_states: bool | None = None

    @model_validator(mode="after")
    def _refuse_unhonoured(self):
        for name, allowed in self._ONLY.items():
            head, _, tail = name.partition(".")
            value = getattr(self, head)
            if tail and value is not None:
                value = getattr(value, tail)
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise ValueError(f"{name}={value!r} is not supported by this server (it would be ignored, so it "
                                 f"is refused); leave it out or send {allowed[0]!r}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAIRequest):
    _ONLY: ClassVar[dict[str, tuple]] = {**OpenAIRequest._ONLY, "suffix": (None,)}

    prompt: (Text | Annotated[list[Text], Field(max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)])
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_prompts(self):
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= MAX_PROMPTS:
            raise ValueError(f"prompt must hold 1 to {MAX_PROMPTS} prompts, got {len(self.prompt)}")
        if self.best_of is not None and self.best_of < self.choices_per_prompt:
            raise ValueError("best_of must be >= n")
        if (self.best_of or 1) > self.choices_per_prompt and self.stream:
            raise ValueError("best_of > n cannot be streamed")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or token ids taken as they are."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(x, int) for x in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)]
    name: str | None = None

    def for_template(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        out = {"role": self.role, "content": content}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(OpenAIRequest):
    _ONLY: ClassVar[dict[str, tuple]] = {
        **OpenAIRequest._ONLY, "audio": (None,), "function_call": (None, "none"), "functions": (None, []),
        "metadata": (None,), "modalities": (None, ["text"]), "moderation": (None,), "prediction": (None,),
        "prompt_cache_options": (None,), "reasoning_effort": (None,), "response_format": (None, {"type": "text"}),
        "service_tier": (None, "auto", "default"), "store": (None, False), "tool_choice": (None, "none"),
        "tools": (None, []), "verbosity": (None,), "web_search_options": (None,)}

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool | None = None  # only means something with tools, which are refused
    prompt_cache_key: str | None = None  # a cache hint: changes nothing here
    prompt_cache_retention: str | None = None  # a cache hint: changes nothing here
    safety_identifier: str | None = None  # an end-user id for the caller's own bookkeeping
    # refused unless neutral (see _ONLY)
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    metadata: Any = None
    modalities: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_options: Any = None
    reasoning_effort: Any = None
    response_format: Any = None
    service_tier: Any = None
    store: Any = None
    tool_choice: Any = None
    tools: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "olora-serve"
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
