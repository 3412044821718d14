#!/usr/bin/env python3
"""Open one local HTML file in headless Chromium over the DevTools protocol (--remote-debugging-pipe,
so no port and no third-party module) and report, as one JSON object on stdout, what a reviewer's
browser would do with it:

  requests     every URL the page asked for other than the file itself (network, data: excluded)
  console      console messages of level error or warning, uncaught exceptions, and browser log
               entries of level error (a Content-Security-Policy violation is one)
  tables       every <table>: its caption and the text of each row's cells
  svg          for each <svg>: the number of elements with class "node" and the rendered size
  pdf_pages    pages of the print-to-PDF rendering (the page's own @page size)

and writes a full-page PNG screenshot. Usage: cdp_render.py CHROMIUM FILE.html SCREENSHOT.png
Exit 0 when the page loaded (whatever it contained), 2 on a protocol failure or timeout.
"""
import base64, json, os, re, shutil, subprocess, sys, tempfile, time, select

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "about:blank"]
TIMEOUT = 20.0


def high_pipe():
    ends = os.pipe()
    high = tuple(os.dup(fd) for fd in ends)
    for fd in ends:
        os.close(fd)
    return high


def main():
    chromium, html, shot = sys.argv[1:4]
    url = "file://" + os.path.abspath(html)
    profile = tempfile.mkdtemp(prefix="gatehouse-cdp-")
    # Keep the pipe ends above 4 so that wiring them to fds 3 and 4 in the child clobbers nothing.
    to_child_r, to_child_w = high_pipe()
    from_child_r, from_child_w = high_pipe()

    def wire():
        os.dup2(to_child_r, 3)
        os.dup2(from_child_w, 4)

    proc = subprocess.Popen([chromium, *FLAGS, "--user-data-dir=" + profile], preexec_fn=wire,
                            pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(to_child_r)
    os.close(from_child_w)
    out = os.fdopen(to_child_w, "wb", buffering=0)
    inp = os.fdopen(from_child_r, "rb", buffering=0)
    buf = b""
    next_id = [0]
    events = []
    deadline = time.monotonic() + TIMEOUT

    def read_msg():
        nonlocal buf
        while b"\0" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([inp], [], [], left)[0]:
                raise TimeoutError("chromium did not answer within %ss" % TIMEOUT)
            chunk = inp.read(65536)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            buf += chunk
        msg, buf = buf.split(b"\0", 1)
        return json.loads(msg)

    def call(method, params=None, session=None):
        next_id[0] += 1
        mid = next_id[0]
        m = {"id": mid, "method": method, "params": params or {}}
        if session:
            m["sessionId"] = session
        out.write(json.dumps(m).encode() + b"\0")
        while True:
            r = read_msg()
            if r.get("id") == mid:
                if "error" in r:
                    raise RuntimeError("%s: %s" % (method, r["error"]))
                return r.get("result", {})
            events.append(r)

    def wait_event(name):
        for i, e in enumerate(events):
            if e.get("method") == name:
                return events.pop(i)
        while True:
            e = read_msg()
            if e.get("method") == name:
                return e
            events.append(e)

    try:
        target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            call(domain + ".enable", session=s)
        call("Emulation.setDeviceMetricsOverride",
             {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=s)
        call("Page.navigate", {"url": url}, session=s)
        wait_event("Page.loadEventFired")
        # Let anything the page starts after load (timers, lazy images) show up.
        call("Runtime.evaluate", {"expression": "new Promise(r => setTimeout(r, 300))",
                                  "awaitPromise": True}, session=s)
        report = json.loads(call("Runtime.evaluate", {"returnByValue": True, "expression": r"""
          JSON.stringify({
            tables: [...document.querySelectorAll('table')].map(t => ({
              id: t.id,
              caption: t.caption ? t.caption.textContent.trim().replace(/\s+/g, ' ') : null,
              rows: [...t.rows].map(r => [...r.cells].map(c => c.textContent.trim().replace(/\s+/g, ' '))),
              row_headers: [...t.querySelectorAll('th[scope]')].length,
              visible: t.getBoundingClientRect().width > 0
            })),
            svg: [...document.querySelectorAll('svg')].map(g => ({
              nodes: g.querySelectorAll('.node').length,
              edges: g.querySelectorAll('.edge').length,
              width: g.getBoundingClientRect().width,
              height: g.getBoundingClientRect().height
            })),
            height: document.documentElement.scrollHeight
          })"""}, session=s)["result"]["value"])
        call("Emulation.setDeviceMetricsOverride",
             {"width": 1200, "height": min(int(report["height"]), 8000), "deviceScaleFactor": 1,
              "mobile": False}, session=s)
        png = call("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
        with open(shot, "wb") as f:
            f.write(base64.b64decode(png))
        pdf = base64.b64decode(call("Page.printToPDF", {"preferCSSPageSize": True},
                                    session=s)["data"])
        report["pdf_pages"] = len(re.findall(rb"/Type\s*/Page[^s]", pdf))
        sizes = re.findall(rb"/MediaBox\s*\[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", pdf)
        report["pdf_page_size_pt"] = [float(x) for x in sizes[0]] if sizes else None
        # Drain what is already queued, then classify.
        call("Runtime.evaluate", {"expression": "1"}, session=s)
        requests, console = [], []
        for e in events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Network.requestWillBeSent":
                u = p["request"]["url"]
                if u != url and not u.startswith("data:"):
                    requests.append(u)
            elif m == "Network.loadingFailed" and p.get("blockedReason"):
                requests.append("blocked: " + p["blockedReason"])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                console.append("console.%s: %s" % (p["type"], " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", []))))
            elif m == "Runtime.exceptionThrown":
                console.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                console.append("log.%s: %s" % (p["entry"]["level"], p["entry"]["text"]))
        report["requests"] = requests
        report["console"] = console
        try:
            call("Browser.close")
        except (EOFError, RuntimeError):
            pass
        print(json.dumps(report))
        return 0
    except (TimeoutError, EOFError, RuntimeError) as e:
        print("cdp_render.py: %s" % e, file=sys.stderr)
        return 2
    finally:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
