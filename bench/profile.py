#!/usr/bin/env python3
"""Instruction-count profile of one sidecar of the gatehouse pair under valgrind --tool=callgrind.

Starts the backend and the gatehouse pair (like bench.py) with one side wrapped in callgrind, sends a fixed number
of keep-alive requests through the pair (and, for the inbound side, a fixed number of full mTLS handshakes), stops
it, and prints instructions per request (or per handshake) and the top functions. Instruction counts are stable on
a noisy machine, unlike timings. Two runs (a base run and a loaded run) are subtracted so start-up and shutdown
are not charged to requests.

  python3 bench/profile.py --side inbound --requests 3000
  python3 bench/profile.py --side outbound --requests 3000
  python3 bench/profile.py --side inbound --handshakes 200
"""

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402


def keepalive_requests(port, n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    bad = 0
    for _ in range(n):
        conn.request("GET", B.REQUEST_PATH)
        r = conn.getresponse()
        r.read()
        bad += r.status != 200
    conn.close()
    if bad:
        raise B.BenchError(f"{bad} of {n} requests did not get 200")


def one_run(args, work, n_requests, n_handshakes, tag):
    bins = {"sidecar": Path(args.bin_dir) / "sidecar", "ca": Path(args.bin_dir) / "ca",
            "nginx": shutil.which("nginx"), "haproxy": shutil.which("haproxy"), "wrk": None,
            "topologies": ["direct", "gatehouse"]}
    run_dir = work / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    names = ["backend", "nginx_in", "nginx_out", "haproxy_in", "haproxy_out"]
    for key in ("gh", "gha"):
        names += [f"{key}_in", f"{key}_out", f"{key}_in_admin", f"{key}_out_admin", f"{key}_out_spare"]
    ports = dict(zip(names, B.free_ports(len(names))))
    certs = work / "certs" if (work / "certs").exists() else B.mint_certs(bins["ca"], work)
    services = B.render_all(run_dir, certs, ports, bins)
    target = services[f"gatehouse-{args.side}"]
    out_file = run_dir / "callgrind.out"
    target.cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", "--separate-threads=no",
                  "--dump-line=yes"] + target.cmd
    target.stop_timeout = 120  # the profile is written at exit: give the graceful shutdown time under valgrind
    started = []
    try:
        for s in services.values():
            s.start()
            started.append(s)
        for s in services.values():
            s.wait_ready(timeout=300)
        topo = B.topologies_from(services, ports, ["direct", "gatehouse"])["gatehouse"]
        keepalive_requests(topo.url_port, 5)  # both sidecars connected, pools warm
        if n_requests:
            keepalive_requests(topo.url_port, n_requests)
        if n_handshakes:
            out = B.run(B.tlsclient("handshakes", topo, certs, extra=("--max", n_handshakes, "--seconds", 600)),
                        timeout=900)
            res = json.loads(out.strip().splitlines()[-1])
            if res["ok"] != n_handshakes:
                raise B.BenchError(f"handshakes: {res}")
    finally:
        for s in reversed(started):
            s.stop()
    if not out_file.exists():
        raise B.BenchError(f"callgrind wrote no profile ({out_file}); log: {target.log_path}\n{target.log_tail()}")
    return out_file


def total_ir(path):
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise B.BenchError(f"{path}: no totals line")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", default=str(B.ROOT / "target" / "release"))
    p.add_argument("--side", choices=["inbound", "outbound"], default="inbound")
    p.add_argument("--requests", type=int, default=0)
    p.add_argument("--handshakes", type=int, default=0)
    p.add_argument("--work", default="/tmp/gatehouse-profile")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    if not args.requests and not args.handshakes:
        args.requests = 3000
    if shutil.which("valgrind") is None:
        raise B.BenchError("valgrind not found; help: apt-get install valgrind")
    work = Path(args.work) / f"{args.side}-{args.requests}r-{args.handshakes}h"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    base = one_run(args, work, 0, 0, "base")
    loaded = one_run(args, work, args.requests, args.handshakes, "loaded")
    ir_base, ir_loaded = total_ir(base), total_ir(loaded)
    unit = args.requests + args.handshakes
    what = "request" if args.requests else "handshake (+1 request)"
    print(f"{args.side}: {ir_base:,} instructions base run, {ir_loaded:,} loaded run; "
          f"{(ir_loaded - ir_base) / unit:,.0f} instructions per {what}")
    ann = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=99", str(loaded)],
                         capture_output=True, text=True)
    incl = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(loaded)], capture_output=True, text=True)
    (work / "self.txt").write_text(ann.stdout)
    (work / "inclusive.txt").write_text(incl.stdout)

    def top(text, n):
        rows = [ln for ln in text.splitlines() if re.match(r"^\s*[\d,]+ \(", ln)]
        return "\n".join(rows[:n])

    print(f"\nself cost (top {args.top}):\n{top(ann.stdout, args.top)}")
    print(f"\ninclusive (top {args.top}):\n{top(incl.stdout, args.top)}")
    print(f"\nfull annotations: {work}/self.txt, {work}/inclusive.txt; profile {loaded}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except B.BenchError as e:
        print(f"profile: error: {e}", file=sys.stderr)
        sys.exit(1)
