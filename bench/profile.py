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
  python3 bench/profile.py --pair gatehouse-h1 --side inbound --requests 3000   # HTTP/1.1 between the sidecars

With --perf SECONDS it samples instead (perf record -e cpu-clock, which works without hardware counters): both
sidecars of the pair under wrk load (--conns, default 32), user and kernel time, release binaries at full speed.

  python3 bench/profile.py --perf 10
  python3 bench/profile.py --perf 10 --conns 1 --pair gatehouse-h1
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


def one_run(args, work, n_requests, n_handshakes, tag, valgrind_extra=()):
    bins = {"sidecar": Path(args.bin_dir) / "sidecar", "ca": Path(args.bin_dir) / "ca",
            "nginx": shutil.which("nginx"), "haproxy": shutil.which("haproxy"), "wrk": None,
            "topologies": ["direct", args.pair]}
    run_dir = work / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = B.allocate_ports()
    certs = work / "certs" if (work / "certs").exists() else B.mint_certs(bins["ca"], work)
    services = B.render_all(run_dir, certs, ports, bins)
    target = services[f"{args.pair}-{args.side}"]
    out_file = run_dir / "callgrind.out"
    if args.pair == "nginx":
        # One process, one worker, so callgrind sees every request (the anchors' instruction counts).
        cfg = Path(target.config)
        cfg.write_text(cfg.read_text().replace("master_process on;", "master_process off;")
                       .replace("worker_processes auto;", "worker_processes 1;"))
    elif args.pair == "haproxy":
        cfg = Path(target.config)
        cfg.write_text(cfg.read_text().replace("global\n", "global\n    nbthread 1\n", 1))
    target.cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", "--separate-threads=no",
                  "--dump-line=yes", *valgrind_extra] + target.cmd
    target.stop_timeout = 120  # the profile is written at exit: give the graceful shutdown time under valgrind
    started = []
    try:
        for s in services.values():
            s.start()
            started.append(s)
        for s in services.values():
            s.wait_ready(timeout=300)
        topo = B.topologies_from(services, ports, ["direct", args.pair])[args.pair]
        keepalive_requests(topo.url_port, 5)  # both sidecars connected, pools warm
        B.http_get(topo.url_port, B.DENIED_PATH)  # and a refusal's path (base and loaded runs alike)
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


def perf_run(args, work):
    """Samples both sidecars under wrk load (--conns, default 32) with perf's cpu-clock event; prints the top symbols."""
    pair = args.pair if args.pair.startswith("gatehouse") else "gatehouse"
    if shutil.which("perf") is None or shutil.which("wrk") is None:
        raise B.BenchError("perf and wrk are needed; help: apt-get install linux-perf wrk")
    bins = {"sidecar": Path(args.bin_dir) / "sidecar", "ca": Path(args.bin_dir) / "ca",
            "nginx": shutil.which("nginx"), "haproxy": shutil.which("haproxy"), "wrk": shutil.which("wrk"),
            "topologies": ["direct", pair]}
    ports = B.allocate_ports()
    certs = B.mint_certs(bins["ca"], work)
    services = B.render_all(work, certs, ports, bins)
    started = []
    try:
        B.start_all(services, started)
        topo = B.topologies_from(services, ports, ["direct", pair])[pair]
        B.wrk(bins, topo.url(), 32, 2)  # warm-up
        perfs = []
        for side in ("inbound", "outbound"):
            pid = services[f"{pair}-{side}"].proc.pid
            data = work / f"perf-{side}.data"
            perfs.append((side, data, subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-F", "1999", "-g", "-p", str(pid), "-o", str(data),
                 "--", "sleep", str(args.perf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        res = B.wrk(bins, topo.url(), args.conns, args.perf)
        for _, _, pr in perfs:
            pr.wait(timeout=60)
        print(f"wrk: {res['requests'] / (res['duration_us'] / 1e6):,.0f} req/s at c={args.conns} during sampling")
    finally:
        for s in reversed(started):
            s.stop()
    for side, data, _ in perfs:
        rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym",
                              "--percent-limit", "0.7", "-g", "none"], capture_output=True, text=True)
        (work / f"perf-{side}.txt").write_text(rep.stdout)
        rows = [ln for ln in rep.stdout.splitlines() if re.match(r"^\s+\d+\.\d+%", ln)]
        print(f"\n{side} sidecar, self time (top {args.top}):")
        print("\n".join(rows[:args.top]))
    print(f"\nfull reports: {work}/perf-*.txt (perf report -i {work}/perf-inbound.data for call graphs)")
    return 0


def syscalls_run(args, work):
    """Syscalls per keep-alive request of each half of every pair (strace -c -f), at --conns."""
    if shutil.which("strace") is None or shutil.which("wrk") is None:
        raise B.BenchError("strace and wrk are needed; help: apt-get install strace wrk")
    wanted = ["direct", "gatehouse", "gatehouse-audit", "gatehouse-h1", "nginx", "haproxy"]
    bins = {"sidecar": Path(args.bin_dir) / "sidecar", "ca": Path(args.bin_dir) / "ca",
            "nginx": shutil.which("nginx"), "haproxy": shutil.which("haproxy"), "wrk": shutil.which("wrk"),
            "topologies": wanted}
    ports = B.allocate_ports()
    certs = B.mint_certs(bins["ca"], work)
    services = B.render_all(work, certs, ports, bins)
    started = []
    rows = []
    try:
        for s in services.values():
            s.start()
            started.append(s)
        for s in services.values():
            s.wait_ready()
        topos = B.topologies_from(services, ports, wanted)
        for name in wanted[1:]:
            topo = topos[name]
            B.wrk(bins, topo.url(), args.conns, 1)  # warm-up
            tracers = []
            for side, svc in (("outbound", topo.outbound), ("inbound", topo.inbound)):
                out = work / f"strace-{name}-{side}.txt"
                cmd = ["strace", "-c", "-f", "-o", str(out)]
                for pid in svc.pids():
                    cmd += ["-p", str(pid)]
                tracers.append((side, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                            stderr=subprocess.DEVNULL)))
            import time
            time.sleep(1)
            res = B.wrk(bins, topo.url(), args.conns, args.syscalls)
            for _, _, tr in tracers:
                tr.send_signal(2)
                tr.wait(timeout=30)
            n = res["requests"]
            for side, out, _ in tracers:
                text = out.read_text()
                calls = {}
                for ln in text.splitlines():
                    f = ln.split()
                    if len(f) >= 5 and f[0].replace(".", "").isdigit() and f[-1] != "total":
                        calls[f[-1]] = int(f[3])
                total = sum(calls.values())
                top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
                rows.append((name, side, n, total / n, ", ".join(f"{k} {v / n:.2f}" for k, v in top)))
    finally:
        for s in reversed(started):
            s.stop()
    print(f"syscalls per request at c={args.conns} (strace -c -f; strace slows the proxies, counts stay)")
    print("| pair | half | requests | syscalls/req | top calls per request |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]} |")
    return 0


def annotate(path, inclusive):
    out = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100",
                          "--auto=no", str(path)], capture_output=True, text=True).stdout
    costs = {}
    for ln in out.splitlines():
        m = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", ln)
        if m and "PROGRAM TOTALS" not in m.group(2) and not m.group(2).startswith("=>"):
            costs[m.group(2)] = costs.get(m.group(2), 0) + int(m.group(1).replace(",", ""))
    return costs


def per_unit_diff(base, loaded, unit, inclusive):
    """Per request (or handshake) cost of each function: loaded run minus base run, divided by the count."""
    a, b = annotate(base, inclusive), annotate(loaded, inclusive)
    diff = {k: (v - a.get(k, 0)) / unit for k, v in b.items()}
    return sorted(((k, v) for k, v in diff.items() if v > 0), key=lambda kv: -kv[1])


def short(fn):
    """`file:function [object]` without the registry/rustc prefixes, for reading."""
    fn = re.sub(r"/root/\.cargo/registry/src/index\.crates\.io-[0-9a-f]+/", "", fn)
    fn = re.sub(r"/rustc/[0-9a-f]+/library/", "std:", fn)
    fn = re.sub(r" \[[^\]]*\]$", "", fn)
    return fn[:200]


def total_ir(path):
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise B.BenchError(f"{path}: no totals line")


def self_costs(path, costs):
    """Adds each function's self cost (instructions) in a callgrind profile written with --demangle=no to `costs`,
    keyed by the raw symbol name. A cost line right after `calls=` is the call's inclusive cost and is skipped."""
    names, fn, after_call = {}, None, False
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("fn=", "cfn=")):  # one name table for both; a name is given once, then its id
            callee = line[0] == "c"
            m = re.match(r"c?fn=\((\d+)\)(?: (.*))?$", line)
            if m and m.group(2):
                names[m.group(1)] = m.group(2)
            if not callee:
                fn = names.get(m.group(1)) if m else line[3:]
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if not after_call and fn is not None:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    costs[fn] = costs.get(fn, 0) + int(parts[1])
            after_call = False


def order_run(args, work):
    """Writes the symbol ordering file (`proxy/symbol-order.txt`, see proxy/build.rs): every function of the sidecar
    binary that ran while both sides started, took the bench's functional checks, requests (audit log on and off) and
    full handshakes, hottest first. lld places them together at the start of .text, so a sidecar maps the pages of
    the code it runs and not the rest of the binary (idle RSS, issue 20); the hot path also shares fewer pages."""
    binary = Path(args.bin_dir) / "sidecar"
    have = B.defined_symbols(binary)
    costs = {}
    for pair in ("gatehouse", "gatehouse-audit"):
        for side in ("inbound", "outbound"):
            args.pair, args.side = pair, side
            out = one_run(args, work / f"{pair}-{side}", 300, 20 if side == "inbound" else 0, "order",
                          valgrind_extra=("--demangle=no",))
            self_costs(out, costs)
    ran = sorted((s for s in costs if s in have), key=lambda s: -costs[s])
    text = "".join(f"{s}\n" for s in ran)
    Path(args.order_file).write_text(text)
    print(f"{len(ran)} functions that ran, of {len(have)} symbols in {binary}; written to {args.order_file}")
    return 0


def fresh_dir(args, name):
    """An empty work directory `--work/name` (what an earlier run left there removed)."""
    work = Path(args.work) / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", default=str(B.ROOT / "target" / "release"))
    p.add_argument("--side", choices=["inbound", "outbound"], default="inbound")
    p.add_argument("--pair", choices=["gatehouse", "gatehouse-audit", "gatehouse-h1", "nginx", "haproxy"], default="gatehouse",
                   help="profile a half of this pair (nginx/HAProxy: for comparison, one worker/thread; "
                        "gatehouse-h1: HTTP/1.1 between the sidecars); --perf: gatehouse or gatehouse-h1")
    p.add_argument("--requests", type=int, default=0)
    p.add_argument("--handshakes", type=int, default=0)
    p.add_argument("--work", default="/tmp/gatehouse-profile")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--conns", type=int, default=32, help="wrk connections during --perf sampling")
    p.add_argument("--perf", type=int, default=0, metavar="SECONDS",
                   help="sample both sidecars with perf under wrk load instead of running callgrind")
    p.add_argument("--syscalls", type=int, default=0, metavar="SECONDS",
                   help="count syscalls per request of every pair's halves with strace instead")
    p.add_argument("--order-file", default="", metavar="PATH",
                   help="write the link-time symbol order (proxy/symbol-order.txt) from callgrind runs instead")
    args = p.parse_args()
    if args.syscalls:
        return syscalls_run(args, fresh_dir(args, "syscalls"))
    if args.perf:
        return perf_run(args, fresh_dir(args, "perf"))
    if shutil.which("valgrind") is None:
        raise B.BenchError("valgrind not found; help: apt-get install valgrind")
    if args.order_file:
        return order_run(args, fresh_dir(args, "order"))
    if not args.requests and not args.handshakes:
        args.requests = 3000
    work = fresh_dir(args, f"{args.pair}-{args.side}-{args.requests}r-{args.handshakes}h")
    base = one_run(args, work, 0, 0, "base")
    loaded = one_run(args, work, args.requests, args.handshakes, "loaded")
    ir_base, ir_loaded = total_ir(base), total_ir(loaded)
    unit = args.requests + args.handshakes
    what = "request" if args.requests else "handshake (+1 request)"
    print(f"{args.pair} {args.side}: {ir_base:,} instructions base run, {ir_loaded:,} loaded run; "
          f"{(ir_loaded - ir_base) / unit:,.0f} instructions per {what}")
    for mode in ("self", "inclusive"):
        per = per_unit_diff(base, loaded, unit, inclusive=(mode == "inclusive"))
        (work / f"{mode}-per-{what.split()[0]}.txt").write_text(
            "\n".join(f"{v:12,.0f}  {k}" for k, v in per))
        print(f"\n{mode} cost per {what}, loaded run minus base run (top {args.top}):")
        for k, v in per[:args.top]:
            print(f"{v:10,.0f}  {short(k)}")
    print(f"\nfull lists: {work}/self-per-*.txt, {work}/inclusive-per-*.txt; profile {loaded}")
    return 0


if __name__ == "__main__":
    B.signal.signal(B.signal.SIGTERM, B._terminated)
    B.signal.signal(B.signal.SIGHUP, B._terminated)
    try:
        sys.exit(main())
    except B.BenchError as e:
        print(f"profile: error: {e}", file=sys.stderr)
        sys.exit(1)
