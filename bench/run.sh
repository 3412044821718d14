#!/usr/bin/env bash
# Gatehouse benchmark, one command: bench/run.sh [bench.py options, e.g. --reps 5 --topologies nginx,gatehouse]
# Installs nginx, HAProxy and wrk when missing (apt-get), builds the release binaries, then bench/bench.py mints the
# certificates with `ca`, starts the backend and every pair on loopback, measures, prints the table and writes
# bench/results/<date>-<short sha>.md. Takes about 10 minutes on 2 cores (plus the release build the first time).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bench] %s\n' "$*" >&2; }

missing=()
for tool in nginx haproxy wrk python3 dnsmasq; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if ((${#missing[@]})); then
  say "installing ${missing[*]} with apt-get"
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages may start system services; the benchmark starts its own instances, on ephemeral ports.
  if command -v systemctl >/dev/null 2>&1; then "${sudo[@]}" systemctl stop nginx haproxy dnsmasq 2>/dev/null || true; fi
fi

# 1,000 idle connections plus their upstream sockets: raise the open-files limit as far as allowed.
hard=$(ulimit -Hn)
if [[ $hard == unlimited ]] || ((hard > 65536)); then ulimit -n 65536; else ulimit -n "$hard"; fi

say "building release binaries (sidecar, ca)"
cargo build --release --locked -p gatehouse-proxy -p gatehouse-ca

sha=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
out="bench/results/$(date -u +%Y-%m-%d)-${sha}.md"
exec python3 bench/bench.py --bin-dir target/release --results "$out" "$@"
