"""What an engine serves and how much it takes: `EngineConfig` (the `OLORA_*` settings' engine half, field names
stable for `Settings.engine_config()`), and the limits every submitted request is checked against."""
from __future__ import annotations

from dataclasses import dataclass

from .cpu_linear import CPU_GEMMS
from .errors import InputTooLong, InvalidRequest
from .lora_layers import KERNELS
from .sampling import SamplingParams

DECODE_GRAPHS = ("auto", "off", "buckets", "cuda")


@dataclass
class EngineConfig:
    model: str | None = None  # HF id or local directory; None = the embedded default model
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    quantize: str = "none"  # none | nf4 | fp4 | int8 (bitsandbytes)
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda | cuda:N
    max_loras: int = 0  # device slots; 0 = auto (max_batch_size where memory allows: slot_budget.py)
    max_cpu_adapters: int = 64  # host-memory LRU entries
    max_rank: int = 64  # slot rank r_max; adapters above it are refused
    max_batch_size: int = 16  # running rows
    max_batch_tokens: int = 2048  # padded prompt tokens prefilled per iteration
    max_input_tokens: int = 1024
    max_total_tokens: int = 1536  # prompt + max_new_tokens; also the KV row length
    target_modules: tuple[str, ...] | None = None  # e.g. ("q_proj", "v_proj"); None = every Linear of the blocks
    max_waiting: int = 256  # bounded waiting queue (QueueFull beyond)
    kernel: str = "auto"  # LoRA kernel: auto | rows | bgmv | grouped | reference (tests)
    compile: str = "off"  # on = torch.compile the decode forward (faster steps after ~1 min/graph; benchmarks.md)
    # auto (cuda on a CUDA device with unquantized weights, else off) | off | buckets (decode padded to static
    # shapes) | cuda (buckets + CUDA graphs); the engine resolves auto (cuda_graphs.choose_decode_graph)
    decode_graph: str = "auto"
    cpu_threads: int = 0  # intra-op threads of the forwards on CPU; 0 = auto: usable CPUs - 1 (cpu_threads.py)
    cpu_gemm: str = "onednn"  # fp32 Linear layers on CPU: onednn (oneDNN matmul) | aten (F.linear) (cpu_linear.py)

    def validate(self) -> None:
        for name in ("max_loras", "cpu_threads"):
            if int(getattr(self, name)) < 0:
                raise InvalidRequest(f"EngineConfig.{name} must be >= 0 (0 = auto), got {getattr(self, name)}")
        positive = ("max_cpu_adapters", "max_rank", "max_batch_size", "max_batch_tokens",
                    "max_input_tokens", "max_total_tokens", "max_waiting")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise InvalidRequest(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_input_tokens >= self.max_total_tokens:
            raise InvalidRequest("EngineConfig.max_input_tokens must be < max_total_tokens")
        if self.max_input_tokens > self.max_batch_tokens:
            raise InvalidRequest("EngineConfig.max_input_tokens must be <= max_batch_tokens")
        if self.cpu_gemm not in CPU_GEMMS:
            raise InvalidRequest(f"EngineConfig.cpu_gemm must be one of {CPU_GEMMS}")
        if self.kernel not in KERNELS:
            raise InvalidRequest(f"EngineConfig.kernel must be one of {KERNELS}")
        if self.compile not in ("off", "on") or self.decode_graph not in DECODE_GRAPHS:
            raise InvalidRequest("EngineConfig.compile must be off|on and decode_graph auto|off|buckets|cuda")

    def check_request(self, prompt_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
        """Raise InvalidRequest / InputTooLong unless the request fits this engine."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("params must be a SamplingParams")
        if not prompt_ids or not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt_ids):
            raise InvalidRequest(f"prompt_ids must be a non-empty list of token ids in [0, {vocab_size})")
        if len(prompt_ids) > self.max_input_tokens:
            raise InputTooLong(f"prompt has {len(prompt_ids)} tokens, max_input_tokens is {self.max_input_tokens}")
        if len(prompt_ids) + params.max_new_tokens > self.max_total_tokens:
            raise InputTooLong(f"prompt tokens ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) "
                               f"must be <= max_total_tokens ({self.max_total_tokens})")
