"""A stand-in for an OpenAI-compatible model server (vLLM, SGLang): every chat completion takes a set delay.

Usage:  python scripts/stand_in_openai.py [--port 0] [--delay 1.0] [--fault drop,502,503,429 --fault-every 7]

It answers what ``geo-r1 serve --backend openai`` asks (``GET /v1/models``, ``POST /v1/chat/completions``)
with a Geo-R1-shaped answer and OpenAI ``logprobs`` (``top_logprobs`` alternatives per token), after
``--delay`` seconds, with no limit on how many requests wait at once (a thread per connection), so it
stands for a GPU server whose batch is never full. It is what the scale-out benchmark
(``scripts/bench_scale.py``) and tests (``tests/engine/test_scale_out.py``) run against; no model is involved.

* **Deterministic answers.** The box (or "None") follows from a hash of the image's ``data:`` URI, so the
  same tile gets the same answer on every run and from every instance: two runs can be compared feature
  for feature. The image's size is read from the PNG header inside the URI (boxes stay inside it).
* **Counting.** ``GET /stats`` returns the completions answered, the faults injected and the peak number
  of completions in flight at once; ``POST /stats/reset`` zeroes them.
* **Faults.** ``--fault-every N`` makes every Nth completion fail with the next kind of ``--fault`` (cycled):
  ``drop`` closes the connection without an answer, ``502`` and ``503`` answer that status, ``429`` answers
  "too many requests" with ``Retry-After: --retry-after``. ``POST /control`` changes ``delay``, ``fault``,
  ``fault_every`` and ``retry_after`` of a running stand-in (JSON body), so a test can end a fault.

The first line on stdout is ``listening on http://127.0.0.1:PORT/v1`` (``--port 0``: a free port).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("stand_in")

MODEL_ID = "stand-in"
FAULT_KINDS = ("drop", "502", "503", "429")


class State:
    """The stand-in's settings and counters (shared by the handler threads)."""

    def __init__(self, delay: float, faults: tuple[str, ...], fault_every: int, retry_after: float) -> None:
        self.lock = threading.Lock()
        self.delay = delay
        self.faults = faults
        self.fault_every = fault_every
        self.retry_after = retry_after
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.seen = 0  # completions received (faults included)
            self.answered = 0
            self.injected: dict[str, int] = {}
            self.in_flight = 0
            self.peak_in_flight = 0

    def configure(self, values: dict[str, Any]) -> None:
        with self.lock:
            if "delay" in values:
                self.delay = float(values["delay"])
            if "fault" in values:
                self.faults = parse_faults(values["fault"])
            if "fault_every" in values:
                self.fault_every = int(values["fault_every"])
            if "retry_after" in values:
                self.retry_after = float(values["retry_after"])

    def arrive(self) -> str | None:
        """Count a completion; the fault it gets, if any."""
        with self.lock:
            self.seen += 1
            if self.faults and self.fault_every > 0 and self.seen % self.fault_every == 0:
                kind = self.faults[(self.seen // self.fault_every - 1) % len(self.faults)]
                self.injected[kind] = self.injected.get(kind, 0) + 1
                return kind
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return None

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1
            self.answered += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"received": self.seen, "answered": self.answered, "faults": dict(self.injected),
                    "in_flight": self.in_flight, "peak_in_flight": self.peak_in_flight,
                    "delay": self.delay}  # fmt: skip


def parse_faults(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if not text:
        return ()
    kinds = tuple(k.strip() for k in (text.split(",") if isinstance(text, str) else text) if k.strip())
    for k in kinds:
        if k not in FAULT_KINDS:
            raise ValueError(f"unknown fault {k!r}; use some of {', '.join(FAULT_KINDS)}")
    return kinds


def image_size(uri: str) -> tuple[int, int]:
    """Width and height from the IHDR of a PNG ``data:`` URI (504 × 504 when it is no PNG)."""
    try:
        head = base64.b64decode(uri.split(",", 1)[1][:44])
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    except (IndexError, ValueError):
        pass
    return 504, 504


def answer_text(uri: str, prompt: str) -> str:
    """A Geo-R1-shaped completion that follows from the image: 0 to 2 boxes (one for a REC prompt)."""
    digest = hashlib.blake2b(uri.encode("ascii", "replace"), digest_size=16).digest()
    w, h = image_size(uri)
    rec = "detect the following objects" not in prompt  # Geo-R1's OVD prompt (task multi) says so; REC does not
    n = 1 if rec else digest[0] % 3
    if n == 0:
        return "<think>The stand-in looked and saw nothing.</think> <answer>None</answer>"
    boxes = []
    for k in range(n):
        d = digest[1 + 6 * k : 7 + 6 * k]
        bw, bh = 8 + d[0] % max(1, w // 4), 8 + d[1] % max(1, h // 4)
        x1 = int.from_bytes(d[2:4], "big") % max(1, w - bw)
        y1 = int.from_bytes(d[4:6], "big") % max(1, h - bh)
        boxes.append({"bbox_2d": [x1, y1, x1 + bw, y1 + bh], "label": "storage tank"})
    body = json.dumps(boxes[0] if rec else boxes)
    return f"<think>The stand-in saw {n} tank(s).</think> <answer>{body}</answer>"


def logprobs_for(text: str, top: int) -> dict[str, Any]:
    """OpenAI ``logprobs``: the text in pieces of up to 3 characters, each with ``top`` alternatives."""
    content = []
    for i in range(0, len(text), 3):
        piece = text[i : i + 3]
        alts = [{"token": piece, "logprob": -0.01}]
        if top > 1:
            alts.append({"token": "None", "logprob": -6.0})
        alts.extend({"token": f"#{k}", "logprob": -9.0 - k} for k in range(max(0, top - 2)))
        content.append({"token": piece, "logprob": -0.01, "top_logprobs": alts[:top]})
    return {"content": content}


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def read_json(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self.send_json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})
            elif self.path == "/stats":
                self.send_json(200, state.stats())
            else:
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            try:
                body = self.read_json()
            except (ValueError, UnicodeDecodeError) as exc:
                self.send_json(400, {"error": {"message": f"bad JSON: {exc}"}})
                return
            if self.path == "/stats/reset":
                state.reset()
                self.send_json(200, state.stats())
            elif self.path == "/control":
                state.configure(body)
                self.send_json(200, state.stats())
            elif self.path.rstrip("/") in ("/v1/chat/completions", "/chat/completions"):
                self.chat(body)
            else:
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})

        def chat(self, body: dict[str, Any]) -> None:
            fault = state.arrive()
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault in ("502", "503", "429"):
                headers = {"Retry-After": f"{state.retry_after:g}"} if fault == "429" else {}
                self.send_json(int(fault), {"error": {"message": f"stand-in fault {fault}"}}, headers)
                return
            try:
                time.sleep(state.delay)
                uri, prompt = "", ""
                for message in body.get("messages") or []:
                    for part in message.get("content") or [] if isinstance(message.get("content"), list) else []:
                        if part.get("type") == "image_url":
                            uri = uri or str((part.get("image_url") or {}).get("url", ""))
                        elif part.get("type") == "text":
                            prompt += str(part.get("text", ""))
                text = answer_text(uri, prompt)
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}  # fmt: skip
                if body.get("logprobs"):
                    choice["logprobs"] = logprobs_for(text, int(body.get("top_logprobs") or 1))
                n_tokens = (len(text) + 2) // 3
                self.send_json(200, {"id": "chatcmpl-stand-in", "object": "chat.completion", "model": MODEL_ID,
                                     "choices": [choice],
                                     "usage": {"prompt_tokens": 400, "completion_tokens": n_tokens}})  # fmt: skip
            finally:
                state.leave()

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 would refuse bursts of connections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed on the first line)")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds each chat completion takes")
    parser.add_argument("--fault", default="", help=f"kinds to inject in turn, comma-separated: {FAULT_KINDS}")
    parser.add_argument("--fault-every", type=int, default=0, help="every Nth completion gets a fault (0: none)")
    parser.add_argument("--retry-after", type=float, default=1.0, help="the Retry-After seconds of a 429")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    try:
        faults = parse_faults(args.fault)
    except ValueError as exc:
        parser.error(str(exc))
    state = State(args.delay, faults, args.fault_every, args.retry_after)
    server = Server((args.host, args.port), make_handler(state))
    sys.stdout.write(f"listening on http://{args.host}:{server.server_address[1]}/v1\n")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stand-in stopping: %s", json.dumps(state.stats()))
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
