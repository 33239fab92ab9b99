"""A DICOMweb server that fails mid-cohort, for the tests: a loopback HTTP proxy in front of a
real Orthanc that passes every request through until told to fail, then answers one kind of
request (``fail``: ``"store"`` for STOW-RS, ``"retrieve"`` for WADO-RS) with an HTTP error
(503 by default, which dicomweb_client retries; 500, which it does not) after ``after`` of them
went through; ``heal`` passes everything again. ``passed`` counts the requests of each kind that
went through, QIDO-RS searches (``"search"``) too."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

PASSED_HEADERS = ("accept", "authorization", "content-type")


class FailingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail: str | None = None
        self.after = 0
        self.status = 503
        self.passed = {"store": 0, "retrieve": 0, "search": 0}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.forward(self, "GET")

            def do_POST(self) -> None:
                proxy.forward(self, "POST")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail_after(self, kind: str, after: int, status: int = 503) -> None:
        with self.lock:
            self.fail, self.after, self.status = kind, after, status
            self.passed = {"store": 0, "retrieve": 0, "search": 0}

    def heal(self) -> None:
        with self.lock:
            self.fail = None

    def forward(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        kind = "store" if method == "POST" else "retrieve" if "/instances/" in handler.path else "search"
        with self.lock:
            failing = kind == self.fail and self.passed[kind] >= self.after
            if not failing:
                self.passed[kind] += 1
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        if failing:
            handler.send_response(self.status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        headers = {name: value for name, value in handler.headers.items() if name.lower() in PASSED_HEADERS}
        answer = requests.request(
            method, self.upstream + handler.path, headers=headers, data=body, timeout=60
        )
        handler.send_response(answer.status_code)
        if "Content-Type" in answer.headers:
            handler.send_header("Content-Type", answer.headers["Content-Type"])
        handler.send_header("Content-Length", str(len(answer.content)))
        handler.end_headers()
        handler.wfile.write(answer.content)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
