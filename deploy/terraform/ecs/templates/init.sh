# Runs in the gatehouse-init container (busybox sh, as root) before the sidecar starts. The
# secrets arrive as environment variables of this container only; they are written to the task's
# shared volume, owned by the sidecar's user, mode 0600, and this container exits.
# shellcheck disable=SC2153 # the GATEHOUSE_* variables come from the task definition
set -eu
umask 077
d=${GATEHOUSE_DIR:-/run/gatehouse}
if [ "${GATEHOUSE_ONLINE:-0}" = 1 ]; then
  # Online identity: the secret is the enroll-only certificate; the SVID key never touches disk.
  printf '%s\n' "$GATEHOUSE_CERT_PEM" > "$d/enroll-cert.pem"
  printf '%s\n' "$GATEHOUSE_KEY_PEM" > "$d/enroll-key.pem"
else
  printf '%s\n' "$GATEHOUSE_CERT_PEM" > "$d/cert.pem"
  printf '%s\n' "$GATEHOUSE_KEY_PEM" > "$d/key.pem"
fi
printf '%s\n' "$GATEHOUSE_BUNDLE_PEM" > "$d/bundle.pem"
if [ -n "${GATEHOUSE_CRL_PEM:-}" ]; then printf '%s\n' "$GATEHOUSE_CRL_PEM" > "$d/crl.pem"; fi
printf '%s' "$GATEHOUSE_SIDECAR_TOML" > "$d/sidecar.toml"
printf '%s' "$GATEHOUSE_POLICY_TOML" > "$d/policy.toml"
chown -R 65532:65532 "$d"
# The app's /tmp volume: Fargate creates it root-owned 0755; make it a normal sticky /tmp.
t=${GATEHOUSE_APP_TMP:-/run/app-tmp}
if [ -d "$t" ]; then chmod 1777 "$t"; fi
echo "gatehouse-init: wrote the certificates, sidecar.toml and policy.toml to $d"
