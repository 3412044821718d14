#!/usr/bin/env bash
# Mints everything the FinTech example needs with Gatehouse's `ca`, into OUT (default: ./certs next to
# this script, which is where the sidecar configs look):
#
#   OUT/ca/                         the private CA of trust domain fintech.internal (keys stay here)
#   OUT/bundle.pem                  trust bundle every sidecar verifies against
#   OUT/{monolith,report-service,api-gateway,reports-db}/{cert,key,bundle}.pem   one X.509-SVID per service
#   OUT/revoked-report-service/     a second report-service SVID, revoked at once (a leaked key);
#                                   its serial is in OUT/revoked-report-service/serial
#   OUT/crl.pem                     the CA's CRL naming that serial (the configs' `crl`)
#   OUT/foreign-ca/, OUT/impostor/  another CA claiming the same trust domain, and a report-service
#                                   SVID from it: what an attacker with their own CA would present
#
# Usage: mint.sh [OUT]     environment: CA=path/to/ca (default: `ca` on PATH, else target/debug/ca),
#                                       TTL=24h (SVID lifetime)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/certs}
td=fintech.internal
ttl=${TTL:-24h}
ca=${CA:-}
if [[ -z $ca ]]; then
  ca=$(command -v ca || true)
  [[ -n $ca ]] || ca=$here/../../../target/debug/ca
fi
if [[ ! -x $ca ]]; then
  echo "mint.sh: error: the ca binary was not found at $ca" >&2
  echo "  help: run \`cargo build --workspace --bins --locked\` first, or set CA=/path/to/ca" >&2
  exit 2
fi
if [[ -e $out/ca ]]; then
  echo "mint.sh: error: $out/ca already exists; refusing to mint over an existing CA" >&2
  echo "  help: remove $out to start over, or pass another output directory" >&2
  exit 2
fi
mkdir -p "$out"

step() { printf '==> %s\n' "$*"; }

step "CA for trust domain $td"
"$ca" init --dir "$out/ca" --trust-domain "$td"

for svc in monolith report-service api-gateway reports-db; do
  step "SVID spiffe://$td/$svc"
  "$ca" issue --dir "$out/ca" --spiffe-id "spiffe://$td/$svc" --ttl "$ttl" --out "$out/$svc"
done
cp "$out/monolith/bundle.pem" "$out/bundle.pem"

step "a second report-service SVID, then revoke it (the leaked key)"
issued=$("$ca" issue --dir "$out/ca" --spiffe-id "spiffe://$td/report-service" --ttl "$ttl" \
  --out "$out/revoked-report-service" --format json)
serial=$(printf '%s\n' "$issued" | sed -n 's/.*"serial": *"\([0-9A-Fa-f:]*\)".*/\1/p' | head -n1)
if [[ -z $serial ]]; then
  echo "mint.sh: error: no serial in the output of \`ca issue --format json\`: $issued" >&2
  exit 1
fi
printf '%s\n' "$serial" > "$out/revoked-report-service/serial"
"$ca" revoke --dir "$out/ca" --serial "$serial" --reason key-compromise
"$ca" crl --dir "$out/ca" --out "$out/crl.pem"

step "an impostor: a foreign CA claiming $td, and a report-service SVID from it"
"$ca" init --dir "$out/foreign-ca" --trust-domain "$td"
"$ca" issue --dir "$out/foreign-ca" --spiffe-id "spiffe://$td/report-service" --ttl "$ttl" --out "$out/impostor"

step "done: $out"
