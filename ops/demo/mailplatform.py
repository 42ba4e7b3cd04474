#!/usr/bin/env python3
"""A stand-in for the mail platform that the demo namespace `hosting` notifies.

POST /mailboxes          -> 201 {"id": ..., ...}   (idempotent per Idempotency-Key)
DELETE /mailboxes/<id>   -> 204 (404 when unknown)
GET /mailboxes           -> 200 [...]
Prints `listening on http://HOST:PORT` once ready. Standard library only.
"""
import json
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAILBOXES = {}
BY_KEY = {}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def _send(self, status, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        if self.path != "/mailboxes":
            return self._send(404, {"error": "no such path"})
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._send(400, {"error": "not JSON"})
        key = self.headers.get("Idempotency-Key") or str(uuid.uuid4())
        with LOCK:
            if key in BY_KEY:
                return self._send(201, MAILBOXES.get(BY_KEY[key], {"id": BY_KEY[key]}))
            mid = "mbx-" + uuid.uuid4().hex[:8]
            BY_KEY[key] = mid
            MAILBOXES[mid] = dict(body, id=mid)
            return self._send(201, MAILBOXES[mid])

    def do_DELETE(self):
        mid = self.path.rsplit("/", 1)[-1]
        with LOCK:
            if MAILBOXES.pop(mid, None) is None:
                return self._send(404, {"error": "unknown mailbox"})
        return self._send(204)

    def do_GET(self):
        with LOCK:
            return self._send(200, list(MAILBOXES.values()))

    def log_message(self, fmt, *args):
        sys.stderr.write("mailplatform: " + (fmt % args) + "\n")


def main():
    host, port = "127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 9200
    server = ThreadingHTTPServer((host, port), Handler)
    print(f"listening on http://{host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
