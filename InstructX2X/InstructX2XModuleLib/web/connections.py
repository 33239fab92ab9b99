"""The panel's web server and its connections: the access policy put in front of wslink
(``access``; docs/security.md), sends bounded in time, and a closed connection's upload freed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from wslink.websocket import LinkProtocol

from .access import AccessPolicy, guard_http, guard_rpc, install_message_limit
from .controls import WRITABLE_STATE

__all__ = ["guard_server", "BoundedConnections", "SEND_TIMEOUT_S", "MESSAGE_OVERHEAD_BYTES"]

SEND_TIMEOUT_S = 10.0  # a page that takes no bytes for this long is cut off
MESSAGE_OVERHEAD_BYTES = 2**20  # a message's room beyond an upload's bytes: names, msgpack framing


def guard_server(wslink_server: Any, protocol: Any, access: AccessPolicy, max_upload_bytes: int) -> None:
    """Put the access policy in front of the web server, bound but not yet listening: message
    limits, the HTTP guard (token, cookie, Host, Origin), the token as wslink's secret compared
    in constant time, and only the page's RPCs and writable state keys served.

    Parameters
    ----------
    wslink_server
        trame's web server (its aiohttp application and websocket handlers).
    protocol
        The server's wslink protocol.
    access: AccessPolicy
        This launch's token, names and limits.
    max_upload_bytes: int
        The largest upload: one message may hold it plus ``MESSAGE_OVERHEAD_BYTES``.
    """
    install_message_limit(max_upload_bytes + MESSAGE_OVERHEAD_BYTES)
    wslink_server.app.middlewares.append(
        guard_http(access, cookie_secure=any(origin.startswith("https:") for origin in access.origins))
    )
    protocol.updateSecret(access.token)

    async def validate(secret: str, _client_id: object) -> bool:
        return access.token_matches(secret)

    protocol.validateToken = validate  # wslink asks the protocol first, in place of its plain ==
    for handler in wslink_server._ws_handlers:
        guard_rpc(handler.functionMap, WRITABLE_STATE)


class BoundedConnections(LinkProtocol):
    """wslink's connections: each one's sends are bounded in time, and a closed one's unfinished
    upload is freed.

    wslink sends every reply and broadcast under one lock shared by all connections, waiting on
    each socket in turn: a page that stops reading would hold every other page. A send that makes
    no progress for ``SEND_TIMEOUT_S`` cuts that connection off instead, and the others go on.

    Parameters
    ----------
    wslink_server: Callable[[], Any]
        The web server once bound (None before).
    forget_upload: Callable[[object], None]
        Frees a connection's unfinished upload.
    """

    def __init__(self, wslink_server: Callable[[], Any], forget_upload: Callable[[object], None]) -> None:
        super().__init__()
        self.wslink_server, self.forget_upload = wslink_server, forget_upload

    def onConnect(self, request: Any, client_id: object) -> None:
        sockets = [
            handler.connections.get(client_id)
            for handler in getattr(self.wslink_server(), "_ws_handlers", [])
        ]
        socket = next((s for s in sockets if s is not None), None)
        if socket is None:
            return
        send = socket.send_bytes

        async def bounded_send(data: bytes, *args: Any, **kwargs: Any) -> None:
            try:
                await asyncio.wait_for(send(data, *args, **kwargs), SEND_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError):
                if request.transport is not None:
                    request.transport.abort()  # its reader ends, wslink forgets it

        socket.send_bytes = bounded_send

    def onClose(self, client_id: object) -> None:
        self.forget_upload(client_id)
