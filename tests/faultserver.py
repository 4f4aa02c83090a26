"""A small OpenAI-compatible server on 127.0.0.1 that misbehaves on demand, for the server fault tests.

Only the standard library: ``http.server`` speaking HTTP/1.1, chat completions streamed as
server-sent events in chunked transfer encoding, as vLLM and ``transformers serve`` send them.
Set ``mode`` before a request:

    ok            the pieces, a finish reason, a usage chunk, [DONE]
    no-usage      as ok, without the usage chunk
    null-usage    as ok, with a usage chunk whose counts are null (some servers send that)
    status        500 with a JSON error body, before any stream
    error-event   two pieces, then an event carrying an error object
    cut           two pieces, then the connection is dropped mid-body (a crashed process)
    eof           two pieces, then a clean end of the body with no finish reason and no [DONE]
    garbage       two pieces, then an event that is not JSON
    stall         two pieces, then silence until ``release`` is set (or 60 s pass)
    queue         silence before the response's headers (a server that queued the request), likewise

``key``: when set, requests without ``Authorization: Bearer KEY`` get 401.
"""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PIECES = ["Hello", ", ", "world", "!"]


class FaultServer:
    def __init__(self, models=("tiny",)):
        self.mode = "ok"
        self.key = None
        self.models = list(models)
        self.pieces = list(PIECES)
        self.usage = {"prompt_tokens": 31, "completion_tokens": len(PIECES), "total_tokens": 31 + len(PIECES)}
        self.requests = []  # the JSON bodies of chat requests, in order
        self.release = threading.Event()
        self.disconnected = threading.Event()  # set when a stalled stream's client went away
        self.httpd = _QuietServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def reset(self, mode="ok"):
        self.mode, self.key = mode, None
        self.release.clear()
        self.disconnected.clear()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hung up on a misbehaving stream is what these tests provoke


def _chunk(piece=None, finish=None):
    delta = {"content": piece} if piece is not None else {}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _handler(server: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _refused(self):
            if server.key and self.headers.get("Authorization") != f"Bearer {server.key}":
                self._json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}})
                return True
            return False

        def do_GET(self):
            if self._refused():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "test"} for name in server.models]})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def _send(self, raw: bytes):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.flush()

        def _event(self, data):
            self._send(b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n")

        def _wait_for_release(self):
            """Say nothing until the test releases us; False (and note it) if the client goes away first."""
            deadline = time.monotonic() + 60
            while not server.release.wait(0.05) and time.monotonic() < deadline:
                try:  # a client that went away shows as a readable socket with nothing to read
                    self.connection.setblocking(False)
                    gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                finally:
                    self.connection.setblocking(True)
                if gone:
                    server.disconnected.set()
                    self.close_connection = True
                    return False
            return True

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self._refused():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._json(404, {"error": {"message": "not found"}})
                return
            server.requests.append(body)
            mode = server.mode
            if mode == "queue" and not self._wait_for_release():
                return
            if mode == "status":
                self._json(500, {"error": {"message": "the engine failed", "type": "server_error"}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pieces = server.pieces if mode in ("ok", "no-usage", "null-usage") else server.pieces[:2]
            for piece in pieces:
                self._event(_chunk(piece))
            if mode in ("ok", "no-usage", "null-usage"):
                self._event(_chunk(finish="stop"))
                if mode == "ok":
                    self._event({**_chunk(), "choices": [], "usage": server.usage})
                elif mode == "null-usage":
                    self._event({**_chunk(), "choices": [], "usage": {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}})
                self._event(b"[DONE]")
            elif mode == "error-event":
                self._event({"error": {"message": "the engine died", "type": "server_error"}})
            elif mode == "garbage":
                self._event(b"<html>502 Bad Gateway</html>")
            elif mode == "cut":
                self.connection.shutdown(socket.SHUT_RDWR)  # mid-body, no terminating chunk
                self.close_connection = True
                return
            elif mode == "stall" and not self._wait_for_release():
                return
            self._send(b"")  # the terminating chunk: the body ends cleanly
            self.close_connection = True

    return Handler
