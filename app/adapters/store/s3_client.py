"""The S3 client both object-store sources use (the repository, app/adapters/store/s3_repository.py, and the
folder of PEFT saves in a bucket, app/adapters/store/s3_peft_folder.py), and how its errors become the
repository's: no answer in time -> RepositoryTimeout (504), anything else that is not the store's plain answer
about a key -> RepositoryUnavailable (503), both naming the adapter asked for.

Client: boto3. It reads credentials from the standard AWS chain (environment, shared config/credentials files
and profiles, web identity/IRSA, container and instance metadata) with no code here, takes an endpoint URL for
non-AWS stores, and exposes S3's conditional writes (PutObject IfNoneMatch/IfMatch, DeleteObject IfMatch) as
plain parameters. obstore is faster for bulk transfers but adapters are small and its credential chain is its
own; s3fs/fsspec put a filesystem cache between us and the pointer object whose freshness is the whole point.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from app.adapters.repository import RepositoryTimeout, RepositoryUnavailable

KEY_ANSWERS = ("NoSuchKey", "404", "NoSuchBucket", "PreconditionFailed", "412")  # passed on to the caller


def make_client(endpoint_url: str | None, timeout_s: float):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


def error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def talking(store_name: str, what: str) -> Iterator[None]:
    """Map the client's failures to RepositoryTimeout/RepositoryUnavailable; `KEY_ANSWERS` are re-raised."""
    from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

    try:
        yield
    except (ConnectTimeoutError, ReadTimeoutError) as exc:
        raise RepositoryTimeout(f"{what}: {store_name} did not answer in time ({type(exc).__name__})") from None
    except ClientError as exc:
        code = error_code(exc)
        if code in KEY_ANSWERS:
            raise
        raise RepositoryUnavailable(f"{what}: {store_name} answered {code or 'an error'}") from None
    except BotoCoreError as exc:
        raise RepositoryUnavailable(f"{what}: {store_name} cannot be reached ({type(exc).__name__})") from None
