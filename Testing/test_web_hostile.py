"""The browser panel against hostile clients: the real ``instructx2x-web`` on a loopback port,
attacked by second websocket clients that speak wslink themselves (``wslink_client``), raw
sockets and HTTP requests without the launch's token. Each attack must fail while the
legitimate user, who holds the token, keeps a working session.

Runs in the web environment (``make test-web``); docs/security.md lists what each test shows.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("trame_slicer")
import aiohttp
import psutil
from web_driver import WebServer
from wslink_client import WslinkClient

pytestmark = pytest.mark.web

MAX_UPLOAD_MB = 8
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = WebServer(
        tmp_path_factory.mktemp("hostile"),
        "untrained-tiny",
        "--max-upload-mb",
        str(MAX_UPLOAD_MB),
        "--max-connections",
        str(MAX_CONNECTIONS),
    ).start()
    yield server
    server.stop()


def origin(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def legitimate(server) -> WslinkClient:
    return WslinkClient(server.url, token=server.token, origin=origin(server), cookie=server.cookie)


def get(url: str, headers: dict | None = None) -> tuple[int, str]:
    """Status and body of a GET that does not follow redirects."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def rss_mb(server) -> float:
    return psutil.Process(server.process.pid).memory_info().rss / 2**20


def run(coroutine):
    return asyncio.run(coroutine)


def test_the_page_needs_the_token_and_a_host_of_this_server(server):
    base = f"http://127.0.0.1:{server.port}"
    for path in ("/", "/index.html", "/?token=wrong-token", "/index.html?secret=wslink-secret"):
        status, body = get(base + path)
        assert status == 403 and "token" in body and "<html" not in body.lower(), path
    status, _ = get(f"{base}/?token={server.token}")
    assert status == 302  # the announced address: the cookie, then the page
    assert server.cookie and server.token not in server.cookie  # other local servers may see the cookie
    cookie = {"Cookie": f"instructx2x_session={server.cookie}"}
    status, body = get(f"{base}/index.html?secret={server.token}", cookie)
    assert status == 200 and "<html" in body.lower()
    for path in ("/", "/index.html"):  # the cookie alone opens no page and gives no token away
        status, body = get(base + path, cookie)
        assert status == 403 and server.token not in body
    status, _ = get(
        f"{base}/index.html?secret={server.token}", {**cookie, "Host": f"evil.example:{server.port}"}
    )
    assert status == 403  # a rebound DNS name is not this server
    status, _ = get(
        f"{base}/index.html?secret={server.token}", {"Cookie": "instructx2x_session=\u00e9t\u00e9"}
    )
    assert status == 403  # undecodable: refused, not a server error
    request = urllib.request.Request(f"{base}/index.html?secret={server.token}", headers=cookie)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert (
            response.headers["X-Frame-Options"] == "DENY" and response.headers["Cache-Control"] == "no-store"
        )


def test_a_websocket_needs_the_cookie_an_own_origin_and_the_secret(server):
    async def attempts():
        refused = []
        for options in (
            {"origin": origin(server)},  # no cookie
            {"origin": "http://evil.example", "cookie": server.token},
            {"cookie": server.cookie},  # no Origin
            {"origin": origin(server), "cookie": server.token},  # the token is not the cookie
            {"origin": origin(server), "cookie": "a" * 43},
        ):
            try:
                async with WslinkClient(server.url, **options):
                    pass
            except aiohttp.WSServerHandshakeError as error:
                refused.append(error.status)
        async with WslinkClient(server.url, origin=origin(server), cookie=server.cookie) as client:
            denied = await client.hello("wslink-secret")  # wslink's public default
            reply = await client.call("trame.state.get")
        return refused, denied, reply

    refused, denied, reply = run(attempts())
    assert refused == [403, 403, 403, 403, 403]
    assert denied["error"]["message"] == "Authentication failed"
    assert "Unauthorized" in reply["error"]["message"] and "result" not in reply


def test_a_client_writes_only_the_page_inputs(server):
    async def attack():
        async with legitimate(server) as client:
            await client.hello()
            before = await client.state()
            await client.set_state(
                trame__template_main="<div>{{ window.injected = 1 }}</div>",
                mask_sources=["x"],
                pacs_names=["evil"],
                status="injected",
                tau="0.5",
                verify=1,
                instruction="Add the finding of left pleural effusion",
            )
            malformed = await client.call("trame.state.update", {"key": "status", "value": "injected"})
            return before, await client.state(), malformed

    before, after, malformed = run(attack())
    assert "error" not in malformed  # not a list of changes: refused like the rest, no traceback sent
    assert after["trame__template_main"] == before["trame__template_main"]
    assert after["mask_sources"] == before["mask_sources"] and after["pacs_names"] == before["pacs_names"]
    assert after["status"] == before["status"] and after["tau"] == before["tau"] and after["verify"] is True
    assert after["instruction"] == "Add the finding of left pleural effusion"  # an input of the page
    log = server.log.read_text()
    assert "refused 6 state change(s)" in log and "refused 1 state change(s)" in log
    assert "injected" not in log  # by kind, never by value


def test_life_cycle_and_exit_messages_cannot_end_the_session(server):
    async def attack():
        async with legitimate(server) as client:
            await client.hello()
            lifecycle = await client.call("trame.lifecycle.update", "server_exited")
            exiting = await client.call("application.exit")
            await asyncio.sleep(0.5)
            return lifecycle, exiting, await client.state()

    lifecycle, exiting, state = run(attack())
    assert "error" not in lifecycle and exiting["error"]["message"] == "Unregistered method called"
    assert server.process.poll() is None and state["trame__title"] == "InstructX2X"
    assert [
        p for p in server.tmp.iterdir() if p.name.startswith("instructx2x-")
    ]  # the session's folder stays


def test_declared_sizes_allocate_nothing_and_cut_the_connection(server):
    async def attack():
        async with legitimate(server) as client:
            await client.hello()
            for message_id in range(3):  # 12-byte headers declaring 512 MiB each, nothing after them
                await client.socket.send_bytes(struct.pack("<III", 1000 + message_id, 0, 512 * 2**20) + b"x")
            closed = await client.socket.receive()
            return closed.type

    before = rss_mb(server)
    assert run(attack()) in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert rss_mb(server) - before < 64  # not 1.5 GB


def test_an_endless_upload_is_cut_at_the_limit_and_freed(server):
    chunk = {"name": "film.dcm", "size": 4 * 2**20, "type": "application/dicom", "content": bytes(4 * 2**20)}

    async def attack():
        async with legitimate(server) as client:
            await client.hello()
            for _ in range(30):  # 120 MB, no end marker
                await client.call("trame.trigger", "upload_chunk", [[chunk]], {})
            grown = rss_mb(server)
            await client.call("trame.trigger", "upload_chunk", [[]], {})  # the end: the reason shown
            return grown, (await client.state())["error"]

    before = rss_mb(server)
    grown, error = run(attack())
    assert grown - before < 3 * MAX_UPLOAD_MB + 32  # the limit's worth (and wslink's buffers), not 120 MB
    assert error == f"the upload is over {MAX_UPLOAD_MB} MB, the limit; nothing was kept."
    assert not [p for p in server.tmp.rglob("film.dcm")]


def test_connections_are_capped_and_a_freed_slot_serves_again(server):
    async def flood():
        clients = [legitimate(server) for _ in range(MAX_CONNECTIONS)]
        for client in clients:
            await client.__aenter__()
        try:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with legitimate(server):
                    pass
        finally:
            for client in clients:
                await client.__aexit__(None, None, None)
        await asyncio.sleep(0.3)
        async with legitimate(server) as client:
            await client.hello()
            title = (await client.state())["trame__title"]
        return refused.value.status, title

    assert run(flood()) == (503, "InstructX2X")


def test_hundreds_of_idle_connections_leave_the_user_served(server):
    idle = []
    try:
        for index in range(300):
            connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if index % 2:
                connection.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a request never finished
            idle.append(connection)

        async def served():
            async with legitimate(server) as client:
                await client.hello()
                return (await client.state())["trame__title"]

        started = time.monotonic()
        assert run(served()) == "InstructX2X"
        assert time.monotonic() - started < 10
    finally:
        for connection in idle:
            connection.close()


def test_in_chromium_an_injected_template_never_runs_and_a_foreign_page_gets_no_socket(server, tmp_path):
    """A second client's template injection, then a fresh tab with the token: the page is the
    panel's own. A tab without the token sees the refusal only. A page of another origin on this
    machine (another port: the same site, so the cookie would go with it) opens no websocket."""
    import http.server
    import threading

    from dicom_factory import require_tool
    from playwright.sync_api import sync_playwright
    from web_driver import CHROMIUM_FLAGS

    async def inject():
        async with legitimate(server) as client:
            await client.hello()
            await client.set_state(trame__template_main='<div id="injected">{{ window.injected = 1 }}</div>')

    run(inject())
    (tmp_path / "evil.html").write_text(
        "<script>window.verdict = new Promise(done => {"
        f" const socket = new WebSocket('ws://127.0.0.1:{server.port}/ws');"
        " socket.onopen = () => done('open'); socket.onerror = () => done('refused'); });</script>"
    )
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(
                executable_path=require_tool("chromium", "chromium"), args=CHROMIUM_FLAGS
            )
            try:
                context = browser.new_context(viewport={"width": 1400, "height": 900})
                page = context.new_page()
                page.set_default_timeout(60_000)
                page.goto(server.url)  # the announced address: the panel's controls appear
                page.get_by_test_id("apply").wait_for()
                assert page.evaluate("window.injected") is None and page.locator("#injected").count() == 0
                assert (
                    "secret" not in page.url and "token" not in page.url
                )  # trame's client cleared the address
                page.reload()  # the token left the address bar: a reload says to open the printed address
                assert "needs the address with its token" in page.content()
                stranger = browser.new_context().new_page()
                stranger.goto(f"http://127.0.0.1:{server.port}/")
                assert "needs the address with its token" in stranger.content()
                foreign = context.new_page()  # the user's own browser, cookie and all
                foreign.goto(f"http://127.0.0.1:{evil.server_address[1]}/evil.html")
                assert foreign.evaluate("window.verdict") == "refused"
            finally:
                browser.close()
    finally:
        evil.shutdown()
    assert "refused a websocket from a foreign Origin" in server.log.read_text()


def test_view_calls_take_only_well_formed_events_for_the_pages_own_views(server):
    """A mistyped event field aborts VTK (the whole server); trame-rca's push, drop and reset let
    one client replace or freeze every viewer's image: refused, the server keeps answering."""

    async def attack():
        async with legitimate(server) as client:
            await client.hello()
            area = next(iter(json_areas(await client.state())), "Radiograph")
            replies = [
                await client.call("trame.rca.event", area, "x", {"type": "MouseMove", "x": "a", "y": 1}),
                await client.call("trame.rca.event", area, "x", {"type": "MouseMove", "x": [1], "y": 1}),
                await client.call(
                    "trame.rca.event", "no such view", "x", {"type": "MouseMove", "x": 1, "y": 1}
                ),
                await client.call("trame.rca.size", area, "x", {"w": 8000, "h": 8000, "p": 1}),
                await client.call("trame.rca.size", area, "x", {"w": 400, "h": 400, "p": "x"}),
            ]
            pushed = await client.call("trame.rca.push", area, {}, b"ATTACKER IMAGE")
            dropped = await client.call("trame.rca.drop", area, "x")
            return replies, pushed, dropped, await client.state()

    before = rss_mb(server)
    replies, pushed, dropped, state = run(attack())
    assert all("error" not in reply for reply in replies)  # refused quietly, no traceback sent
    assert pushed["error"]["message"] == dropped["error"]["message"] == "Unregistered method called"
    assert server.process.poll() is None and state["trame__title"] == "InstructX2X"
    assert rss_mb(server) - before < 200  # an 8000 x 8000 view was never made


def json_areas(state: dict) -> list[str]:
    """The names of the page's views, as trame-slicer puts them in the page's template."""
    import re

    return re.findall(r'name="([^"]+)"', state.get("trame__template_main", ""))


def test_message_shapes_that_expand_are_cut_off(server):
    """A 16 MB message of empty arrays (gigabytes once unpacked), thousands of unfinished message
    ids, a 60 MB instruction: each refused or cut off, the server's memory and answers intact."""
    import msgpack

    async def expanding():
        async with legitimate(server) as client:
            await client.hello()
            bomb = msgpack.packb(
                {
                    "wslink": "1.0",
                    "id": "rpc:c0:99",
                    "method": "trame.state.get",
                    "args": [[[]] * (4 * 2**20)],
                    "kwargs": {},
                }
            )
            await client.send_raw(bomb)
            return (await client.socket.receive()).type

    async def many_ids():
        async with legitimate(server) as client:
            await client.hello()
            try:
                for message_id in range(200):
                    await client.socket.send_bytes(struct.pack("<III", 5000 + message_id, 0, 2) + b"x")
            except aiohttp.ClientConnectionResetError:
                return aiohttp.WSMsgType.CLOSED  # cut off before the 200th
            return (await client.socket.receive()).type

    async def long_text():
        async with legitimate(server) as client:
            await client.hello()
            await client.set_state(instruction="x" * (4 * 2**20))
            return (await client.state())["instruction"]

    before = rss_mb(server)
    closed = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert run(expanding()) in closed and run(many_ids()) in closed
    assert len(run(long_text())) < 4096
    assert rss_mb(server) - before < 200


def test_a_deflated_dicom_upload_is_refused_before_it_is_inflated(server, tmp_path):
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from web_driver import SAMPLE

    dataset = pydicom.dcmread(SAMPLE)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    dataset.save_as(path, enforce_file_format=True)

    async def upload():
        async with legitimate(server) as client:
            await client.hello()
            chunk = {
                "name": "deflated.dcm",
                "size": path.stat().st_size,
                "type": "application/dicom",
                "content": path.read_bytes(),
            }
            await client.call("trame.trigger", "upload_chunk", [[chunk]], {})
            await client.call("trame.trigger", "upload_chunk", [[]], {})
            return (await client.state())["error"]

    assert run(upload()).startswith("deflated DICOM files are not accepted here")


def test_a_page_that_stops_reading_holds_no_one_else(server):
    """wslink sends to all pages under one lock: a client that asks and never reads is cut off
    after the send timeout, and the user is answered meanwhile or right after."""

    async def stalled_and_served():
        stalled = legitimate(server)
        await stalled.__aenter__()
        try:
            await stalled.hello()
            stalled.socket._writer.transport.pause_reading()
            for index in range(400):
                await stalled.send(
                    {
                        "wslink": "1.0",
                        "id": f"rpc:c0:{1000 + index}",
                        "method": "trame.state.get",
                        "args": [],
                        "kwargs": {},
                    }
                )
            started = time.monotonic()
            async with legitimate(server) as user:
                await user.hello()
                title = (await user.state())["trame__title"]
            return title, time.monotonic() - started
        finally:
            await stalled.__aexit__(None, None, None)

    title, waited = run(stalled_and_served())
    assert title == "InstructX2X" and waited < 25  # the send timeout (10 s) and the user's own calls
