"""Who may reach the browser panel, and what a connected page may change.

Every launch draws a random token (or reads one from ``--token-file``). The address the server
announces carries it (``/?token=...``, as Jupyter does); the first request that shows it gets
an HttpOnly, SameSite=Strict cookie and is sent on to the page with the token as wslink's
secret, which trame's client reads from the address and then removes from the address bar.
The cookie holds a second random value, not the token: browsers send a loopback cookie to every
port of the machine, so another local server could read it, and it opens no page and no call
by itself. From then on:

- the page needs the token in its address; its scripts and the websocket handshake need the
  cookie; every request needs a ``Host`` header naming this server (a loopback name, ``--host``,
  or a ``--origin``);
- the websocket handshake also needs an ``Origin`` of this server or of a ``--origin``;
- wslink's hello must carry the token (compared in constant time) before any call is served;
- at most ``max_connections`` websockets are open at once, and one message (a file of an
  upload included) is at most ``max_message_bytes``, counted over all of a connection's
  unfinished messages (at most ``MAX_PENDING_MESSAGES`` of them), so no declared size allocates
  memory that was never sent, and msgpack may unpack at most ``MAX_UNPACKED_ITEMS`` items;
- only the RPCs the page uses are served, a page may write only the state keys of its own
  inputs (with the types they hold, strings of at most ``MAX_STATE_TEXT`` characters), the
  views take only well-formed events and sizes for their own areas, and only trame's client
  life-cycle names are accepted: anything else is refused and logged by kind, never by value.

Nothing here knows the panel: ``connections.guard_server`` hands in the keys and the limits.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgpack
from aiohttp import web
from wslink import chunking
from wslink import protocol as wslink_protocol

from instructx2x.errors import ParameterError

__all__ = [
    "AccessPolicy",
    "new_token",
    "read_token_file",
    "guard_http",
    "guard_rpc",
    "BoundedUnChunker",
    "install_message_limit",
    "COOKIE",
    "CLIENT_LIFECYCLE",
    "SERVED_RPCS",
]

logger = logging.getLogger("instructx2x.web.access")

COOKIE = "instructx2x_session"
MIN_TOKEN_CHARACTERS = 32
WEBSOCKET_PATH = "/ws"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# the life-cycle names trame's client sends; server_* names are the server's own
CLIENT_LIFECYCLE = frozenset({"client_connected", "client_exited", "client_unmounted"})
# the RPCs trame's client and trame-rca's views call; wslink's application.exit, trame-rca's
# push, drop and reset (which let one client replace or freeze every viewer's image) and the rest
# are refused
SERVED_RPCS = frozenset(
    {
        "trame.state.get",
        "trame.state.update",
        "trame.trigger",
        "trame.lifecycle.update",
        "trame.error.client",
        "trame.rca.size",
        "trame.rca.event",
        "trame.rca.video.codecs",
        "trame.rca.video.negotiate",
    }
)
MAX_PENDING_MESSAGES = 16
MAX_UNPACKED_ITEMS = 100_000  # array and map entries in one message: a page's messages hold far fewer
MAX_STATE_TEXT = 4096
MAX_VIEW_PIXELS = 4096  # a view's width or height
_SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_REFUSAL = (
    "This InstructX2X panel needs the address with its token that the server printed when it "
    "started (…/?token=…).\n"
)


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (its first line, stripped).

    Raises
    ------
    ParameterError
        When the file cannot be read, or the token is shorter than 32 characters or holds
        characters that do not survive an address unquoted.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ParameterError(
            f"cannot read the token file {Path(path).name} "
            f"({getattr(error, 'strerror', None) or type(error).__name__})."
        ) from None
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARACTERS:
        raise ParameterError(
            f"the token in {Path(path).name} has {len(token)} characters; use at least "
            f"{MIN_TOKEN_CHARACTERS} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')."
        )
    if not all(character.isalnum() or character in "-_." for character in token):
        raise ParameterError(
            f"the token in {Path(path).name} may hold only letters, digits, '-', '_' and '.'."
        )
    return token


@dataclasses.dataclass(frozen=True)
class AccessPolicy:
    """What the server accepts.

    Parameters
    ----------
    token: str
        The launch's secret.
    host: str
        The interface the server listens on (``--host``).
    origins: tuple[str, ...]
        Extra origins the page is served under, e.g. ``https://xray.example.org`` behind a
        reverse proxy (``--origin``); their host names become acceptable ``Host`` headers.
    max_connections: int
        Websockets open at once.
    max_message_bytes: int
        The largest message a connection may send, all its unfinished messages together.
    """

    token: str
    host: str = "127.0.0.1"
    origins: tuple[str, ...] = ()
    max_connections: int = 8
    max_message_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        if len(self.token) < MIN_TOKEN_CHARACTERS:
            raise ParameterError(f"the access token must have at least {MIN_TOKEN_CHARACTERS} characters.")
        for origin in self.origins:
            parts = urlsplit(origin)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.path not in ("", "/")
                or parts.query
                or parts.username
            ):
                raise ParameterError(
                    f"--origin must read SCHEME://HOST[:PORT] (http or https), got {origin!r}."
                )
        if self.max_connections < 1 or self.max_message_bytes < 1:
            raise ParameterError("the connection and message limits must be positive.")

    cookie: str = dataclasses.field(default_factory=new_token)

    def token_matches(self, candidate: Any) -> bool:
        """Constant-time comparison with the launch's token (false for anything undecodable)."""
        return _same(candidate, self.token)

    def cookie_matches(self, candidate: Any) -> bool:
        """Constant-time comparison with the launch's cookie value."""
        return _same(candidate, self.cookie)

    def host_names(self) -> set[str]:
        """The host names a ``Host`` header may carry (lower case, IPv6 in brackets)."""
        names = set(LOOPBACK_NAMES)
        if self.host and not _is_wildcard(self.host):
            names.add(_bracketed(self.host.lower()))
        names.update(
            _bracketed(host.lower()) for origin in self.origins if (host := urlsplit(origin).hostname)
        )  # __post_init__ checked that every origin names a host
        return names

    def host_allowed(self, header: str | None, port: int) -> bool:
        """A ``Host`` header naming this server: a known name with our port, or a ``--origin``'s
        host (with its port, if it names one)."""
        if not header:
            return False
        header = header.lower()
        if any(header == f"{name}:{port}" for name in self.host_names()):
            return True
        return any(header == urlsplit(origin).netloc.lower() for origin in self.origins)

    def origin_allowed(self, origin: str | None, port: int) -> bool:
        """An ``Origin`` of this server (over http, by a known name and our port) or a ``--origin``."""
        if not origin:
            return False
        origin = origin.rstrip("/").lower()
        if origin in (o.rstrip("/").lower() for o in self.origins):
            return True
        return any(origin == f"http://{name}:{port}" for name in self.host_names())


def _same(candidate: Any, secret: str) -> bool:
    if not isinstance(candidate, str):
        return False
    try:
        return hmac.compare_digest(candidate.encode("ascii"), secret.encode("ascii"))
    except UnicodeEncodeError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


def _bracketed(name: str) -> str:
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def guard_http(policy: AccessPolicy, cookie_secure: bool = False) -> Callable:
    """An aiohttp middleware that enforces ``policy`` on every HTTP request.

    A request carrying ``?token=`` (the announced address) gets the cookie and a redirect to
    the page with wslink's ``secret``; the page itself needs that secret (a reload after trame's
    client cleared the address is refused with the reason: open the printed address again).
    Scripts need the cookie; the websocket handshake needs the cookie, an allowed Origin and a
    free connection slot. Every answer carries headers that forbid framing, caching and referrers.
    """
    open_sockets = 0

    @web.middleware
    async def middleware(request: web.Request, handler):
        response = await _checked(request, handler)
        for name, value in _SECURITY_HEADERS.items():
            if not response.prepared:
                response.headers.setdefault(name, value)
        return response

    async def _checked(request: web.Request, handler):
        nonlocal open_sockets
        port = _local_port(request)
        if not policy.host_allowed(request.headers.get("Host"), port):
            _refused("an HTTP request with an unknown Host header")
            return web.Response(status=403, text="Unknown Host.\n")
        query_token = request.query.get("token")
        if query_token is not None:
            if not policy.token_matches(query_token):
                _refused("a request with a wrong token")
                return web.Response(status=403, text=_REFUSAL)
            response = web.HTTPFound(f"/index.html?secret={policy.token}")
            response.set_cookie(
                COOKIE, policy.cookie, httponly=True, samesite="Strict", secure=cookie_secure, path="/"
            )
            return response
        if request.path in ("/", "/index.html") and not policy.token_matches(request.query.get("secret")):
            _refused("a page request without the token")
            return web.Response(status=403, text=_REFUSAL)
        if not policy.cookie_matches(request.cookies.get(COOKIE)):
            _refused("a request without the session cookie")
            return web.Response(status=403, text=_REFUSAL)
        if request.path == WEBSOCKET_PATH:
            if not policy.origin_allowed(request.headers.get("Origin"), port):
                _refused("a websocket from a foreign Origin")
                return web.Response(status=403, text="Foreign Origin.\n")
            if open_sockets >= policy.max_connections:
                _refused("a websocket over the connection limit")
                return web.Response(
                    status=503, text=f"At most {policy.max_connections} pages may be open at once.\n"
                )
            open_sockets += 1
            try:
                return await handler(request)  # returns when the websocket closes
            finally:
                open_sockets -= 1
        return await handler(request)

    return middleware


_refusal_counts: dict[str, int] = {}


def _refused(what: str) -> None:
    """Log a refusal: the first of its kind, then every thousandth (a flood cannot fill the log)."""
    count = _refusal_counts[what] = _refusal_counts.get(what, 0) + 1
    if count == 1 or count % 1000 == 0:
        logger.warning("refused %s (%d so far)", what, count)


def _local_port(request: web.Request) -> int:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return int(sockname[1]) if sockname else -1


class BoundedUnChunker(chunking.UnChunker):
    """wslink's un-chunker with a ceiling: after the hello, wslink lets a connection declare
    messages of up to 4 GiB, and allocates each declared size on its first 12-byte header.
    Here the declared sizes of a connection's unfinished messages together may not pass
    ``limit``; past it the connection is closed (wslink ends it on the raised ValueError)."""

    limit = 4 * 2**20

    def set_max_message_size(self, size: int) -> None:
        super().set_max_message_size(min(size, self.limit))

    def process_chunk(self, chunk: bytes):
        header, content = chunk[: chunking.HEADER_LENGTH], chunk[chunking.HEADER_LENGTH :]
        message_id, offset, total = chunking._decode_header(header)
        pending = self.pending_messages.get(message_id)
        if pending is None:
            declared = sum(len(message["content"]) for message in self.pending_messages.values())
            if declared + total > self.max_message_size or len(self.pending_messages) >= MAX_PENDING_MESSAGES:
                self.release_pending_messages()
                _refused("a connection's oversized or too many unfinished messages (connection closed)")
                raise ValueError("message too large")
            pending = {"received_size": 0, "content": bytearray(total)}
            self.pending_messages[message_id] = pending
        if total != len(pending["content"]) or offset + len(content) > total:
            self.release_pending_messages()
            raise ValueError("inconsistent chunk")
        pending["content"][offset : offset + len(content)] = content
        pending["received_size"] += len(content)
        if pending["received_size"] < total:
            return None
        del self.pending_messages[message_id]
        return msgpack.unpackb(
            bytes(pending["content"]), max_array_len=MAX_UNPACKED_ITEMS, max_map_len=MAX_UNPACKED_ITEMS
        )


def install_message_limit(limit: int) -> None:
    """Make wslink's connections use ``BoundedUnChunker`` with ``limit`` (process-wide: wslink
    creates one un-chunker per connection from its protocol module's name)."""
    BoundedUnChunker.limit = int(limit)
    wslink_protocol.UnChunker = BoundedUnChunker


def guard_rpc(function_map: dict, writable: dict[str, tuple[type, ...]]) -> None:
    """Restrict a wslink handler's ``function_map`` in place: only the RPCs of ``SERVED_RPCS``
    (and trame-rca's), state updates only for the keys of ``writable`` with values of their
    types, and life-cycle updates only with trame's client names."""
    for name in list(function_map):
        if name not in SERVED_RPCS:
            del function_map[name]
    owner, update_state = function_map["trame.state.update"]
    _owner, lifecycle = function_map["trame.lifecycle.update"]

    def filtered_update(protocol, changes):
        changes = changes if isinstance(changes, list) else [changes]
        accepted = [change for change in changes if isinstance(change, dict) and _writable(change, writable)]
        if len(accepted) != len(changes):
            logger.warning("refused %d state change(s) the page does not make", len(changes) - len(accepted))
        if accepted:
            return update_state(protocol, accepted)
        return None

    def filtered_lifecycle(protocol, name):
        if name not in CLIENT_LIFECYCLE:
            logger.warning("refused a life-cycle message that is not a page's")
            return None
        return lifecycle(protocol, name)

    function_map["trame.state.update"] = (owner, filtered_update)
    function_map["trame.lifecycle.update"] = (_owner, filtered_lifecycle)
    for name, check in (
        ("trame.rca.size", _view_size),
        ("trame.rca.event", _view_event),
        ("trame.rca.video.codecs", None),
        ("trame.rca.video.negotiate", _codecs),
    ):
        if name in function_map:
            views, call = function_map[name]
            function_map[name] = _checked_view_call(views, call, check)


def _checked_view_call(views, call: Callable, check: Callable | None) -> tuple:
    """A trame-rca call served only for one of the views' own areas and, where it takes one, a
    well-formed last argument: VTK aborts the process on a mistyped event field."""

    def checked(protocol, area=None, *args):
        areas = getattr(protocol, "_area_adapters", {})  # trame-rca's registered views
        if not isinstance(area, str) or area not in areas:
            _refused("a view call for a view that is not a page's")
            return None
        if check is not None and not (args and check(args[-1])):
            _refused(f"a malformed {getattr(check, '__name__', 'view').strip('_').replace('_', ' ')} call")
            return None
        return call(protocol, area, *args)

    return views, checked


def _finite(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _view_size(size: Any) -> bool:
    return (
        isinstance(size, dict)
        and set(size) <= {"w", "h", "p"}
        and all(_finite(size.get(key), 0, MAX_VIEW_PIXELS) for key in ("w", "h"))
        and _finite(size.get("p", 1), 0.25, 4)
    )


_EVENT_NUMBERS = {"x", "y", "w", "h", "deltaX", "deltaY", "deltaZ", "scale", "rotation", "repeatCount"}


def _view_event(event: Any) -> bool:
    """A pointer, wheel or key event as trame-rca's page sends it: a type name, numbers within the
    view, flags and short key names; nothing nested but a translation or touch positions."""
    if (
        not isinstance(event, dict)
        or len(event) > 32
        or not isinstance(event.get("type"), str)
        or not event["type"].isalnum()
        or len(event["type"]) > 40
    ):
        return False
    for key, value in event.items():
        if not isinstance(key, str) or len(key) > 32:
            return False
        if key in _EVENT_NUMBERS:
            if not _finite(value, -1e5, 1e5):
                return False
        elif key == "translation":
            if not (
                isinstance(value, list) and len(value) <= 3 and all(_finite(v, -1e5, 1e5) for v in value)
            ):
                return False
        elif key == "positions":
            if not (
                isinstance(value, dict)
                and len(value) <= 10
                and all(
                    isinstance(p, dict)
                    and set(p) <= {"x", "y"}
                    and all(_finite(v, -1e5, 1e5) for v in p.values())
                    for p in value.values()
                )
            ):
                return False
        elif not (
            value is None  # a field the page leaves unset (a key event's firstRenderer)
            or isinstance(value, bool)
            or _finite(value, -1e5, 1e5)
            or (isinstance(value, str) and len(value) <= 32)
        ):
            return False
    return True


def _codecs(codecs: Any) -> bool:
    return (
        isinstance(codecs, list)
        and len(codecs) <= 16
        and all(isinstance(c, str) and len(c) <= 64 for c in codecs)
    )


def _writable(change: dict, writable: dict[str, tuple[type, ...]]) -> bool:
    key, value = change.get("key"), change.get("value")
    types = writable.get(key) if isinstance(key, str) else None
    if types is None:
        return False
    if isinstance(value, bool) and bool not in types:  # True is an int to Python, not to the page
        return False
    if isinstance(value, str) and len(value) > MAX_STATE_TEXT:
        return False
    return isinstance(value, types)
