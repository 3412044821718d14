#!/bin/sh
# Copy each service's current SVID (re-issued or not) and the fresh CRL into its Secret in
# namespace fintech. Idempotent: an unchanged certificate makes an unchanged Secret.
set -eu
svids=/var/lib/gatehouse/svids
for svc in monolith report-service; do
  kubectl -n fintech create secret generic "gatehouse-svid-$svc" \
    --from-file=cert.pem="$svids/$svc/cert.pem" \
    --from-file=key.pem="$svids/$svc/key.pem" \
    --from-file=bundle.pem="$svids/$svc/bundle.pem" \
    --from-file=crl.pem="$svids/crl.pem" \
    --dry-run=client -o yaml | kubectl apply -f -
done
