"""The embedded default model: a ~3.4M-parameter Llama pretrained on stdlib docstrings, shipped as package data.

It lets the server and the tests run offline with a real (not random) causal LM. The directory is a
standard Hugging Face checkpoint: ``AutoModelForCausalLM.from_pretrained(default_model_path())`` and
``AutoTokenizer.from_pretrained(default_model_path())`` load it. How it was built: docs/default-model.md;
rebuild with scripts/build_default_model.py (then update DEFAULT_MODEL_SHA256 below).
"""
from __future__ import annotations

import hashlib
import pathlib
from importlib.resources import files

# SHA-256 of assets/default_model/model.safetensors as shipped (see docs/default-model.md).
DEFAULT_MODEL_SHA256 = "e7f964e3d11bf30e75a5e81e4e0d4b91429a8217f88e6176b30dfa3be06bc531"

WEIGHTS_FILE = "model.safetensors"
REQUIRED_FILES = ("config.json", "generation_config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json")


class DefaultModelError(RuntimeError):
    """The embedded default model is missing, incomplete, or its weights do not match DEFAULT_MODEL_SHA256."""


def default_model_path() -> pathlib.Path:
    """Absolute path of the embedded model directory (works for editable and wheel installs)."""
    resource = files("olora_core") / "assets" / "default_model"
    if not isinstance(resource, pathlib.Path):
        raise DefaultModelError(
            f"olora_core is installed in a form without a real directory ({type(resource).__name__}); "
            "the default model needs an unpacked install (pip install, not a zip import)")
    path = resource.resolve()
    if not path.is_dir():
        raise DefaultModelError(f"default model directory {path} does not exist; the package was installed "
                                "without its assets (olora_core/assets/**) or the checkout is incomplete")
    return path


def hash_file_into(digest, path: pathlib.Path, chunk_bytes: int = 1 << 20) -> None:
    """Feed a file's bytes to a hashlib digest in chunks (the one file-hashing loop of the project)."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)


def sha256_of_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    hash_file_into(digest, path)
    return digest.hexdigest()


def verify_default_model(path: pathlib.Path | None = None) -> pathlib.Path:
    """Check the model directory is complete and its weights hash to DEFAULT_MODEL_SHA256; returns the path.

    Raises DefaultModelError naming the missing file or both hashes on a mismatch.
    """
    directory = pathlib.Path(path).resolve() if path is not None else default_model_path()
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise DefaultModelError(f"default model directory {directory} is missing {', '.join(missing)}")
    weights = directory / WEIGHTS_FILE
    actual = sha256_of_file(weights)
    if actual != DEFAULT_MODEL_SHA256:
        raise DefaultModelError(
            f"{weights} has SHA-256 {actual}, expected {DEFAULT_MODEL_SHA256}: the file is corrupted or was "
            "rebuilt without updating DEFAULT_MODEL_SHA256 in olora_core/default_model.py")
    return directory
