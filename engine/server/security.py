"""The engine's security boundary: pure ASGI middleware, the Host check and the token file.

Nothing here needs FastAPI: the middleware wraps any ASGI app and answers its refusals itself, with the
engine's one error shape, ``{"error": {"message", "type", "code"}}``.

- :class:`BodyLimitMiddleware` refuses bodies over ``--max-body-mb`` (413) while they arrive.
- :class:`HostCheckMiddleware` refuses a Host header that is not this machine (400, DNS rebinding).
- :class:`TokenAuthMiddleware` requires ``Authorization: Bearer <token>`` outside :data:`PUBLIC_PATHS` (401).
- :func:`ensure_token` creates or reads the 0600 token file and refuses one other users can read.
- :func:`bind_socket` and :func:`is_loopback` help ``geo-r1 serve`` listen where it was told to.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException

from geo_r1_qgis.core.errors import ConfigError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Host names that always mean "this machine" (the Host header check accepts them with any port).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: Bind addresses that listen on every interface.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # nosec B104 - names, used to detect a wildcard bind
#: Routes that need no token.
PUBLIC_PATHS = frozenset({"/health"})

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "overloaded_error",
}


# --------------------------------------------------------------------------------------------------
# Token file
# --------------------------------------------------------------------------------------------------


def ensure_token(path: str | os.PathLike[str]) -> str:
    """Return the engine's bearer token, creating the file (0600, parent 0700) on first start.

    An existing file is reused; one that other users can read is refused (ConfigError naming the fix).
    """
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        return _read_token(path)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    token = secrets.token_urlsafe(32)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:  # another engine created it just now: use theirs
        return _read_token(path)
    except OSError as exc:
        raise ConfigError(f"cannot create the token file {path}: {exc.strerror}; pass --token-file") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    log.info("created a new engine token in %s", path)
    return token


def _read_token(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"the token file {path} is not a regular file; pass another --token-file")
    if os.name != "nt" and st.st_mode & 0o077:
        raise ConfigError(
            f"the token file {path} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"run  chmod 600 {path}  (or delete it and the engine writes a new one)"
        )
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"the token file {path} is empty: delete it and the engine writes a new one")
    return token


# --------------------------------------------------------------------------------------------------
# Errors and ASGI middleware (pure: no FastAPI)
# --------------------------------------------------------------------------------------------------


class ApiError(HTTPException):
    """An HTTP error with a message for the client (rendered as ``{"error": {...}}``)."""

    def __init__(
        self, status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.error_type = error_type or _ERROR_TYPES.get(status, "invalid_request_error")


class BodyTooLargeError(ApiError):
    """Raised from ``receive`` once a request body passes the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than the engine's limit of {limit} bytes (--max-body-mb): "
            "send fewer or smaller images per request",
        )


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {
        "error": {
            "message": message,
            "type": error_type or _ERROR_TYPES.get(status, "invalid_request_error"),
            "code": status,
        }
    }


async def send_error(
    send: Send, status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
) -> None:
    """Send a complete JSON error response on a raw ASGI ``send``."""
    body = json.dumps(error_body(status, message, error_type)).encode("utf-8")
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, counting bytes as they arrive.

    A declared ``Content-Length`` over the limit is refused before anything is read. Otherwise (no
    Content-Length, chunked, or a short declaration) the bytes are counted as the app receives them,
    and the read that passes the limit raises :class:`BodyTooLargeError`, which the app's error handler
    (or this middleware, if the app lets it through) turns into a 413 response.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await send_error(send, 400, f"invalid Content-Length header {declared!r}")
                return
            if too_big:
                await send_error(send, 413, BodyTooLargeError(self.max_bytes).detail)
                return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError as exc:
            if started:
                raise
            await send_error(send, 413, exc.detail)


def split_host_header(value: str | None) -> str | None:
    """The host name of a Host header (lower case, IPv6 without brackets), or None if malformed."""
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[1:end], text[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return name or None
    if text.count(":") > 1:  # an IPv6 address must be bracketed in a Host header
        return None
    name, sep, port = text.partition(":")
    if sep and not port.isdigit():
        return None
    return name or None


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host_header: str | None, bound_host: str) -> bool:
    """Whether a request's Host header names this machine (the DNS-rebinding guard).

    Accepted: 127.0.0.1, localhost and ::1 (any port) and the bound address. When bound to a wildcard
    (0.0.0.0 or ::), any IP literal is accepted too: DNS rebinding needs a host NAME, and clients on
    other machines can only reach a wildcard-bound engine by one of its addresses.
    """
    name = split_host_header(host_header)
    if name is None:
        return False
    bound = bound_host.strip().strip("[]").lower()
    if name in LOOPBACK_HOSTS or name == bound:
        return True
    return bound in WILDCARD_HOSTS and _is_ip_literal(name)


class HostCheckMiddleware:
    """Answer 400 to requests whose Host header is missing or is not this machine (DNS rebinding)."""

    def __init__(self, app: ASGIApp, bound_host: str) -> None:
        self.app = app
        self.bound_host = bound_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            value = _header(scope, b"host")
            if value is None or split_host_header(value) is None:
                await send_error(send, 400, f"missing or malformed Host header {value!r}", "invalid_host")
                return
            if not host_allowed(value, self.bound_host):
                await send_error(
                    send,
                    400,
                    f"Host {value!r} is not this engine: use http://127.0.0.1:<port> "
                    "(requests for other host names are refused to stop DNS rebinding)",
                    error_type="invalid_host",
                )
                return
        await self.app(scope, receive, send)


class TokenAuthMiddleware:
    """Require ``Authorization: Bearer <token>`` on every route except :data:`PUBLIC_PATHS`.

    Runs before the body is read, so an unauthenticated client never gets its body parsed.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ConfigError("the engine token is empty")
        self.app = app
        self._token = token.encode("utf-8")

    def authorized(self, header: str | None) -> bool:
        scheme, _, value = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return secrets.compare_digest(value.strip().encode("utf-8", "replace"), self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        public = scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS
        if not public and not self.authorized(_header(scope, b"authorization")):
            await send_error(
                send,
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token "
                "from the engine's token file (logged by geo-r1 serve at start)",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------------------
# Binding
# --------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``, or a ConfigError that says what to do."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    if os.name != "nt":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}): another engine may already run there "
            f"(try GET /health), or pick another --port"
        ) from None
    sock.set_inheritable(True)
    return sock
