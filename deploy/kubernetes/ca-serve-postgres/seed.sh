#!/bin/sh
# Lays out the CA directory from the flat keys of Secret gatehouse-ca-dir (Secret keys cannot hold
# a `/`): `ca.json`, `bundle.pem`, and `gen-N.<file>` for each gen-N/<file>. With the CA keys in
# a PKCS#11 token (`ca init --key-store`) the Secret holds no private key at all.
set -eu
src=/etc/gatehouse/ca-dir
dst=/var/lib/gatehouse/ca
umask 077
mkdir -p "$dst"
for f in "$src"/*; do
  n=$(basename "$f")
  case "$n" in
    gen-*.*) d=${n%%.*}; mkdir -p "$dst/$d"; cp "$f" "$dst/$d/${n#*.}" ;;
    *) cp "$f" "$dst/$n" ;;
  esac
done
# The records live in PostgreSQL; these exist only because `ca` expects them.
: >"$dst/inventory.jsonl"
: >"$dst/.lock"
