"""Typed errors of olora_core. Every message names the file, key or shapes involved.

All errors derive from `OLoRAError` (a `ValueError`), so callers (the CLI, the server) can catch one type
and turn it into a message + exit code 2 / HTTP 4xx.
"""
from __future__ import annotations


class OLoRAError(ValueError):
    """Base class of every error raised on purpose by olora_core."""


class AdapterFormatError(OLoRAError):
    """A PEFT adapter directory is unusable: missing/invalid files, pickle weights, not a LoRA config,
    `auto_mapping` or another key that names code, non-float tensors."""


class AdapterMismatchError(OLoRAError):
    """The initial and the trained adapter of a conversion do not belong together."""


class NothingToConvertError(OLoRAError):
    """Both adapters are plain LoRA: there is no mutated init to subtract."""


class NonFiniteError(OLoRAError):
    """A tensor holds NaN or Inf."""


class RankError(OLoRAError):
    """A rank is impossible for a layer (r > min(in, out)) or disagrees with the config."""


class UnsupportedLayerError(OLoRAError):
    """A layer type / LoRA variant this code cannot handle exactly (refused rather than done wrong)."""


class UnsupportedInitError(OLoRAError):
    """An `init_lora_weights` kind whose conversion is not the OLoRA/PiSSA math (e.g. LoftQ)."""


class OutputExistsError(OLoRAError):
    """The output directory exists and is not empty, and overwrite was not requested."""


class MergeError(OLoRAError):
    """Adapters cannot be combined (merge_adapters), or an adapter cannot be merged into a base model
    (merge_into_base), exactly: unequal ranks, bad density, key/shape mismatches, unconverted OLoRA/PiSSA."""


class MagnitudeError(OLoRAError):
    """An adapter's served delta s·B·A (after alpha/r, patterns, rsLoRA, merge weights) is not finite or is far
    larger than the base weight it is added to (`adapter_format.MAX_DELTA_RATIO`)."""


class UnsupportedConfigError(AdapterFormatError):
    """A well-formed config that asks for something never accepted: another peft_type, code to import."""
