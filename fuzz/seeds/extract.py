#!/usr/bin/env python3
"""Regenerates the text seeds of the fuzz targets from the repository's own test inputs.

policy_compile: every policy.toml under deploy/ and every raw-string policy in policy/ and tests/;
sidecar_config: every sidecar.toml under deploy/ and every raw-string config in proxy/ and tests/;
path_normalize: every string literal starting with `/` in the path tests, once per option byte.
The PEM and CSR seeds come from make-pki.sh. Run from anywhere: fuzz/seeds/extract.py
"""
import hashlib
import pathlib
import re

here = pathlib.Path(__file__).resolve().parent
repo = here.parent.parent
RAW = re.compile(r'r#+"(.*?)"#+', re.S)
STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


def put(target, data):
    d = here / target
    d.mkdir(exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def rust_files(*paths):
    for p in paths:
        p = repo / p
        yield from sorted(p.rglob("*.rs")) if p.is_dir() else [p]


def literals(f):
    """Every raw string and every plain string literal of a Rust file, unescaped."""
    text = f.read_text()
    for m in RAW.finditer(text):
        yield m.group(1)
    for m in STR.finditer(RAW.sub("", text)):
        try:
            yield m.group(1).encode().decode("unicode_escape").encode("latin-1").decode("utf-8")
        except (UnicodeDecodeError, UnicodeEncodeError):
            pass


# The head policy/tests/load_errors.rs puts before its route snippets.
HEAD = 'version = 1\ntrust_domain = "fintech.internal"\n\n[identities]\nreport-service = "spiffe://fintech.internal/report-service"\n'


for p in sorted((repo / "deploy").rglob("policy.toml")):
    put("policy_compile", p.read_bytes())
for f in rust_files("policy", "tests/src", "tests/tests", "proxy"):
    for s in literals(f):
        if "[identity]" in s or "[inbound]" in s or "[[outbound]]" in s:
            put("sidecar_config", s.encode())
        elif "trust_domain" in s and "version" in s:
            put("policy_compile", s.encode())
        elif "[[route]]" in s:
            put("policy_compile", (HEAD + s).encode())
for p in sorted((repo / "deploy").rglob("sidecar.toml")):
    put("sidecar_config", p.read_bytes())
for f in rust_files("policy/src/path.rs", "policy/tests"):
    for s in literals(f):
        if s.startswith("/") and len(s) < 200:
            for flags in (b"\x00", b"\x01"):
                put("path_normalize", flags + s.encode())
