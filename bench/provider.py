#!/usr/bin/env python3
"""A test OAuth2 token endpoint for the refresh-storm benchmark.

It behaves like the providers tokenproxy exists for: refresh tokens are single-use
and rotate on every grant, a reused one is answered `invalid_grant`, and every
answer is delayed by --latency-ms (the storm target is "provider latency + 50 ms").
It counts grants and rejections so the bench can report how many refreshes the
proxy really made.

  POST /token   grant_type=refresh_token&refresh_token=...   (form body)
  POST /reset?refresh_token=RT   make RT the one valid refresh token; zero counters
  GET  /count   {"grants": N, "rejected": M, "requests": K}

Usage: provider.py [--listen 127.0.0.1:18084] [--latency-ms 100]
"""

import argparse
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"valid": None, "serial": 0, "grants": 0, "rejected": 0, "requests": 0}
LATENCY = 0.1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: the bench prints the counters instead
        pass

    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/count":
            with LOCK:
                self.reply(200, {k: STATE[k] for k in ("grants", "rejected", "requests")})
        else:
            self.reply(404, {"error": "not_found"})

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        if url.path == "/reset":
            query = urllib.parse.parse_qs(url.query)
            with LOCK:
                STATE.update(valid=query["refresh_token"][0], grants=0, rejected=0, requests=0)
            self.reply(200, {"ok": True})
            return
        if url.path != "/token":
            self.reply(404, {"error": "not_found"})
            return
        presented = form.get("refresh_token", [None])[0]
        # Decide (and rotate) under the lock, then wait outside it, so concurrent
        # requests all pay the latency but only one can win a given refresh token.
        with LOCK:
            STATE["requests"] += 1
            if form.get("grant_type", [None])[0] == "refresh_token" and presented == STATE["valid"]:
                STATE["serial"] += 1
                STATE["grants"] += 1
                serial = STATE["serial"]
                STATE["valid"] = f"rt-{serial}"
                answer = (200, {
                    "access_token": f"at-{serial}",
                    "token_type": "bearer",
                    "expires_in": 3600,
                    "refresh_token": f"rt-{serial}",
                })
            else:
                STATE["rejected"] += 1
                answer = (400, {"error": "invalid_grant"})
        time.sleep(LATENCY)
        self.reply(*answer)


def main():
    global LATENCY
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:18084")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    args = parser.parse_args()
    LATENCY = args.latency_ms / 1000.0
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
