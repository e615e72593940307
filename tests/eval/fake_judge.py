"""A local OpenAI-compatible chat-completions server for judge tests (127.0.0.1, its own thread)."""
from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import threading
from typing import Callable


@dataclasses.dataclass
class HTTPReply:
    status: int
    body: str = ""
    headers: dict = dataclasses.field(default_factory=dict)


class FakeJudge:
    """reply(body, headers) -> content string, or an HTTPReply to answer with an error status.
    Records every request's path, headers and JSON body."""

    def __init__(self, reply: Callable[[dict], str]):
        self.reply, self.requests = reply, []
        self.wants_headers = reply.__code__.co_argcount >= 2
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                answer = judge.reply(body, dict(self.headers)) if judge.wants_headers else judge.reply(body)
                if isinstance(answer, HTTPReply):
                    status, extra, payload = answer.status, answer.headers, answer.body.encode()
                else:
                    status, extra = 200, {}
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@contextlib.contextmanager
def fake_judge(reply):
    judge = FakeJudge(reply)
    thread = threading.Thread(target=judge.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield judge
    finally:
        judge.server.shutdown()
        judge.server.server_close()


def write_config(path, base_url, **extra) -> str:
    with open(path, "w") as f:
        json.dump({"base_url": base_url, "model": "judge-model", **extra}, f)
    return str(path)
