//! `[identity] ca = …`: the online-identity settings as written in the TOML ([`OnlineIdentityRaw`],
//! field names exactly as in DESIGN.md "Fleet contracts") and their validated form
//! ([`OnlineIdentity`]).
//!
//! Validation collects every problem, each naming the key and saying what to write instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gatehouse_policy::{SpiffeId, TrustDomain};
use serde::Deserialize;

/// Default interval between two fetches of the bundle and the CRLs (`ca_poll`).
pub const DEFAULT_CA_POLL: Duration = Duration::from_secs(5);
/// Shortest accepted `ca_poll`.
pub const MIN_CA_POLL: Duration = Duration::from_secs(1);
/// Longest accepted `ca_poll`.
pub const MAX_CA_POLL: Duration = Duration::from_secs(3600);
/// Most CA URLs in `ca = [ … ]`.
pub const MAX_CA_URLS: usize = 16;

/// `ca`: one URL, or a list of the replicas' URLs (tried in order, see [`OnlineIdentity::ca`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaUrls {
    /// `ca = "https://ca.fintech.internal:8444"` (a Service, or one `ca serve`).
    One(String),
    /// `ca = ["https://ca-0…", "https://ca-1…"]`.
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for CaUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Urls;
        impl<'de> serde::de::Visitor<'de> for Urls {
            type Value = CaUrls;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an https:// URL of `ca serve`, or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CaUrls, E> {
                Ok(CaUrls::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CaUrls, A::Error> {
                let mut urls = Vec::new();
                while let Some(u) = seq.next_element::<String>()? {
                    urls.push(u);
                }
                Ok(CaUrls::Many(urls))
            }
        }
        d.deserialize_any(Urls)
    }
}

impl Default for CaUrls {
    fn default() -> Self {
        Self::One(String::new())
    }
}

impl From<String> for CaUrls {
    fn from(url: String) -> Self {
        Self::One(url)
    }
}

impl From<&str> for CaUrls {
    fn from(url: &str) -> Self {
        Self::One(url.to_owned())
    }
}

impl CaUrls {
    /// The URLs as written.
    pub fn as_slice(&self) -> &[String] {
        match self {
            Self::One(u) => std::slice::from_ref(u),
            Self::Many(v) => v,
        }
    }

    /// The URLs joined with `, ` (for names in messages).
    pub fn joined(&self) -> String {
        self.as_slice().join(", ")
    }
}

/// The online-identity keys of `[identity]`, as written (paths not yet resolved).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineIdentityRaw {
    /// `ca = "https://host:port"` or a list of them: the `ca serve` replicas to enroll with and
    /// renew from.
    #[serde(default)]
    pub ca: CaUrls,
    /// `spiffe_id`: the identity this sidecar expects to be given (the CA decides it from the
    /// credential; a different answer is refused).
    pub spiffe_id: String,
    /// `ca_bundle`: PEM roots for the first contact with the CA (later contacts use the bundle
    /// the CA hands out).
    pub ca_bundle: PathBuf,
    /// `join_token_file`: a file holding a join token from `ca token create`.
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// `enrollment_cert`: an enrollment certificate from `ca enrollment issue` (with
    /// `enrollment_key`).
    #[serde(default)]
    pub enrollment_cert: Option<PathBuf>,
    /// `enrollment_key`: the enrollment certificate's key.
    #[serde(default)]
    pub enrollment_key: Option<PathBuf>,
    /// `k8s_token_file`: a projected Kubernetes service-account token (audience `gatehouse`).
    #[serde(default)]
    pub k8s_token_file: Option<PathBuf>,
    /// `ca_poll = "5s"`: how often the bundle and the CRLs are fetched (1 s to 1 h).
    #[serde(default)]
    pub ca_poll: Option<String>,
}

/// How the sidecar proves who it is on its first contact with the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A join token, read from this file at each enrollment (leading/trailing space trimmed).
    JoinTokenFile(PathBuf),
    /// An enrollment certificate and its key, presented as the TLS client certificate.
    EnrollmentCert {
        /// Certificate chain (PEM).
        cert: PathBuf,
        /// Its private key (PEM).
        key: PathBuf,
    },
    /// A projected service-account token, read at each enrollment (kubelet rotates it), sent as
    /// `Authorization: Bearer`.
    K8sTokenFile(PathBuf),
}

impl Bootstrap {
    /// The credential kind, for logs and `/status`: `join_token`, `enrollment_certificate` or
    /// `k8s_service_account`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JoinTokenFile(_) => "join_token",
            Self::EnrollmentCert { .. } => "enrollment_certificate",
            Self::K8sTokenFile(_) => "k8s_service_account",
        }
    }
}

/// Where the CA listens, parsed from `ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaEndpoint {
    /// `ca` as written.
    pub url: String,
    /// Host name or IP address (brackets of an IPv6 literal removed).
    pub host: String,
    /// Port (443 when not written).
    pub port: u16,
}

/// The validated online-identity settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineIdentity {
    /// The CA endpoints, at least one, in the order written. Each call goes to the one that
    /// answered last (the first at start) and moves on to the next (and to every address a
    /// host name resolves to) when it cannot be reached, fails the TLS check, times out or
    /// answers 502/503/504.
    pub ca: Vec<CaEndpoint>,
    /// The identity we expect.
    pub spiffe_id: SpiffeId,
    /// The CA's own identity, `spiffe://<td>/gatehouse/ca`, pinned on every connection to it.
    pub ca_id: SpiffeId,
    /// Bootstrap anchors (resolved path).
    pub ca_bundle: PathBuf,
    /// The first-contact credential (resolved paths).
    pub bootstrap: Bootstrap,
    /// Bundle and CRL fetch interval.
    pub ca_poll: Duration,
}

/// One problem with the online-identity settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[identity] {key}: {problem}\nhelp: {help}")]
pub struct IdentityConfigError {
    /// The key at fault.
    pub key: &'static str,
    /// What is wrong.
    pub problem: String,
    /// What to write instead.
    pub help: String,
}

fn problem(key: &'static str, problem: String, help: &str) -> IdentityConfigError {
    IdentityConfigError {
        key,
        problem,
        help: help.to_owned(),
    }
}

impl OnlineIdentityRaw {
    /// Checks the settings; relative paths are resolved against `base` (the directory of the
    /// configuration file).
    ///
    /// # Errors
    /// Every problem found.
    pub fn validate(&self, base: &Path) -> Result<OnlineIdentity, Vec<IdentityConfigError>> {
        let mut errors = Vec::new();
        let ca = parse_ca_urls(&self.ca).map_err(|e| errors.push(e)).ok();
        let spiffe_id = self
            .spiffe_id
            .parse::<SpiffeId>()
            .map_err(|e| {
                errors.push(problem(
                    "spiffe_id",
                    format!("`{}` is not a SPIFFE ID: {e}", self.spiffe_id),
                    "write the identity this sidecar enrolls as, e.g. \
                     spiffe_id = \"spiffe://fintech.internal/report-service\"",
                ))
            })
            .ok();
        if self.ca_bundle.as_os_str().is_empty() {
            errors.push(problem(
                "ca_bundle",
                "is empty".into(),
                "name the PEM file with the CA's roots (e.g. a copy of the CA's bundle.pem)",
            ));
        }
        let resolve = |p: &Path| base.join(p);
        let creds = [
            self.join_token_file.is_some(),
            self.enrollment_cert.is_some() || self.enrollment_key.is_some(),
            self.k8s_token_file.is_some(),
        ];
        const CREDS_HELP: &str = "set exactly one of join_token_file, enrollment_cert + \
                                  enrollment_key, or k8s_token_file";
        let bootstrap = match creds.iter().filter(|c| **c).count() {
            0 => {
                errors.push(problem(
                    "join_token_file",
                    "no bootstrap credential: the CA would not know who this sidecar is".into(),
                    CREDS_HELP,
                ));
                None
            }
            1 => {
                if let Some(p) = &self.join_token_file {
                    Some(Bootstrap::JoinTokenFile(resolve(p)))
                } else if let Some(p) = &self.k8s_token_file {
                    Some(Bootstrap::K8sTokenFile(resolve(p)))
                } else {
                    match (&self.enrollment_cert, &self.enrollment_key) {
                        (Some(cert), Some(key)) => Some(Bootstrap::EnrollmentCert {
                            cert: resolve(cert),
                            key: resolve(key),
                        }),
                        (Some(_), None) => {
                            errors.push(problem(
                                "enrollment_key",
                                "missing: enrollment_cert needs its key".into(),
                                "add enrollment_key = \"…/key.pem\" (from `ca enrollment issue`)",
                            ));
                            None
                        }
                        _ => {
                            errors.push(problem(
                                "enrollment_cert",
                                "missing: enrollment_key needs its certificate".into(),
                                "add enrollment_cert = \"…/cert.pem\" (from `ca enrollment issue`)",
                            ));
                            None
                        }
                    }
                }
            }
            _ => {
                errors.push(problem(
                    "join_token_file",
                    "more than one bootstrap credential is set".into(),
                    CREDS_HELP,
                ));
                None
            }
        };
        let ca_poll = match &self.ca_poll {
            None => Some(DEFAULT_CA_POLL),
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if (MIN_CA_POLL..=MAX_CA_POLL).contains(&d) => Some(d),
                Ok(_) => {
                    errors.push(problem(
                        "ca_poll",
                        format!("`{s}` is outside 1s..=1h"),
                        "write a duration between 1s and 1h, e.g. ca_poll = \"5s\" (the default)",
                    ));
                    None
                }
                Err(e) => {
                    errors.push(problem(
                        "ca_poll",
                        format!("`{s}` is not a duration: {e}"),
                        "write a duration such as \"5s\" or \"1m\"",
                    ));
                    None
                }
            },
        };
        let ca_id = spiffe_id.as_ref().and_then(|id| {
            SpiffeId::from_parts(&id.trust_domain(), "/gatehouse/ca")
                .map_err(|e| {
                    errors.push(problem(
                        "spiffe_id",
                        format!("cannot derive the CA's identity from it: {e}"),
                        "use an ID of the CA's trust domain",
                    ))
                })
                .ok()
        });
        match (ca, spiffe_id, ca_id, bootstrap, ca_poll) {
            (Some(ca), Some(spiffe_id), Some(ca_id), Some(bootstrap), Some(ca_poll))
                if errors.is_empty() =>
            {
                Ok(OnlineIdentity {
                    ca,
                    spiffe_id,
                    ca_id,
                    ca_bundle: resolve(&self.ca_bundle),
                    bootstrap,
                    ca_poll,
                })
            }
            _ => Err(errors),
        }
    }
}

impl OnlineIdentity {
    /// The trust domain of our identity (and of the CA).
    pub fn trust_domain(&self) -> TrustDomain {
        self.spiffe_id.trust_domain()
    }

    /// The CA URLs joined with `, `, for logs and names in messages.
    pub fn ca_urls(&self) -> String {
        let urls: Vec<&str> = self.ca.iter().map(|e| e.url.as_str()).collect();
        urls.join(", ")
    }
}

/// Parses every URL of `ca`: at least one, at most [`MAX_CA_URLS`], no duplicates.
fn parse_ca_urls(urls: &CaUrls) -> Result<Vec<CaEndpoint>, IdentityConfigError> {
    let list = urls.as_slice();
    if list.is_empty() {
        return Err(problem(
            "ca",
            "is an empty list".into(),
            "name at least one `ca serve`, e.g. ca = [\"https://ca-0.ca:8444\", \"https://ca-1.ca:8444\"]",
        ));
    }
    if list.len() > MAX_CA_URLS {
        return Err(problem(
            "ca",
            format!("lists {} URLs (at most {MAX_CA_URLS})", list.len()),
            "list a few replicas, or put a Service / load balancer in front of them and name it once",
        ));
    }
    let mut out: Vec<CaEndpoint> = Vec::with_capacity(list.len());
    for url in list {
        let e = parse_ca_url(url)?;
        if out.iter().any(|o| o.host == e.host && o.port == e.port) {
            return Err(problem(
                "ca",
                format!("`{url}` is listed twice"),
                "list each `ca serve` replica once",
            ));
        }
        out.push(e);
    }
    Ok(out)
}

/// Parses `https://host[:port][/]`: no user, path, query or fragment.
fn parse_ca_url(url: &str) -> Result<CaEndpoint, IdentityConfigError> {
    const HELP: &str =
        "write the address of `ca serve`, e.g. ca = \"https://ca.fintech.internal:8444\"";
    let bad = |why: &str| problem("ca", format!("`{url}` {why}"), HELP);
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(bad(
            "is not an https:// URL (the CA is only spoken to over TLS)",
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(bad("has no host"));
    }
    if authority.contains(['/', '?', '#', '@']) {
        return Err(bad(
            "has a path, query, fragment or user part (only https://host[:port] is accepted)",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Err(bad("has an unclosed `[`"));
        };
        match after {
            "" => (h, None),
            p => match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err(bad("has text after the IPv6 address")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    let port = match port {
        None => 443,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => return Err(bad("has an invalid port (1-65535)")),
        },
    };
    Ok(CaEndpoint {
        url: url.to_owned(),
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(extra: &str) -> Result<OnlineIdentity, Vec<IdentityConfigError>> {
        let text = format!(
            "ca = \"https://ca.fintech.internal:8444\"\n\
             spiffe_id = \"spiffe://fintech.internal/report-service\"\n\
             ca_bundle = \"bootstrap/bundle.pem\"\n{extra}"
        );
        let raw: OnlineIdentityRaw = toml::from_str(&text).expect("toml");
        raw.validate(Path::new("/etc/gatehouse"))
    }

    fn keys(r: Result<OnlineIdentity, Vec<IdentityConfigError>>) -> Vec<&'static str> {
        r.expect_err("refused").iter().map(|e| e.key).collect()
    }

    #[test]
    fn join_token_config_resolves_paths_and_derives_the_ca_id() {
        let c = raw("join_token_file = \"bootstrap/token\"").expect("valid");
        assert_eq!(c.ca[0].host, "ca.fintech.internal");
        assert_eq!(c.ca[0].port, 8444);
        assert_eq!(
            c.bootstrap,
            Bootstrap::JoinTokenFile("/etc/gatehouse/bootstrap/token".into())
        );
        assert_eq!(
            c.ca_bundle,
            Path::new("/etc/gatehouse/bootstrap/bundle.pem")
        );
        assert_eq!(
            c.ca_id.to_string(),
            "spiffe://fintech.internal/gatehouse/ca"
        );
        assert_eq!(c.ca_poll, DEFAULT_CA_POLL);
    }

    #[test]
    fn exactly_one_credential_is_required() {
        assert_eq!(keys(raw("")), ["join_token_file"]);
        assert_eq!(
            keys(raw("join_token_file = \"t\"\nk8s_token_file = \"k\"")),
            ["join_token_file"]
        );
        assert_eq!(keys(raw("enrollment_cert = \"c\"")), ["enrollment_key"]);
        assert_eq!(keys(raw("enrollment_key = \"k\"")), ["enrollment_cert"]);
        let c = raw("enrollment_cert = \"c\"\nenrollment_key = \"k\"").expect("valid");
        assert_eq!(c.bootstrap.kind(), "enrollment_certificate");
        let c = raw("k8s_token_file = \"/var/run/secrets/gatehouse/token\"").expect("valid");
        assert_eq!(
            c.bootstrap,
            Bootstrap::K8sTokenFile("/var/run/secrets/gatehouse/token".into())
        );
    }

    #[test]
    fn bad_url_id_and_poll_are_named_with_help() {
        let bad = |ca: &str| {
            let raw = OnlineIdentityRaw {
                ca: ca.into(),
                spiffe_id: "spiffe://td/x".into(),
                ca_bundle: "b.pem".into(),
                join_token_file: Some("t".into()),
                ..Default::default()
            };
            raw.validate(Path::new("/")).expect_err(ca)[0].clone()
        };
        for url in [
            "http://ca:8444",
            "https://",
            "https://ca:0",
            "https://ca:x",
            "https://ca/v1",
            "https://u@ca",
        ] {
            let e = bad(url);
            assert_eq!(e.key, "ca", "{url}");
            assert!(e.to_string().contains("help: write the address"), "{e}");
        }
        let ok = |ca: &str| {
            let raw = OnlineIdentityRaw {
                ca: ca.into(),
                spiffe_id: "spiffe://td/x".into(),
                ca_bundle: "b.pem".into(),
                join_token_file: Some("t".into()),
                ..Default::default()
            };
            raw.validate(Path::new("/")).expect(ca).ca.remove(0)
        };
        assert_eq!(ok("https://ca/").port, 443);
        let v6 = ok("https://[::1]:9");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9));
        assert_eq!(
            keys(raw("join_token_file = \"t\"\nca_poll = \"100ms\"")),
            ["ca_poll"]
        );
        assert_eq!(
            keys(raw("join_token_file = \"t\"\nca_poll = \"soon\"")),
            ["ca_poll"]
        );
        let r: OnlineIdentityRaw = toml::from_str(
            "ca = \"https://ca:1\"\nspiffe_id = \"not-an-id\"\nca_bundle = \"b\"\njoin_token_file = \"t\"",
        )
        .expect("toml");
        let e = r.validate(Path::new("/")).expect_err("bad id");
        assert_eq!(e[0].key, "spiffe_id");
    }

    #[test]
    fn ca_takes_one_url_or_a_list_of_replicas() {
        let parse = |ca: &str| {
            let text = format!(
                "ca = {ca}\nspiffe_id = \"spiffe://td/x\"\nca_bundle = \"b\"\njoin_token_file = \"t\""
            );
            let raw: OnlineIdentityRaw = toml::from_str(&text).expect("toml");
            raw.validate(Path::new("/"))
        };
        let one = parse("\"https://ca:8444\"").expect("one");
        assert_eq!(one.ca.len(), 1);
        let two = parse("[\"https://ca-0:8444\", \"https://ca-1:8444\"]").expect("list");
        let hosts: Vec<&str> = two.ca.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(hosts, ["ca-0", "ca-1"], "in the order written");
        assert_eq!(two.ca_urls(), "https://ca-0:8444, https://ca-1:8444");
        for bad in [
            "[]",
            "[\"https://a:1\", \"https://a:1/\"]",
            "[\"https://a:1\", \"http://b:1\"]",
        ] {
            assert_eq!(keys(parse(bad)), ["ca"], "{bad}");
        }
        let many: Vec<String> = (0..=MAX_CA_URLS)
            .map(|i| format!("\"https://ca-{i}:1\""))
            .collect();
        let e = parse(&format!("[{}]", many.join(","))).expect_err("too many");
        assert!(e[0].problem.contains("at most 16"), "{e:?}");
        let wrong =
            toml::from_str::<OnlineIdentityRaw>("ca = 5\nspiffe_id = \"x\"\nca_bundle = \"b\"")
                .expect_err("a number");
        assert!(
            wrong
                .to_string()
                .contains("an https:// URL of `ca serve`, or a list of them"),
            "{wrong}"
        );
    }
}
