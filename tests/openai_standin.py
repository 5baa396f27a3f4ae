"""Replies of a stand-in OpenAI-compatible chat server, shaped as vLLM's: JSON bodies, the
model list, whole completions and server-sent-event streams. Used where the subject is the
client or the page, not the model (tests/test_client.py, tests/test_ui_proxy.py)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class OpenAIHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply_models(self, names) -> None:
        self.reply(
            {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "t"} for m in names]}
        )

    def reply_chat(self, body: dict, pieces: list[str], finish_reason: str = "stop", usage: dict | None = None) -> None:
        """The answer ``"".join(pieces)``: whole, or with ``stream`` one chunk per piece, then
        [DONE] (HTTP/1.0: closing the connection ends the stream)."""
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in pieces:
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                }
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        message = {"role": "assistant", "content": "".join(pieces)}
        self.reply(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                **({"usage": usage} if usage else {}),
            }
        )
