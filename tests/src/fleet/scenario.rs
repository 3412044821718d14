//! The peak, step by step: the fleet under a continuous report load while the monolith scales
//! out, a replica dies, the CA restarts, the root rotates and retires, a compromised
//! report-service replica is revoked and the monolith scales back. Every step is a
//! [`Check`] with the window's figures ([`Stats`]); the summary table closes the transcript.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use super::{AUDIT_FLUSH, DENIED_PATH, Fleet, Load, Sample, Stats, Stop, TD, ca};
use crate::fintech::scenario::Check;
use crate::harness::client::HttpClient;
use crate::harness::{Sidecar, eventually};

/// A crash loses the audit lines of decisions made less than this before it: one flush
/// interval, three times over for a flusher thread slowed by a busy machine.
const LOST_WINDOW: Duration = AUDIT_FLUSH.saturating_mul(3);
/// How long after a crash an answer the crashed sidecar gave can still reach the probe.
const LATE_ANSWER: Duration = Duration::from_millis(200);

/// The report-service replica whose key is "compromised" and revoked.
pub const REVOKED: &str = "report-service-2";

/// One row of the summary table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The step.
    pub step: &'static str,
    /// Its figures.
    pub stats: Stats,
}

/// Everything the scenario found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every check, in order.
    pub checks: Vec<Check>,
    /// The summary table.
    pub rows: Vec<Row>,
}

async fn status(sc: &Sidecar) -> serde_json::Value {
    sc.status_json().await.unwrap_or_default()
}

fn endpoints(status: &serde_json::Value, upstream: &str) -> Vec<(String, String)> {
    status["upstreams"][upstream]["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["addr"].as_str().unwrap_or_default().to_owned(),
                        e["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Serial of the SVID a sidecar holds (lowercase hex, as the CA writes it).
async fn serial(sc: &Sidecar) -> String {
    status(sc).await["online_identity"]["serial"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Runs the scenario, handing each check to `say` as soon as it is known.
pub async fn run(fleet: &mut Fleet, say: &mut dyn FnMut(&Check)) -> Outcome {
    let mut out = Outcome::default();
    if let Err(e) = wait_endpoints(fleet, fleet.monoliths.len()).await {
        let check = fail("peak running", format!("{e:#}"));
        say(&check);
        out.checks.push(check);
        return out;
    }
    let load = Load::start(fleet.frontend(), fleet.opts.rate, 4);
    let flowing = eventually("reports flowing", Duration::from_secs(30), async || {
        (load
            .samples()
            .iter()
            .filter(|s| s.status == Some(202))
            .count()
            >= 8)
            .then_some(())
    })
    .await;
    let mut record = |check: Check, row: Option<Row>| {
        say(&check);
        out.checks.push(check);
        out.rows.extend(row);
    };
    if let Err(e) = flowing {
        record(fail("peak running", e.to_string()), None);
        load.stop().await;
        return out;
    }
    let mut revoked = false;
    for step in Step::ALL {
        let mark = fleet.mark(&load);
        let mut result = step.run(fleet).await;
        let stats = fleet.stats(&mark, &load);
        if step == Step::Spread {
            result = Ok(spread_check(&stats, fleet.monoliths.len()));
        }
        revoked |= step == Step::Revoke;
        let label = step.label();
        record(
            judge(label, result, &stats, revoked),
            Some(Row { step: label, stats }),
        );
    }
    let (samples, probes) = (load.samples(), load.denied());
    load.stop().await;
    record(denied(fleet, &probes).await, None);
    record(timeline(fleet, &samples), None);
    out
}

/// The last lines of a sidecar's log, for a failed step.
fn tail(sc: &Sidecar) -> String {
    let text = sc.stderr_text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

fn fail(label: &'static str, detail: String) -> Check {
    Check {
        ok: false,
        label,
        detail,
    }
}

type StepResult = anyhow::Result<(bool, String)>;

/// The steps of the peak, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Baseline,
    ScaleOut,
    Spread,
    KillOne,
    RestartCa,
    RotateRoot,
    Revoke,
    ScaleBack,
}

impl Step {
    const ALL: [Step; 8] = [
        Step::Baseline,
        Step::ScaleOut,
        Step::Spread,
        Step::KillOne,
        Step::RestartCa,
        Step::RotateRoot,
        Step::Revoke,
        Step::ScaleBack,
    ];

    fn label(self) -> &'static str {
        match self {
            Step::Baseline => "peak: 2 monolith, 2 report-service replicas",
            Step::ScaleOut => "monolith scaled out (DNS records added, each replica enrolled)",
            Step::Spread => "load spread over every monolith replica",
            Step::KillOne => "one monolith replica killed",
            Step::RestartCa => "ca serve restarted",
            Step::RotateRoot => "root rotated with overlap and retired",
            Step::Revoke => "compromised report-service replica revoked",
            Step::ScaleBack => "monolith scaled back to 2",
        }
    }

    async fn run(self, fleet: &mut Fleet) -> StepResult {
        match self {
            Step::Baseline => baseline(fleet).await,
            Step::ScaleOut => scale_out(fleet).await,
            Step::Spread => spread(fleet).await,
            Step::KillOne => kill_one(fleet).await,
            Step::RestartCa => restart_ca(fleet).await,
            Step::RotateRoot => rotate_root(fleet).await,
            Step::Revoke => revoke(fleet).await,
            Step::ScaleBack => scale_back(fleet).await,
        }
    }
}

/// A step holds when it did what it says (`ok`), no report request failed, and no mesh call
/// failed outside the revoked replica.
fn judge(label: &'static str, result: StepResult, stats: &Stats, revoked: bool) -> Check {
    let except: &[&str] = if revoked { &[REVOKED] } else { &[] };
    let (ok, what) = match result {
        Ok(r) => r,
        Err(e) => (false, format!("error: {e:#}")),
    };
    let clean =
        stats.reports_failed == 0 && stats.failed_outside(except) == 0 && stats.denied.1 == 0;
    Check {
        ok: ok && clean,
        label,
        detail: format!("{what}\n{}", stats.describe()),
    }
}

async fn baseline(fleet: &mut Fleet) -> StepResult {
    tokio::time::sleep(fleet.opts.window).await;
    Ok((true, "reports flowing through the gateway".into()))
}

/// Waits until every sidecar balancing over the monolith lists exactly `n` endpoints (none
/// draining), i.e. it re-resolved the DNS name.
async fn wait_endpoints(fleet: &Fleet, n: usize) -> anyhow::Result<()> {
    let within = Duration::from_secs(30);
    for r in fleet.reports.values().chain([&fleet.gateway]) {
        eventually("every monolith endpoint listed", within, async || {
            let eps = endpoints(&status(&r.sidecar).await, "monolith");
            (eps.len() == n && eps.iter().all(|(_, s)| s != "draining")).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", r.name))?;
    }
    Ok(())
}

async fn scale_out(fleet: &mut Fleet) -> StepResult {
    let from = fleet.monoliths.len();
    let t = Instant::now();
    let new = fleet.scale_monolith_to(fleet.opts.peak).await?;
    let started = t.elapsed();
    wait_endpoints(fleet, fleet.opts.peak).await?;
    let mut serials = BTreeSet::new();
    for r in fleet.monoliths.values() {
        serials.insert(serial(&r.sidecar).await);
    }
    let own = serials.len() == fleet.monoliths.len();
    Ok((
        own && new.len() == fleet.opts.peak - from,
        format!(
            "{from} → {} replicas: {} enrolled with their own join token in {:.1}s ({} distinct SVID serials), \
             dnsmasq reloaded, every balancer lists {} endpoints after {:.1}s",
            fleet.monoliths.len(),
            new.len(),
            started.as_secs_f64(),
            serials.len(),
            fleet.opts.peak,
            t.elapsed().as_secs_f64()
        ),
    ))
}

async fn spread(fleet: &mut Fleet) -> StepResult {
    tokio::time::sleep(fleet.opts.window * 3).await;
    Ok((true, String::new()))
}

/// Each monolith replica served between half and twice its fair share.
fn spread_check(stats: &Stats, replicas: usize) -> (bool, String) {
    let total: usize = stats.per_monolith.values().sum();
    #[allow(clippy::cast_precision_loss)]
    let fair = total as f64 / replicas as f64;
    #[allow(clippy::cast_precision_loss)]
    let ok = stats.per_monolith.len() == replicas
        && stats
            .per_monolith
            .values()
            .all(|&c| (fair / 2.0..=fair * 2.0).contains(&(c as f64)));
    (
        ok,
        format!(
            "{total} data exports over {replicas} replicas after the last one joined: fair share {fair:.1}, \
             each within [{:.1}, {:.1}]: {}",
            fair / 2.0,
            fair * 2.0,
            if ok { "yes" } else { "NO" }
        ),
    )
}

async fn kill_one(fleet: &mut Fleet) -> StepResult {
    let Some(&k) = fleet.monoliths.keys().nth(2) else {
        anyhow::bail!("fewer than 3 monolith replicas");
    };
    fleet.stop_monolith(k, Stop::Crash).await?;
    fleet.publish_dns();
    tokio::time::sleep(fleet.opts.window).await;
    wait_endpoints(fleet, fleet.monoliths.len()).await?;
    Ok((
        true,
        format!(
            "monolith-{k} SIGKILLed (sidecar and app), its A record removed; {} replicas left",
            fleet.monoliths.len()
        ),
    ))
}

async fn renewals(fleet: &Fleet) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in fleet.replicas() {
        let s = status(&r.sidecar).await;
        m.insert(
            r.name.clone(),
            s["online_identity"]["renewals"].as_u64().unwrap_or(0),
        );
    }
    m
}

async fn restart_ca(fleet: &mut Fleet) -> StepResult {
    let before = renewals(fleet).await;
    // Down for a tenth of the SVID lifetime (1 to 3 s): the sidecars ride it out on the SVIDs
    // they hold. (An outage longer than an SVID's remaining life lets it expire, and an
    // expired SVID cannot renew: the sidecar must enroll again, which a spent join token
    // cannot do.)
    let down = (fleet.opts.svid_ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(3));
    fleet.restart_ca(down).await?;
    let back = Instant::now();
    // Every sidecar renews through the new process.
    let within = fleet.opts.svid_ttl + Duration::from_secs(10);
    for r in fleet.replicas() {
        let was = before.get(&r.name).copied().unwrap_or(0);
        eventually("a renewal after the restart", within, async || {
            let s = status(&r.sidecar).await;
            (s["online_identity"]["renewals"].as_u64().unwrap_or(0) > was).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}\n{}", r.name, tail(&r.sidecar)))?;
    }
    Ok((
        true,
        format!(
            "down for {down:?} (same address, same CA directory); all {} sidecars renewed through the new process within {:.1}s",
            fleet.replicas().count(),
            back.elapsed().as_secs_f64()
        ),
    ))
}

/// Waits until every live sidecar trusts exactly `n` roots.
async fn wait_roots(fleet: &Fleet, n: usize, within: Duration) -> anyhow::Result<()> {
    for r in fleet.replicas() {
        eventually("the bundle", within, async || {
            let s = status(&r.sidecar).await;
            (s["bundle"].as_array().map(Vec::len) == Some(n)).then_some(())
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{} does not trust {n} roots: {e}\n{}",
                r.name,
                tail(&r.sidecar)
            )
        })?;
    }
    Ok(())
}

/// The CA generation each serial chains to, from `ca list`.
async fn generations(fleet: &Fleet) -> anyhow::Result<BTreeMap<String, u64>> {
    let out = ca(
        &fleet.opts.work_dir,
        &["--format", "json", "list", "--dir", "ca"],
    )
    .await?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["serial"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches('0')
                    .to_owned(),
                e["generation"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

async fn rotate_root(fleet: &mut Fleet) -> StepResult {
    let dir = fleet.opts.work_dir.clone();
    let t = Instant::now();
    ca(&dir, &["root", "rotate", "--dir", "ca"]).await?;
    let ttl = fleet.opts.svid_ttl;
    wait_roots(fleet, 2, Duration::from_secs(20)).await?;
    let overlap = t.elapsed();
    // Every sidecar renews onto the new root (generation 2).
    for r in fleet.replicas() {
        let mut last = String::new();
        eventually(
            "an SVID of the new root",
            ttl + Duration::from_secs(10),
            async || {
                let s = serial(&r.sidecar).await;
                let gens = match generations(fleet).await {
                    Ok(g) => g,
                    Err(e) => {
                        last = format!("ca list: {e:#}");
                        return None;
                    }
                };
                // `ca list` and `/status` may differ in leading zeros.
                let generation = gens.get(s.trim_start_matches('0'));
                last = format!("serial {s} of generation {generation:?}");
                (generation == Some(&2)).then_some(())
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e} (last seen: {last})", r.name))?;
    }
    let renewed = t.elapsed();
    // `ca root retire` refuses while a live SVID (the replicas' previous ones, the CA's own)
    // chains to the old root: they expire within one SVID lifetime.
    let mut refusals = 0;
    let retired = eventually(
        "ca root retire",
        ttl + Duration::from_secs(15),
        async || match ca(&dir, &["root", "retire", "--dir", "ca"]).await {
            Ok(_) => Some(()),
            Err(_) => {
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        },
    )
    .await;
    retired?;
    wait_roots(fleet, 1, Duration::from_secs(20)).await?;
    // Bundle first, leaves later: every sidecar trusted the new root before it signed.
    Ok((
        overlap < super::BUNDLE_LEAD,
        format!(
            "`ca root rotate`: every sidecar fetched the two-root bundle from the CA in {:.1}s (the new root signs from {}s on) and renewed onto the new root by {:.1}s; \
             `ca root retire` refused {refusals}× while old SVIDs lived, then succeeded; every sidecar trusts the new root alone after {:.1}s",
            overlap.as_secs_f64(),
            super::BUNDLE_LEAD.as_secs(),
            renewed.as_secs_f64(),
            t.elapsed().as_secs_f64()
        ),
    ))
}

async fn revoke(fleet: &mut Fleet) -> StepResult {
    let dir = fleet.opts.work_dir.clone();
    let victim = fleet
        .reports
        .values()
        .find(|r| r.name == REVOKED)
        .ok_or_else(|| anyhow::anyhow!("no {REVOKED}"))?;
    let serial = serial(&victim.sidecar).await;
    let t = Instant::now();
    let args = [
        "revoke",
        "--dir",
        "ca",
        "--serial",
        &serial,
        "--reason",
        "key-compromise",
    ];
    ca(&dir, &args).await?;
    // The compromised replica's own calls to the monolith are refused...
    let probe = format!(
        "http://{}{}",
        victim.sidecar.listener("outbound:monolith"),
        DENIED_PATH
    );
    let client = HttpClient::new(Duration::from_secs(10));
    let refused = eventually(
        "the revoked replica refused",
        Duration::from_secs(20),
        async || match client.get(&probe).await {
            Ok(r) if r.status.is_success() => None,
            Ok(r) => Some(format!("{}", r.status)),
            Err(e) => Some(e.to_string()),
        },
    )
    .await?;
    let cut = t.elapsed();
    // ... and the gateway stops sending it reports (its endpoint is ejected).
    let addr = victim.sidecar.inbound_addr().to_string();
    eventually(
        "the gateway ejects the revoked replica",
        Duration::from_secs(20),
        async || {
            let eps = endpoints(&status(&fleet.gateway.sidecar).await, "report-service");
            eps.iter()
                .any(|(a, s)| *a == addr && s == "ejected")
                .then_some(())
        },
    )
    .await?;
    let seen = |fleet: &Fleet, name: &str| {
        fleet
            .reports
            .values()
            .find(|r| r.name == name)
            .map_or(0, |r| {
                r.audit()
                    .iter()
                    .filter(|l| l["direction"] == "inbound" && l["decision"] == "allow")
                    .count()
            })
    };
    let (victim_before, other_before) = (seen(fleet, REVOKED), seen(fleet, "report-service-1"));
    tokio::time::sleep(fleet.opts.window).await;
    let (victim_after, other_after) = (seen(fleet, REVOKED), seen(fleet, "report-service-1"));
    let alone = victim_after == victim_before && other_after > other_before;
    Ok((
        alone,
        format!(
            "`ca revoke --serial {serial}`: {REVOKED}'s calls to the monolith refused ({refused}) after {:.1}s, \
             the gateway ejected it; in the next {:.0}s it got {} reports, report-service-1 got {}",
            cut.as_secs_f64(),
            fleet.opts.window.as_secs_f64(),
            victim_after - victim_before,
            other_after - other_before,
        ),
    ))
}

async fn scale_back(fleet: &mut Fleet) -> StepResult {
    let extra: Vec<usize> = fleet.monoliths.keys().skip(2).copied().collect();
    // Out of DNS first: the balancers drain them, then the tasks stop.
    let parked: Vec<_> = extra
        .iter()
        .filter_map(|k| fleet.monoliths.remove(k).map(|r| (*k, r)))
        .collect();
    fleet.publish_dns();
    let drained = wait_endpoints(fleet, 2).await;
    for (k, r) in parked {
        fleet.monoliths.insert(k, r);
        fleet.stop_monolith(k, Stop::Retire).await?;
    }
    drained?;
    tokio::time::sleep(fleet.opts.window).await;
    Ok((
        true,
        format!(
            "{} replicas removed from DNS, drained by every balancer, then stopped (SIGTERM: each \
             sidecar drained and wrote its last audit lines); {} left",
            extra.len(),
            fleet.monoliths.len()
        ),
    ))
}

/// The denied call stayed 403 all along, never reached a monolith app, and every denial is in
/// a monolith sidecar's audit lines (joined on the probe's trace id), but for one a crash
/// could have lost: answered less than [`LOST_WINDOW`] before a SIGKILL.
async fn denied(fleet: &Fleet, probes: &[Sample]) -> Check {
    let client = HttpClient::new(Duration::from_secs(10));
    let mut leaked = fleet.leaked;
    for r in fleet.monoliths.values() {
        leaked += super::gateway_exports_seen(&client, r).await;
    }
    let crashed = |s: &Sample| crashed(fleet, s);
    // A live sidecar writes a line up to one flush interval after its decision: wait for it.
    let _ = eventually("every denial audited", Duration::from_secs(3), async || {
        let unaudited = unaudited(&fleet.audit_lines(), probes);
        unaudited.iter().all(|s| crashed(s).is_some()).then_some(())
    })
    .await;
    let others: Vec<Option<u16>> = probes
        .iter()
        .map(|s| s.status)
        .filter(|s| *s != Some(403))
        .collect();
    let unaudited = unaudited(&fleet.audit_lines(), probes);
    let (mut lost_note, mut lost, mut missing) = (String::new(), 0, Vec::new());
    for s in &unaudited {
        match crashed(s) {
            Some((name, at)) => {
                lost += 1;
                let before = at.saturating_duration_since(s.at + s.latency);
                lost_note += &format!(
                    "; 1 denial answered {:.0} ms before {name} was SIGKILLed is not in the audit \
                     (lines buffered at a crash are lost: flush_interval {} ms)",
                    before.as_secs_f64() * 1e3,
                    AUDIT_FLUSH.as_millis()
                );
            }
            None => missing.push(&s.trace),
        }
    }
    let n = probes.len();
    Check {
        ok: leaked == 0
            && others.is_empty()
            && n > 0
            && missing.is_empty()
            && lost <= fleet.crashes.len(),
        label: "gateway → monolith data export denied throughout",
        detail: format!(
            "{n} calls of GET /api/data/reports by the gateway: {} answered 403; {} of them \
             found in the monolith sidecars' audit lines by trace id{lost_note}; requests of the \
             gateway seen by a monolith app: {leaked}{}{}",
            n - others.len(),
            n - others.len() - unaudited.len(),
            if others.is_empty() {
                String::new()
            } else {
                format!("; other answers: {others:?}")
            },
            if missing.is_empty() {
                String::new()
            } else {
                format!("; not audited: {missing:?}")
            }
        ),
    }
}

/// The probes answered 403 whose trace id is in no monolith sidecar's denial of the gateway.
fn unaudited<'a>(
    all: &BTreeMap<String, Vec<serde_json::Value>>,
    probes: &'a [Sample],
) -> Vec<&'a Sample> {
    let gateway = format!("spiffe://{TD}/api-gateway");
    let audited: HashSet<&str> = all
        .iter()
        .filter(|(n, _)| n.starts_with("monolith"))
        .flat_map(|(_, l)| l.iter())
        .filter(|l| l["decision"] == "deny" && l["caller"] == gateway.as_str())
        .filter_map(|l| l["trace_id"].as_str())
        .collect();
    probes
        .iter()
        .filter(|s| s.status == Some(403) && !audited.contains(s.trace.as_str()))
        .collect()
}

/// The crash that could have lost the audit line of `probe`: a line is lost only if it was
/// still buffered at the kill, so its probe was answered within [`LOST_WINDOW`] before it.
fn crashed<'a>(fleet: &'a Fleet, probe: &Sample) -> Option<&'a (String, Instant)> {
    let answered = probe.at + probe.latency;
    fleet
        .crashes
        .iter()
        .find(|(_, at)| answered <= *at + LATE_ANSWER && *at < answered + LOST_WINDOW)
}

/// The audit lines of every sidecar joined on one report's trace id.
fn timeline(fleet: &Fleet, samples: &[super::Sample]) -> Check {
    let all = fleet.audit_lines();
    let mut best: Vec<(String, serde_json::Value)> = Vec::new();
    for s in samples.iter().filter(|s| s.status == Some(202)).take(200) {
        let lines: Vec<(String, serde_json::Value)> = all
            .iter()
            .flat_map(|(n, ls)| {
                ls.iter()
                    .filter(|l| l["trace_id"] == s.trace.as_str())
                    .map(move |l| (n.clone(), l.clone()))
            })
            .collect();
        if lines.len() > best.len() {
            best = lines;
        }
        if best.len() >= 6 {
            break;
        }
    }
    best.sort_by(|a, b| a.1["time"].as_str().cmp(&b.1["time"].as_str()));
    let services: BTreeSet<&str> = best
        .iter()
        .map(|(n, _)| n.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-'))
        .collect();
    let trace = best
        .first()
        .and_then(|(_, l)| l["trace_id"].as_str())
        .unwrap_or("-")
        .to_owned();
    let mut detail = format!(
        "trace {trace}: {} audit lines from {} services",
        best.len(),
        services.len()
    );
    for (name, l) in &best {
        let peer = if l["direction"] == "inbound" {
            format!(
                "from {}",
                l["caller"]
                    .as_str()
                    .unwrap_or("-")
                    .rsplit('/')
                    .next()
                    .unwrap_or("-")
            )
        } else {
            format!("to {}", l["upstream"].as_str().unwrap_or("-"))
        };
        detail.push_str(&format!(
            "\n{}  {:<18} {:<8} {:<4} {:<24} {:<20} {} {}",
            l["time"].as_str().unwrap_or("-"),
            name,
            l["direction"].as_str().unwrap_or("-"),
            l["method"].as_str().unwrap_or("-"),
            l["path"].as_str().unwrap_or("-"),
            peer,
            l["decision"].as_str().unwrap_or(""),
            l["status"],
        ));
    }
    Check {
        ok: best.len() >= 6 && services.len() == 3,
        label: "one report's path through the fleet, joined on its trace id",
        detail,
    }
}

/// The summary table (Markdown): one row per step.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| step | secs | reports | failed | p50 ms | p99 ms | mesh calls | failed calls | per monolith replica |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let s = &r.stats;
        let spread: Vec<String> = s.per_monolith.values().map(usize::to_string).collect();
        t.push_str(&format!(
            "| {} | {:.1} | {} | {} | {:.1} | {:.1} | {} | {} | {} |\n",
            r.step,
            s.secs,
            s.reports_ok + s.reports_failed,
            s.reports_failed,
            s.report_ms.0,
            s.report_ms.1,
            s.calls,
            s.failed.values().sum::<usize>(),
            spread.join("/")
        ));
    }
    t
}
