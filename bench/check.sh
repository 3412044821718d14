#!/usr/bin/env bash
# What CI runs for bench/ (.ci/run calls it): every script parses, every rendered config passes its own tool's
# check (nginx -t, haproxy -c, sidecar check), and a 2-second smoke run of the gatehouse pair when the debug
# binaries exist (target/debug/{sidecar,ca}, built by the test suite). The benchmark itself is not run here.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '  bench/check: %s\n' "$*"; }
bins=${BENCH_BIN_DIR:-target/debug}

step "shell syntax"
for f in bench/*.sh; do bash -n "$f"; done
if command -v shellcheck >/dev/null 2>&1; then
  step "shellcheck"
  shellcheck bench/*.sh
fi
step "python syntax"
python3 -c 'import ast, sys
for f in sys.argv[1:]:
    ast.parse(open(f).read(), f)' bench/*.py

tmp=$(mktemp -d /tmp/gatehouse-bench-check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

real_certs=0
if [[ -x $bins/ca ]]; then
  step "rendering configs with certificates from $bins/ca"
  python3 bench/bench.py --render-only --bin-dir "$bins" --work "$tmp/w" >/dev/null
  real_certs=1
else
  # Syntax checks of nginx/HAProxy configs only need well-formed certificate files: mint throwaway ones.
  step "rendering configs with throwaway openssl certificates ($bins/ca not built)"
  c=$tmp/certs
  mkdir -p "$c"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$c/ca.key" -out "$c/bundle.pem" \
    -days 1 -subj "/CN=bench check CA" -addext "basicConstraints=critical,CA:TRUE" 2>/dev/null
  for who in server client other; do
    mkdir -p "$c/$who"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$c/$who/key.pem" -out "$c/$who/csr.pem" \
      -subj "/CN=$who" 2>/dev/null
    printf 'subjectAltName=URI:spiffe://bench.internal/%s,DNS:inbound.bench.internal\n' "$who" >"$c/$who/ext"
    openssl x509 -req -in "$c/$who/csr.pem" -CA "$c/bundle.pem" -CAkey "$c/ca.key" -CAcreateserial -days 1 \
      -extfile "$c/$who/ext" -out "$c/$who/cert.pem" 2>/dev/null
    cat "$c/$who/cert.pem" "$c/$who/key.pem" >"$c/$who/combined.pem"
  done
  python3 bench/bench.py --render-only --certs "$c" --bin-dir "$bins" --work "$tmp/w" >/dev/null
fi

if command -v nginx >/dev/null 2>&1; then
  for name in backend nginx-inbound nginx-outbound; do
    step "nginx -t ($name)"
    nginx -q -t -p "$tmp/w/$name" -e "$tmp/w/$name/error.log" -c "$tmp/w/$name/nginx.conf"
  done
else
  step "nginx not installed: nginx config check skipped"
fi
if command -v haproxy >/dev/null 2>&1; then
  for cfg in "$tmp"/w/conf/haproxy-*.cfg; do
    step "haproxy -c ($(basename "$cfg"))"
    haproxy -q -c -f "$cfg"
  done
else
  step "haproxy not installed: HAProxy config check skipped"
fi

if ((real_certs)) && [[ -x $bins/sidecar ]]; then
  for cfg in "$tmp"/w/conf/gatehouse*-inbound.toml "$tmp"/w/conf/gatehouse*-outbound.toml; do
    step "sidecar check ($(basename "$cfg"))"
    "$bins/sidecar" check --config "$cfg" >/dev/null
  done
  if command -v nginx >/dev/null 2>&1; then
    step "2-second smoke run of the gatehouse pair (debug binaries)"
    timeout 150 python3 bench/bench.py --smoke --bin-dir "$bins" --work "$tmp/smoke"
  fi
else
  step "$bins/sidecar or $bins/ca not built: sidecar check and smoke run skipped (run after cargo test)"
fi
step "ok"
