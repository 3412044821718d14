#!/usr/bin/env bash
# Regenerates the PEM and CSR seeds with the real `ca` binary and openssl:
#   pem_load:  cert.pem, key.pem, bundle.pem, crl.pem of a CA with and without an intermediate,
#              each alone and all concatenated (the target reads one file for every role);
#   csr_parse: PKCS#10 requests (P-256, P-384, Ed25519, RSA), PEM and DER.
# Usage: fuzz/seeds/make-pki.sh [path/to/ca]  (default: target/debug/ca; build it first)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ca=${1:-$here/../../target/debug/ca}
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
mkdir -p "$here/pem_load" "$here/csr_parse"
for kind in root:ecdsa-p256: inter:ecdsa-p384:--intermediate ed:ed25519:--intermediate; do
  IFS=: read -r name key flag <<<"$kind"
  "$ca" init --dir "$w/$name" --trust-domain fintech.internal --key-type "$key" ${flag:+"$flag"} >/dev/null
  "$ca" issue --dir "$w/$name" --spiffe-id spiffe://fintech.internal/svc --dns svc.fintech.internal --out "$w/$name-svc" >/dev/null
  "$ca" issue --dir "$w/$name" --spiffe-id spiffe://fintech.internal/gone --out "$w/$name-gone" >/dev/null
  "$ca" revoke --dir "$w/$name" --spiffe-id spiffe://fintech.internal/gone --reason key-compromise --crl "$w/$name-crl.pem" >/dev/null
  for f in cert key bundle; do cp "$w/$name-svc/$f.pem" "$here/pem_load/$name-$f.pem"; done
  cp "$w/$name-crl.pem" "$here/pem_load/$name-crl.pem"
  cat "$w/$name-svc/"{cert,key,bundle}.pem "$w/$name-crl.pem" >"$here/pem_load/$name-all.pem"
done
cd "$w"
openssl ecparam -name prime256v1 -genkey -noout -out p256.key
openssl ecparam -name secp384r1 -genkey -noout -out p384.key
openssl genpkey -algorithm ed25519 -out ed.key 2>/dev/null
openssl genpkey -algorithm rsa -pkeyopt rsa_keygen_bits:2048 -out rsa.key 2>/dev/null
for k in p256 p384 ed rsa; do
  openssl req -new -key $k.key -subj "/CN=$k" -addext "subjectAltName=URI:spiffe://fintech.internal/$k,DNS:$k.example" -out "$here/csr_parse/$k.pem"
  openssl req -in "$here/csr_parse/$k.pem" -outform DER -out "$here/csr_parse/$k.der"
done
