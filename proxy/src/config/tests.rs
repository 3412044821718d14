use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const GOOD: &str = r#"
[identity]
cert = "certs/cert.pem"
key = "certs/key.pem"
bundle = "certs/bundle.pem"

[inbound]
listen = "0.0.0.0:8443"
app = "127.0.0.1:8080"
policy = "policy.toml"

[[outbound]]
name = "monolith"
listen = "127.0.0.1:7001"
connect = "monolith.internal:8443"
server_id = "spiffe://fintech.internal/monolith"

[admin]
listen = "127.0.0.1:9901"
"#;

fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    Config::parse(text, Path::new("/etc/gh/sidecar.toml"))
}

fn errors(text: &str) -> Vec<String> {
    parse(text)
        .expect_err("config should be refused")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn good_config_resolves_paths_and_defaults() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(c.identity.cert, Path::new("/etc/gh/certs/cert.pem"));
    assert_eq!(c.min_tls, MinTls::Tls13);
    let i = c.inbound.expect("inbound");
    assert_eq!(i.policy, Path::new("/etc/gh/policy.toml"));
    assert_eq!(i.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
    assert_eq!(c.outbound[0].target.host(), "monolith.internal");
    assert_eq!(c.outbound[0].target.port(), 8443);
    assert_eq!(c.shutdown_grace_period, DEFAULT_SHUTDOWN_GRACE);
}

#[test]
fn connection_limits_default_and_pending_handshakes_stay_under_half_the_slots() {
    let i = parse(GOOD).expect("valid").inbound.expect("inbound");
    assert_eq!(i.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(
        i.max_connections_per_source,
        DEFAULT_MAX_CONNECTIONS_PER_SOURCE
    );
    assert_eq!(
        i.max_handshakes_per_source,
        DEFAULT_MAX_HANDSHAKES_PER_SOURCE
    );
    assert_eq!(i.max_pending_handshakes, DEFAULT_MAX_PENDING_HANDSHAKES);
    assert_eq!(i.failed_handshake_delay, DEFAULT_FAILED_HANDSHAKE_DELAY);
    let text = GOOD.replace(
        "policy = \"policy.toml\"",
        "policy = \"p\"\nmax_connections = 100\nmax_pending_handshakes = 500\n\
             max_connections_per_source = 7\nmax_handshakes_per_source = 3\n\
             failed_handshake_delay = \"250ms\"",
    );
    let i = parse(&text).expect("valid").inbound.expect("inbound");
    assert_eq!(i.max_pending_handshakes, 50);
    assert_eq!(i.max_connections_per_source, 7);
    assert_eq!(i.max_handshakes_per_source, 3);
    assert_eq!(i.failed_handshake_delay, Duration::from_millis(250));
}

#[test]
fn unknown_key_names_line_and_column() {
    let text = GOOD.replace("policy = \"policy.toml\"", "policy = \"p\"\npolcy = 1");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("/etc/gh/sidecar.toml:11:1: "), "{e:?}");
    assert!(e[0].contains("polcy"), "{e:?}");
}

#[test]
fn every_problem_is_reported_with_its_position() {
    let text = GOOD
        .replace("\"127.0.0.1:8080\"", "\"10.0.0.5:8080\"")
        .replace("\"127.0.0.1:7001\"", "\"0.0.0.0:7001\"")
        .replace(
            "spiffe://fintech.internal/monolith",
            "spiffe://Fintech/monolith",
        )
        .replace("listen = \"127.0.0.1:9901\"", "listen = \"localhost\"");
    let e = errors(&text);
    assert_eq!(e.len(), 4, "{e:?}");
    assert!(
        e[0].contains(":9:7: the app address 10.0.0.5:8080"),
        "{e:?}"
    );
    assert!(
        e[1].contains(":14:10: outbound `monolith` listens on 0.0.0.0:7001"),
        "{e:?}"
    );
    assert!(e[2].contains(":16:13: invalid SPIFFE ID"), "{e:?}");
    assert!(
        e[3].contains(":19:10: `localhost` is not an IP:PORT"),
        "{e:?}"
    );
}

#[test]
fn dangerous_opt_ins_allow_non_loopback() {
    let text = GOOD
        .replace(
            "app = \"127.0.0.1:8080\"",
            "app = \"10.0.0.5:8080\"\ninsecure_app_address = true",
        )
        .replace(
            "listen = \"127.0.0.1:7001\"",
            "listen = \"0.0.0.0:7001\"\nallow_non_loopback_listen = true",
        );
    let c = parse(&text).expect("valid");
    assert!(c.inbound.expect("inbound").insecure_app_address);
    assert!(c.outbound[0].allow_non_loopback_listen);
}

#[test]
fn min_tls_top_level_or_tls_table() {
    let c = parse(&format!("min_tls = \"1.2\"\n{GOOD}")).expect("valid");
    assert_eq!(c.min_tls, MinTls::Tls12);
    let c = parse(&format!("{GOOD}\n[tls]\nmin_tls = \"1.2\"\n")).expect("valid");
    assert_eq!(c.min_tls, MinTls::Tls12);
    let e = errors(&format!("min_tls = \"1.1\"\n{GOOD}"));
    assert!(e[0].contains(":1:11: `1.1` is not a supported"), "{e:?}");
}

#[test]
fn crl_stale_and_grace_default_to_refuse_after_an_hour() {
    let c = parse(GOOD).expect("good").identity.crl_policy;
    assert_eq!(
        (c.stale, c.grace),
        (CrlStale::Refuse, Duration::from_secs(3600))
    );
    let with = |lines: &str| GOOD.replacen("[identity]\n", &format!("[identity]\n{lines}\n"), 1);
    for (v, want) in [("warn", CrlStale::Warn), ("unready", CrlStale::Unready)] {
        let text = with(&format!("crl_stale = \"{v}\"\ncrl_grace = \"10m\""));
        let c = parse(&text).expect("valid").identity.crl_policy;
        assert_eq!((c.stale, c.grace), (want, Duration::from_secs(600)));
    }
    let e = errors(&with("crl_stale = \"ignore\""));
    assert!(
        e[0].contains(":3:13: `ignore` is not a `crl_stale` action"),
        "{e:?}"
    );
    let e = errors(&with("crl_grace = \"soon\""));
    assert_eq!(e.len(), 1, "{e:?}");
}

#[test]
fn reload_section_defaults_values_and_errors() {
    let d = parse(GOOD).expect("good").reload;
    assert!(d.watch && !d.allow_identity_change);
    assert_eq!(
        (d.debounce, d.poll_interval),
        (DEFAULT_RELOAD_DEBOUNCE, DEFAULT_RELOAD_POLL)
    );
    let text = format!(
        "{GOOD}\n[reload]\nwatch = false\ndebounce = \"10ms\"\npoll_interval = \"5s\"\nallow_identity_change = true\n"
    );
    let r = parse(&text).expect("reload section").reload;
    assert!(!r.watch && r.allow_identity_change);
    assert_eq!(r.debounce, Duration::from_millis(10));
    assert_eq!(r.poll_interval, Duration::from_secs(5));
    let e = errors(&format!("{GOOD}\n[reload]\npoll_interval = \"0s\"\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("reload.poll_interval"), "{e:?}");
    let e = errors(&format!("{GOOD}\n[reload]\nintervall = \"1s\"\n"));
    assert!(e[0].contains("intervall"), "{e:?}");
}

#[test]
fn runtime_worker_threads_and_outbound_protocol() {
    let c = parse(GOOD).expect("good");
    assert_eq!(c.runtime.worker_threads, DEFAULT_WORKER_THREADS);
    assert_eq!(c.outbound[0].protocol, UpstreamProtocol::Auto);
    let text = GOOD.replace(
        "connect = \"monolith.internal:8443\"",
        "connect = \"monolith.internal:8443\"\nprotocol = \"http1\"",
    );
    let c = parse(&format!("{text}\n[runtime]\nworker_threads = 2\n")).expect("valid");
    assert_eq!(c.runtime.worker_threads, 2);
    assert_eq!(c.outbound[0].protocol, UpstreamProtocol::Http1);
    assert_eq!(c.outbound[0].protocol.alpn(), [b"http/1.1".as_slice()]);
    let e = errors(&format!("{GOOD}\n[runtime]\nworker_threads = 0\n"));
    assert!(e[0].contains("runtime.worker_threads"), "{e:?}");
    let e = errors(&format!("{GOOD}\n[runtime]\nworker_threads = 257\n"));
    assert!(
        e[0].contains("worker_threads` = 257 is more than the maximum of 256"),
        "{e:?}"
    );
    assert!(
        e[0].contains("sidecar.toml:22:18:"),
        "names line and column: {e:?}"
    );
    let c = parse(&format!("{GOOD}\n[runtime]\nworker_threads = 256\n")).expect("max");
    assert_eq!(c.runtime.worker_threads, MAX_WORKER_THREADS);
    let e = errors(&GOOD.replace(
        "connect = \"monolith.internal:8443\"",
        "connect = \"monolith.internal:8443\"\nprotocol = \"h3\"",
    ));
    assert!(e[0].contains("h3"), "{e:?}");
}

#[test]
fn slow_reader_and_reset_limits_default_and_can_be_set() {
    let i = parse(GOOD).expect("good").inbound.expect("inbound");
    assert_eq!(i.send_timeout, DEFAULT_SEND_TIMEOUT);
    assert_eq!(i.max_h2_resets, DEFAULT_MAX_H2_RESETS);
    assert_eq!(i.h2_reset_window, DEFAULT_H2_RESET_WINDOW);
    let text = GOOD.replace(
        "policy = \"policy.toml\"",
        "policy = \"p\"\nsend_timeout = \"5s\"\nmax_h2_resets = 50\nh2_reset_window = \"1m\"",
    );
    let i = parse(&text).expect("set").inbound.expect("inbound");
    assert_eq!(i.send_timeout, Duration::from_secs(5));
    assert_eq!(i.max_h2_resets, 50);
    assert_eq!(i.h2_reset_window, Duration::from_secs(60));
    let text = GOOD.replace(
        "policy = \"policy.toml\"",
        "policy = \"p\"\nsend_timeout = \"0s\"\nmax_h2_resets = 0",
    );
    let e = errors(&text);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e.iter().any(|e| e.contains("inbound.send_timeout")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|e| e.contains("inbound.max_h2_resets")),
        "{e:?}"
    );
}

#[test]
fn bad_durations_and_zero_limits() {
    let text = GOOD.replace(
        "policy = \"policy.toml\"",
        "policy = \"p\"\nheader_read_timeout = \"soon\"\nmax_connections = 0",
    );
    let e = errors(&text);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].contains(":11:23: `soon` is not a duration"), "{e:?}");
    assert!(
        e[1].contains(":12:19: `inbound.max_connections` must be"),
        "{e:?}"
    );
}

#[test]
fn connect_host_that_is_no_http_authority_is_refused_not_a_panic_at_run() {
    let text = GOOD.replace("monolith.internal:8443", "mono#lith:8443");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("`mono#lith:8443` is not HOST:PORT"), "{e:?}");
    for good in ["monolith.internal:8443", "10.0.0.7:8443", "[::1]:8443"] {
        let c = parse(&GOOD.replace("monolith.internal:8443", good)).expect(good);
        assert_eq!(c.outbound[0].target.port(), 8443);
    }
}

#[test]
fn missing_section_is_a_syntax_error_with_position() {
    let text = GOOD.replace("[admin]\nlisten = \"127.0.0.1:9901\"\n", "");
    let e = errors(&text);
    assert!(e[0].contains("admin"), "{e:?}");
}

#[test]
fn audit_section_defaults_values_and_errors() {
    let d = parse(GOOD).expect("good").audit;
    assert!(d.enabled);
    assert_eq!(d.path, None);
    assert_eq!(d.flush_interval, DEFAULT_AUDIT_FLUSH_INTERVAL);
    let a = parse(&format!("{GOOD}\n[audit]\npath = \"audit.jsonl\"\n"))
        .expect("path only")
        .audit;
    assert!(a.enabled);
    assert_eq!(a.path.as_deref(), Some(Path::new("/etc/gh/audit.jsonl")));
    assert_eq!(a.flush_interval, DEFAULT_AUDIT_FLUSH_INTERVAL);
    let a = parse(&format!(
        "{GOOD}\n[audit]\nenabled = false\nflush_interval = \"1s\"\n"
    ))
    .expect("off")
    .audit;
    assert!(!a.enabled);
    assert_eq!(a.flush_interval, Duration::from_secs(1));
    for zero in ["0", "0s"] {
        let a = parse(&format!("{GOOD}\n[audit]\nflush_interval = \"{zero}\"\n"))
            .expect("zero: every line at once")
            .audit;
        assert_eq!(a.flush_interval, Duration::ZERO);
    }
    let e = errors(&format!("{GOOD}\n[audit]\nflush_interval = \"1m\"\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains(":22:18: `audit.flush_interval` = `1m` is longer than the maximum"),
        "{e:?}"
    );
    let e = errors(&format!("{GOOD}\n[audit]\nflush_interval = \"soon\"\n"));
    assert!(e[0].contains(":22:18: `soon` is not a duration"), "{e:?}");
    let e = errors(&format!("{GOOD}\n[audit]\nenabled = \"no\"\n"));
    assert!(e[0].contains(":22:"), "{e:?}");
    let e = errors(&format!("{GOOD}\n[audit]\nflush = \"1s\"\n"));
    assert!(e[0].contains("flush"), "{e:?}");
}

#[test]
fn audit_summary_says_where_how_and_when_off() {
    let mut a = AuditConfig::default();
    assert_eq!(
        a.summary(),
        "stdout, buffered: written every 100ms or 128 KiB, and on shutdown"
    );
    a.path = Some(PathBuf::from("/var/log/gh/audit.jsonl"));
    a.flush_interval = Duration::ZERO;
    assert_eq!(
        a.summary(),
        "/var/log/gh/audit.jsonl, every line written at once (flush_interval = 0)"
    );
    a.enabled = false;
    assert!(a.summary().starts_with("OFF"), "{}", a.summary());
}

#[test]
fn audit_flush_interval_error_has_help() {
    let kind = ConfigErrorKind::AuditFlushInterval { value: "1h".into() };
    assert!(kind.help().contains("10s"), "{}", kind.help());
}

/// `connect` is parsed once, here (the outbound pool's own parser is gone): the cases its test
/// covered.
#[test]
fn connect_parses_names_and_addresses_into_a_target() {
    for (text, host) in [
        ("monolith.internal:8443", "monolith.internal"),
        ("127.0.0.1:8443", "127.0.0.1"),
        ("[::1]:8443", "::1"),
    ] {
        let c = parse(&GOOD.replace("monolith.internal:8443", text)).expect(text);
        let t = &c.outbound[0].target;
        assert_eq!((t.host(), t.port()), (host, 8443));
    }
    let c = parse(&GOOD.replace("monolith.internal:8443", "[::1]:8443")).expect("ipv6");
    assert_eq!(c.outbound[0].target.authority().as_str(), "[::1]:8443");
    for bad in [
        "monolith",
        "monolith:",
        ":8443",
        "user@host:1",
        "http://h:1",
        "",
    ] {
        let e = errors(&GOOD.replace("monolith.internal:8443", bad));
        assert!(
            e.iter().any(|e| e.contains("is not HOST:PORT")),
            "{bad} must be refused: {e:?}"
        );
    }
}

/// The pool's own defaults are the documented configuration defaults (they once said 60 s,
/// 90 s, 600 s and 16 where docs/CONFIG.md says 30 s, 30 s, 5 min and 32).
#[test]
fn outbound_limits_default_to_the_documented_config_defaults() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(c.outbound[0].limits, OutboundLimits::default());
    let d = OutboundLimits::default();
    assert_eq!(d.response_timeout, Duration::from_secs(30));
    assert_eq!(d.idle_timeout, Duration::from_secs(30));
    assert_eq!(d.max_connection_age, Duration::from_secs(300));
    assert_eq!((d.max_idle, d.max_connections), (32, 64));
}

#[test]
fn online_identity_is_exclusive_with_files_and_errors_name_the_key() {
    let online = GOOD.replace(
        "cert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\nbundle = \"certs/bundle.pem\"\n",
        "ca = \"https://ca.fintech.internal:8444\"\n\
         spiffe_id = \"spiffe://fintech.internal/report-service\"\n\
         ca_bundle = \"bootstrap/bundle.pem\"\njoin_token_file = \"bootstrap/token\"\n",
    );
    let c = parse(&online).expect("valid online identity");
    let o = c.identity.online.as_ref().expect("online");
    assert_eq!(o.ca_bundle, Path::new("/etc/gh/bootstrap/bundle.pem"));
    assert!(c.is_online() && c.identity.crl.is_none());

    // A file key next to `ca`: at that key.
    let both = online.replace("[inbound]", "crl = \"crl.pem\"\n\n[inbound]");
    let e = errors(&both);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("/etc/gh/sidecar.toml:8:7: [identity] `crl` cannot be combined"),
        "{e:?}"
    );
    // An online key without `ca`.
    let e = errors(&GOOD.replace("[inbound]", "ca_poll = \"5s\"\n\n[inbound]"));
    assert!(
        e[0].contains(":7:11: [identity] `ca_poll` only applies with `ca"),
        "{e:?}"
    );
    // The client's own validation, placed at the key: a bad duration, a missing credential.
    let e = errors(&online.replace("[inbound]", "ca_poll = \"100ms\"\n\n[inbound]"));
    assert!(e[0].contains(":8:11: `100ms` is outside 1s..=1h"), "{e:?}");
    let e = errors(&online.replace("join_token_file = \"bootstrap/token\"\n", ""));
    assert!(e[0].contains(":3:6: no bootstrap credential"), "{e:?}");
    // Neither: every missing file named.
    let e = errors(&online.replace("ca = \"https://ca.fintech.internal:8444\"\n", ""));
    assert!(
        e.iter().any(|e| e.contains("[identity] has no `cert`")),
        "{e:?}"
    );
}
