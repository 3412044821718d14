//! The FinTech demo's online mode (`fintech-demo --online`, issue 16): nothing is minted for the
//! workloads. `ca init` makes the CA, `ca serve` runs on 127.0.0.1:17800 with 10 s SVIDs, and each
//! of the three sidecars gets, instead of `cert`/`key`/`bundle`/`crl`, an online `[identity]`
//! with a single-use join token from `ca token create`. The sidecars make their keys in memory,
//! enroll, and renew every ~7 s during the run, while the report flow, the denied request and a
//! continuous load go through them.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::scenario::{self, Check, REPORT_QUERY};
use super::stack::{Service, Stack, StackError, TRUST_DOMAIN, io};
use crate::harness::ca_serve::private_keys_under;
use crate::harness::wait;
use crate::load::{Load, Sample, failures};

/// Lifetime of the SVIDs `ca serve` issues in the demo: short, so the run sees renewals.
pub const SVID_TTL: &str = "10s";

/// The CA directory, relative to the work directory.
const CA_DIR: &str = "certs/ca";

/// Renewals each sidecar must make under load (after its enrollment).
const RENEWALS: u64 = 2;

/// The online mode's own check labels (the report and denial checks are [`scenario::label`]'s).
pub mod label {
    /// The CA, `ca serve` and the join tokens.
    pub const CA: &str = "created the CA with `ca init` and one single-use join token per service with `ca token create`; no workload certificate or key minted";
    /// The processes.
    pub const STARTED: &str = "started `ca serve` (SVIDs live 10 s), 3 fake services and their 3 sidecars; every sidecar enrolled and /readyz is 200";
    /// Enrollment.
    pub const ENROLLED: &str = "each sidecar holds an SVID for its own identity, issued to its join token (ca list: source enroll, credential join_token)";
    /// Renewal under load.
    pub const RENEWED: &str = "under continuous load every sidecar renewed twice, each time with a new key and serial; no request failed";
    /// No key on disk.
    pub const NO_KEY_ON_DISK: &str =
        "no workload private key on disk: the only PRIVATE KEY files are the CA's own";
}

fn ca_failed(detail: String) -> StackError {
    StackError::CaSetup { detail }
}

/// Makes the CA (`certs/ca`), its bundle (`certs/bundle.pem`, the sidecars' `ca_bundle`) and one
/// join token per service (`certs/tokens/<name>.token`), and rewrites each copied sidecar config's
/// `[identity]` to enroll with `ca serve`.
///
/// # Errors
/// A `ca` command or a file operation failed.
pub async fn prepare(stack: &Stack) -> Result<(), StackError> {
    let work = stack.work_dir();
    stack
        .ca(&["init", "--dir", CA_DIR, "--trust-domain", TRUST_DOMAIN])
        .await
        .map_err(ca_failed)?;
    let bundle = work.join("certs/bundle.pem");
    tokio::fs::copy(work.join(CA_DIR).join("bundle.pem"), &bundle)
        .await
        .map_err(io("copy the bundle to", &bundle))?;
    let tokens = work.join("certs/tokens");
    tokio::fs::create_dir_all(&tokens)
        .await
        .map_err(io("create", &tokens))?;
    let ca = stack.ports().ca_serve();
    for s in Service::ALL {
        let id = s.spiffe_id().to_string();
        let out = stack
            .ca(&[
                "--format",
                "json",
                "token",
                "create",
                "--dir",
                CA_DIR,
                "--spiffe-id",
                &id,
                "--ttl",
                "15m",
            ])
            .await
            .map_err(ca_failed)?;
        let token: Value = serde_json::from_str(&out)
            .map_err(|e| ca_failed(format!("`ca token create` printed no JSON: {e}")))?;
        let token = token["token"]
            .as_str()
            .ok_or_else(|| ca_failed(format!("no token in {out}")))?;
        let file = tokens.join(format!("{}.token", s.name()));
        write_private(&file, token).await?;
        let config = stack.sidecar_config(s);
        let text = tokio::fs::read_to_string(&config)
            .await
            .map_err(io("read", &config))?;
        let online = format!(
            "[identity]\n\
             ca              = \"https://{ca}\"   # ca serve: enroll, then renew before expiry\n\
             spiffe_id       = \"{id}\"\n\
             ca_bundle       = \"../certs/bundle.pem\"\n\
             join_token_file = \"../certs/tokens/{}.token\"\n\
             ca_poll         = \"1s\"\n\n",
            s.name()
        );
        let rewritten = replace_table(&text, "identity", &online)
            .ok_or_else(|| ca_failed(format!("{} has no [identity] table", config.display())))?;
        tokio::fs::write(&config, rewritten)
            .await
            .map_err(io("write", &config))?;
    }
    Ok(())
}

/// `ca serve`'s arguments: the CA directory, the example's CA port, short SVIDs.
pub fn ca_serve_args(stack: &Stack) -> Vec<String> {
    [
        "serve",
        "--dir",
        CA_DIR,
        "--listen",
        &stack.ports().ca_serve().to_string(),
        "--svid-ttl",
        SVID_TTL,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Replaces the TOML table `[name]` (its header up to the next table header) with `with`.
fn replace_table(text: &str, name: &str, with: &str) -> Option<String> {
    let header = format!("[{name}]");
    let start = text.lines().position(|l| l.trim() == header)?;
    let lines: Vec<&str> = text.lines().collect();
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out = lines[..start].join("\n");
    out.push('\n');
    out.push_str(with);
    out.push_str(&lines[end..].join("\n"));
    out.push('\n');
    Some(out)
}

/// Writes a secret file readable by its owner only.
async fn write_private(path: &Path, text: &str) -> Result<(), StackError> {
    use std::os::unix::fs::PermissionsExt as _;
    tokio::fs::write(path, text)
        .await
        .map_err(io("write", path))?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(io("chmod", path))
}

/// Every step of the online mode against a started stack, each check handed to `report` as
/// soon as it is known.
pub async fn run(stack: &Stack, report: &mut dyn FnMut(&Check)) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut record = |check: Check| {
        report(&check);
        checks.push(check);
    };
    record(Check::from_result(label::ENROLLED, enrolled(stack).await));
    for check in scenario::report_flow(stack).await {
        record(check);
    }
    for check in scenario::denied_flow(stack).await {
        record(check);
    }
    record(Check::from_result(
        label::RENEWED,
        renewed_under_load(stack).await,
    ));
    record(Check::from_result(
        label::NO_KEY_ON_DISK,
        no_key_on_disk(stack),
    ));
    checks
}

/// `/status` of the sidecar of `s`, as JSON.
async fn status(stack: &Stack, s: Service) -> Result<Value, String> {
    let url = format!("http://{}/status", stack.ports().admin(s));
    let reply = stack.client().get(&url).await.map_err(|e| e.to_string())?;
    reply.json::<Value>().map_err(|e| e.to_string())
}

/// `ca list --format json`.
async fn inventory(stack: &Stack) -> Result<Vec<Value>, String> {
    let out = stack
        .ca(&["--format", "json", "list", "--dir", CA_DIR])
        .await?;
    match serde_json::from_str(&out).map_err(|e| e.to_string())? {
        Value::Array(a) => Ok(a),
        other => Err(format!("ca list printed {other}")),
    }
}

/// The issuances of `s`'s identity, oldest first.
fn issued_to(inventory: &[Value], s: Service) -> Vec<&Value> {
    let id = s.spiffe_id().to_string();
    let mut mine: Vec<&Value> = inventory
        .iter()
        .filter(|e| e["spiffe_id"].as_str() == Some(id.as_str()))
        .collect();
    mine.sort_by_key(|e| e["issued_at"].as_str().unwrap_or_default().to_owned());
    mine
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

async fn enrolled(stack: &Stack) -> Result<String, String> {
    let inventory = inventory(stack).await?;
    let mut detail = Vec::new();
    for s in Service::ALL {
        let st = status(stack, s).await?;
        let online = &st["online_identity"];
        let serial = online["serial"]
            .as_str()
            .ok_or_else(|| format!("{}: /status shows no SVID: {st}", s.name()))?;
        let row = inventory
            .iter()
            .find(|e| e["serial"].as_str() == Some(serial))
            .ok_or_else(|| format!("{}: serial {serial} is not in `ca list`", s.name()))?;
        let id = s.spiffe_id().to_string();
        if row["spiffe_id"] != id.as_str()
            || row["source"] != "enroll"
            || row["credential"] != "join_token"
        {
            return Err(format!("{}: unexpected inventory row {row}", s.name()));
        }
        detail.push(format!(
            "{:<15} {id}  serial {}…  expires in {}s",
            s.name(),
            short(serial),
            online["expires_in_seconds"].as_i64().unwrap_or(0)
        ));
    }
    Ok(detail.join("\n"))
}

async fn renewals(stack: &Stack, s: Service) -> u64 {
    status(stack, s).await.map_or(0, |st| {
        st["online_identity"]["renewals"].as_u64().unwrap_or(0)
    })
}

/// Continuous load through two sidecar paths (report-service → monolith, and the gateway's
/// dashboard → monolith) until every sidecar renewed [`RENEWALS`] more times; no request may fail,
/// and the inventory must show a new serial and a new public key for every issuance.
async fn renewed_under_load(stack: &Stack) -> Result<String, String> {
    let p = stack.ports();
    let data = p
        .outbound(Service::ReportService, Service::Monolith)
        .ok_or("the example has no report-service → monolith outbound")?;
    let path = format!("/api/data/reports?{REPORT_QUERY}");
    let loads = [
        Load::start(data, &path, "monolith", 2, 20.0),
        Load::start(p.frontend(), "/api/dashboard", "localhost", 2, 20.0),
    ];
    let mut target = Vec::new();
    for s in Service::ALL {
        target.push(renewals(stack, s).await + RENEWALS);
    }
    let t0 = Instant::now();
    let renewed = wait::until(Duration::from_secs(60), async || {
        for (s, want) in Service::ALL.iter().zip(&target) {
            if renewals(stack, *s).await < *want {
                return None;
            }
        }
        Some(())
    })
    .await;
    let took = t0.elapsed();
    let mut samples = Vec::new();
    let mut started = Instant::now();
    for load in loads {
        started = started.min(load.started);
        samples.extend(load.stop().await.0);
    }
    if renewed.is_none() {
        return Err(format!(
            "not every sidecar renewed {RENEWALS} times within 60 s (see logs/*-sidecar.log and logs/ca-serve.log)"
        ));
    }
    let failed = failures(&samples, started, Sample::is_200);
    let ok = samples.iter().filter(|s| s.is_200()).count();
    if !failed.is_empty() || ok == 0 {
        return Err(format!(
            "{} of {} requests failed: {}",
            samples.len() - ok,
            samples.len(),
            failed.join("; ")
        ));
    }
    let inventory = inventory(stack).await?;
    let mut detail = vec![format!(
        "{} requests in {:.1} s (report-service → monolith data, gateway dashboard), 0 failed",
        samples.len(),
        took.as_secs_f64()
    )];
    for s in Service::ALL {
        let mine = issued_to(&inventory, s);
        let serials: BTreeSet<&str> = mine.iter().filter_map(|e| e["serial"].as_str()).collect();
        let keys: BTreeSet<&str> = mine
            .iter()
            .filter_map(|e| e["public_key_sha256"].as_str())
            .collect();
        let renews = mine.iter().filter(|e| e["source"] == "renew").count();
        if (renews as u64) < RENEWALS || serials.len() != mine.len() || keys.len() != mine.len() {
            return Err(format!(
                "{}: {} issuances, {renews} renewals, {} serials, {} keys: {mine:?}",
                s.name(),
                mine.len(),
                serials.len(),
                keys.len()
            ));
        }
        let chain: Vec<String> = mine
            .iter()
            .map(|e| {
                format!(
                    "{}… (key {}…)",
                    short(e["serial"].as_str().unwrap_or_default()),
                    short(e["public_key_sha256"].as_str().unwrap_or_default())
                )
            })
            .collect();
        detail.push(format!("{:<15} {}", s.name(), chain.join(" → ")));
    }
    Ok(detail.join("\n"))
}

fn no_key_on_disk(stack: &Stack) -> Result<String, String> {
    let ca = stack.work_dir().join(CA_DIR);
    let found = private_keys_under(stack.work_dir(), &|p: &Path| p == ca);
    if found.is_empty() {
        Ok(format!(
            "searched {} (but {CA_DIR}) for `PRIVATE KEY`: none",
            stack.work_dir().display()
        ))
    } else {
        Err(format!("found: {found:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::replace_table;

    #[test]
    fn replace_table_swaps_one_table_only() {
        let text = "min_tls = \"1.3\"\n\n[identity]\ncert = \"a\"\nkey = \"b\"\n\n[inbound]\nlisten = \"x\"\n";
        let out = replace_table(text, "identity", "[identity]\nca = \"https://c\"\n\n")
            .expect("has the table");
        assert_eq!(
            out,
            "min_tls = \"1.3\"\n\n[identity]\nca = \"https://c\"\n\n[inbound]\nlisten = \"x\"\n"
        );
        assert!(replace_table("[other]\n", "identity", "").is_none());
    }
}
