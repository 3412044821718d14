#!/usr/bin/env python3
"""A real WebSocket echo server and client (`websockets`) for the WebSocket-through-Gatehouse
tests (issue 17).

Server:  ws_echo.py serve --listen 127.0.0.1:0
  prints {"listening": "127.0.0.1:PORT"} first, then one JSON line per upgrade request it
  accepted: {"path": "/ws/reports", "headers": {"x-client-spiffe-id": ..., ...}} and one when
  the connection closes: {"closed": "/ws/reports", "messages": N}. Every text or binary
  message is sent back unchanged.
Client:  ws_echo.py call --url ws://127.0.0.1:PORT/ws/reports [--seconds 10] [--interval 0.1]
                         [--header "name: value"]...
  sends a message every --interval for --seconds and checks each echo; prints one JSON object:
  {"ok": bool, "status": 101 | HTTP status of a refused upgrade, "sent": N, "echoed": N,
   "mismatched": N, "seconds": S, "error": str|null}; exit 0 when every message came back.
"""

import argparse
import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import InvalidStatus


def log(obj):
    print(json.dumps(obj), flush=True)


async def echo(ws):
    req = ws.request
    log({"path": req.path, "headers": {k.lower(): v for k, v in req.headers.raw_items()}})
    n = 0
    try:
        async for message in ws:
            n += 1
            await ws.send(message)
    finally:
        log({"closed": req.path, "messages": n})


async def serve(listen):
    host, port = listen.rsplit(":", 1)
    async with ws_serve(echo, host, int(port)) as server:
        bound = next(iter(server.sockets)).getsockname()
        log({"listening": f"{bound[0]}:{bound[1]}"})
        await asyncio.Future()


async def call(args):
    headers = [tuple(h.split(":", 1)) for h in args.header]
    headers = [(k.strip(), v.strip()) for k, v in headers]
    result = {"ok": False, "status": None, "sent": 0, "echoed": 0, "mismatched": 0, "seconds": 0.0, "error": None}
    started = time.monotonic()
    try:
        async with connect(args.url, additional_headers=headers, open_timeout=10) as ws:
            result["status"] = 101
            # The session's clock starts with the open tunnel (the sidecars time the tunnel from
            # their 101, which precedes this), not before the handshake.
            started = time.monotonic()
            i = 0
            while time.monotonic() - started < args.seconds:
                message = f"message-{i}" if i % 2 == 0 else f"message-{i}".encode()
                await ws.send(message)
                result["sent"] += 1
                answer = await asyncio.wait_for(ws.recv(), timeout=10)
                if answer == message:
                    result["echoed"] += 1
                else:
                    result["mismatched"] += 1
                i += 1
                await asyncio.sleep(args.interval)
        result["ok"] = result["sent"] > 0 and result["echoed"] == result["sent"]
    except InvalidStatus as e:
        result["status"] = e.response.status_code
        result["error"] = f"upgrade refused with HTTP {e.response.status_code}"
    except Exception as e:  # a test reads the reason from the JSON
        result["error"] = f"{type(e).__name__}: {e}"
    result["seconds"] = round(time.monotonic() - started, 3)
    log(result)
    return 0 if result["ok"] else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", default="127.0.0.1:0")
    c = sub.add_parser("call")
    c.add_argument("--url", required=True)
    c.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--interval", type=float, default=0.1)
    c.add_argument("--header", action="append", default=[])
    args = p.parse_args()
    if args.command == "serve":
        try:
            asyncio.run(serve(args.listen))
        except KeyboardInterrupt:
            pass
        return 0
    return asyncio.run(call(args))


if __name__ == "__main__":
    sys.exit(main())
