"""Minimal fakes of the Anthropic Messages API and the Gemini API, for end-to-end tests.

Stdlib only. One server answers both APIs (by request path), on the host's loopback:

* Anthropic: ``POST /v1/messages`` (query string such as ``?beta=true`` ignored).
  A request with ``"stream": true`` gets a streamed (SSE) answer, the others a JSON message.
  ``POST /v1/messages/count_tokens`` gets a token count.
* Gemini: ``POST /v1beta/models/MODEL:generateContent`` (JSON) and
  ``POST /v1beta/models/MODEL:streamGenerateContent?alt=sse`` (SSE), ``:countTokens``.

Every answer's text is the server's ``answer`` (a canned phrase the tests look for).
Every request is recorded (method, path, headers, parsed body) in ``server.requests``.
Anything else gets a 404 JSON error (and is recorded too).

Use it as a context manager; it binds ``127.0.0.2`` by default: Linux routes the whole of
127.0.0.0/8 to ``lo``, and a sandbox's ``NO_PROXY=localhost,127.0.0.1,::1`` does not match
127.0.0.2, so a CLI inside ``--unshare-net`` sends its request through the filtering proxy.

    with FakeAPIServer(answer="hello from fake") as fake:
        env = {"ANTHROPIC_BASE_URL": fake.url, "GOOGLE_GEMINI_BASE_URL": fake.url}
        ...
        fake.requests  # what arrived

Run it by hand: ``python3 tests/fake_apis.py [--host 127.0.0.2] [--port 0] [--answer TEXT]``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_HOST = "127.0.0.2"
DEFAULT_ANSWER = "BWFAKE canned answer 7341"
MAX_BODY = 16 * 1024 * 1024


def _sse(event: str | None, data: dict) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(data, separators=(",", ":")) + "\n\n").encode()


def anthropic_message(answer: str, model: str, msg_id: str) -> dict:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": answer}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 7,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def anthropic_stream(answer: str, model: str, msg_id: str) -> bytes:
    """The event sequence of a streamed Messages API answer with one text block."""
    start = anthropic_message("", model, msg_id)
    start["content"] = []
    start["stop_reason"] = None
    start["usage"]["output_tokens"] = 1
    words = answer.split(" ")
    chunks = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
    out = [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        _sse("ping", {"type": "ping"}),
    ]
    for chunk in chunks:
        out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": chunk}}))
    out += [
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 7}}),
        _sse("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(out)


def gemini_response(text: str, model: str) -> dict:
    return {
        "candidates": [{
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
        }],
        "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 7, "totalTokenCount": 19},
        "modelVersion": model,
    }


def _gemini_wants_json(body: dict) -> dict | None:
    """Gemini CLI makes side calls (model routing, next-speaker check, loop detection) that ask
    for JSON output with a schema. Return a plausible JSON object for those, else None."""
    cfg = body.get("generationConfig") or body.get("config") or {}
    if cfg.get("responseMimeType") != "application/json":
        return None
    schema = cfg.get("responseJsonSchema") or cfg.get("responseSchema") or {}
    props = schema.get("properties") or {}
    obj: dict = {}
    for name, spec in props.items():
        typ = str(spec.get("type", "string")).lower()
        if name == "next_speaker":
            obj[name] = "user"
        elif name == "model_choice":
            enum = spec.get("enum") or ["flash"]
            obj[name] = enum[0]
        elif "enum" in spec:
            obj[name] = spec["enum"][0]
        elif typ == "boolean":
            obj[name] = False
        elif typ in ("number", "integer"):
            obj[name] = spec.get("minimum", 1)
        elif typ == "array":
            obj[name] = []
        elif typ == "object":
            obj[name] = {}
        else:
            obj[name] = "fake"
    return obj


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeAPIs/1"
    server: "FakeAPIServer"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = bytearray()
            while len(data) <= MAX_BODY:
                line = self.rfile.readline(1024)
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data += self.rfile.read(size)
                self.rfile.readline(1024)
            return bytes(data)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(min(length, MAX_BODY)) if length > 0 else b""

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if ctype.startswith("text/event-stream"):
            self.send_header("Cache-Control", "no-cache")
        if status == 200 and self.server.api_of(self.path) == "anthropic":
            self.send_header("request-id", "req_fake_0001")
            self.send_header("anthropic-organization-id", "00000000-0000-0000-0000-000000000000")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _handle(self) -> None:
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        target = self.path
        if target.startswith(("http://", "https://")):  # absolute form (a proxy passed it on as is)
            target = urllib.parse.urlsplit(target)._replace(scheme="", netloc="").geturl()
        parts = urllib.parse.urlsplit(target)
        path, query = parts.path, urllib.parse.parse_qs(parts.query)
        self.server.record({
            "time": time.time(),
            "method": self.command,
            "raw_target": self.path,
            "path": path,
            "query": parts.query,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
            "client": self.client_address[0],
        })
        answer = self.server.answer
        body = body if isinstance(body, dict) else {}

        # --- Anthropic Messages API ---
        if self.command == "POST" and path == "/v1/messages/count_tokens":
            return self._json(200, {"input_tokens": 12})
        if self.command == "POST" and path == "/v1/messages":
            model = str(body.get("model") or "claude-fake")
            msg_id = "msg_fake_%04d" % self.server.count()
            if body.get("stream"):
                return self._send(200, anthropic_stream(answer, model, msg_id), "text/event-stream; charset=utf-8")
            return self._json(200, anthropic_message(answer, model, msg_id))

        # --- Gemini API ---
        if self.command == "POST" and ":" in path and "/models/" in path:
            model_part, _, method = path.rpartition(":")
            model = model_part.rsplit("/", 1)[-1]
            if method == "countTokens":
                return self._json(200, {"totalTokens": 12})
            if method in ("generateContent", "streamGenerateContent"):
                structured = _gemini_wants_json(body)
                text = json.dumps(structured) if structured is not None else answer
                resp = gemini_response(text, model)
                if method == "generateContent":
                    return self._json(200, resp)
                if query.get("alt") == ["sse"]:
                    return self._send(200, b"data: " + json.dumps(resp).encode() + b"\r\n\r\n",
                                      "text/event-stream")
                return self._json(200, [resp])

        self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                    "message": f"fake API: no route {self.command} {path}"}})

    do_POST = do_GET = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


class FakeAPIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0, answer: str = DEFAULT_ANSWER):
        super().__init__((host, port), _Handler)
        self.answer = answer
        self._lock = threading.Lock()
        self._requests: list[dict] = []
        self._thread: threading.Thread | None = None

    # -- bookkeeping --
    def record(self, req: dict) -> None:
        with self._lock:
            self._requests.append(req)

    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def requests(self) -> list[dict]:
        with self._lock:
            return list(self._requests)

    @staticmethod
    def api_of(path: str) -> str:
        return "anthropic" if "/v1/messages" in path else "gemini"

    def requests_to(self, api: str) -> list[dict]:
        """Recorded requests that reached a real route of `api` ("anthropic" or "gemini")."""
        if api == "anthropic":
            return [r for r in self.requests if r["path"].startswith("/v1/messages")]
        return [r for r in self.requests
                if "/models/" in r["path"] and r["path"].rpartition(":")[2]
                in ("generateContent", "streamGenerateContent")]

    # -- address --
    @property
    def host(self) -> str:
        return self.server_address[0]

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifetime --
    def start(self) -> "FakeAPIServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-apis", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
            self._thread = None
        self.server_close()

    def __enter__(self) -> "FakeAPIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default=DEFAULT_HOST)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--answer", default=DEFAULT_ANSWER)
    ap.add_argument("--log", help="append each request as a JSON line to this file")
    args = ap.parse_args()
    srv = FakeAPIServer(args.host, args.port, args.answer)
    if args.log:
        orig = srv.record

        def record(req, _orig=orig):
            _orig(req)
            with open(args.log, "a") as f:
                f.write(json.dumps(req) + "\n")
        srv.record = record
    print(f"listening {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
