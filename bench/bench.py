#!/usr/bin/env python3
"""Gatehouse benchmark orchestrator (standard library only); bench/run.sh installs the tools and calls it.

One run measures every topology behind the same load, interleaving repetitions so drift on a shared machine hits
every topology alike:

  direct            wrk -> backend (nginx `return 200`, one worker)
  gatehouse         wrk -> outbound sidecar -> mTLS -> inbound sidecar (policy enforcing a route) -> backend
  gatehouse         (audit log off: `[audit] enabled = false`)
  gatehouse-audit   the same pair with the audit log on (both sidecars, buffered, to a file)
  gatehouse-h1      the same pair with HTTP/1.1 between the sidecars (`[[outbound]] protocol = "http1"`)
  gatehouse-2loops  the same pair with two event loops per sidecar (`[runtime] worker_threads = 2`), audit off
  nginx             wrk -> nginx (mTLS origination) -> mTLS -> nginx (client cert verified, route pinned) -> backend
  haproxy           the same with HAProxy

Fleet group (`--topologies fleet`, or any of fleet-gatehouse,fleet-haproxy,fleet-nginx; issue 15): one outbound
in front of THREE inbound proxies on 127.0.0.1, .2 and .3 (one port), each in front of its own backend; two backends
are nginx, the third (bench/slow_backend.py, asyncio) answers after a timer: nginx cannot delay a response without a
third-party module.
  fleet-gatehouse   outbound sidecar -> a DNS name with three A records (dnsmasq) -> three inbound sidecars
  fleet-haproxy     HAProxy `balance leastconn`, health checks -> three HAProxy inbounds
  fleet-nginx       nginx `least_conn` (passive health) -> three nginx inbounds
Two phases per topology, wrk c=32: `even` (no delay) and `slowed` (one backend +50 ms): requests per backend
(max/min), the slowed backend's share, req/s and p99.

Figures: requests/s and p50/p99 at keep-alive c=32 and c=1 (wrk), proxy CPU per request (utime+stime of every
process of the pair from /proc/PID/stat, before/after), inbound CPU per full mTLS handshake (bench/tlsclient.py:
new connection, client certificate, one request), RSS idle and with N idle mTLS connections open. Medians of the
repetitions, each also as a ratio to the best anchor (nginx, HAProxy) measured in the same run.
"""

import argparse
import base64
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONF = HERE / "conf"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

TRUST_DOMAIN = "bench.internal"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/server"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/client"
OTHER_ID = f"spiffe://{TRUST_DOMAIN}/other"
SERVER_DNS = "inbound.bench.internal"
ROUTE = "/api/data/reports"
REQUEST_PATH = ROUTE + "?startDate=2024-01-01&endDate=2024-12-31"
DENIED_PATH = "/admin/users"
# ~200-byte JSON body the backend returns (no single quotes: it sits inside an nginx '...' string).
BODY = ('{"id":"r-000042","status":"ready","startDate":"2024-01-01","endDate":"2024-12-31",'
        '"rows":[{"month":"2024-01","total":1234.56},{"month":"2024-02","total":2345.67}],'
        '"format":"json","owner":"report-service"}')

# Anchor rows: each anchor in the configurations a user would tune it to on this machine, so the "best anchor" of a
# column is the best of them: tool, port key, and the knob (nginx `worker_processes`, HAProxy `nbthread`; HAProxy's
# default is one thread per CPU). `nginx` and `haproxy` keep the tools' defaults.
ANCHOR_VARIANTS = {
    "nginx": ("nginx", "nginx", "auto"),
    "nginx-1w": ("nginx", "nginx1w", "1"),
    "haproxy": ("haproxy", "haproxy", None),
    "haproxy-1t": ("haproxy", "haproxy1t", 1),
}
ANCHORS = tuple(ANCHOR_VARIANTS)
# Gatehouse rows: port key, audit log to a file (else off), `[[outbound]] protocol` (None = default, auto),
# `[runtime] worker_threads` (event loops per sidecar).
# The `-before` rows run the same configurations with another build of `sidecar` (`--before-bin-dir`: a commit
# before a change), so a change's before and after are measured in one run, behind the same load and drift.
GH_VARIANTS = {
    "gatehouse": ("gh", False, None, 1, "sidecar"),
    "gatehouse-audit": ("gha", True, None, 1, "sidecar"),
    "gatehouse-h1": ("gh1", False, "http1", 1, "sidecar"),
    "gatehouse-2loops": ("gh2", False, None, 2, "sidecar"),
    "gatehouse-before": ("ghb", False, None, 1, "sidecar_before"),
    "gatehouse-audit-before": ("ghab", True, None, 1, "sidecar_before"),
}
GATEHOUSE = tuple(GH_VARIANTS)
BEFORE = tuple(t for t, v in GH_VARIANTS.items() if v[4] == "sidecar_before")
ALL_TOPOLOGIES = ("direct",) + GATEHOUSE + ANCHORS
# The fleet group (issue 15): not in the default run; `--topologies fleet` selects all three.
FLEET = ("fleet-gatehouse", "fleet-haproxy", "fleet-nginx")
FLEET_NAME = "inbound.fleet.bench.internal"
FLEET_ADDRS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
FLEET_DELAY_MS = 50


class BenchError(Exception):
    """A step failed; the message says which and what to look at."""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def allocate_ports():
    names = ["backend"]
    for _, key, _ in ANCHOR_VARIANTS.values():
        names += [f"{key}_in", f"{key}_out"]
    for key, *_ in GH_VARIANTS.values():
        names += [f"{key}_in", f"{key}_out", f"{key}_in_admin", f"{key}_out_admin", f"{key}_out_spare"]
    return dict(zip(names, free_ports(len(names))))


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def render(template, out, values):
    text = (CONF / template).read_text()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z0-9_]+@", text)
    if left:
        raise BenchError(f"{template}: unrendered placeholders {sorted(set(left))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def run(cmd, **kw):
    """Run a command, raise BenchError with its output on failure."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise BenchError(f"`{' '.join(map(str, cmd))}` exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------------
# /proc accounting


def proc_children(pid):
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    st = (d / "stat").read_text()
                    if int(st.rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d.name))
                except (OSError, ValueError, IndexError):
                    pass
        return kids


def cpu_ticks(pid):
    return sum(cpu_split(pid))


def cpu_split(pid):
    """(utime, stime) in clock ticks: fields 14 and 15 of /proc/PID/stat (all threads of the process)."""
    st = Path(f"/proc/{pid}/stat").read_text()
    fields = st.rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Service:
    """A process we started (its whole tree is accounted: nginx master + workers)."""

    def __init__(self, name, cmd, logdir, ports, env=None):
        self.name, self.cmd, self.ports = name, [str(c) for c in cmd], ports
        self.log_path = logdir / f"{name}.log"
        self.proc = None
        self.env = env
        self.stop_timeout = 10
        self.host = "127.0.0.1"

    def start(self):
        logf = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=self.env)
        logf.close()

    def pids(self):
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"{self.name} is not running (exit {self.proc and self.proc.returncode}); "
                             f"log: {self.log_path}\n{self.log_tail()}")
        return [self.proc.pid] + proc_children(self.proc.pid)

    def sys_ticks(self):
        return sum(cpu_split(p)[1] for p in self.pids())

    def ticks(self):
        return sum(cpu_ticks(p) for p in self.pids())

    def rss(self):
        return sum(rss_kib(p) for p in self.pids())

    def pss(self):
        vals = [pss_kib(p) for p in self.pids()]
        return None if None in vals else sum(vals)

    def log_tail(self, n=25):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending:
            self.pids()  # raises if it died
            try:
                with socket.create_connection((self.host, pending[0]), timeout=1):
                    pending.pop(0)
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not listen on {pending[0]} within {timeout}s; "
                                     f"log: {self.log_path}\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class Topology:
    def __init__(self, name, url_port, outbound=None, inbound=None, inbound_port=None):
        self.name, self.url_port = name, url_port
        self.outbound, self.inbound, self.inbound_port = outbound, inbound, inbound_port

    @property
    def proxies(self):
        return [s for s in (self.outbound, self.inbound) if s is not None]

    def url(self, path=REQUEST_PATH):
        return f"http://127.0.0.1:{self.url_port}{path}"


def start_all(services, started):
    """Starts every service (each appended to `started`, for the caller's cleanup), then waits until all listen."""
    for s in services.values():
        s.start()
        started.append(s)
    for s in services.values():
        s.wait_ready()


# ---------------------------------------------------------------------------------------------------------------
# setup


def pem_first_der(path):
    text = Path(path).read_text()
    m = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)
    if not m:
        raise BenchError(f"{path}: no certificate")
    return base64.b64decode("".join(m.group(1).split()))


def mint_certs(ca_bin, work):
    ca_dir, certs = work / "ca", work / "certs"
    if certs.exists():
        shutil.rmtree(certs)
    if ca_dir.exists():
        shutil.rmtree(ca_dir)
    run([ca_bin, "init", "--dir", ca_dir, "--trust-domain", TRUST_DOMAIN, "--key-type", "ecdsa-p256"])
    certs.mkdir(parents=True)
    for name, sid, dns in (("server", SERVER_ID, [SERVER_DNS]), ("client", CLIENT_ID, []),
                           ("other", OTHER_ID, [])):
        cmd = [ca_bin, "issue", "--dir", ca_dir, "--spiffe-id", sid, "--out", certs / name]
        for d in dns:
            cmd += ["--dns", d]
        run(cmd)
    shutil.copy(certs / "server" / "bundle.pem", certs / "bundle.pem")
    for name in ("server", "client", "other"):
        d = certs / name
        (d / "combined.pem").write_text((d / "cert.pem").read_text() + (d / "key.pem").read_text())
        os.chmod(d / "combined.pem", 0o600)
    return certs


def common_values(certs):
    """The placeholders every template shares."""
    client_sha1 = hashlib.sha1(pem_first_der(certs / "client" / "cert.pem")).hexdigest()
    return {"CERTS": certs, "SERVER_DNS": SERVER_DNS, "CLIENT_SHA1": client_sha1,
            "CLIENT_SHA1_HEX": client_sha1.upper(), "USER_LINE": "user root root;" if os.geteuid() == 0 else "",
            "BODY": BODY, "TRUST_DOMAIN": TRUST_DOMAIN, "CLIENT_ID": CLIENT_ID, "SERVER_ID": SERVER_ID,
            "ROUTE": ROUTE, "INBOUND_ADDR": "127.0.0.1"}


def nginx_config(work, conf_dir, bins, name, template, values):
    """Renders an nginx config under work/name (its prefix) with a copy in conf_dir; returns it and the command."""
    prefix = work / name
    for t in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / t).mkdir(parents=True, exist_ok=True)
    cfg = render(template, prefix / "nginx.conf", {**values, "PREFIX": prefix})
    shutil.copy(cfg, conf_dir / f"{name}.conf")
    return cfg, [bins["nginx"], "-p", prefix, "-e", prefix / "error.log", "-c", cfg]


def render_all(work, certs, ports, bins):
    """Write every config into work/; returns the services per topology (not started)."""
    conf_dir = work / "conf"
    logs = work / "logs"
    for d in (conf_dir, logs):
        d.mkdir(parents=True, exist_ok=True)
    common = {**common_values(certs), "BACKEND_PORT": ports["backend"]}
    services = {}

    def nginx(name, template, extra):
        return nginx_config(work, conf_dir, bins, name, template, {**common, **extra})

    cfg, cmd = nginx("backend", "nginx-backend.conf", {})
    services["backend"] = Service("backend", cmd, logs, [ports["backend"]])
    services["backend"].config = cfg

    for topo, (tool, key, knob) in ANCHOR_VARIANTS.items():
        if topo not in bins["topologies"]:
            continue
        ports_of = {"INBOUND_PORT": ports[f"{key}_in"], "OUTBOUND_PORT": ports[f"{key}_out"]}
        for side in ("inbound", "outbound"):
            name = f"{topo}-{side}"
            port = ports[f"{key}_in" if side == "inbound" else f"{key}_out"]
            if tool == "nginx":
                cfg, cmd = nginx(name, f"nginx-{side}.conf", {**ports_of, "WORKERS": knob})
            else:
                threads = f"    nbthread {knob}\n" if knob else ""
                cfg = render(f"haproxy-{side}.cfg", conf_dir / f"{name}.cfg",
                             {**common, **ports_of, "NBTHREAD_LINE": threads})
                cmd = [bins["haproxy"], "-f", cfg]
            services[name] = Service(name, cmd, logs, [port])
            services[name].config = cfg

    for topo in GATEHOUSE:
        if topo not in bins["topologies"]:
            continue
        key, audit, protocol, loops, sidecar = GH_VARIANTS[topo]
        policy = render("gatehouse-policy.toml", conf_dir / f"{topo}-policy.toml", common)
        def audit_section(side):
            runtime = f"[runtime]\nworker_threads = {loops}\n\n"
            if audit:
                return runtime + f'[audit]\npath = "{work / "logs" / f"{topo}-{side}-audit.jsonl"}"\n'
            return runtime + AUDIT_OFF_SECTION

        cfg_in = render("gatehouse-inbound.toml", conf_dir / f"{topo}-inbound.toml",
                        {**common, "INBOUND_PORT": ports[f"{key}_in"], "ADMIN_PORT": ports[f"{key}_in_admin"],
                         "POLICY": policy, "AUDIT_SECTION": audit_section("inbound")})
        cfg_out = render("gatehouse-outbound.toml", conf_dir / f"{topo}-outbound.toml",
                         {**common, "INBOUND_PORT": ports[f"{key}_in"], "OUTBOUND_PORT": ports[f"{key}_out"],
                          "ADMIN_PORT": ports[f"{key}_out_admin"], "SPARE_PORT": ports[f"{key}_out_spare"],
                          "POLICY": policy, "AUDIT_SECTION": audit_section("outbound"),
                          "PROTOCOL_LINE": f'protocol  = "{protocol}"' if protocol else ""})
        env = dict(os.environ, RUST_LOG=os.environ.get("BENCH_RUST_LOG", "warn"))
        for side, cfg, port in (("inbound", cfg_in, ports[f"{key}_in"]), ("outbound", cfg_out, ports[f"{key}_out"])):
            name = f"{topo}-{side}"
            services[name] = Service(name, [bins[sidecar], "run", "--config", cfg], logs, [port], env=env)
            services[name].config = cfg
    return services


# The sidecar config has no switch that turns the audit log off (`[audit] path`, default stdout): the "audit off"
# row sends it to /dev/null, so it still pays for building and formatting each line, only not for storing it.
AUDIT_OFF_SECTION = '[audit]\nenabled = false\n'



def topologies_from(services, ports, wanted):
    topos = {"direct": Topology("direct", ports["backend"])}
    for topo, (_, key, _) in ANCHOR_VARIANTS.items():
        if topo in wanted:
            topos[topo] = Topology(topo, ports[f"{key}_out"], services[f"{topo}-outbound"],
                                   services[f"{topo}-inbound"], ports[f"{key}_in"])
    for topo in GATEHOUSE:
        if topo in wanted:
            key = GH_VARIANTS[topo][0]
            topos[topo] = Topology(topo, ports[f"{key}_out"], services[f"{topo}-outbound"],
                                   services[f"{topo}-inbound"], ports[f"{key}_in"])
    return {k: v for k, v in topos.items() if k in wanted}


# ---------------------------------------------------------------------------------------------------------------
# load


def http_get(port, path, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wrk(bins, url, conns, seconds, threads=1):
    cmd = [bins["wrk"], f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", HERE / "wrk-report.lua", url]
    out = run(cmd, timeout=seconds + 60)
    m = re.search(r"WRK_JSON (\{.*\})", out)
    if not m:
        raise BenchError(f"wrk printed no report:\n{out}")
    return json.loads(m.group(1))


def py_load(url_port, path, seconds):
    """Keep-alive HTTP/1.1 loop in Python: the smoke run's load when wrk is not installed."""
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=10)
    n = bad = 0
    lat = []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        t0 = time.monotonic()
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        lat.append((time.monotonic() - t0) * 1e6)
        n += 1
        bad += r.status != 200
    dur = time.monotonic() - start
    conn.close()
    lat.sort()
    pct = lambda q: int(lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else 0  # noqa: E731
    return {"requests": n, "duration_us": int(dur * 1e6), "err_status": bad, "err_connect": 0, "err_read": 0,
            "err_write": 0, "err_timeout": 0, "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99)}


def measure_load(bins, topo, backend, conns, seconds, use_wrk=True):
    procs = topo.proxies
    before = [p.ticks() for p in procs]
    sys_before = sum(p.sys_ticks() for p in procs)
    b_before = backend.ticks()
    if use_wrk:
        res = wrk(bins, topo.url(), conns, seconds)
    else:
        res = py_load(topo.url_port, REQUEST_PATH, seconds)
    after = [p.ticks() for p in procs]
    sys_after = sum(p.sys_ticks() for p in procs)
    b_after = backend.ticks()
    n = res["requests"]
    errors = sum(res[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    if n == 0:
        raise BenchError(f"{topo.name} c={conns}: no request completed")
    if errors > n * 0.001:
        raise BenchError(f"{topo.name} c={conns}: {errors} errors in {n} requests ({res}); "
                         f"see the logs under the work directory")
    us = lambda ticks: ticks / CLK_TCK * 1e6 / n  # noqa: E731
    rec = {"topology": topo.name, "conns": conns, "requests": n, "errors": errors,
           "rps": n / (res["duration_us"] / 1e6), "p50_us": res["p50_us"], "p99_us": res["p99_us"],
           "backend_cpu_us": us(b_after - b_before)}
    if procs:
        rec["proxy_cpu_us"] = us(sum(after) - sum(before))
        rec["proxy_sys_us"] = us(sys_after - sys_before)
        for p, b, a in zip(procs, before, after):
            rec[("outbound" if p is topo.outbound else "inbound") + "_cpu_us"] = us(a - b)
    return rec


def tlsclient(mode, topo, certs, who="client", extra=()):
    return [str(c) for c in [sys.executable, HERE / "tlsclient.py", mode, "--port", topo.inbound_port,
                             "--cert", certs / who / "cert.pem", "--key", certs / who / "key.pem",
                             "--ca", certs / "bundle.pem", "--path", REQUEST_PATH, *extra]]


def measure_handshakes(topo, certs, seconds, max_n=0):
    before = topo.inbound.ticks()
    out = run(tlsclient("handshakes", topo, certs, extra=("--seconds", seconds, "--max", max_n)),
              timeout=seconds + 120)
    after = topo.inbound.ticks()
    res = json.loads(out.strip().splitlines()[-1])
    if res["ok"] == 0 or res["failed"] > res["ok"] * 0.01:
        raise BenchError(f"{topo.name} handshakes: {res}")
    return {"topology": topo.name, "handshakes": res["ok"], "failed": res["failed"],
            "inbound_cpu_us_per_handshake": (after - before) / CLK_TCK * 1e6 / res["ok"],
            "handshakes_per_s": res["ok"] / res["elapsed_s"]}


def measure_idle_conns(topo, certs, count):
    inbound = topo.inbound
    time.sleep(0.5)
    before = inbound.rss()
    cmd = tlsclient("hold", topo, certs, extra=("--count", count))
    holder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        if not line.startswith("READY "):
            raise BenchError(f"{topo.name}: idle-connection client failed: {line}{holder.stderr.read()}")
        ready = json.loads(line[len("READY "):])
        time.sleep(1.0)
        during = inbound.rss()
        holder.stdin.close()
        closed = holder.stdout.readline()
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    still = json.loads(closed[len("CLOSED "):]) if closed.startswith("CLOSED ") else {}
    if ready["open"] < count * 0.99:
        raise BenchError(f"{topo.name}: only {ready['open']} of {count} idle mTLS connections opened: {ready}")
    return {"topology": topo.name, "open": ready["open"], "failures": ready["failures"],
            "still_open_at_end": still.get("still_open_at_end"), "rss_before_kib": before,
            "rss_with_conns_kib": during, "kib_per_conn": (during - before) / ready["open"]}


def check_topology(topo, certs):
    """Functional checks before measuring: the route answers 200 with the body, a denied path 403."""
    status, body = http_get(topo.url_port, REQUEST_PATH)
    if status != 200 or body.decode(errors="replace") != BODY:
        raise BenchError(f"{topo.name}: GET {REQUEST_PATH} gave {status} {body[:200]!r}, expected 200 + the body")
    if topo.name == "direct":
        return {"topology": topo.name, "route": status}
    denied, _ = http_get(topo.url_port, DENIED_PATH)
    if denied != 403:
        raise BenchError(f"{topo.name}: GET {DENIED_PATH} gave {denied}, expected 403 (policy not enforced)")
    # A caller with a valid certificate but another identity is refused on the route itself.
    out = subprocess.run(tlsclient("handshakes", topo, certs, who="other", extra=("--expect", 403, "--max", 1)),
                         capture_output=True, text=True, timeout=60)
    other = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {"ok": 0}
    if other.get("ok") != 1:
        raise BenchError(f"{topo.name}: caller {OTHER_ID} was not refused with 403 on {ROUTE}: {other} "
                         f"{out.stderr}")
    return {"topology": topo.name, "route": status, "denied_path": denied, "other_caller": 403}


# ---------------------------------------------------------------------------------------------------------------
# report


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return "n/a"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def ratio(x, best):
    if x is None or not best:
        return None
    return x / best


def summarize(loads, handshakes, idles, rss_idle, wanted):
    rows = {}
    for t in wanted:
        r = {}
        for c in (32, 1):
            recs = [x for x in loads if x["topology"] == t and x["conns"] == c]
            for k in ("rps", "p50_us", "p99_us", "proxy_cpu_us", "proxy_sys_us", "inbound_cpu_us",
                      "outbound_cpu_us", "backend_cpu_us"):
                r[f"{k}@{c}"] = median([x.get(k) for x in recs])
        hs = [x for x in handshakes if x["topology"] == t]
        r["hs_us"] = median([x["inbound_cpu_us_per_handshake"] for x in hs])
        r["hs_rate"] = median([x["handshakes_per_s"] for x in hs])
        idle = [x for x in idles if x["topology"] == t]
        r["kib_per_conn"] = median([x["kib_per_conn"] for x in idle])
        r["rss_conns_kib"] = median([x["rss_with_conns_kib"] for x in idle])
        ri = rss_idle.get(t, {})
        r["rss_in_kib"], r["rss_out_kib"] = ri.get("inbound"), ri.get("outbound")
        r["pss_in_kib"] = ri.get("inbound_pss")
        rows[t] = r
    return rows


METRICS = [  # key, heading, digits, better
    ("rps@32", "req/s c=32", 0, "high"),
    ("p50_us@32", "p50 µs c=32", 0, "low"),
    ("p99_us@32", "p99 µs c=32", 0, "low"),
    ("rps@1", "req/s c=1", 0, "high"),
    ("p50_us@1", "p50 µs c=1", 0, "low"),
    ("p99_us@1", "p99 µs c=1", 0, "low"),
    ("proxy_cpu_us@32", "pair CPU µs/req c=32", 1, "low"),
    ("proxy_cpu_us@1", "pair CPU µs/req c=1", 1, "low"),
    ("proxy_sys_us@32", "of which kernel c=32", 1, "low"),
    ("proxy_sys_us@1", "of which kernel c=1", 1, "low"),
    ("inbound_cpu_us@32", "inbound CPU µs/req c=32", 1, "low"),
    ("outbound_cpu_us@32", "outbound CPU µs/req c=32", 1, "low"),
    ("backend_cpu_us@32", "backend CPU µs/req c=32", 1, "low"),
    ("hs_us", "inbound CPU µs/handshake", 0, "low"),
    ("rss_in_kib", "RSS idle inbound KiB", 0, "low"),
    ("rss_out_kib", "RSS idle outbound KiB", 0, "low"),
    ("pss_in_kib", "PSS idle inbound KiB", 0, "low"),
    ("rss_conns_kib", "RSS inbound +N conns KiB", 0, "low"),
    ("kib_per_conn", "KiB per idle mTLS conn", 1, "low"),
]


def best_anchor(rows, key, better):
    vals = [(rows[a][key], a) for a in ANCHORS if a in rows and rows[a].get(key) is not None]
    if not vals:
        return None, None
    return (max if better == "high" else min)(vals)


def markdown(rows, wanted, args, idle_count):
    out = []
    cols = [t for t in ALL_TOPOLOGIES if t in wanted]
    out.append("| figure | " + " | ".join(cols) + " | best anchor | " +
               " | ".join(f"{g} / best" for g in GATEHOUSE if g in wanted) + " |")
    out.append("|---" * (len(cols) + 2 + sum(g in wanted for g in GATEHOUSE)) + "|")
    for key, head, digits, better in METRICS:
        head = head.replace("+N", f"+{idle_count}")
        best, who = best_anchor(rows, key, better)
        cells = [fmt(rows[t].get(key), digits) for t in cols]
        rat = [fmt(ratio(rows[g].get(key), best), 2) + "×" if best else "n/a" for g in GATEHOUSE if g in wanted]
        out.append(f"| {head} | " + " | ".join(cells) + f" | {who or 'n/a'} | " + " | ".join(rat) + " |")
    return "\n".join(out)


def targets(rows, wanted):
    """The issue's targets, each with the measured ratio and pass/fail."""
    ghs = [g for g in GATEHOUSE if g in wanted]
    lines = ["| target | " + " | ".join(ghs) + " | verdict |", "|---" * (len(ghs) + 2) + "|"]

    def row(name, fn, ok):
        vals = {g: fn(g) for g in ghs}
        verdicts = []
        for g in ghs:
            if vals[g] is not None:
                verdicts.append(f"{g}: {'met' if ok(vals[g]) else 'NOT met'}")
        cells = [(fmt(vals[g], 2) if vals[g] is not None else "n/a") for g in ghs]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + "; ".join(verdicts) + " |")

    def rat(key, better):
        best, _ = best_anchor(rows, key, better)
        return lambda g: ratio(rows.get(g, {}).get(key), best) if g in rows else None

    # Issue 20's targets: each ratio against the best anchor configuration of the same run.
    row("pair CPU per keep-alive request (c=32) ≤ 0.55× best anchor", rat("proxy_cpu_us@32", "low"),
        lambda v: v <= 0.55)
    row("req/s keep-alive c=32 ≥ 1.3× best anchor", rat("rps@32", "high"), lambda v: v >= 1.3)
    row("pair CPU per request (c=1) ≤ 0.8× best anchor", rat("proxy_cpu_us@1", "low"), lambda v: v <= 0.8)
    direct = rows.get("direct", {}).get("p99_us@1")
    added = {t: rows[t]["p99_us@1"] - direct for t in rows
             if direct is not None and rows[t].get("p99_us@1") is not None and t != "direct"}
    best_added = min((added[a] for a in ANCHORS if a in added), default=None)
    row("added p99 over direct at c=1 (µs) ≤ best anchor's "
        f"({fmt(best_added, 0) if best_added is not None else 'n/a'} µs)",
        lambda g: added.get(g), lambda v: best_added is not None and v <= best_added)
    nginx_conn = min((rows[a]["kib_per_conn"] for a in ANCHORS
                      if a.startswith("nginx") and a in rows and rows[a].get("kib_per_conn")), default=None)
    row("memory per idle mTLS connection ≤ 0.8× nginx's",
        lambda g: ratio(rows[g].get("kib_per_conn"), nginx_conn) if g in rows else None, lambda v: v <= 0.8)
    row("idle RSS per sidecar < 10 MiB (max of inbound, outbound; MiB)",
        lambda g: (max(rows[g]["rss_in_kib"] or 0, rows[g]["rss_out_kib"] or 0) / 1024) if g in rows else None,
        lambda v: v < 10)
    nginx_hs = min((rows[a]["hs_us"] for a in ANCHORS
                    if a.startswith("nginx") and a in rows and rows[a].get("hs_us")), default=None)
    row("inbound CPU per full mTLS handshake ≤ 0.35× nginx",
        lambda g: ratio(rows[g].get("hs_us"), nginx_hs) if g in rows else None, lambda v: v <= 0.35)
    crit = policy_criterion()
    if crit:
        worst = max(crit.values())
        lines.append("| policy decision at 10,000 routes ≤ 1 µs (criterion medians from `target/criterion`, "
                     "`cargo bench -p gatehouse-policy`, not re-run here): "
                     + ", ".join(f"{k} {v:.0f} ns" for k, v in sorted(crit.items())) + " | "
                     + " | ".join("" for _ in ghs) + f" | {'met' if worst <= 1000 else 'NOT met'} |")
    return "\n".join(lines)


def policy_criterion():
    """Medians of the policy crate's criterion bench at 10,000 routes, if it has been run on this machine."""
    out = {}
    for f in (ROOT / "target" / "criterion" / "decide").glob("*/10000/new/estimates.json"):
        try:
            out[f.parts[-4]] = json.loads(f.read_text())["median"]["point_estimate"]
        except (OSError, ValueError, KeyError):
            pass
    return out


def tool_version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


def machine(bins):
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "os": tool_version(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "memory": tool_version(["sh", "-c", "free -m | awk '/Mem:/ {print $2 \" MiB\"}'"]),
        "nginx": tool_version([bins["nginx"], "-v"]),
        "haproxy": tool_version([bins["haproxy"], "-v"]),
        "wrk": tool_version([bins["wrk"], "--version"]) if bins.get("wrk") else "not found",
        "rustc": tool_version(["rustc", "-V"]),
        "openssl": tool_version(["openssl", "version"]),
        "python": platform.python_version(),
        "git": tool_version(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "symbol_order": symbol_order(bins["sidecar"]),
        "mitigations": cpu_mitigations(),
    }


def cpu_mitigations():
    """The kernel's CPU-vulnerability mitigations in force (/sys/devices/system/cpu/vulnerabilities). They set much
    of what a syscall, a wake-up and a context switch cost, so two hosts with the same core count can differ
    threefold in the kernel time per request of every proxy: compare ratios within a run, not figures across runs."""
    d = Path("/sys/devices/system/cpu/vulnerabilities")
    try:
        found = sorted((f.name, f.read_text().strip()) for f in d.iterdir())
    except OSError:
        return "unknown"
    return "; ".join(f"{name}: {state}" for name, state in found if not state.startswith("Not affected")) or "none"


def defined_symbols(binary):
    """The names of the symbols `binary` defines (`nm`), as the linker sees them (not demangled)."""
    return set(subprocess.run(["nm", "--defined-only", "--format=just-symbols", str(binary)],
                              capture_output=True, text=True, timeout=60, check=True).stdout.split())


def symbol_order(binary):
    """How much of proxy/symbol-order.txt the sidecar binary was linked with (proxy/build.rs): a list made from
    another build's symbols (new dependencies, toolchain) is ignored line by line, and idle RSS grows back."""
    listed = (ROOT / "proxy" / "symbol-order.txt").read_text().split()
    try:
        have = defined_symbols(binary)
    except (OSError, subprocess.SubprocessError):
        return "unknown (nm failed)"
    found = sum(s in have for s in listed)
    note = "" if found >= 0.9 * len(listed) else (
        " (stale: regenerate with python3 bench/profile.py --order-file proxy/symbol-order.txt, then rebuild)")
    return f"{found} of {len(listed)} functions of proxy/symbol-order.txt in the binary{note}"


# ---------------------------------------------------------------------------------------------------------------
# main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", default=str(ROOT / "target" / "release"),
                   help="where `sidecar` and `ca` are (default target/release)")
    p.add_argument("--work", default="", help="work directory (default: a new one under /tmp)")
    p.add_argument("--duration", type=float, default=5, help="seconds per wrk run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--handshake-seconds", type=float, default=4)
    p.add_argument("--idle-conns", type=int, default=1000)
    p.add_argument("--before-bin-dir", default="",
                   help="another build's `sidecar` (a commit before a change) for the rows "
                        + ", ".join(BEFORE) + ", measured in the same run")
    p.add_argument("--topologies", default="",
                   help="comma-separated (default: every one; the -before rows only with --before-bin-dir)")
    p.add_argument("--results", default="", help="write the markdown report here")
    p.add_argument("--raw", default="", help="write the raw measurements (JSON) here")
    p.add_argument("--smoke", action="store_true",
                   help="2-second functional smoke run (CI): direct + gatehouse, 1 repetition, few handshakes")
    p.add_argument("--render-only", action="store_true",
                   help="mint certificates and render every config into --work, then stop (config checks)")
    p.add_argument("--certs", default="",
                   help="use this certificate directory (bundle.pem, {server,client,other}/{cert,key,combined}.pem) "
                        "instead of minting one with `ca` (config syntax checks only)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (certificates, rendered configs, logs) after a successful run")
    p.add_argument("--hold", action="store_true", help="after measuring, keep everything running until Ctrl-C")
    args = p.parse_args()

    default = [t for t in ALL_TOPOLOGIES if args.before_bin_dir or t not in BEFORE]
    wanted = [t.strip() for t in args.topologies.split(",") if t.strip()] or default
    wanted = [x for t in wanted for x in (FLEET if t == "fleet" else (t,))]
    fleet_wanted = [t for t in FLEET if t in wanted]
    wanted = [t for t in wanted if t not in FLEET]
    if any(t in BEFORE for t in wanted) and not args.before_bin_dir:
        raise BenchError("the -before rows need --before-bin-dir DIR (a directory with another build's `sidecar`)")
    for t in wanted:
        if t not in ALL_TOPOLOGIES:
            raise BenchError(f"unknown topology {t!r}; known: {', '.join(ALL_TOPOLOGIES + FLEET)}, fleet")
    # `--topologies fleet` alone measures only the fleet group.
    fleet_only = bool(fleet_wanted) and not wanted
    if "direct" not in wanted:
        wanted.insert(0, "direct")
    if args.smoke:
        wanted = [t for t in wanted if t in ("direct", "gatehouse")]
        args.duration, args.reps, args.handshake_seconds, args.idle_conns = 2, 1, 1, 20

    bin_dir = Path(args.bin_dir)
    bins = {"sidecar": bin_dir / "sidecar", "ca": bin_dir / "ca", "nginx": shutil.which("nginx"),
            "sidecar_before": Path(args.before_bin_dir) / "sidecar" if args.before_bin_dir else None,
            "haproxy": shutil.which("haproxy"), "wrk": shutil.which("wrk"), "dnsmasq": shutil.which("dnsmasq"),
            "topologies": wanted}
    need = ([] if args.certs else ["ca"]) + ["nginx"] + \
        (["sidecar"] if any(t in GATEHOUSE for t in wanted) and not args.render_only else []) + \
        (["sidecar_before"] if any(t in BEFORE for t in wanted) and not args.render_only else []) + \
        (["haproxy"] if any(ANCHOR_VARIANTS[t][0] == "haproxy" for t in wanted if t in ANCHOR_VARIANTS) else []) + \
        (["sidecar", "dnsmasq"] if "fleet-gatehouse" in fleet_wanted else []) + \
        (["haproxy"] if "fleet-haproxy" in fleet_wanted else [])
    for k in need:
        if not bins[k] or not Path(bins[k]).exists():
            raise BenchError(f"{k} not found ({bins[k]}); help: run bench/run.sh, which installs and builds it")
    use_wrk = bins["wrk"] is not None
    if not use_wrk and not args.smoke:
        raise BenchError("wrk not found; help: run bench/run.sh, which installs it (apt-get install wrk)")

    work = Path(args.work) if args.work else Path(
        subprocess.run(["mktemp", "-d", "/tmp/gatehouse-bench.XXXXXX"], capture_output=True, text=True).stdout.strip())
    work.mkdir(parents=True, exist_ok=True)
    log(f"work directory {work}")
    ports = allocate_ports()

    certs = Path(args.certs) if args.certs else mint_certs(bins["ca"], work)
    fleet = None
    if fleet_wanted and not args.render_only:
        fleet = run_fleet(args, bins, work, certs, fleet_wanted, use_wrk)
        print("\nFleet (one outbound, three backends, b3 slowed in the `slowed` phase):\n\n" + fleet[0] + "\n")
        if fleet_only:
            if args.results:
                write_fleet_results(Path(args.results), machine(bins), args, fleet)
                log(f"results written to {args.results}")
            if not args.keep and not args.work:
                shutil.rmtree(work, ignore_errors=True)
            return 0
    services = render_all(work, certs, ports, bins)
    if args.render_only:
        print(json.dumps({k: str(s.config) for k, s in services.items()}, indent=1))
        return 0

    started = []
    ok = False
    try:
        start_all(services, started)
        topos = topologies_from(services, ports, wanted)
        backend = services["backend"]
        info = machine(bins)
        checks = [check_topology(t, certs) for t in topos.values()]
        log("functional checks passed: " + ", ".join(c["topology"] for c in checks))
        time.sleep(1)
        rss_idle = {t.name: {"inbound": t.inbound.rss() if t.inbound else None,
                             "outbound": t.outbound.rss() if t.outbound else None,
                             "inbound_pss": t.inbound.pss() if t.inbound else None} for t in topos.values()}
        rss_idle["direct"] = {"inbound": None, "outbound": None, "backend": backend.rss()}

        loads, hss, idles = [], [], []
        order = list(topos.values())
        for t in order:  # warm-up: pools, caches, allocator
            measure_load(bins, t, backend, 32, 1, use_wrk)
        for rep in range(args.reps):
            rot = order[rep % len(order):] + order[:rep % len(order)]
            for conns in ((32, 1) if not args.smoke else (32,)):
                for t in rot:
                    rec = measure_load(bins, t, backend, conns, args.duration, use_wrk)
                    rec["rep"] = rep
                    loads.append(rec)
                    log(f"rep {rep + 1} {t.name:16} c={conns:<2} {rec['rps']:9.0f} req/s p50 {rec['p50_us']}µs "
                        f"p99 {rec['p99_us']}µs pair CPU {rec.get('proxy_cpu_us', 0):.1f}µs/req")
            for t in rot:
                if t.inbound is None:
                    continue
                rec = measure_handshakes(t, certs, args.handshake_seconds, 20 if args.smoke else 0)
                rec["rep"] = rep
                hss.append(rec)
                log(f"rep {rep + 1} {t.name:16} handshakes {rec['handshakes']} "
                    f"inbound CPU {rec['inbound_cpu_us_per_handshake']:.0f}µs/handshake")
        for t in order:
            if t.inbound is None:
                continue
            rec = measure_idle_conns(t, certs, args.idle_conns)
            idles.append(rec)
            log(f"{t.name:16} {rec['open']} idle mTLS conns: RSS {rec['rss_before_kib']} -> "
                f"{rec['rss_with_conns_kib']} KiB ({rec['kib_per_conn']:.1f} KiB/conn)")
        info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        for s in services.values():
            s.pids()  # every process survived the run

        rows = summarize(loads, hss, idles, rss_idle, wanted)
        table = markdown(rows, wanted, args, args.idle_conns)
        tgt = targets(rows, wanted)
        if args.smoke:
            g = rows.get("gatehouse", {})
            print(f"smoke ok: gatehouse pair {fmt(g.get('rps@32'))} req/s at c=32, pair CPU "
                  f"{fmt(g.get('proxy_cpu_us@32'), 1)} µs/req, inbound {fmt(g.get('hs_us'))} µs/handshake, "
                  f"{idles[0]['open'] if idles else 0} idle mTLS connections held")
        else:
            print("\n" + table + "\n\n" + tgt + "\n")
        raw = {"machine": info, "ports": ports, "work": str(work), "checks": checks, "loads": loads,
               "fleet": fleet[1] if fleet else [],
               "handshakes": hss, "idle_conns": idles, "rss_idle": rss_idle, "rows": rows,
               "settings": {"duration_s": args.duration, "reps": args.reps,
                            "handshake_seconds": args.handshake_seconds, "idle_conns": args.idle_conns,
                            "bin_dir": str(bin_dir), "before_bin_dir": args.before_bin_dir, "smoke": args.smoke}}
        if args.raw:
            Path(args.raw).write_text(json.dumps(raw, indent=1, default=str))
        if args.results:
            write_results(Path(args.results), raw, table, tgt, services)
            log(f"results written to {args.results}")
            if not args.smoke and Path(args.results).resolve().parent == (HERE / "results").resolve():
                quote_in_readme(Path(args.results), raw, table, tgt)
        if args.hold:
            log("holding; Ctrl-C to stop")
            signal.pause()
        ok = True
        return 0
    finally:
        for s in reversed(started):
            s.stop()
        if ok and not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            log(f"logs and configs kept in {work}")


def quote_in_readme(results, raw, table, tgt):
    """bench/README.md quotes the latest run (everything after the `latest-results` marker)."""
    readme = HERE / "README.md"
    text = readme.read_text()
    marker = "<!-- latest-results -->"
    if marker not in text:
        return
    m = raw["machine"]
    quote = (f"{marker}\nLatest run: [`results/{results.name}`](results/{results.name}), {m['nproc']} CPUs "
             f"({m['cpu']}), {m['nginx']}, {m['haproxy'].split(' - ')[0]}, {m['rustc']}.\n\n{table}\n\n{tgt}\n")
    readme.write_text(text.split(marker)[0] + quote)


def write_results(path, raw, table, tgt, services):
    m = raw["machine"]
    st = raw["settings"]
    lines = [f"# Gatehouse benchmark {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} "
             f"({m['git']})", "",
             "Produced by `bench/run.sh` (see bench/README.md for what each figure means and how it is measured).", "",
             "## Machine", "",
             f"- {m['nproc']} CPUs: {m['cpu']}; {m['memory']}; kernel {m['kernel']}; {m['os']}",
             f"- {m['nginx']}; {m['haproxy']}; {m['wrk']}; {m['rustc']}; {m['openssl']}; Python {m['python']}",
             f"- load average at start {' '.join(m['loadavg_start'])}, at end {' '.join(m.get('loadavg_end', []))}",
             f"- sidecar link order: {m.get('symbol_order', 'not recorded')}",
             f"- CPU vulnerability mitigations: {m.get('mitigations', 'not recorded')}",
             f"- settings: {st['duration_s']} s per wrk run, {st['reps']} repetitions (medians), "
             f"{st['handshake_seconds']} s of handshakes per repetition, {st['idle_conns']} idle mTLS connections; "
             f"binaries from `{st['bin_dir']}`" +
             (f" (the -before rows: `{st['before_bin_dir']}`)" if st.get("before_bin_dir") else ""), "",
             "## Results (medians; ratios against the best anchor of the same run)", "", table, "",
             "## Targets (issue 20)", "", tgt, "",
             *(["## Fleet (issue 15)", "", FLEET_NOTE, "", fleet_table(raw["fleet"]), ""] if raw.get("fleet") else []),
             "## Functional checks before measuring", "",
             "Each pair answered 200 with the backend's body on the route, 403 on an unrouted path, and 403 to a "
             "valid certificate of another identity on the route itself: " +
             ", ".join(c["topology"] for c in raw["checks"]) + ".", "",
             "## Raw repetitions", "", "| topology | c | rep | req/s | p50 µs | p99 µs | pair CPU µs/req | "
             "of which kernel | inbound | outbound | backend |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in raw["loads"]:
        lines.append(f"| {r['topology']} | {r['conns']} | {r['rep'] + 1} | {r['rps']:.0f} | {r['p50_us']} | "
                     f"{r['p99_us']} | {fmt(r.get('proxy_cpu_us'), 1)} | {fmt(r.get('proxy_sys_us'), 1)} | "
                     f"{fmt(r.get('inbound_cpu_us'), 1)} | "
                     f"{fmt(r.get('outbound_cpu_us'), 1)} | {fmt(r['backend_cpu_us'], 1)} |")
    lines += ["", "| topology | rep | handshakes | failed | handshakes/s | inbound CPU µs/handshake |",
              "|---|---|---|---|---|---|"]
    for r in raw["handshakes"]:
        lines.append(f"| {r['topology']} | {r['rep'] + 1} | {r['handshakes']} | {r['failed']} | "
                     f"{r['handshakes_per_s']:.0f} | {r['inbound_cpu_us_per_handshake']:.0f} |")
    lines += ["", "| topology | idle conns open | RSS before KiB | RSS with conns KiB | KiB/conn |",
              "|---|---|---|---|---|"]
    for r in raw["idle_conns"]:
        lines.append(f"| {r['topology']} | {r['open']} | {r['rss_before_kib']} | {r['rss_with_conns_kib']} | "
                     f"{r['kib_per_conn']:.1f} |")
    lines += ["", "## Configs used", "",
              "Templates: `bench/conf/` (rendered with this run's ports and certificate paths, shown below).", ""]
    for name, s in services.items():
        cfg = Path(s.config)
        lang = "toml" if cfg.suffix == ".toml" else ("nginx" if cfg.suffix == ".conf" else "")
        lines += [f"<details><summary>{name}: <code>{' '.join(s.cmd[:1] + [x for x in s.cmd[1:]])}</code>"
                  "</summary>", "", f"```{lang}", cfg.read_text().rstrip(), "```", "", "</details>", ""]
        if name.endswith("inbound") and name.startswith("gatehouse"):
            pol = cfg.parent / (name.rsplit("-", 1)[0] + "-policy.toml")
            if pol.exists():
                lines += [f"<details><summary>{pol.name}</summary>", "", "```toml", pol.read_text().rstrip(), "```",
                          "", "</details>", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# fleet (issue 15): one outbound balancing over three inbound proxies, one backend slowed


def backend_count(port):
    """Requests a fleet backend has answered (nginx stub_status, or slow_backend.py's look-alike)."""
    status, body = http_get(port, "/bench_status")
    if status != 200:
        raise BenchError(f"backend on {port}: /bench_status answered {status}")
    return int(body.decode().splitlines()[2].split()[2])


def start_fleet(work, certs, bins, wanted):
    """Starts the fleet's backends, DNS server and, per wanted tool, three inbounds and the outbound."""
    conf_dir, logs = work / "fleet-conf", work / "logs"
    for d in (conf_dir, logs):
        d.mkdir(parents=True, exist_ok=True)
    names = ["b1", "b2", "b3", "dns", "gh_in", "gh_out", "gh_out_admin", "gh_in_admin1", "gh_in_admin2",
             "gh_in_admin3", "hap_in", "hap_out", "ngx_in", "ngx_out"]
    ports = dict(zip(names, free_ports(len(names))))
    common = {**common_values(certs), "NBTHREAD_LINE": "", "WORKERS": "1"}
    services = {}

    def nginx(name, template, extra):
        return nginx_config(work, conf_dir, bins, name, template, {**common, **extra})

    def add(name, cmd, cfg, port, host="127.0.0.1", env=None):
        s = Service(name, cmd, logs, [port], env=env)
        s.config, s.host = cfg, host
        services[name] = s
        return s

    # Backends: two nginx, the third slowed by a timer (asyncio; its CPU is reported with the figures).
    for i, key in ((1, "b1"), (2, "b2")):
        cfg, cmd = nginx(f"fleet-backend{i}", "fleet-nginx-backend.conf", {"BACKEND_PORT": ports[key], "NAME": f"b{i}"})
        add(f"fleet-backend{i}", cmd, cfg, ports[key])
    slow_py = HERE / "slow_backend.py"
    add("fleet-backend3-slow", [sys.executable, slow_py, "--port", ports["b3"], "--delay-ms", 0, "--body", BODY],
        slow_py, ports["b3"])
    backends = [ports["b1"], ports["b2"], ports["b3"]]

    if "fleet-gatehouse" in wanted:
        hosts = conf_dir / "fleet-hosts"
        hosts.write_text("".join(f"{a} {FLEET_NAME}\n" for a in FLEET_ADDRS))
        if not bins.get("dnsmasq"):
            raise BenchError("dnsmasq not found; help: apt-get install dnsmasq (bench/run.sh does)")
        cmd = [bins["dnsmasq"], "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
               "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={ports['dns']}", "--local-ttl=5",
               f"--addn-hosts={hosts}", "--pid-file="] + (["--user=root"] if os.geteuid() == 0 else [])
        add("fleet-dns", cmd, hosts, ports["dns"])
        env = dict(os.environ, RUST_LOG=os.environ.get("BENCH_RUST_LOG", "warn"))
        policy = render("gatehouse-policy.toml", conf_dir / "fleet-gatehouse-policy.toml", common)
        runtime = "[runtime]\nworker_threads = 1\n\n" + AUDIT_OFF_SECTION
        for i, addr in enumerate(FLEET_ADDRS, 1):
            cfg = render("gatehouse-inbound.toml", conf_dir / f"fleet-gatehouse-inbound{i}.toml",
                         {**common, "INBOUND_ADDR": addr, "INBOUND_PORT": ports["gh_in"],
                          "ADMIN_PORT": ports[f"gh_in_admin{i}"], "BACKEND_PORT": backends[i - 1],
                          "POLICY": policy, "AUDIT_SECTION": runtime})
            add(f"fleet-gatehouse-inbound{i}", [bins["sidecar"], "run", "--config", cfg], cfg, ports["gh_in"], addr, env)
        cfg = render("fleet-gatehouse-outbound.toml", conf_dir / "fleet-gatehouse-outbound.toml",
                     {**common, "FLEET_NAME": FLEET_NAME, "INBOUND_PORT": ports["gh_in"],
                      "OUTBOUND_PORT": ports["gh_out"], "ADMIN_PORT": ports["gh_out_admin"],
                      "DNS_ADDR": f"127.0.0.1:{ports['dns']}", "AUDIT_SECTION": runtime})
        add("fleet-gatehouse-outbound", [bins["sidecar"], "run", "--config", cfg], cfg, ports["gh_out"], env=env)
    for topo, tool, pin, pout in (("fleet-haproxy", "haproxy", "hap_in", "hap_out"),
                                  ("fleet-nginx", "nginx", "ngx_in", "ngx_out")):
        if topo not in wanted:
            continue
        side = {"INBOUND_PORT": ports[pin], "OUTBOUND_PORT": ports[pout],
                **{f"BACKEND{i}_ADDR": a for i, a in enumerate(FLEET_ADDRS, 1)}}
        for i, addr in enumerate(FLEET_ADDRS, 1):
            name = f"{topo}-inbound{i}"
            extra = {**side, "INBOUND_ADDR": addr, "BACKEND_PORT": backends[i - 1]}
            if tool == "nginx":
                cfg, cmd = nginx(name, "nginx-inbound.conf", extra)
            else:
                cfg = render("haproxy-inbound.cfg", conf_dir / f"{name}.cfg", {**common, **extra})
                cmd = [bins["haproxy"], "-f", cfg]
            add(name, cmd, cfg, ports[pin], addr)
        name = f"{topo}-outbound"
        if tool == "nginx":
            cfg, cmd = nginx(name, "fleet-nginx-outbound.conf", side)
        else:
            cfg = render("fleet-haproxy-outbound.cfg", conf_dir / f"{name}.cfg", {**common, **side})
            cmd = [bins["haproxy"], "-f", cfg]
        add(name, cmd, cfg, ports[pout])
    outbound_ports = {"fleet-gatehouse": ports["gh_out"], "fleet-haproxy": ports["hap_out"],
                      "fleet-nginx": ports["ngx_out"]}
    return services, backends, outbound_ports


def run_fleet(args, bins, work, certs, wanted, use_wrk):
    """The fleet group: per topology an `even` and a `slowed` phase; returns (markdown, raw records)."""
    services, backends, outbound_ports = start_fleet(work, certs, bins, wanted)
    started = []
    try:
        start_all(services, started)
        slow = services["fleet-backend3-slow"]
        recs = []
        for topo in [t for t in FLEET if t in wanted]:
            port = outbound_ports[topo]
            # Functional check, then warm-up: DNS answered, connections open, slow start (5 s) over.
            deadline = time.monotonic() + 30
            while True:
                try:
                    status, _ = http_get(port, REQUEST_PATH)
                except OSError:
                    status = None
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{topo}: no 200 through the outbound within 30 s (last: {status}); "
                                     f"logs under {work / 'logs'}")
                time.sleep(0.2)
            warm = Topology(topo, port)
            for phase, delay in (("even", 0), ("slowed", FLEET_DELAY_MS)):
                http_get(backends[2], f"/bench_delay?ms={delay}")
                measure_load(bins, warm, slow, 32, 2 if args.smoke else 6, use_wrk)
                before = [backend_count(p) for p in backends]
                slow_ticks = slow.ticks()
                rec = measure_load(bins, warm, slow, 32, args.duration, use_wrk)
                after = [backend_count(p) for p in backends]
                counts = [a - b - 1 for a, b in zip(after, before)]  # minus the /bench_status read itself
                total = sum(counts) or 1
                rec.update({"phase": phase, "delay_ms": delay, "per_backend": counts,
                            "max_min": max(counts) / max(1, min(counts)), "slowed_share": counts[2] / total,
                            "slow_backend_cpu_us": (slow.ticks() - slow_ticks) / CLK_TCK * 1e6 / max(1, counts[2])})
                recs.append(rec)
                log(f"{topo:16} {phase:6} {rec['rps']:8.0f} req/s p99 {rec['p99_us']}µs per backend {counts} "
                    f"max/min {rec['max_min']:.2f} slowed share {rec['slowed_share'] * 100:.1f} %")
        for s in services.values():
            s.pids()  # every process survived
        return fleet_table(recs), recs, services
    finally:
        for s in reversed(started):
            s.stop()


FLEET_NOTE = (
    "One outbound in front of three inbound proxies on 127.0.0.1, .2 and .3 (one port), each in front of its own "
    "backend (b1, b2: nginx; b3: bench/slow_backend.py, a 50 ms asyncio timer in the `slowed` phase, none in `even`). "
    "wrk c=32 keep-alive; requests per backend from the backends' own counters. Gatehouse: DNS name with three A "
    "records (dnsmasq), p2c over peak-EWMA; HAProxy: `balance leastconn`, health checks; nginx: `least_conn`.")


def fleet_table(recs):
    lines = ["| topology | phase | req/s | p50 µs | p99 µs | requests per backend (b1 / b2 / b3) | max/min | "
             "b3 share | b3 CPU µs/req |", "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        phase = r["phase"] + (f" (b3 +{r['delay_ms']} ms)" if r["delay_ms"] else "")
        lines.append(f"| {r['topology']} | {phase} | {r['rps']:.0f} | {r['p50_us']} | {r['p99_us']} | "
                     f"{' / '.join(str(c) for c in r['per_backend'])} | {r['max_min']:.2f} | "
                     f"{r['slowed_share'] * 100:.1f} % | {r['slow_backend_cpu_us']:.0f} |")
    return "\n".join(lines)


def write_fleet_results(path, m, args, fleet):
    _, recs, services = fleet
    lines = [f"# Gatehouse fleet benchmark {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} "
             f"({m['git']})", "", "Produced by `bench/run.sh --topologies fleet` (issue 15).", "",
             f"- {m['nproc']} CPUs: {m['cpu']}; {m['nginx']}; {m['haproxy']}; {m['rustc']}",
             f"- {args.duration} s per wrk run{' (smoke)' if args.smoke else ''}", "", FLEET_NOTE, "",
             fleet_table(recs), "", "## Configs used", ""]
    for name, s in services.items():
        cfg = Path(s.config)
        lines += [f"<details><summary>{name}</summary>", "", "```", cfg.read_text().rstrip(), "```", "",
                  "</details>", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _terminated(signum, _frame):
    # SIGTERM/SIGHUP (e.g. `timeout`): unwind so every started process is stopped, not orphaned.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGHUP, _terminated)
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: error: {e}\nhelp: check the tools with bench/check.sh; logs are in the work directory",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
