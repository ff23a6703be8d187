"""olora_core: OLoRA initialisation, OLoRA->LoRA conversion from adapter files, training helper.

This package never imports the server (`app`) or FastAPI.
"""

__version__ = "0.1.0"
