"""Gatehouse deployment invariants that no schema can express, checked on the real artefacts.

Schemas (kubernetes-validate, the Argo CD CRDs, systemd-analyze, terraform) say a manifest is
well-formed; this says it is the deployment we mean: hardened pods, the sidecar as a native
sidecar with probes on its admin port, read-only whole-directory mounts (hot reload), only the
sidecar port reachable, Argo CD self-healing, Terraform variables and outputs documented.

    python check_manifests.py k8s RENDERED.yaml...
    python check_manifests.py argocd REPO_ROOT JSON_OUT_DIR RENDER_DIR MANIFEST.yaml...
    python check_manifests.py terraform DIR
    python check_manifests.py extract RENDERED.yaml CONFIGMAP KEY   (prints one ConfigMap value)
    python check_manifests.py run-cronjob RENDERED.yaml CA_BIN ROOT  (runs its `ca` containers)
"""

from __future__ import annotations

import json
import sys
import tomllib
import subprocess
from pathlib import Path

import hcl2
import yaml

errors: list[str] = []


def err(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")


def load_yaml(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def host_of(addr: str) -> str:
    return addr.rsplit(":", 1)[0]


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------

def pod_specs(doc: dict) -> list[tuple[dict, dict]]:
    """(pod template metadata, pod spec) of every workload kind we ship."""
    kind = doc.get("kind")
    spec = doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        t = spec["template"]
        return [(t.get("metadata", {}), t["spec"])]
    if kind == "CronJob":
        t = spec["jobTemplate"]["spec"]["template"]
        return [(t.get("metadata", {}), t["spec"])]
    if kind == "Pod":
        return [(doc.get("metadata", {}), spec)]
    return []


def check_hardening(where: str, pod: dict) -> None:
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        err(where, "pod securityContext.runAsNonRoot must be true")
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            err(where, f"{flag} must not be set")
    for v in pod.get("volumes", []):
        if "hostPath" in v:
            err(where, f"volume {v['name']}: hostPath volumes are not allowed")
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            err(cw, "securityContext.allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            err(cw, "securityContext.readOnlyRootFilesystem must be true")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            err(cw, "securityContext.capabilities.drop must contain ALL")
        if sc.get("capabilities", {}).get("add"):
            err(cw, "no capabilities may be added")
        if sc.get("privileged"):
            err(cw, "privileged must not be set")
        if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
            err(cw, "must not run as root")
        if (sc.get("seccompProfile", {}).get("type") or pod_seccomp) != "RuntimeDefault":
            err(cw, "seccompProfile must be RuntimeDefault (pod or container)")


def probe_path(c: dict, probe: str) -> tuple[str | None, object]:
    g = c.get(probe, {}).get("httpGet", {})
    return g.get("path"), g.get("port")


def check_sidecar_workload(where: str, meta: dict, pod: dict, by_kind: dict, file: str) -> None:
    labels = meta.get("labels", {})
    sidecars = [c for c in pod.get("initContainers", []) if c["name"] == "gatehouse-sidecar"]
    if len(sidecars) != 1:
        err(where, "needs exactly one initContainer named gatehouse-sidecar")
        return
    sc = sidecars[0]
    if sc.get("restartPolicy") != "Always":
        err(where, "gatehouse-sidecar must be a native sidecar (initContainers[].restartPolicy: Always)")
    ports = {p.get("name"): p["containerPort"] for p in sc.get("ports", [])}
    if "mtls" not in ports or "admin" not in ports:
        err(where, "gatehouse-sidecar must declare container ports named mtls and admin")
        return
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/readyz")):
        got_path, got_port = probe_path(sc, probe)
        if got_path != path or got_port not in ("admin", ports["admin"]):
            err(where, f"gatehouse-sidecar {probe} must GET {path} on the admin port (got {got_path} on {got_port})")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {}
    for m in sc.get("volumeMounts", []):
        vol = volumes.get(m["name"], {})
        if m.get("readOnly") is not True:
            err(where, f"gatehouse-sidecar mount {m['mountPath']} must be readOnly")
        if "subPath" in m or "subPathExpr" in m:
            err(where, f"gatehouse-sidecar mount {m['mountPath']} uses subPath: kubelet never updates it (no hot reload)")
        mounts[m["mountPath"].rstrip("/")] = vol

    # The ConfigMap behind the sidecar config mount, and its TOML.
    cfg_dir = "/etc/gatehouse/config"
    cm_name = mounts.get(cfg_dir, {}).get("configMap", {}).get("name")
    args = sc.get("args", [])
    if cm_name is None or f"{cfg_dir}/sidecar.toml" not in args:
        err(where, f"gatehouse-sidecar must run with --config {cfg_dir}/sidecar.toml from a ConfigMap mounted at {cfg_dir}")
        return
    cm = by_kind.get(("ConfigMap", cm_name))
    if cm is None or "sidecar.toml" not in cm.get("data", {}):
        err(where, f"ConfigMap {cm_name} with key sidecar.toml is not in {file}")
        return
    try:
        cfg = tomllib.loads(cm["data"]["sidecar.toml"])
    except tomllib.TOMLDecodeError as e:
        err(f"ConfigMap {cm_name} sidecar.toml", f"not valid TOML: {e}")
        return

    inbound, admin, identity = cfg.get("inbound", {}), cfg.get("admin", {}), cfg.get("identity", {})
    if port_of(inbound.get("listen", ":0")) != ports["mtls"]:
        err(where, f"inbound.listen {inbound.get('listen')} does not match container port mtls {ports['mtls']}")
    if port_of(admin.get("listen", ":0")) != ports["admin"]:
        err(where, f"admin.listen {admin.get('listen')} does not match container port admin {ports['admin']}")
    if host_of(admin.get("listen", "")) != "0.0.0.0":
        err(where, "admin.listen must be on 0.0.0.0 for kubelet probes to reach it")
    app_addr = inbound.get("app", "")
    if host_of(app_addr) != "127.0.0.1":
        err(where, f"inbound.app {app_addr} must be on 127.0.0.1 (the app is reachable only through the sidecar)")
    if "ca" in identity:
        check_online_identity(where, identity, pod, mounts)
    else:
        for key in ("cert", "key", "bundle", "crl"):
            p = identity.get(key)
            if p is not None and not p.startswith("/etc/gatehouse/certs/"):
                err(where, f"identity.{key} {p} must be in the Secret mounted at /etc/gatehouse/certs")
        if "secret" not in mounts.get("/etc/gatehouse/certs", {}):
            err(where, "certificates must come from a Secret mounted at /etc/gatehouse/certs")
    for o in cfg.get("outbound", []) + cfg.get("tcp_outbound", []):
        if host_of(o.get("listen", "")) != "127.0.0.1":
            err(where, f"outbound {o.get('name')} must listen on 127.0.0.1")
        if o.get("allow_non_loopback_listen"):
            err(where, f"outbound {o.get('name')}: allow_non_loopback_listen lends the pod's identity to the network")

    policy_path = inbound.get("policy", "")
    pol_dir = str(Path(policy_path).parent)
    pol_cm_name = mounts.get(pol_dir, {}).get("configMap", {}).get("name")
    pol_cm = by_kind.get(("ConfigMap", pol_cm_name)) if pol_cm_name else None
    pol_key = Path(policy_path).name
    if pol_cm is None or pol_key not in pol_cm.get("data", {}):
        err(where, f"inbound.policy {policy_path} is not backed by a ConfigMap in {file}")
    else:
        try:
            pol = tomllib.loads(pol_cm["data"][pol_key])
            if pol.get("trust_domain") != "fintech.internal":
                err(f"ConfigMap {pol_cm_name}", "policy trust_domain must be fintech.internal")
            if not pol.get("route"):
                err(f"ConfigMap {pol_cm_name}", "policy has no routes")
        except tomllib.TOMLDecodeError as e:
            err(f"ConfigMap {pol_cm_name} {pol_key}", f"not valid TOML: {e}")

    for c in pod.get("containers", []):
        for p in c.get("ports", []):
            if p["containerPort"] == port_of(app_addr):
                err(where, f"container {c['name']} declares the app port {p['containerPort']}")

    # Services: only the sidecar's mTLS port. NetworkPolicies: only the sidecar's port admitted.
    services = [d for (k, _), d in by_kind.items() if k == "Service" and matches(d["spec"].get("selector", {}), labels)]
    if not services:
        err(where, "no Service selects these pods")
    for svc in services:
        for p in svc["spec"].get("ports", []):
            if p.get("targetPort") not in ("mtls", ports["mtls"]):
                err(f"Service {svc['metadata']['name']}", f"port {p.get('name')} targets {p.get('targetPort')}: only the sidecar's mtls port may be exposed")
    netpols = [d for (k, _), d in by_kind.items() if k == "NetworkPolicy" and matches(d["spec"].get("podSelector", {}).get("matchLabels", {}), labels)]
    if not netpols:
        err(where, "no NetworkPolicy selects these pods")
    for np in netpols:
        npw = f"NetworkPolicy {np['metadata']['name']}"
        if "Ingress" not in np["spec"].get("policyTypes", []):
            err(npw, "policyTypes must include Ingress")
        for rule in np["spec"].get("ingress", []):
            rports = rule.get("ports") or []
            if not rports:
                err(npw, "an ingress rule without ports admits every port")
            # The admin port (metrics) only for a named scraper: every peer must name both the
            # namespace and the pods, never "any pod" or an IP block.
            scraper = bool(rule.get("from")) and all(
                peer.get("namespaceSelector", {}).get("matchLabels") and peer.get("podSelector", {}).get("matchLabels")
                for peer in rule["from"]
            )
            for rp in rports:
                if rp.get("port") in ("admin", ports["admin"]) and scraper:
                    continue
                if rp.get("port") not in ("mtls", ports["mtls"]):
                    err(npw, f"ingress admits port {rp.get('port')}: only the sidecar port {ports['mtls']} may be admitted "
                        f"(and the admin port {ports['admin']} to a scraper named by namespace and pod labels)")


def check_online_identity(where: str, identity: dict, pod: dict, mounts: dict) -> None:
    """`[identity] ca = …` (issue 16): the key is made in the sidecar's memory, so no Secret is
    mounted anywhere in the pod; the sidecar enrolls with a projected service-account token of
    audience gatehouse, and its first-contact bundle comes from a ConfigMap."""
    for v in pod.get("volumes", []):
        sources = v.get("projected", {}).get("sources", [])
        if "secret" in v or any("secret" in src for src in sources):
            err(where, f"volume {v['name']}: online identity keeps no key in any Secret (remove the Secret volume)")
    if not identity.get("ca", "").startswith("https://"):
        err(where, f"identity.ca {identity.get('ca')} must be an https:// URL of ca serve")
    token = identity.get("k8s_token_file")
    if token is None:
        err(where, "online identity on Kubernetes enrolls with k8s_token_file (a projected service-account token)")
        return
    vol = mounts.get(str(Path(token).parent), {})
    sat = [src["serviceAccountToken"] for src in vol.get("projected", {}).get("sources", []) if "serviceAccountToken" in src]
    if not sat or sat[0].get("path") != Path(token).name:
        err(where, f"identity.k8s_token_file {token} is not a projected serviceAccountToken mounted into the sidecar")
    elif sat[0].get("audience") != "gatehouse":
        err(where, "the projected service-account token must have audience gatehouse (what ca serve checks)")
    bundle = identity.get("ca_bundle", "")
    bvol = mounts.get(str(Path(bundle).parent), {})
    if "configMap" not in bvol and not any("configMap" in src for src in bvol.get("projected", {}).get("sources", [])):
        err(where, f"identity.ca_bundle {bundle} must come from a ConfigMap mounted into the sidecar")


def check_k8s(files: list[str]) -> None:
    for file in files:
        before = len(errors)
        docs = load_yaml(Path(file))
        by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        workloads = 0
        for d in docs:
            for meta, pod in pod_specs(d):
                workloads += 1
                where = f"{file}: {d['kind']}/{d['metadata']['name']}"
                check_hardening(where, pod)
                if meta.get("labels", {}).get("gatehouse.dev/sidecar") == "true":
                    check_sidecar_workload(where, meta, pod, by_kind, file)
        for d in docs:
            # A claim holding CA keys must survive Argo CD pruning and Application deletion.
            if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "gatehouse-ca":
                opts = d["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-options", "")
                opts = {o.strip() for o in opts.split(",")}
                if not {"Prune=false", "Delete=false"} <= opts:
                    err(f"{file}: PersistentVolumeClaim/gatehouse-ca",
                        "needs annotation argocd.argoproj.io/sync-options: Prune=false,Delete=false (it holds the CA keys)")
        if workloads == 0:
            err(file, "no workload found")
        status = "ok  " if len(errors) == before else "FAIL"
        print(f"{status} {file}: {len(docs)} objects, {workloads} workload(s) checked")


# --------------------------------------------------------------------------------------------
# Argo CD
# --------------------------------------------------------------------------------------------

def group_of(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def allowed(kind: str, group: str, whitelist: list[dict]) -> bool:
    return any(w.get("kind") in (kind, "*") and w.get("group") in (group, "*") for w in whitelist)


def check_argocd(repo: str, out_dir: str, render_dir: str, files: list[str]) -> None:
    """Applications sync automatically with prune + selfHeal, point at a kustomize root, and
    their AppProject admits every kind and namespace that root renders (else the sync fails in
    the cluster, long after review)."""
    root = Path(repo)
    all_docs = []
    for file in files:
        docs = load_yaml(Path(file))
        for d in docs:
            d["__source"] = file
        all_docs += docs
        out = Path(out_dir) / (Path(file).stem + ".json")
        out.write_text(json.dumps(docs))
        print(f"ok   {file}: {len(docs)} objects converted for schema validation")
    projects = {d["metadata"]["name"]: d for d in all_docs if d.get("kind") == "AppProject"}
    for d in all_docs:
        if d.get("kind") != "Application":
            continue
        where = f"{d['__source']}: Application/{d['metadata']['name']}"
        sp = d.get("spec", {})
        auto = sp.get("syncPolicy", {}).get("automated", {})
        if auto.get("prune") is not True or auto.get("selfHeal") is not True:
            err(where, "syncPolicy.automated must set prune: true and selfHeal: true (GitOps: Git wins)")
        path = sp.get("source", {}).get("path", "")
        if not (root / path / "kustomization.yaml").is_file():
            err(where, f"source.path {path} is not a kustomize root in this repository")
            continue
        project = projects.get(sp.get("project"))
        if project is None:
            err(where, f"AppProject {sp.get('project')} is not defined in {', '.join(files)}")
            continue
        # validate.sh names each render after its root: overlays/monolith -> overlays_monolith.yaml
        rel = path.removeprefix("deploy/kubernetes/")
        rendered = Path(render_dir) / (rel.replace("/", "_") + ".yaml")
        if rel == path or not rendered.is_file():
            err(where, f"no render of {path} in {render_dir}")
            continue
        pspec = project["spec"]
        if sp.get("source", {}).get("repoURL") not in pspec.get("sourceRepos", []):
            err(where, f"repoURL is not in AppProject {project['metadata']['name']} sourceRepos")
        dest_ns = sp.get("destination", {}).get("namespace")
        allowed_ns = {x.get("namespace") for x in pspec.get("destinations", [])}
        for obj in load_yaml(rendered):
            kind, group = obj["kind"], group_of(obj["apiVersion"])
            ns = obj["metadata"].get("namespace", dest_ns)
            label = f"{kind}/{obj['metadata']['name']}"
            if kind == "Namespace":
                wl = pspec.get("clusterResourceWhitelist", [])
            else:
                wl = pspec.get("namespaceResourceWhitelist", [])
                if ns not in allowed_ns and "*" not in allowed_ns:
                    err(where, f"{label} goes to namespace {ns}, which AppProject {project['metadata']['name']} does not allow")
            if not allowed(kind, group, wl):
                err(where, f"{label}: kind {group or 'core'}/{kind} is not in AppProject {project['metadata']['name']}'s whitelist")
        print(f"ok   {where}: sync policy, source path and project whitelist")


# --------------------------------------------------------------------------------------------
# Terraform
# --------------------------------------------------------------------------------------------

def text(value: object) -> str:
    """A python-hcl2 string value without its quotes ("" -> empty)."""
    return str(value or "").strip().strip('"').strip()


def check_terraform(directory: str) -> None:
    root = Path(directory)
    parsed = 0
    for f in sorted(list(root.rglob("*.tf")) + list(root.rglob("*.tfvars")) + list(root.rglob("*.tfvars.example"))):
        if ".terraform" in f.parts:
            continue
        try:
            with f.open() as fh:
                doc = hcl2.load(fh)
        except Exception as e:  # the parser raises lark errors of several types
            err(str(f), f"HCL parse error: {e}")
            continue
        parsed += 1
        # python-hcl2 keeps the quotes of block labels in its keys.
        for block in doc.get("variable", []):
            for name, body in block.items():
                name = name.strip('"')
                if not text(body.get("description")):
                    err(str(f), f'variable "{name}" has no description')
                if "type" not in body:
                    err(str(f), f'variable "{name}" has no type')
        for block in doc.get("output", []):
            for name, body in block.items():
                name = name.strip('"')
                if not text(body.get("description")):
                    err(str(f), f'output "{name}" has no description')
        for tf in doc.get("terraform", []):
            for rp in tf.get("required_providers", []):
                aws = rp.get("aws")
                if aws is not None and not text(aws.get("version")):
                    err(str(f), "the aws provider version is not pinned")
    if not (root / "ecs" / "versions.tf").is_file():
        err(directory, "ecs/versions.tf is missing")
    print(f"ok   {directory}: {parsed} HCL files parsed" if parsed else f"..   {directory}")


def run_cronjob(file: str, ca_bin: str, root: str) -> None:
    """Run the CronJob's init containers that use `ca` exactly as written, with the binary and
    the volume paths remapped to a scratch root: the command lines must match the real CLI."""
    ran = 0
    for d in load_yaml(Path(file)):
        if d.get("kind") != "CronJob":
            continue
        pod = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []):
            argv = c.get("command", []) + c.get("args", [])
            if not argv or not argv[0].endswith("/ca"):
                continue
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            def remap(a: str) -> str:
                return next((root + a for m in mounts if a == m or a.startswith(m + "/")), a)
            cmd = [ca_bin] + [remap(a) for a in argv[1:]]
            where = f"{file}: CronJob/{d['metadata']['name']} initContainer {c['name']}"
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                err(where, f"`ca {' '.join(argv[1:])}` failed ({proc.returncode}): {proc.stderr.strip()}")
            else:
                ran += 1
                print(f"ok   {where}: ca {' '.join(argv[1:])}")
    if ran == 0 and not errors:
        err(file, "no CronJob init container runs ca")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[1], argv[2:]
    if cmd == "k8s":
        check_k8s(rest)
    elif cmd == "argocd":
        check_argocd(rest[0], rest[1], rest[2], rest[3:])
    elif cmd == "terraform":
        check_terraform(rest[0])
    elif cmd == "run-cronjob":
        run_cronjob(rest[0], rest[1], rest[2])
    elif cmd == "extract":
        docs = load_yaml(Path(rest[0]))
        found = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == rest[1]]
        if not found or rest[2] not in found[0].get("data", {}):
            print(f"{rest[0]}: no ConfigMap {rest[1]} with key {rest[2]}", file=sys.stderr)
            return 1
        sys.stdout.write(found[0]["data"][rest[2]])
    else:
        print(f"unknown check {cmd}", file=sys.stderr)
        return 2
    for e in errors:
        print(f"FAIL {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
