#!/usr/bin/env python3
"""The fleet benchmark's slowed backend (standard library only): answers every request with the same ~200-byte body
as the nginx backends, after a timer of --delay-ms (default 50 ms). nginx cannot delay a response without a third-party
module (echo_sleep), so this is asyncio: the wait is a timer, not a busy thread, and at the few hundred requests per
second a balancer sends to a slowed backend its own CPU stays far below one core (bench.py reports its CPU per request
next to the figures, so a saturated backend would show).

  GET /bench_status            nginx stub_status-shaped counters (the third number of line 3 is the request count)
  GET /bench_delay?ms=N        set the delay (the bench turns it on and off between phases)
  anything else                the body, after the delay
"""

import argparse
import asyncio
import sys



async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=50)
    p.add_argument("--body", required=True)
    args = p.parse_args()
    state = {"delay": args.delay_ms / 1000, "requests": 0}
    body = args.body.encode()

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                target = line.split(" ")[1] if " " in line else "/"
                length = 0
                for h in head.split(b"\r\n")[1:]:
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                if target == "/bench_status":
                    n = state["requests"]
                    out = f"Active connections: 0\nserver accepts handled requests\n 0 0 {n}\n".encode()
                    ctype = b"text/plain"
                elif target.startswith("/bench_delay?ms="):
                    state["delay"] = float(target.split("=", 1)[1]) / 1000
                    out, ctype = b"ok\n", b"text/plain"
                else:
                    state["requests"] += 1
                    if state["delay"] > 0:
                        await asyncio.sleep(state["delay"])
                    out, ctype = body, b"application/json"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: " +
                             str(len(out)).encode() + b"\r\nX-Backend: slow\r\n\r\n" + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
