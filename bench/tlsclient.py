#!/usr/bin/env python3
"""Small mTLS load client for the benchmark (standard library only).

Modes:
  handshakes  sequential full mTLS handshakes (fresh connection, no resumption) with a client certificate, each
              followed by one `Connection: close` GET whose response status is checked; prints one JSON line.
  hold        opens COUNT mTLS connections, sends one keep-alive GET on each (so the server has finished the
              handshake, verified the client certificate and served a request), prints `READY {json}`, then keeps
              every connection open and idle until stdin reaches EOF.
"""

import argparse
import asyncio
import json
import resource
import socket
import ssl
import sys
import time


def client_context(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    # Servers present SPIFFE SVIDs; the chain is verified, the name is checked by --server-name when given.
    ctx.check_hostname = bool(args.server_name)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def request_bytes(args, close):
    conn = "close" if close else "keep-alive"
    return (f"GET {args.path} HTTP/1.1\r\nHost: {args.server_name or args.host}\r\n"
            f"Connection: {conn}\r\nUser-Agent: gatehouse-bench\r\n\r\n").encode()


def status_of(head):
    line = head.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else 0


def one_handshake(ctx, args):
    with socket.create_connection((args.host, args.port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname=args.server_name or None) as tls:
            tls.sendall(request_bytes(args, close=True))
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
            return status_of(data)


def run_handshakes(args):
    ctx = client_context(args)
    ok = failed = 0
    statuses = {}
    errors = {}
    start = time.monotonic()
    deadline = start + args.seconds
    while time.monotonic() < deadline and (args.max == 0 or ok + failed < args.max):
        try:
            status = one_handshake(ctx, args)
            statuses[status] = statuses.get(status, 0) + 1
            if status == args.expect:
                ok += 1
            else:
                failed += 1
        except (OSError, ssl.SSLError) as e:
            failed += 1
            key = type(e).__name__ + ": " + str(e)[:120]
            errors[key] = errors.get(key, 0) + 1
    elapsed = time.monotonic() - start
    print(json.dumps({"ok": ok, "failed": failed, "elapsed_s": elapsed,
                      "statuses": {str(k): v for k, v in statuses.items()}, "errors": errors}))
    return 0 if ok > 0 else 1


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status_of(head)


async def hold(args):
    ctx = client_context(args)
    gate = asyncio.Semaphore(args.parallel)
    conns = []
    failures = {}

    async def open_one():
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(args.host, args.port, ssl=ctx,
                                            server_hostname=args.server_name or None), 30)
                writer.write(request_bytes(args, close=False))
                await writer.drain()
                status = await asyncio.wait_for(read_response(reader), 30)
                if status != args.expect:
                    failures[f"status {status}"] = failures.get(f"status {status}", 0) + 1
                conns.append((reader, writer))
            except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                key = type(e).__name__
                failures[key] = failures.get(key, 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(args.count)))
    report = {"open": len(conns), "failures": failures, "elapsed_s": time.monotonic() - start}
    print("READY " + json.dumps(report), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    still_open = sum(1 for r, _ in conns if not r.at_eof())
    for _, w in conns:
        w.close()
    print("CLOSED " + json.dumps({"still_open_at_end": still_open}), flush=True)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["handshakes", "hold"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--server-name", default="", help="check the server certificate's DNS name (default: chain only)")
    p.add_argument("--path", default="/")
    p.add_argument("--expect", type=int, default=200, help="expected HTTP status")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--max", type=int, default=0, help="stop after this many handshakes (0 = time bound only)")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--parallel", type=int, default=32)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, args.count + 256):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    if args.mode == "handshakes":
        return run_handshakes(args)
    return asyncio.run(hold(args))


if __name__ == "__main__":
    sys.exit(main())
