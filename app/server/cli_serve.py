"""`olora serve`: every flag is also an environment variable OLORA_<FLAG> (flags win)."""
from __future__ import annotations

import argparse
import socket
import sys
import typing
import urllib.request

from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from app.server.settings import Settings

_TYPES = {int: int, float: float}


def _default_text(field) -> str:
    default = field.default_factory() if field.default is PydanticUndefined else field.default
    return "unset" if default in (None, []) else str(default)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not argparse's usage dump
        self.exit(2, f"error: {message} (see olora serve --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="olora serve", description=__doc__)
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name.replace('_', ' ')} (env OLORA_{name.upper()}; default: " \
                    f"{_default_text(field)})"
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name in ("api_keys", "admin_keys"):
            p.add_argument(flag, dest=name, default=None, help=help_text + "; comma-separated")
        else:
            p.add_argument(flag, dest=name, default=None, choices=choices, type=_TYPES.get(field.annotation),
                           metavar=None if choices else name.upper(), help=help_text)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default: info)")
    return p


def describe(error: ValidationError) -> str:
    """One line naming each bad setting as both its flag and its environment variable."""
    parts = []
    for e in error.errors():
        name = str(e["loc"][0]) if e["loc"] else "?"
        parts.append(f"--{name.replace('_', '-')} / OLORA_{name.upper()}: {e['msg']} (got {e.get('input')!r})")
    return "invalid setting: " + "; ".join(parts)


def settings_from_args(argv: list[str] | None) -> tuple[Settings, str]:
    args = vars(build_parser().parse_args(argv))
    log_level = args.pop("log_level")
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        return Settings(**overrides), log_level
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


def port_holder(host: str, port: int) -> str | None:
    """None when nothing listens on host:port; "olora-serve" when an olora-serve answers there; else "other"."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=1):
            pass
    except OSError:
        return None
    url = f"http://{'[' + target + ']' if ':' in target else target}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 - our own loopback/bind address
            return "olora-serve" if b"olora_requests_total" in r.read() else "other"
    except (OSError, ValueError):
        return "other"


GRACEFUL_SHUTDOWN_S = 5  # after the drain: uvicorn's wait for connections to close


def draining_server(config, drain, timeout_s: float):
    """A uvicorn.Server that drains first: the first SIGTERM/SIGINT starts `drain.run(timeout_s)` (the port stays
    open: /ready says 503, new generations get 503 + Retry-After, running ones finish), and only then is uvicorn
    told to exit, so the process exits 0. A second signal is uvicorn's own: exit now."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.drain_requested = False
            self.drain_task: asyncio.Task | None = None
            self.loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self.drain_requested or self.loop is None:
                return super().handle_exit(sig, frame)
            self.drain_requested = True  # not recorded as a captured signal: uvicorn does not re-raise it
            self.loop.call_soon_threadsafe(self.start_drain)

        def start_drain(self) -> None:
            self.drain_task = self.loop.create_task(self.drain_then_exit())

        async def drain_then_exit(self) -> None:
            try:
                await drain.run(timeout_s)
            finally:
                self.should_exit = True

    return DrainingServer()


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from app.server.main import create_app

    try:
        settings, log_level = settings_from_args(argv)
        warning = settings.check_bind()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    holder = port_holder(settings.host, settings.port)
    if holder == "olora-serve":  # e.g. the README tour's `make serve &` while the set-up's server still runs
        print(f"olora serve: an olora-serve is already running on {settings.host}:{settings.port}; "
              "not starting a second one (stop it first, or pick another --port)", file=sys.stderr)
        return 0
    if holder is not None:
        print(f"error: {settings.host}:{settings.port} is in use by another program; pick another --port",
              file=sys.stderr)
        return 2
    import logging.config

    from app.server.log_format import logging_config

    log_config = logging_config(log_level, settings.log_format)
    logging.config.dictConfig(log_config)
    if warning:
        logging.getLogger("olora.server").warning(warning)
    app = create_app(settings, load_in_background=True)  # the port opens at once; /ready says when it is loaded
    from app.server.connections import header_timeout_protocol

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
                            log_config=log_config,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            http=header_timeout_protocol(settings.header_timeout),
                            timeout_keep_alive=settings.keep_alive_timeout, limit_concurrency=settings.max_connections)
    server = draining_server(config, app.state.drain, settings.drain_timeout)
    app.state.startup.on_failure.append(lambda: setattr(server, "should_exit", True))
    server.run()
    return 1 if app.state.startup.error is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
