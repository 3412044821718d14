#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for the gRPC-through-Gatehouse tests (issue 17).

Service `gatehouse.test.Echo`, messages are raw bytes (UTF-8 JSON) with grpcio's generic
handlers, so no generated stubs are needed; the wire is ordinary gRPC over HTTP/2 (h2c):
  /gatehouse.test.Echo/Unary         one request, one response (the request echoed)
  /gatehouse.test.Echo/ServerStream  one request {"count": N}, N responses
  /gatehouse.test.Echo/Bidi          a response per request, as they come
  /gatehouse.test.Echo/Fail          an application error: NOT_FOUND, message "no such report"
  /gatehouse.test.Echo/Slow          sleeps {"seconds": S} before answering (deadline tests)
  /gatehouse.test.Admin/Purge        another service (a method a policy leaves out)

Server:  grpc_echo.py serve --listen 127.0.0.1:0
  prints {"listening": "127.0.0.1:PORT"} first, then one JSON line per call it receives:
  {"method": "/gatehouse.test.Echo/Unary", "metadata": {"x-client-spiffe-id": ...}}
Client:  grpc_echo.py call --target 127.0.0.1:PORT --method unary|server_stream|bidi|fail|slow|purge
                           [--count N] [--deadline SECONDS] [--sleep SECONDS] [--payload TEXT]
  prints one JSON object: {"ok": bool, "code": "OK"|"PERMISSION_DENIED"|..., "details": str,
  "responses": [...], "trailing_metadata": {...}}; exit 0 when the call ended with OK.
"""

import argparse
import json
import sys
import time
from concurrent import futures

import grpc

SERVICE = "gatehouse.test.Echo"
ADMIN = "gatehouse.test.Admin"


def identity(b):
    return b


def log(obj):
    print(json.dumps(obj), flush=True)


def metadata_dict(md):
    out = {}
    for key, value in md or ():
        out[key] = value if isinstance(value, str) else value.decode("latin-1")
    return out


def seen(method, context):
    log({"method": f"/{SERVICE}/{method}", "metadata": metadata_dict(context.invocation_metadata())})


def unary(request, context):
    seen("Unary", context)
    context.set_trailing_metadata((("x-echo-trailer", "unary"),))
    return request


def server_stream(request, context):
    seen("ServerStream", context)
    count = json.loads(request or b"{}").get("count", 3)
    for i in range(count):
        yield json.dumps({"index": i}).encode()


def bidi(request_iterator, context):
    seen("Bidi", context)
    for i, request in enumerate(request_iterator):
        yield json.dumps({"index": i, "echo": request.decode()}).encode()


def fail(request, context):
    seen("Fail", context)
    context.abort(grpc.StatusCode.NOT_FOUND, "no such report")


def slow(request, context):
    seen("Slow", context)
    time.sleep(json.loads(request or b"{}").get("seconds", 5))
    return b"{}"


def purge(request, context):
    log({"method": f"/{ADMIN}/Purge", "metadata": metadata_dict(context.invocation_metadata())})
    return b"{}"


def serve(listen):
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, identity, identity),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, identity, identity),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, identity, identity),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, identity, identity),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, identity, identity),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    admin = {"Purge": grpc.unary_unary_rpc_method_handler(purge, identity, identity)}
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE, handlers),
            grpc.method_handlers_generic_handler(ADMIN, admin),
        )
    )
    port = server.add_insecure_port(listen)
    host = listen.rsplit(":", 1)[0]
    log({"listening": f"{host}:{port}"})
    server.start()
    server.wait_for_termination()


def call(args):
    channel = grpc.insecure_channel(args.target)
    path = lambda m: f"/{SERVICE}/{m}"
    timeout = args.deadline
    responses, trailing = [], {}
    try:
        if args.method in ("unary", "fail", "slow", "purge"):
            name = {"unary": "Unary", "fail": "Fail", "slow": "Slow", "purge": "Purge"}[args.method]
            full = f"/{ADMIN}/Purge" if args.method == "purge" else path(name)
            stub = channel.unary_unary(full, request_serializer=identity, response_deserializer=identity)
            payload = args.payload.encode() if args.method == "unary" else json.dumps({"seconds": args.sleep}).encode()
            response, call_ = stub.with_call(payload, timeout=timeout)
            responses.append(response.decode())
            trailing = metadata_dict(call_.trailing_metadata())
        elif args.method == "server_stream":
            stub = channel.unary_stream(path("ServerStream"), request_serializer=identity, response_deserializer=identity)
            it = stub(json.dumps({"count": args.count}).encode(), timeout=timeout)
            responses = [json.loads(r) for r in it]
            trailing = metadata_dict(it.trailing_metadata())
        elif args.method == "bidi":
            stub = channel.stream_stream(path("Bidi"), request_serializer=identity, response_deserializer=identity)
            requests = (f"message-{i}".encode() for i in range(args.count))
            it = stub(requests, timeout=timeout)
            responses = [json.loads(r) for r in it]
            trailing = metadata_dict(it.trailing_metadata())
        result = {"ok": True, "code": "OK", "details": "", "responses": responses, "trailing_metadata": trailing}
    except grpc.RpcError as e:
        result = {
            "ok": False,
            "code": e.code().name,
            "details": e.details() or "",
            "responses": responses,
            "trailing_metadata": metadata_dict(e.trailing_metadata()),
        }
    log(result)
    return 0 if result["ok"] else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", default="127.0.0.1:0")
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--method", required=True, choices=["unary", "server_stream", "bidi", "fail", "slow", "purge"])
    c.add_argument("--count", type=int, default=3)
    c.add_argument("--deadline", type=float, default=10.0)
    c.add_argument("--sleep", type=float, default=5.0)
    c.add_argument("--payload", default='{"hello": "gatehouse"}')
    args = p.parse_args()
    if args.command == "serve":
        serve(args.listen)
        return 0
    return call(args)


if __name__ == "__main__":
    sys.exit(main())
