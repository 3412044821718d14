#!/usr/bin/env bash
# ECS rotation, run on the CA host on a schedule shorter than the renewal window (hourly for 72h
# certificates). Fargate tasks read their Secrets Manager secrets once, at start, so a new
# certificate reaches a service only through a new deployment:
#
#   1. `ca rotate --exit-code --format json` on every service's SVID directory ($SVID_ROOT/<service>);
#   2. for each re-issued directory: put the new {cert_pem,key_pem} JSON into
#      $SECRET_PREFIX/<service> and force a new deployment of that service;
#   3. `ca crl` and put the CRL into $SECRET_PREFIX/crl (tasks pick it up on their next start;
#      after a revocation run `rotate.sh --redeploy-all`).
#
# A directory whose certificate is revoked is skipped by `ca rotate` (it never re-mints a revoked
# identity). Exit status: 0 ok (whether or not anything was re-issued), 1 when a step failed.
#
# Environment (all required unless a default is shown):
#   CA_DIR         the CA directory                          e.g. /srv/gatehouse/ca
#   SVID_ROOT      one SVID directory per service below it   e.g. /srv/gatehouse/svids
#   SERVICES       space-separated ECS service names         e.g. "monolith report-service"
#   CLUSTER        ECS cluster name
#   SECRET_PREFIX  Secrets Manager prefix                    e.g. gatehouse/fintech
#   CA, AWS        the ca and aws commands (default: ca, aws on PATH)
#   ROTATE_ARGS    extra `ca rotate` options, e.g. "--renew-before 48h" (default: none)
#   DRY_RUN=1      print the aws commands instead of running them
#
# Usage: rotate.sh [--redeploy-all]
set -euo pipefail

die() {
  printf 'rotate.sh: error: %s\n  help: %s\n' "$1" "$2" >&2
  exit 1
}
for v in CA_DIR SVID_ROOT SERVICES CLUSTER SECRET_PREFIX; do
  [[ -n ${!v:-} ]] || die "$v is not set" "see the environment list at the top of this script"
done
ca=${CA:-ca}
aws=${AWS:-aws}
command -v "$ca" >/dev/null || die "the ca command ($ca) was not found" "put ca on PATH or set CA=/path/to/ca"
command -v jq >/dev/null || die "jq was not found" "install jq (it builds the secret JSON)"
redeploy_all=no
[[ ${1:-} == --redeploy-all ]] && redeploy_all=yes

run_aws() {
  if [[ ${DRY_RUN:-} == 1 ]]; then
    printf 'aws'
    printf ' %q' "$@"
    printf '\n'
  else
    "$aws" "$@"
  fi
}

# Secret values go through files in a private directory, never on a command line (ps) or stdout.
work=$(mktemp -d)
chmod 0700 "$work"
trap 'rm -rf "$work"' EXIT

dirs=()
for svc in $SERVICES; do dirs+=("$SVID_ROOT/$svc"); done

# 1. Re-issue what is due. --exit-code: 3 = something was written, 0 = nothing, 1/2 = failure.
set +e
# shellcheck disable=SC2086 # ROTATE_ARGS is a list of options
report=$("$ca" rotate --dir "$CA_DIR" --exit-code --format json ${ROTATE_ARGS:-} "${dirs[@]}")
rc=$?
set -e
[[ $rc == 0 || $rc == 3 ]] || die "ca rotate failed (exit $rc): $report" "fix the directory named above, then re-run"
jq -r '.[] | "\(.action) \(.dir)"' <<<"$report" | sed 's/^/ca rotate: /'

# 2. Publish and redeploy each service whose certificate changed.
for svc in $SERVICES; do
  dir="$SVID_ROOT/$svc"
  action=$(jq -r --arg d "$dir" '.[] | select(.dir == $d) | .action' <<<"$report")
  if [[ $action == rotated ]]; then
    (umask 077 && jq -n --rawfile c "$dir/cert.pem" --rawfile k "$dir/key.pem" '{cert_pem:$c,key_pem:$k}' >"$work/$svc.json")
    run_aws secretsmanager put-secret-value --secret-id "$SECRET_PREFIX/$svc" --secret-string "file://$work/$svc.json"
  fi
  if [[ $action == rotated || $redeploy_all == yes ]]; then
    run_aws ecs update-service --cluster "$CLUSTER" --service "$svc" --force-new-deployment
  fi
done

# 3. A fresh CRL every run (it must be republished before its next-update).
crl="$work/crl.pem"
"$ca" crl --dir "$CA_DIR" --out "$crl" >/dev/null
run_aws secretsmanager put-secret-value --secret-id "$SECRET_PREFIX/crl" --secret-string "file://$crl"
