//! Stage two: [`Config::parse`] checks the raw TOML value by value, collecting *every* problem
//! with its `file:line:col`, and fills what is not written from [`super::defaults`].

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::balance::BalanceConfig;
use crate::balance::discover::DiscoverConfig;
use gatehouse_policy::SpiffeId;

use super::defaults::*;
use super::error::{ConfigError, ConfigErrorKind};
use super::model::*;
use super::raw::*;

/// Collects every problem with its position.
pub(crate) struct Check<'a> {
    file: &'a Path,
    dir: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Check<'_> {
    pub(crate) fn push(&mut self, span: Option<Range<usize>>, kind: ConfigErrorKind) {
        let position = span.map(|s| line_col(self.text, s.start));
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            position,
            kind,
        });
    }

    pub(crate) fn path(&mut self, v: &S<String>, key: &'static str) -> PathBuf {
        if v.get_ref().is_empty() {
            self.push(Some(v.span()), ConfigErrorKind::Empty { key });
        }
        self.dir.join(v.get_ref())
    }

    pub(crate) fn addr(&mut self, v: &S<String>) -> Option<SocketAddr> {
        match v.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                let value = v.get_ref().clone();
                self.push(Some(v.span()), ConfigErrorKind::Address { value });
                None
            }
        }
    }

    pub(crate) fn duration(
        &mut self,
        v: Option<&S<String>>,
        key: &'static str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.push(Some(v.span()), ConfigErrorKind::Zero { key });
                default
            }
            Ok(d) => d,
            Err(_) => {
                let value = v.get_ref().clone();
                self.push(Some(v.span()), ConfigErrorKind::Duration { value });
                default
            }
        }
    }

    /// `[audit] flush_interval`: zero allowed (every line written at once), at most
    /// [`MAX_AUDIT_FLUSH_INTERVAL`].
    fn audit_flush_interval(&mut self, v: Option<&S<String>>) -> Duration {
        let Some(v) = v else {
            return DEFAULT_AUDIT_FLUSH_INTERVAL;
        };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if d > MAX_AUDIT_FLUSH_INTERVAL => {
                let value = v.get_ref().clone();
                self.push(
                    Some(v.span()),
                    ConfigErrorKind::AuditFlushInterval { value },
                );
                DEFAULT_AUDIT_FLUSH_INTERVAL
            }
            Ok(d) => d,
            Err(_) => {
                let value = v.get_ref().clone();
                self.push(Some(v.span()), ConfigErrorKind::Duration { value });
                DEFAULT_AUDIT_FLUSH_INTERVAL
            }
        }
    }

    pub(crate) fn count(&mut self, v: Option<&S<u64>>, key: &'static str, default: usize) -> usize {
        let Some(v) = v else { return default };
        if *v.get_ref() == 0 {
            self.push(Some(v.span()), ConfigErrorKind::Zero { key });
            return default;
        }
        usize::try_from(*v.get_ref()).unwrap_or(usize::MAX)
    }

    fn crl_stale(&mut self, v: Option<&S<String>>) -> CrlStale {
        let Some(v) = v else {
            return DEFAULT_CRL_STALE;
        };
        match v.get_ref().as_str() {
            "warn" => CrlStale::Warn,
            "unready" => CrlStale::Unready,
            "refuse" => CrlStale::Refuse,
            other => {
                let value = other.to_owned();
                self.push(Some(v.span()), ConfigErrorKind::CrlStale { value });
                DEFAULT_CRL_STALE
            }
        }
    }

    fn min_tls(&mut self, top: Option<&S<String>>, tls: Option<&S<String>>) -> MinTls {
        let v = match (top, tls) {
            (Some(_), Some(t)) => {
                self.push(Some(t.span()), ConfigErrorKind::MinTlsTwice);
                return MinTls::Tls13;
            }
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => return MinTls::Tls13,
        };
        match v.get_ref().as_str() {
            "1.3" => MinTls::Tls13,
            "1.2" => MinTls::Tls12,
            other => {
                let value = other.to_owned();
                self.push(Some(v.span()), ConfigErrorKind::MinTls { value });
                MinTls::Tls13
            }
        }
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn placeholder_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl Config {
    /// Reads and validates the configuration file.
    ///
    /// # Errors
    /// Every problem found, each with `file:line:col` (or only the file when it cannot be read).
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let err = |kind| {
            vec![ConfigError {
                file: path.to_path_buf(),
                position: None,
                kind,
            }]
        };
        let bytes = crate::input::read(&abs, crate::input::FileKind::Config)
            .map_err(|e| err(ConfigErrorKind::Read(e)))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            err(ConfigErrorKind::Syntax(format!(
                "the file is not UTF-8 text: {e}"
            )))
        })?;
        Self::parse(&text, &abs)
    }

    /// Validates configuration text as if it had been read from `path` (relative paths inside
    /// are resolved against `path`'s directory).
    ///
    /// # Errors
    /// Every problem found, each with `file:line:col`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut check = Check {
            file: path,
            dir,
            text,
            errors: Vec::new(),
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                // toml's message repeats the position and a snippet; keep the first line.
                let msg = e
                    .message()
                    .lines()
                    .next()
                    .unwrap_or("invalid TOML")
                    .to_owned();
                check.push(e.span(), ConfigErrorKind::Syntax(msg));
                return Err(check.errors);
            }
        };
        let config = check.validate(raw, path);
        if check.errors.is_empty() {
            Ok(config)
        } else {
            Err(check.errors)
        }
    }
}

impl Check<'_> {
    fn validate(&mut self, raw: RawConfig, path: &Path) -> Config {
        let min_tls = self.min_tls(
            raw.min_tls.as_ref(),
            raw.tls.as_ref().and_then(|t| t.min_tls.as_ref()),
        );
        let identity = self.identity(raw.identity);
        let inbound = raw.inbound.map(|i| self.inbound(i));
        let outbound = self.outbound(raw.outbound);
        let tcp = self.tcp(raw.tcp_inbound, raw.tcp_outbound); // issue 17
        let admin = AdminConfig {
            listen: self
                .addr(&raw.admin.listen)
                .unwrap_or_else(placeholder_addr),
        };
        let audit = raw
            .audit
            .map_or_else(AuditConfig::default, |a| AuditConfig {
                enabled: a.enabled.unwrap_or(true),
                path: a.path.map(|p| self.path(&p, "audit.path")),
                flush_interval: self.audit_flush_interval(a.flush_interval.as_ref()),
            });
        let shutdown_grace_period = self.duration(
            raw.shutdown_grace_period.as_ref(),
            "shutdown_grace_period",
            DEFAULT_SHUTDOWN_GRACE,
        );
        let reload = raw
            .reload
            .map_or_else(ReloadConfig::default, |r| ReloadConfig {
                watch: r.watch.unwrap_or(true),
                debounce: self.duration(
                    r.debounce.as_ref(),
                    "reload.debounce",
                    DEFAULT_RELOAD_DEBOUNCE,
                ),
                poll_interval: self.duration(
                    r.poll_interval.as_ref(),
                    "reload.poll_interval",
                    DEFAULT_RELOAD_POLL,
                ),
                allow_identity_change: r.allow_identity_change,
            });
        let worker_threads = raw.runtime.as_ref().and_then(|r| r.worker_threads.as_ref());
        let mut loops = self.count(
            worker_threads,
            "runtime.worker_threads",
            DEFAULT_WORKER_THREADS,
        );
        if let Some(v) = worker_threads.filter(|_| loops > MAX_WORKER_THREADS) {
            let value = *v.get_ref();
            self.push(Some(v.span()), ConfigErrorKind::WorkerThreads { value });
            loops = DEFAULT_WORKER_THREADS;
        }
        let runtime = RuntimeConfig {
            worker_threads: loops,
        };
        if inbound.is_none() && outbound.is_empty() && tcp.is_empty() {
            self.push(None, ConfigErrorKind::NoListener);
        }
        let config = Config {
            path: path.to_path_buf(),
            identity,
            min_tls,
            inbound,
            outbound,
            tcp, // issue 17
            admin,
            audit,
            shutdown_grace_period,
            reload,
            runtime,
        };
        self.duplicate_listens(&config);
        config
    }

    /// `[identity]`: the files (`cert`, `key`, `bundle`, `crl`), or online with `ca = …`
    /// (exclusive with the files; `crl_stale`/`crl_grace` apply to the CRLs from the CA too).
    fn identity(&mut self, raw: S<RawIdentity>) -> IdentityConfig {
        let table = raw.span();
        let raw = raw.into_inner();
        let crl_policy = CrlPolicy {
            stale: self.crl_stale(raw.crl_stale.as_ref()),
            grace: self.duration(
                raw.crl_grace.as_ref(),
                "identity.crl_grace",
                DEFAULT_CRL_GRACE,
            ),
        };
        let files = [
            ("cert", &raw.cert),
            ("key", &raw.key),
            ("bundle", &raw.bundle),
            ("crl", &raw.crl),
        ];
        let online_keys = [
            ("spiffe_id", &raw.spiffe_id),
            ("ca_bundle", &raw.ca_bundle),
            ("join_token_file", &raw.join_token_file),
            ("enrollment_cert", &raw.enrollment_cert),
            ("enrollment_key", &raw.enrollment_key),
            ("k8s_token_file", &raw.k8s_token_file),
            ("ca_poll", &raw.ca_poll),
        ];
        let Some(ca) = &raw.ca else {
            for (key, v) in online_keys {
                if let Some(v) = v {
                    self.push(Some(v.span()), ConfigErrorKind::IdentityOnlineOnly { key });
                }
            }
            let mut file = |v: &Option<S<String>>, key: &'static str, name: &'static str| match v {
                Some(v) => self.path(v, key),
                None => {
                    self.push(
                        Some(table.clone()),
                        ConfigErrorKind::IdentityMissing { key: name },
                    );
                    PathBuf::new()
                }
            };
            let cert = file(&raw.cert, "identity.cert", "cert");
            let key = file(&raw.key, "identity.key", "key");
            let bundle = file(&raw.bundle, "identity.bundle", "bundle");
            return IdentityConfig {
                cert,
                key,
                bundle,
                crl: raw.crl.as_ref().map(|c| self.path(c, "identity.crl")),
                crl_policy,
                online: None,
            };
        };
        for (key, v) in files {
            if let Some(v) = v {
                self.push(Some(v.span()), ConfigErrorKind::IdentityConflict { key });
            }
        }
        let text = |v: &Option<S<String>>| v.as_ref().map(|v| v.get_ref().clone());
        let online = crate::identity::OnlineIdentityRaw {
            ca: ca.get_ref().clone(),
            spiffe_id: text(&raw.spiffe_id).unwrap_or_default(),
            ca_bundle: text(&raw.ca_bundle).unwrap_or_default().into(),
            join_token_file: text(&raw.join_token_file).map(Into::into),
            enrollment_cert: text(&raw.enrollment_cert).map(Into::into),
            enrollment_key: text(&raw.enrollment_key).map(Into::into),
            k8s_token_file: text(&raw.k8s_token_file).map(Into::into),
            ca_poll: text(&raw.ca_poll),
        }
        .validate(self.dir);
        let online = match online {
            Ok(o) => Some(o),
            Err(problems) => {
                for e in problems {
                    // The error's position: the key at fault, else `ca` (a missing key).
                    let span = online_keys
                        .iter()
                        .find(|(k, _)| *k == e.key)
                        .and_then(|(_, v)| v.as_ref())
                        .map_or_else(|| ca.span(), |v| v.span());
                    self.push(Some(span), ConfigErrorKind::Online(e));
                }
                None
            }
        };
        // Names for the in-memory SVID, key, bundle and CRLs in messages and `/status`.
        let name = |what: &str| PathBuf::from(format!("{} ({what})", ca.get_ref().joined()));
        IdentityConfig {
            cert: name("SVID"),
            key: name("key in memory"),
            bundle: name("bundle"),
            crl: None,
            crl_policy,
            online,
        }
    }

    fn duplicate_listens(&mut self, config: &Config) {
        let mut seen = std::collections::HashSet::new();
        for (_, addr) in config.listeners() {
            if addr.port() != 0 && !seen.insert(addr) {
                self.push(None, ConfigErrorKind::DuplicateListen { addr });
            }
        }
    }

    fn inbound(&mut self, i: RawInbound) -> InboundConfig {
        let listen = self.addr(&i.listen).unwrap_or_else(placeholder_addr);
        let app = self.addr(&i.app).unwrap_or_else(placeholder_addr);
        if !app.ip().is_loopback() && !i.insecure_app_address {
            self.push(
                Some(i.app.span()),
                ConfigErrorKind::NonLoopbackApp { addr: app },
            );
        }
        let max_h2_streams = match i.max_h2_streams {
            Some(v) if *v.get_ref() == 0 => {
                let key = "inbound.max_h2_streams";
                self.push(Some(v.span()), ConfigErrorKind::Zero { key });
                DEFAULT_MAX_H2_STREAMS
            }
            Some(v) => *v.get_ref(),
            None => DEFAULT_MAX_H2_STREAMS,
        };
        let max_header_bytes = self.count(
            i.max_header_bytes.as_ref(),
            "inbound.max_header_bytes",
            DEFAULT_MAX_HEADER_BYTES,
        );
        let mut inbound = InboundConfig {
            listen,
            app,
            policy: self.path(&i.policy, "inbound.policy"),
            insecure_app_address: i.insecure_app_address,
            handshake_timeout: self.duration(
                i.handshake_timeout.as_ref(),
                "inbound.handshake_timeout",
                DEFAULT_HANDSHAKE_TIMEOUT,
            ),
            header_read_timeout: self.duration(
                i.header_read_timeout.as_ref(),
                "inbound.header_read_timeout",
                DEFAULT_HEADER_READ_TIMEOUT,
            ),
            idle_timeout: self.duration(
                i.idle_timeout.as_ref(),
                "inbound.idle_timeout",
                DEFAULT_IDLE_TIMEOUT,
            ),
            app_timeout: self.duration(
                i.app_timeout.as_ref(),
                "inbound.app_timeout",
                DEFAULT_APP_TIMEOUT,
            ),
            max_header_bytes,
            max_connections: self.count(
                i.max_connections.as_ref(),
                "inbound.max_connections",
                DEFAULT_MAX_CONNECTIONS,
            ),
            max_connections_per_source: self.count(
                i.max_connections_per_source.as_ref(),
                "inbound.max_connections_per_source",
                DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            ),
            max_handshakes_per_source: self.count(
                i.max_handshakes_per_source.as_ref(),
                "inbound.max_handshakes_per_source",
                DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            ),
            max_pending_handshakes: self.count(
                i.max_pending_handshakes.as_ref(),
                "inbound.max_pending_handshakes",
                DEFAULT_MAX_PENDING_HANDSHAKES,
            ),
            failed_handshake_delay: self.duration(
                i.failed_handshake_delay.as_ref(),
                "inbound.failed_handshake_delay",
                DEFAULT_FAILED_HANDSHAKE_DELAY,
            ),
            max_h2_streams,
            max_h2_resets: u32::try_from(self.count(
                i.max_h2_resets.as_ref(),
                "inbound.max_h2_resets",
                DEFAULT_MAX_H2_RESETS as usize,
            ))
            .unwrap_or(u32::MAX),
            h2_reset_window: self.duration(
                i.h2_reset_window.as_ref(),
                "inbound.h2_reset_window",
                DEFAULT_H2_RESET_WINDOW,
            ),
            send_timeout: self.duration(
                i.send_timeout.as_ref(),
                "inbound.send_timeout",
                DEFAULT_SEND_TIMEOUT,
            ),
            app_pool_max_idle: self.count(
                i.app_pool_max_idle.as_ref(),
                "inbound.app_pool_max_idle",
                DEFAULT_APP_POOL_MAX_IDLE,
            ),
            app_pool_idle_timeout: self.duration(
                i.app_pool_idle_timeout.as_ref(),
                "inbound.app_pool_idle_timeout",
                DEFAULT_APP_POOL_IDLE_TIMEOUT,
            ),
            allow_matrix_params: i.allow_matrix_params,
            // issue 17
            app_protocol: i.app_protocol.unwrap_or_default(),
            websocket_idle_timeout: self.duration(
                i.websocket_idle_timeout.as_ref(),
                "inbound.websocket_idle_timeout",
                DEFAULT_WEBSOCKET_IDLE_TIMEOUT,
            ),
            websocket_max_duration: self.duration(
                i.websocket_max_duration.as_ref(),
                "inbound.websocket_max_duration",
                DEFAULT_WEBSOCKET_MAX_DURATION,
            ),
        };
        // Unauthenticated connections never hold more than half the slots.
        inbound.max_pending_handshakes = inbound
            .max_pending_handshakes
            .min(inbound.max_connections.div_ceil(2));
        inbound
    }

    fn outbound(&mut self, raw: Vec<RawOutbound>) -> Vec<OutboundConfig> {
        let mut names = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for o in raw {
            let name = o.name.get_ref().clone();
            if name.is_empty() {
                let key = "outbound.name";
                self.push(Some(o.name.span()), ConfigErrorKind::Empty { key });
            } else if !names.insert(name.clone()) {
                let kind = ConfigErrorKind::DuplicateOutbound { name: name.clone() };
                self.push(Some(o.name.span()), kind);
            }
            let listen = self.addr(&o.listen).unwrap_or_else(placeholder_addr);
            if !listen.ip().is_loopback() && !o.allow_non_loopback_listen {
                let kind = ConfigErrorKind::NonLoopbackOutbound {
                    name: name.clone(),
                    addr: listen,
                };
                self.push(Some(o.listen.span()), kind);
            }
            let target = self.target(&o.connect);
            let server_id = match SpiffeId::parse(o.server_id.get_ref()) {
                Ok(id) => Some(id),
                Err(source) => {
                    let value = o.server_id.get_ref().clone();
                    let kind = ConfigErrorKind::SpiffeId { value, source };
                    self.push(Some(o.server_id.span()), kind);
                    None
                }
            };
            let sni = o.sni.as_ref().map(|s| {
                if s.get_ref().is_empty() {
                    let key = "outbound.sni";
                    self.push(Some(s.span()), ConfigErrorKind::Empty { key });
                }
                s.get_ref().clone()
            });
            let entry = OutboundConfig {
                name,
                listen,
                target,
                server_id: match server_id {
                    Some(id) => id,
                    // An error is already recorded; the value is never used.
                    None => continue,
                },
                sni,
                allow_non_loopback_listen: o.allow_non_loopback_listen,
                limits: self.outbound_limits(&o),
                protocol: o.protocol.unwrap_or_default(),
            };
            out.push(entry);
        }
        out
    }

    fn outbound_limits(&mut self, o: &RawOutbound) -> OutboundLimits {
        OutboundLimits {
            connect_timeout: self.duration(
                o.connect_timeout.as_ref(),
                "outbound.connect_timeout",
                DEFAULT_CONNECT_TIMEOUT,
            ),
            response_timeout: self.duration(
                o.request_timeout.as_ref(),
                "outbound.request_timeout",
                DEFAULT_REQUEST_TIMEOUT,
            ),
            idle_timeout: self.duration(
                o.pool_idle_timeout.as_ref(),
                "outbound.pool_idle_timeout",
                DEFAULT_POOL_IDLE_TIMEOUT,
            ),
            max_idle: self.count(
                o.pool_max_idle.as_ref(),
                "outbound.pool_max_idle",
                DEFAULT_POOL_MAX_IDLE,
            ),
            max_connections: self.count(
                o.pool_max_connections.as_ref(),
                "outbound.pool_max_connections",
                DEFAULT_POOL_MAX_CONNECTIONS,
            ),
            max_connection_age: self.duration(
                o.max_connection_age.as_ref(),
                "outbound.max_connection_age",
                DEFAULT_MAX_CONNECTION_AGE,
            ),
            pool_wait_timeout: POOL_WAIT_TIMEOUT,
            lane_idle: LANE_IDLE,
            balance: BalanceConfig {
                slow_start: self.slow_start(o.slow_start.as_ref()),
                ..BalanceConfig::default()
            },
            discover: self.discover(o),
            retry_idempotent: o.retry_idempotent,
        }
    }

    /// `slow_start`: zero allowed (turns warm-up off).
    fn slow_start(&mut self, v: Option<&S<String>>) -> Duration {
        let default = BalanceConfig::default().slow_start;
        let Some(v) = v else { return default };
        humantime::parse_duration(v.get_ref()).unwrap_or_else(|_| {
            let value = v.get_ref().clone();
            self.push(Some(v.span()), ConfigErrorKind::Duration { value });
            default
        })
    }

    /// `resolver`, `dns_min_ttl`, `dns_max_ttl` (a maximum below the minimum is an error).
    fn discover(&mut self, o: &RawOutbound) -> DiscoverConfig {
        let default = DiscoverConfig::default();
        let min_ttl = self.duration(
            o.dns_min_ttl.as_ref(),
            "outbound.dns_min_ttl",
            default.min_ttl,
        );
        let max_ttl = self.duration(
            o.dns_max_ttl.as_ref(),
            "outbound.dns_max_ttl",
            default.max_ttl,
        );
        if max_ttl < min_ttl {
            let span = o
                .dns_max_ttl
                .as_ref()
                .or(o.dns_min_ttl.as_ref())
                .map(S::span);
            self.push(span, ConfigErrorKind::TtlRange { min_ttl, max_ttl });
        }
        DiscoverConfig {
            min_ttl,
            max_ttl,
            resolver: o.resolver.as_ref().and_then(|r| self.addr(r)),
        }
    }

    /// `connect`: the one place `host:port` is parsed.
    pub(crate) fn target(&mut self, v: &S<String>) -> Target {
        Target::parse(v.get_ref()).unwrap_or_else(|| {
            let value = v.get_ref().clone();
            self.push(Some(v.span()), ConfigErrorKind::HostPort { value });
            Target::new("", 0)
        })
    }
}
