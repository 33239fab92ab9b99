"""A second client of the browser panel that speaks wslink itself (aiohttp's websocket and
wslink's own framing, as the page's script does), for the hostile-client tests: it can send
what no page would."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import msgpack
from wslink.chunking import UnChunker, generate_chunks

CHUNK_BYTES = 4 * 2**20


class WslinkClient:
    """One websocket connection to ``url`` (``http://host:port/``) with the given headers."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        origin: str | None = None,
        cookie: str | None = None,
        host: str | None = None,
    ) -> None:
        self.url = url.split("?")[0].rstrip("/") + "/ws"
        self.headers = {}
        if origin is not None:
            self.headers["Origin"] = origin
        if cookie is not None:
            self.headers["Cookie"] = f"instructx2x_session={cookie}"
        if host is not None:
            self.headers["Host"] = host
        self.token = token
        self.session: Any = None  # an aiohttp.ClientSession once entered
        self.socket: Any = None  # its websocket
        self.unchunker = UnChunker()
        self.unchunker.set_max_message_size(2**31)
        self._ids = itertools.count(1)
        self.published: list[dict] = []

    async def __aenter__(self) -> WslinkClient:
        self.session = aiohttp.ClientSession()
        try:
            self.socket = await self.session.ws_connect(self.url, headers=self.headers, max_msg_size=0)
        except BaseException:
            await self.session.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        if self.socket is not None:
            await self.socket.close()
        await self.session.close()

    async def send(self, message: dict) -> None:
        for chunk in generate_chunks(msgpack.packb(message), CHUNK_BYTES):
            await self.socket.send_bytes(chunk)

    async def send_raw(self, packed: bytes) -> None:
        """Bytes already packed, framed as wslink frames them."""
        for chunk in generate_chunks(packed, CHUNK_BYTES):
            await self.socket.send_bytes(chunk)

    async def receive(self, rpc_id: str, timeout: float = 30) -> dict:
        """The reply to ``rpc_id`` (published messages on the way are kept in ``published``)."""
        return await asyncio.wait_for(self._reply(rpc_id), timeout)

    async def _reply(self, rpc_id: str) -> dict:
        while True:
            message = await self.socket.receive()
            if message.type != aiohttp.WSMsgType.BINARY:
                raise ConnectionError(f"the server closed the connection ({message.type.name})")
            full = self.unchunker.process_chunk(message.data)
            if full is None:
                continue
            if full.get("id") == rpc_id:
                return full
            self.published.append(full)

    async def call(self, method: str, *args, system: bool = False) -> dict:
        rpc_id = f"{'system' if system else 'rpc'}:c0:{next(self._ids)}"
        await self.send({"wslink": "1.0", "id": rpc_id, "method": method, "args": list(args), "kwargs": {}})
        return await self.receive(rpc_id)

    async def hello(self, secret: str | None = None) -> dict:
        return await self.call(
            "wslink.hello", {"secret": self.token if secret is None else secret}, system=True
        )

    async def set_state(self, **changes) -> dict:
        return await self.call("trame.state.update", [{"key": k, "value": v} for k, v in changes.items()])

    async def state(self) -> dict:
        return (await self.call("trame.state.get"))["result"]["state"]
