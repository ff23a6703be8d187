"""`olora serve`: every flag is also an environment variable OLORA_<FLAG> (flags win)."""
from __future__ import annotations

import argparse
import logging
import sys

from app.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="olora serve", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or name.replace("_", " ")) + f" (env OLORA_{name.upper()})"
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name in ("api_keys", "admin_keys"):
            p.add_argument(flag, dest=name, default=None, help=help_text + "; comma-separated")
        else:
            p.add_argument(flag, dest=name, default=None, help=help_text)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def settings_from_args(argv: list[str] | None) -> tuple[Settings, str]:
    args = vars(build_parser().parse_args(argv))
    log_level = args.pop("log_level")
    overrides = {k: v for k, v in args.items() if v is not None}
    return Settings(**overrides), log_level


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from app.main import create_app

    try:
        settings, log_level = settings_from_args(argv)
        warning = settings.check_bind()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=log_level.upper(), format="%(message)s")
    if warning:
        print(warning, file=sys.stderr)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                access_log=False, timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
