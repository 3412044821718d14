//! Unit tests of the reloader: which input combinations are tried, and a stuck attempt.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::apply::{BUNDLE, CERT, CRL, KEY, POLICY, candidates, kinds};
use super::{Reloader, Trigger};
use crate::input::Inputs;
use crate::metrics::Metrics;
use crate::outbound::tls_source::TlsSource;
use crate::state::{State, Trust};

#[test]
fn candidates_try_every_changed_group_then_trust_first() {
    assert!(candidates(0).is_empty());
    assert_eq!(candidates(POLICY), vec![POLICY]);
    assert_eq!(
        candidates(CRL | POLICY),
        vec![CRL | POLICY, CRL, POLICY],
        "trust alone before policy alone"
    );
    assert_eq!(
        candidates(CERT | CRL | POLICY),
        vec![
            CERT | CRL | POLICY,
            CRL | POLICY,
            CERT | CRL,
            CERT | POLICY,
            CRL,
            POLICY,
            CERT
        ]
    );
    // Cert and key are one group, as are bundle and CRL: never applied apart.
    assert_eq!(candidates(KEY | BUNDLE), vec![KEY | BUNDLE, BUNDLE, KEY]);
    assert_eq!(kinds(CERT | POLICY), vec!["cert", "policy"]);
}

/// A sidecar state over files minted by our CA, with a CRL and a policy.
fn state(dir: &Path) -> (Arc<State>, Inputs) {
    use gatehouse_ca::{Authority, InitOptions, IssueRequest, KeyType};
    use gatehouse_policy::{SpiffeId, TrustDomain};
    let ca = Authority::init(
        &dir.join("ca"),
        &InitOptions {
            trust_domain: TrustDomain::parse("reload.test").expect("td"),
            key_type: KeyType::EcdsaP256,
            ttl: Duration::from_secs(86400),
            intermediate: false,
        },
    )
    .expect("ca init");
    let svid = ca
        .issue(&IssueRequest {
            spiffe_id: SpiffeId::parse("spiffe://reload.test/app").expect("id"),
            dns: vec![],
            ttl: Duration::from_secs(3600),
        })
        .expect("issue");
    svid.write_to(&dir.join("certs")).expect("write");
    std::fs::write(
        dir.join("policy.toml"),
        "version = 1\ntrust_domain = \"reload.test\"\n\n[[route]]\nname = \"all\"\n\
         path = \"/**\"\nallow = [\"*\"]\n",
    )
    .expect("policy");
    let config = "[identity]\ncert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\n\
         bundle = \"certs/bundle.pem\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\n\
         app = \"127.0.0.1:1\"\npolicy = \"policy.toml\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[outbound]]\nname = \"peer\"\nlisten = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:1\"\n\
         server_id = \"spiffe://reload.test/peer\"\n";
    let config = crate::config::Config::parse(config, &dir.join("sidecar.toml")).expect("config");
    let (state, inputs) = State::load(config).expect("state");
    (Arc::new(state), inputs)
}

fn slow_read(paths: &[Option<PathBuf>; 5]) -> Inputs {
    std::thread::sleep(Duration::from_millis(600));
    Inputs::read(paths)
}

/// A reload attempt past its deadline is a visible error (log, metric, `/status`), no
/// second attempt starts while it runs, and reloading resumes once it finished.
#[tokio::test]
async fn stuck_attempt_is_reported_and_blocks_no_later_reload() {
    let dir = tempfile::tempdir().expect("tmp");
    let (state, inputs) = state(dir.path());
    let metrics = Metrics::register().expect("metrics");
    let mut r = Reloader::new(state.clone(), metrics.clone(), inputs);
    r.deadline = Duration::from_millis(100);
    r.read = slow_read;
    let status = r.status();
    let timeouts = || metrics.reloads.with_label_values(&["all", "timeout"]).get();

    r.reload(Trigger::Signal).await;
    assert_eq!(timeouts(), 1);
    assert_eq!(metrics.reload_stuck.get(), 1);
    let json = status.lock().expect("status").to_json();
    assert!(json["stuck_since"].is_string(), "{json}");
    assert_eq!(json["last_result"], "timeout");
    assert_eq!(state.generation(), 0);

    // Still running: no new attempt (none times out, nothing is swapped).
    r.reload(Trigger::Signal).await;
    assert_eq!(timeouts(), 1);
    assert!(r.stuck.is_some());

    // Once it finished, the next trigger reads again and reloads.
    let finished = tokio::time::timeout(Duration::from_secs(10), async {
        while !r.stuck.as_ref().is_some_and(JoinHandle::is_finished) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    finished.await.expect("the slow attempt finishes");
    r.read = Inputs::read;
    r.reload(Trigger::Signal).await;
    assert_eq!(metrics.reload_stuck.get(), 0);
    assert!(status.lock().expect("status").to_json()["stuck_since"].is_null());
    assert_eq!(state.generation(), 1);
    assert_eq!(metrics.reloads.with_label_values(&["none", "ok"]).get(), 1);
}

/// Outbound pools dial with the current snapshot's configuration for their entry, and only a
/// change of trust (a swap with a new bundle or CRL, a CRL gone stale) retires their pooled
/// connections.
#[test]
fn outbound_tls_follows_the_snapshot_and_only_trust_changes_retire_connections() {
    let dir = tempfile::tempdir().expect("tmp");
    let (state, inputs) = state(dir.path());
    let tls: &dyn TlsSource = &*state;
    let first = tls.client_config("peer").expect("the configured entry");
    assert!(tls.client_config("other").is_none());
    assert_eq!(tls.trust_generation(), 0);

    // A policy edit or certificate rotation: a new configuration, connections stay pooled.
    state.swap(state.build_snapshot(&inputs).expect("build"), Trust::Kept);
    let second = tls.client_config("peer").expect("entry");
    assert!(!Arc::ptr_eq(&first, &second), "dials use the new snapshot");
    assert_eq!(tls.trust_generation(), 0);

    // A new bundle or CRL: pooled connections are retired.
    state.swap(
        state.build_snapshot(&inputs).expect("build"),
        Trust::Changed,
    );
    assert!(!Arc::ptr_eq(
        &second,
        &tls.client_config("peer").expect("entry")
    ));
    assert_eq!(tls.trust_generation(), 1);

    // A CRL gone stale beyond its grace period: retired without a swap.
    state.recheck_peers();
    assert_eq!(tls.trust_generation(), 2);
    assert_eq!(state.generation(), 2);
}
