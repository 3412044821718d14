//! `ca`: the Gatehouse CA command line. Parses arguments, calls `gatehouse_ca`, renders the
//! result; every error goes through [`render`] (exit 0 ok, 1 refused by a rule, 2 usage or I/O).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use gatehouse_ca::inspect::{self, Inspection};
use gatehouse_ca::inventory::Entry;
use gatehouse_ca::keystore::{self, KeyLocation};
use gatehouse_ca::revoke::RevokeTarget;
use gatehouse_ca::rotate::{Outcome, RotateOptions};
use gatehouse_ca::{
    Authority, CaError, InitOptions, IssueRequest, KeyType, SpiffeId, TrustDomain, store,
};
use gatehouse_policy::{outln, stdout};
use serde_json::json;
use time::OffsetDateTime;

/// Gatehouse CA: one private CA per SPIFFE trust domain, issuing X.509-SVIDs.
#[derive(Parser)]
#[command(name = "ca", version, propagate_version = true)]
struct Cli {
    /// Output format for commands that print data.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// PKCS#11 module (shared library) for a CA whose keys live in a token, e.g.
    /// /usr/lib/softhsm/libsofthsm2.so. Default: $GATEHOUSE_PKCS11_MODULE, the key-store URI's
    /// module-path, then the module recorded by `ca init`.
    #[arg(long, global = true, value_name = "LIB")]
    pkcs11_module: Option<PathBuf>,
    /// Read the token's user PIN from this environment variable (default: the key-store URI's
    /// pin-source, then $GATEHOUSE_PKCS11_PIN). The PIN is never written to any file.
    #[arg(long, global = true, value_name = "VAR")]
    pin_env: Option<String>,
    /// Keep the inventory, join tokens, revocations and CRL numbers in PostgreSQL instead of the
    /// CA directory (`postgres://user:password@host:5432/db[?sslmode=require]`; TLS roots from
    /// $PGSSLROOTCERT). Shared by every `ca serve` replica and by `ca list`/`revoke`/`crl`/
    /// `token create`/`enrollment issue`. The password is never printed.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "GATEHOUSE_CA_STORE",
        hide_env_values = true
    )]
    store: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Human-readable text.
    Text,
    /// One JSON document on stdout.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a CA directory (root, optional intermediate, bundle.pem, inventory).
    ///
    /// The directory is created with mode 0700, keys 0600 (PKCS#8). Refuses to touch a directory
    /// that is not empty.
    Init {
        /// CA directory to create (mode 0700).
        #[arg(long)]
        dir: PathBuf,
        /// The one trust domain this CA issues for, e.g. `fintech.internal`.
        #[arg(long)]
        trust_domain: String,
        /// Key algorithm of the CA and of the leaf keys it generates.
        #[arg(long, default_value = "ecdsa-p256", value_parser = ["ecdsa-p256", "ecdsa-p384", "ed25519"])]
        key_type: String,
        /// Lifetime of the root (and intermediate).
        #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Create a root and an intermediate; leaves are signed by the intermediate.
        #[arg(long)]
        intermediate: bool,
        /// Generate the CA keys inside a PKCS#11 token instead of PKCS#8 files:
        /// "pkcs11:token=<label>;object=<prefix>" (RFC 7512; query attributes module-path,
        /// pin-source, pin-value). ECDSA P-256 or P-384 only. The keys never leave the token.
        #[arg(long, value_name = "URI")]
        key_store: Option<String>,
    },
    /// Issue an X.509-SVID with a new key into a certificate directory.
    ///
    /// Writes OUT/cert.pem (leaf + chain), OUT/key.pem (0600, PKCS#8) and OUT/bundle.pem as one
    /// atomic set (versioned directory + `..data` symlink swap).
    Issue {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        svid: SvidArgs,
        /// Certificate directory to write (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a workload's CSR (the private key never touches the CA).
    ///
    /// The SANs come from --spiffe-id/--dns, never from the CSR; only its public key is used,
    /// after its signature verifies.
    Sign {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The CSR, PEM (`CERTIFICATE REQUEST`) or DER.
        #[arg(long)]
        csr: PathBuf,
        #[command(flatten)]
        svid: SvidArgs,
        /// Where to write the certificate chain (PEM).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show a certificate; with --bundle, whether its chain verifies.
    ///
    /// Prints identity, DNS SANs, serial, validity and time left, key type, issuer. With
    /// --bundle the chain is verified with webpki (serverAuth and clientAuth); exit 1 when it
    /// does not verify.
    #[command(group = clap::ArgGroup::new("what").required(true).multiple(true).args(["file", "dir"]))]
    Inspect {
        /// PEM file, leaf first (e.g. cert.pem from `ca issue`).
        file: Option<PathBuf>,
        /// CA directory: print where each of its keys lives (PKCS#8 file or PKCS#11 token).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Trust bundle to verify against (e.g. bundle.pem).
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
    /// List the inventory: every certificate the CA signed, with its state.
    List {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Re-issue the certificate directories that are due (safe to run from cron).
    ///
    /// Due: inside the renewal window (default: the last third of the lifetime), signed by an old
    /// root, or key not matching the certificate. Same identity and SANs; key and certificate are
    /// swapped together. A directory whose certificate is revoked is skipped ("skipped ...:
    /// revoked"), even with --force: re-issue it with --include-revoked.
    ///
    /// Exit status: 0 ok (whether or not anything was re-issued), 1/2 when a directory failed.
    /// With --exit-code: 3 when a directory was written (re-issued or given a new bundle.pem) and
    /// nothing failed, 0 when nothing changed. --format json prints one object per directory with
    /// "action": "rotated", "bundle_updated", "skipped", "current" or "error".
    Rotate {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Certificate directories to check.
        #[arg(required = true, value_name = "OUTDIR")]
        out_dirs: Vec<PathBuf>,
        /// Renew when less than this is left, instead of the last third of the lifetime.
        #[arg(long, value_parser = humantime::parse_duration)]
        renew_before: Option<Duration>,
        /// Re-issue every directory, due or not.
        #[arg(long)]
        force: bool,
        /// Keep the existing private key (default: a new key per rotation).
        #[arg(long)]
        keep_key: bool,
        /// Also re-issue directories whose certificate is revoked (skipped by default), with a
        /// new key.
        #[arg(long)]
        include_revoked: bool,
        /// Exit 3 when a directory was written (re-issued or new bundle), 0 when nothing changed.
        #[arg(long)]
        exit_code: bool,
        /// Re-issue nothing; only replace each directory's bundle.pem with the CA's current
        /// bundle (after `ca root rotate`: every sidecar trusts both roots before leaves change).
        #[arg(long, conflicts_with_all = ["force", "include_revoked", "keep_key", "renew_before"])]
        bundle_only: bool,
    },
    /// Root CA rotation: `root rotate` adds a new root, `root retire` drops the old ones.
    Root {
        #[command(subcommand)]
        command: RootCommand,
    },
    /// Revoke a certificate by serial, or every live certificate of an identity.
    ///
    /// Records the revocation in the inventory; with --crl also writes a fresh CRL.
    #[command(group = clap::ArgGroup::new("target").required(true).args(["serial", "spiffe_id"]))]
    Revoke {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Serial number, hex (as `ca list` prints it; `:` separators are accepted).
        #[arg(long)]
        serial: Option<String>,
        /// Revoke every unexpired, unrevoked certificate of this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// RFC 5280 reason: unspecified, key-compromise, ca-compromise, affiliation-changed,
        /// superseded, cessation-of-operation, certificate-hold, privilege-withdrawn.
        #[arg(long, default_value = "unspecified")]
        reason: String,
        /// Also write the CRL to this file (as `ca crl --out FILE`; recorded, so root rotation
        /// republishes it).
        #[arg(long)]
        crl: Option<PathBuf>,
        /// Validity of the CRL written with --crl (its next-update).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        crl_ttl: Duration,
    },
    /// Write the signed CRLs (v2, CRL number, next-update) as one PEM file.
    ///
    /// One CRL per issuing CA of every root in the bundle. Re-run it before next-update (e.g. from
    /// the same cron job as `ca rotate`). The file is recorded in ca.json: `ca root rotate` and
    /// `ca root retire` rewrite it, so it keeps covering every root in the bundle.
    Crl {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the CRL file (replaced atomically).
        #[arg(long)]
        out: PathBuf,
        /// Validity of the CRL (its next-update).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// With --intermediate: validity of each root's CRL when its key is present (the longer
        /// of this and --ttl); it is stored as gen-N/root.crl.pem and reused while root.key is
        /// offline (docs/OPERATIONS.md, "Offline root").
        #[arg(long, default_value = "2160h", value_parser = humantime::parse_duration)]
        root_ttl: Duration,
    },
    /// Write the CA's current trust bundle (every root not retired) to a file, and nothing else.
    ///
    /// The bundle-only step of a root rotation: after `ca root rotate`, hand this file (both roots)
    /// to every sidecar's `[identity] bundle` and wait until each trusts both, before any leaf is
    /// re-issued under the new root.
    Bundle {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the bundle (PEM, 0644, replaced atomically).
        #[arg(long)]
        out: PathBuf,
    },
    /// One-time join tokens for `ca serve` enrollment.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Enrollment certificates: long-lived, enroll-only credentials for `ca serve`.
    Enrollment {
        #[command(subcommand)]
        command: EnrollmentCommand,
    },
    /// Serve the CA over HTTPS: enrollment, renewal, bundle and CRL (see ca/README.md).
    ///
    /// Prints `listening on ADDR` once it accepts. Its own certificate is the SVID
    /// spiffe://<td>/gatehouse/ca, issued by itself at start (key in memory only) and renewed
    /// after two thirds of its lifetime.
    Serve {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on, e.g. 0.0.0.0:8444 (port 0: any free port).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Lifetime of the SVIDs it issues (at most the CA's own lifetime).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        svid_ttl: Duration,
        /// After `ca root rotate`, how long the new root is in the published bundle before it
        /// signs enrollments, renewals and this server's own certificate (the previous root
        /// signs them meanwhile). Keep it several times the sidecars' `ca_poll`, so every
        /// sidecar trusts the new root before a peer presents a leaf of it.
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        bundle_lead: Duration,
        /// DNS name to add to the serving certificate (repeatable), for clients that check one.
        #[arg(long)]
        dns: Vec<String>,
        /// Connections held at once; more wait in the accept queue. Keep it below the open-files
        /// limit (`ulimit -n`, systemd's LimitNOFILE), with room for the store's connections.
        #[arg(long, default_value_t = gatehouse_ca::serve::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        max_connections: usize,
        /// Connections from one IP address; more are closed before the TLS handshake. Raise it
        /// when many sidecars reach the CA from one address (a NAT gateway, an SNAT load balancer).
        #[arg(long, default_value_t = gatehouse_ca::serve::DEFAULT_MAX_CONNECTIONS_PER_SOURCE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        max_connections_per_source: usize,
        /// Serve `gatehouse_ca_*` Prometheus metrics on this address (plain HTTP, `GET /metrics`),
        /// e.g. 127.0.0.1:9902; keep it where only the scraper reaches. Printed as `metrics on ADDR`.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Accept Kubernetes projected service-account tokens (`Authorization: Bearer`) for
        /// enrollment, verified against the public keys of this JWKS file (the cluster's
        /// /openid/v1/jwks). They enroll as spiffe://<td>/ns/<namespace>/sa/<serviceaccount>.
        #[arg(long, requires = "k8s_issuer")]
        k8s_jwks: Option<PathBuf>,
        /// The `iss` those tokens must carry (the API server's --service-account-issuer).
        #[arg(long, requires = "k8s_jwks")]
        k8s_issuer: Option<String>,
        /// The audience those tokens must include (the pod's serviceAccountToken.audience).
        #[arg(long, default_value = gatehouse_ca::k8s::DEFAULT_AUDIENCE)]
        k8s_audience: String,
        /// TOML table `"<namespace>/<serviceaccount>" = "spiffe://<td>/<path>"`: instead of
        /// spiffe://<td>/ns/<ns>/sa/<sa>, only the listed accounts enroll, as their listed ID.
        #[arg(long, requires = "k8s_jwks")]
        k8s_map: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum EnrollmentCommand {
    /// Issue an enrollment certificate bound to one SPIFFE ID into a certificate directory.
    ///
    /// Its URI SAN is spiffe://<td>/gatehouse/enroll/<path> and its only extended key usage is
    /// Gatehouse's enroll-only OID, so sidecars refuse it for traffic. Presented to `ca serve`
    /// as the TLS client certificate with `{"csr"}`, it enrolls as --spiffe-id. Writes
    /// OUT/cert.pem, OUT/key.pem (0600) and OUT/bundle.pem; revoke it with `ca revoke --serial`.
    Issue {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The identity its enrollments receive.
        #[arg(long)]
        spiffe_id: String,
        /// Certificate directory to write (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the enrollment certificate.
        #[arg(long, default_value = "2160h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token bound to one SPIFFE ID; printed once, stored only as a SHA-256 hash.
    Create {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The identity an enrollment with this token receives.
        #[arg(long)]
        spiffe_id: String,
        /// How long the token can be used.
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many enrollments it allows (at least 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
    },
}

#[derive(Subcommand)]
enum RootCommand {
    /// Create a new root (and intermediate) and make it current.
    ///
    /// bundle.pem then holds the old and new roots; new leaves chain to the new root. Every CRL
    /// file written by `ca crl`/`ca revoke --crl` is rewritten first with CRLs of the new root's
    /// CAs too. Next: `ca rotate` every certificate directory, then `ca root retire`.
    Rotate {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Drop every non-current root from bundle.pem.
    ///
    /// Refuses while an unexpired, unrevoked leaf that `ca rotate` has not re-issued still chains
    /// to one of them (--force overrides, loudly). Then rewrites the recorded CRL files without
    /// the retired CAs.
    Retire {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Retire anyway: leaves that chain to the old root stop verifying.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    gatehouse_ca::keystore::configure(gatehouse_ca::keystore::Pkcs11Options {
        module: cli.pkcs11_module.clone(),
        pin_env: cli.pin_env.clone(),
    });
    if let Some(url) = &cli.store {
        let _ = STORE_URL.set(url.clone());
    }
    match run(&cli) {
        Ok(code) => stdout::exit_code(code),
        Err(e) => render(&e),
    }
}

fn run(cli: &Cli) -> Result<ExitCode, CaError> {
    let json = cli.format == Format::Json;
    match &cli.command {
        Command::Init {
            dir,
            trust_domain,
            key_type,
            ttl,
            intermediate,
            key_store,
        } => init(
            dir,
            trust_domain,
            key_type,
            *ttl,
            *intermediate,
            key_store.as_deref(),
            json,
        ),
        Command::Issue { dir, svid, out } => issue(dir, svid, out, json),
        Command::Sign {
            dir,
            csr,
            svid,
            out,
        } => sign(dir, csr, svid, out, json),
        Command::Inspect { file, dir, bundle } => match (file, dir) {
            (Some(file), _) => {
                let code = inspect_cmd(file, bundle.as_deref(), json)?;
                if let (Some(dir), false) = (dir, json) {
                    stdout::write(&keys_text(&open_ca(dir)?.key_locations()?));
                }
                Ok(code)
            }
            (None, Some(dir)) => {
                let ca = open_ca(dir)?;
                let keys = ca.key_locations()?;
                if json {
                    print_json(&json!({
                        "dir": dir, "trust_domain": ca.trust_domain().as_str(), "keys": keys_json(&keys),
                    }));
                } else {
                    outln!("CA {} in {}", ca.trust_domain(), dir.display());
                    stdout::write(&keys_text(&keys));
                }
                Ok(ExitCode::SUCCESS)
            }
            (None, None) => unreachable_usage(),
        },
        Command::List { dir } => list(dir, json),
        Command::Rotate {
            dir,
            out_dirs,
            renew_before,
            force,
            keep_key,
            include_revoked,
            exit_code,
            bundle_only,
        } => {
            let ca = open_ca(dir)?;
            let opts = RotateOptions {
                renew_before: *renew_before,
                force: *force,
                keep_key: *keep_key,
                include_revoked: *include_revoked,
                bundle_only: *bundle_only,
            };
            Ok(rotate(&ca, out_dirs, &opts, *exit_code, json))
        }
        Command::Root {
            command: RootCommand::Rotate { dir },
        } => root_rotate(dir, json),
        Command::Root {
            command: RootCommand::Retire { dir, force },
        } => root_retire(dir, *force, json),
        Command::Revoke {
            dir,
            serial,
            spiffe_id,
            reason,
            crl,
            crl_ttl,
        } => revoke(
            dir,
            serial.as_deref(),
            spiffe_id.as_deref(),
            reason,
            crl.as_deref(),
            *crl_ttl,
            json,
        ),
        Command::Crl {
            dir,
            out,
            ttl,
            root_ttl,
        } => crl(dir, out, *ttl, *root_ttl, json),
        Command::Bundle { dir, out } => bundle(dir, out, json),
        Command::Token {
            command:
                TokenCommand::Create {
                    dir,
                    spiffe_id,
                    ttl,
                    uses,
                },
        } => token_create(dir, spiffe_id, *ttl, *uses, json),
        Command::Enrollment {
            command:
                EnrollmentCommand::Issue {
                    dir,
                    spiffe_id,
                    out,
                    ttl,
                },
        } => enrollment_issue(dir, spiffe_id, out, *ttl, json),
        Command::Serve {
            dir,
            listen,
            svid_ttl,
            bundle_lead,
            dns,
            max_connections,
            max_connections_per_source,
            metrics_listen,
            k8s_jwks,
            k8s_issuer,
            k8s_audience,
            k8s_map,
        } => {
            let k8s = k8s_jwks
                .as_deref()
                .zip(k8s_issuer.as_deref())
                .map(|(jwks, iss)| K8sArgs {
                    jwks,
                    issuer: iss,
                    audience: k8s_audience,
                    map: k8s_map.as_deref(),
                });
            let net = Network {
                listen: *listen,
                limits: gatehouse_ca::serve::ConnLimits {
                    max_connections: *max_connections,
                    max_connections_per_source: *max_connections_per_source,
                },
                metrics_listen: *metrics_listen,
            };
            serve(dir, net, *svid_ttl, *bundle_lead, dns, k8s)
        }
    }
}

fn token_create(
    dir: &Path,
    spiffe_id: &str,
    ttl: Duration,
    uses: u32,
    json: bool,
) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    let t = ca.create_token(&parse_id(spiffe_id)?, ttl, uses)?;
    if json {
        print_json(&json!({
            "token": t.token, "spiffe_id": t.spiffe_id.as_str(), "expires": rfc3339(t.expires), "uses": t.uses,
        }));
    } else {
        outln!("{}", t.token);
        eprintln!(
            "join token for {} (expires {}, {} use(s)); it is shown only once",
            t.spiffe_id,
            rfc3339(t.expires),
            t.uses
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn enrollment_issue(
    dir: &Path,
    spiffe_id: &str,
    out: &Path,
    ttl: Duration,
    json: bool,
) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    let bound = parse_id(spiffe_id)?;
    check_out_dir(&ca, out)?;
    let cert = ca.issue_enrollment(&bound, ttl)?;
    cert.write_to(out)?;
    if json {
        print_json(&json!({
            "spiffe_id": bound.as_str(), "enrollment_id": cert.spiffe_id.as_str(), "serial": cert.serial_hex,
            "not_after": rfc3339(cert.not_after), "out": out,
        }));
    } else {
        outln!("enrollment certificate for {bound} ({})", cert.spiffe_id);
        outln!("  serial     {}", cert.serial_hex);
        outln!("  not after  {}", rfc3339(cert.not_after));
        outln!(
            "  wrote      {}/{{cert.pem,key.pem,bundle.pem}}",
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--k8s-*` options of `ca serve`.
struct K8sArgs<'a> {
    jwks: &'a Path,
    issuer: &'a str,
    audience: &'a str,
    map: Option<&'a Path>,
}

/// Where `ca serve` listens, and how many connections it holds.
struct Network {
    listen: std::net::SocketAddr,
    limits: gatehouse_ca::serve::ConnLimits,
    metrics_listen: Option<std::net::SocketAddr>,
}

fn serve(
    dir: &Path,
    net: Network,
    svid_ttl: Duration,
    bundle_lead: Duration,
    dns: &[String],
    k8s: Option<K8sArgs<'_>>,
) -> Result<ExitCode, CaError> {
    let Network {
        listen,
        limits,
        metrics_listen,
    } = net;
    let ca = open_ca(dir)?;
    gatehouse_ca::profile::check_dns_names(dns)?;
    let k8s = k8s
        .map(|k| {
            let v = gatehouse_ca::k8s::K8sVerifier::load(
                k.jwks,
                k.issuer,
                k.audience,
                ca.trust_domain().clone(),
            )?;
            match k.map {
                Some(map) => v.with_map(map),
                None => Ok(v),
            }
            .map(std::sync::Arc::new)
        })
        .transpose()?;
    let io = |action| {
        move |source| CaError::Io {
            action,
            path: PathBuf::from(listen.to_string()),
            source,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("cannot start the runtime for"))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(io("cannot listen on"))?;
        let opts = gatehouse_ca::serve::ServeOptions {
            svid_ttl,
            dns: dns.to_vec(),
            k8s,
            bundle_lead,
            limits,
            metrics_listen,
        };
        // `outln!` flushes: whoever waits for this line sees it at once.
        gatehouse_ca::serve::serve(ca, opts, listener, |addr, metrics| {
            outln!("listening on {addr}");
            if let Some(m) = metrics {
                outln!("metrics on {m}");
            }
        })
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn init(
    dir: &Path,
    trust_domain: &str,
    key_type: &str,
    ttl: Duration,
    intermediate: bool,
    key_store: Option<&str>,
    json: bool,
) -> Result<ExitCode, CaError> {
    let trust_domain = TrustDomain::parse(trust_domain).map_err(|source| CaError::InvalidId {
        input: trust_domain.to_owned(),
        source,
    })?;
    let key_type: KeyType = key_type.parse().unwrap_or_default();
    let opts = InitOptions {
        trust_domain,
        key_type,
        ttl,
        intermediate,
    };
    let key_store = key_store.map(keystore::KeyStoreRef::for_init).transpose()?;
    let ca = Authority::init_with_key_store(dir, &opts, key_store)?;
    let keys = ca.key_locations()?;
    let bundle = dir.join("bundle.pem");
    if json {
        print_json(&json!({
            "dir": dir, "trust_domain": ca.trust_domain().as_str(), "key_type": key_type.as_str(),
            "intermediate": intermediate, "bundle": bundle, "keys": keys_json(&keys),
        }));
    } else {
        outln!(
            "created CA for trust domain {} in {}",
            ca.trust_domain(),
            dir.display()
        );
        outln!(
            "  key type      {key_type}{}",
            if intermediate {
                " (root + intermediate)"
            } else {
                ""
            }
        );
        outln!("  trust bundle  {}", bundle.display());
        for k in &keys {
            outln!("  {:<13} {}", format!("{} key", k.role), k.location);
        }
        outln!(
            "next: ca issue --dir {} --spiffe-id spiffe://{}/<service> --out <dir>",
            dir.display(),
            ca.trust_domain()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What an SVID says about its workload: shared by `ca issue` and `ca sign`.
#[derive(clap::Args, Debug)]
struct SvidArgs {
    /// The workload's SPIFFE ID, e.g. spiffe://fintech.internal/payments.
    #[arg(long)]
    spiffe_id: String,
    /// Extra DNS SAN (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// Lifetime; may not outlive the signing CA.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

impl SvidArgs {
    fn request(&self) -> Result<IssueRequest, CaError> {
        Ok(IssueRequest {
            spiffe_id: parse_id(&self.spiffe_id)?,
            dns: self.dns.clone(),
            ttl: self.ttl,
        })
    }
}

fn issue(dir: &Path, svid: &SvidArgs, out: &Path, json: bool) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    let req = svid.request()?;
    check_out_dir(&ca, out)?;
    let svid = ca.issue(&req)?;
    svid.write_to(out)?;
    let [cert, key, bundle] = store::cert_dir_paths(out);
    if json {
        print_json(&json!({
            "spiffe_id": svid.spiffe_id.as_str(), "serial": svid.serial_hex, "sha256": svid.sha256_hex,
            "not_before": rfc3339(svid.not_before), "not_after": rfc3339(svid.not_after),
            "cert": cert, "key": key, "bundle": bundle,
        }));
    } else {
        outln!("issued {}", svid.spiffe_id);
        outln!("  serial     {}", svid.serial_hex);
        outln!(
            "  not after  {} (in {})",
            rfc3339(svid.not_after),
            left(svid.not_after)
        );
        outln!(
            "  wrote      {} {} {}",
            cert.display(),
            key.display(),
            bundle.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn sign(
    dir: &Path,
    csr: &Path,
    svid: &SvidArgs,
    out: &Path,
    json: bool,
) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    let req = svid.request()?;
    let csr_bytes = std::fs::read(csr).map_err(|e| CaError::Io {
        action: "cannot read",
        path: csr.to_path_buf(),
        source: e,
    })?;
    check_out_file(&ca, out)?;
    let signed = ca.sign_csr(&csr_bytes, csr, &req)?;
    create_parent(out)?;
    store::write_atomic(out, signed.cert_pem.as_bytes(), store::PUBLIC_MODE)?;
    if json {
        print_json(&json!({
            "spiffe_id": signed.spiffe_id.as_str(), "serial": signed.serial_hex, "sha256": signed.sha256_hex,
            "not_after": rfc3339(signed.not_after), "cert": out,
        }));
    } else {
        outln!("signed {} from {}", signed.spiffe_id, csr.display());
        outln!("  serial     {}", signed.serial_hex);
        outln!(
            "  not after  {} (in {})",
            rfc3339(signed.not_after),
            left(signed.not_after)
        );
        outln!("  wrote      {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect_cmd(file: &Path, bundle: Option<&Path>, json: bool) -> Result<ExitCode, CaError> {
    let pem = read(file)?;
    let bundle_pem = bundle.map(read).transpose()?;
    let bundle_arg = bundle_pem.as_deref().zip(bundle);
    let report = inspect::inspect_pem(&pem, file, bundle_arg, OffsetDateTime::now_utc())?;
    if json {
        print_json(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        print_inspection(&report);
    }
    if report.verified == Some(false) {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn list(dir: &Path, json: bool) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    let entries = ca.list()?;
    if json {
        print_json(&serde_json::to_value(&entries).unwrap_or_default());
    } else {
        let mut text = list_text(&entries);
        text.push_str(&keys_text(&ca.key_locations()?));
        stdout::write(&text);
    }
    Ok(ExitCode::SUCCESS)
}

/// clap's argument group makes FILE or --dir required.
fn unreachable_usage() -> Result<ExitCode, CaError> {
    eprintln!("error: pass a certificate FILE or --dir <CA directory>");
    Ok(ExitCode::from(2))
}

static STORE_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Opens the CA directory, with the `--store` records when one is given (connected and
/// migrated once per process).
fn open_ca(dir: &Path) -> Result<Authority, CaError> {
    static STORE: std::sync::OnceLock<std::sync::Arc<gatehouse_ca::pg::PgStore>> =
        std::sync::OnceLock::new();
    let ca = Authority::open(dir)?;
    let Some(url) = STORE_URL.get() else {
        return Ok(ca);
    };
    let store = match STORE.get() {
        Some(s) => s.clone(),
        None => {
            let s = gatehouse_ca::pg::PgStore::connect(url)?;
            STORE.get_or_init(|| s).clone()
        }
    };
    ca.with_store(store)
}

fn keys_json(keys: &[KeyLocation]) -> serde_json::Value {
    serde_json::to_value(keys).unwrap_or_default()
}

/// Where each CA key lives (`ca list`, `ca inspect --dir`).
fn keys_text(keys: &[KeyLocation]) -> String {
    use std::fmt::Write as _;
    let mut text = "CA keys:\n".to_owned();
    for k in keys {
        let _ = writeln!(
            text,
            "  gen-{} {:<12}  {}",
            k.generation, k.role, k.location
        );
    }
    text
}

fn root_rotate(dir: &Path, json: bool) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    let generation = ca.rotate_root()?;
    let crls = republished(&ca);
    if json {
        let mut v = serde_json::to_value(&generation).unwrap_or_default();
        v["crls_republished"] = json!(crls);
        print_json(&v);
    } else {
        print_republished(&crls);
        outln!(
            "created root generation {} (expires {}); bundle.pem now holds old and new roots",
            generation.id,
            generation.not_after
        );
        outln!(
            "next: ca rotate --dir {} <outdir>... (re-issues every leaf under the new root), then ca root retire --dir {}",
            dir.display(),
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn root_retire(dir: &Path, force: bool, json: bool) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    let (retired, cut_off) = ca.retire_roots(force)?;
    let crls = republished(&ca);
    if cut_off > 0 {
        eprintln!(
            "warning: --force: {cut_off} unexpired certificate(s) chain to a retired root and no longer verify against bundle.pem"
        );
    }
    if json {
        print_json(&json!({
            "retired_generations": retired, "live_certificates_cut_off": cut_off,
            "crls_republished": crls,
        }));
    } else {
        print_republished(&crls);
        outln!(
            "retired root generation(s) {retired:?}; bundle.pem now holds only the current root"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The CRL files a root change rewrote (every file `ca crl --out`/`ca revoke --crl` wrote).
fn republished(ca: &Authority) -> Vec<PathBuf> {
    ca.crl_outputs()
        .map(|o| o.into_iter().map(|o| o.path).collect())
        .unwrap_or_default()
}

fn print_republished(crls: &[PathBuf]) {
    for path in crls {
        outln!(
            "republished CRL {} (covers every root in bundle.pem)",
            path.display()
        );
    }
}

fn revoke(
    dir: &Path,
    serial: Option<&str>,
    spiffe_id: Option<&str>,
    reason: &str,
    crl: Option<&Path>,
    crl_ttl: Duration,
    json: bool,
) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    let target = match (serial, spiffe_id) {
        (Some(s), _) => RevokeTarget::Serial(s.to_owned()),
        (None, Some(id)) => RevokeTarget::Identity(parse_id(id)?),
        (None, None) => unreachable!("clap requires --serial or --spiffe-id"),
    };
    if let Some(out) = crl {
        check_out_file(&ca, out)?;
    }
    let revoked = ca.revoke(&target, reason)?;
    if let Some(out) = crl {
        create_parent(out)?;
        ca.write_crl(out, crl_ttl)?;
    }
    if json {
        print_json(&json!({ "revoked": revoked, "crl": crl }));
    } else {
        if revoked.is_empty() {
            outln!("already revoked; nothing new recorded");
        }
        for r in &revoked {
            outln!("revoked serial {} ({})", r.serial, r.reason);
        }
        match crl {
            Some(out) => outln!("wrote CRL {}", out.display()),
            None => outln!(
                "next: ca crl --dir {} --out <crl.pem> and distribute it to the sidecars",
                dir.display()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn crl(
    dir: &Path,
    out: &Path,
    ttl: Duration,
    root_ttl: Duration,
    json: bool,
) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    check_out_file(&ca, out)?;
    create_parent(out)?;
    ca.write_crl_with_root_ttl(out, ttl, root_ttl)?;
    let revoked = ca.revoked_serials()?.len();
    if json {
        print_json(&json!({ "crl": out, "revoked_total": revoked }));
    } else {
        outln!(
            "wrote CRL {} ({revoked} revocation(s) on record)",
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bundle(dir: &Path, out: &Path, json: bool) -> Result<ExitCode, CaError> {
    let ca = open_ca(dir)?;
    check_out_file(&ca, out)?;
    create_parent(out)?;
    let pem = ca.bundle_pem()?;
    gatehouse_ca::store::write_atomic(out, pem.as_bytes(), 0o644)?;
    let roots = pem.matches("-----BEGIN CERTIFICATE-----").count();
    if json {
        print_json(&json!({ "bundle": out, "roots": roots }));
    } else {
        outln!("wrote bundle {} ({roots} root(s))", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `ca rotate --exit-code`: a directory was written and none failed.
const EXIT_CHANGED: u8 = 3;

/// Rotates every directory, reporting each; one failure does not stop the others.
fn rotate(
    ca: &Authority,
    out_dirs: &[PathBuf],
    opts: &RotateOptions,
    exit_code: bool,
    json: bool,
) -> ExitCode {
    let now = OffsetDateTime::now_utc();
    let mut worst = 0u8;
    let mut changed = false;
    let mut reports = Vec::new();
    for dir in out_dirs {
        match ca.rotate_dir(dir, opts, now) {
            Ok(report) => {
                changed |= matches!(
                    report.outcome,
                    Outcome::Rotated { .. } | Outcome::BundleUpdated { .. }
                );
                if !json {
                    match &report.outcome {
                        Outcome::Rotated {
                            reason,
                            old_serial,
                            new_serial,
                            not_after,
                        } => outln!(
                            "rotated {} ({}): serial {old_serial} -> {new_serial}, not after {not_after}; {reason}",
                            dir.display(),
                            report.spiffe_id
                        ),
                        Outcome::BundleUpdated { serial } => outln!(
                            "bundle updated {} ({}): serial {serial} kept",
                            dir.display(),
                            report.spiffe_id
                        ),
                        Outcome::Skipped { serial, reason } => outln!(
                            "skipped {} ({}): serial {serial} {reason}",
                            dir.display(),
                            report.spiffe_id
                        ),
                        Outcome::Current { serial, due_at } => outln!(
                            "current {} ({}): serial {serial}, due {due_at}",
                            dir.display(),
                            report.spiffe_id
                        ),
                    }
                }
                reports.push(serde_json::to_value(&report).unwrap_or_default());
            }
            Err(e) => {
                let code = if e.is_refusal() { 1 } else { 2 };
                worst = worst.max(code);
                reports.push(json!({ "dir": dir, "action": "error", "error": e.to_string() }));
                let _ = render(&e);
            }
        }
    }
    if json {
        print_json(&serde_json::Value::Array(reports));
    }
    if worst == 0 && changed && exit_code {
        return ExitCode::from(EXIT_CHANGED);
    }
    ExitCode::from(worst)
}

fn parse_id(s: &str) -> Result<SpiffeId, CaError> {
    SpiffeId::parse(s).map_err(|source| CaError::InvalidId {
        input: s.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| CaError::Io {
        action: "cannot read",
        path: path.to_path_buf(),
        source: e,
    })
}

/// Refuses an output directory inside the CA directory, one we could not create or that is a
/// file, before anything is signed.
fn check_out_dir(ca: &Authority, out: &Path) -> Result<(), CaError> {
    ca.check_output(out)?;
    if out.exists() && !out.is_dir() {
        let source = std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "exists and is not a directory",
        );
        return Err(CaError::Io {
            action: "cannot use as certificate directory",
            path: out.to_path_buf(),
            source,
        });
    }
    check_parent(out)
}

/// Refuses an output file inside the CA directory, a directory, or one under a file, before
/// anything is signed.
fn check_out_file(ca: &Authority, out: &Path) -> Result<(), CaError> {
    ca.check_output(out)?;
    if out.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory");
        return Err(CaError::Io {
            action: "cannot write certificate to",
            path: out.to_path_buf(),
            source,
        });
    }
    check_parent(out)
}

/// The nearest existing ancestor of `out` must be a directory (missing ones are created when
/// writing), so a typo like `cert.pem/out` is refused before anything is signed.
fn check_parent(out: &Path) -> Result<(), CaError> {
    let mut ancestor = out.parent();
    while let Some(dir) = ancestor.filter(|p| !p.as_os_str().is_empty()) {
        if dir.exists() {
            if dir.is_dir() {
                return Ok(());
            }
            let source = std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory");
            return Err(CaError::Io {
                action: "cannot write into",
                path: dir.to_path_buf(),
                source,
            });
        }
        ancestor = dir.parent();
    }
    Ok(())
}

/// Creates the missing parent directories of an output file.
fn create_parent(out: &Path) -> Result<(), CaError> {
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir).map_err(|e| CaError::Io {
            action: "cannot create directory",
            path: dir.to_path_buf(),
            source: e,
        }),
        None => Ok(()),
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn left(t: OffsetDateTime) -> String {
    let secs = (t - OffsetDateTime::now_utc()).whole_seconds();
    if secs <= 0 {
        return "expired".into();
    }
    humantime::format_duration(Duration::from_secs(secs.unsigned_abs())).to_string()
}

fn print_json(v: &serde_json::Value) {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    stdout::write(&text);
}

fn print_inspection(r: &Inspection) {
    outln!("{}", r.file);
    match (&r.spiffe_id, r.uri_sans.len()) {
        (Some(id), _) => outln!("  identity    {id}"),
        (None, 0) => outln!("  identity    none (no URI SAN: not an X.509-SVID)"),
        (None, n) => outln!("  identity    none ({n} URI SANs: an X.509-SVID has exactly one)"),
    }
    if !r.dns.is_empty() {
        outln!("  dns         {}", r.dns.join(", "));
    }
    outln!("  serial      {}", r.serial);
    outln!("  not before  {}", r.not_before);
    let remaining = if r.expired {
        "EXPIRED".to_owned()
    } else {
        format!(
            "{} left",
            humantime::format_duration(Duration::from_secs(r.seconds_left.unsigned_abs()))
        )
    };
    outln!("  not after   {} ({remaining})", r.not_after);
    outln!("  key type    {}", r.key_type);
    outln!("  ca          {}", r.is_ca);
    outln!("  subject     {}", r.subject);
    outln!("  issuer      {}", r.issuer);
    outln!("  chain       {} certificate(s) in file", r.chain_len);
    outln!("  sha256      {}", r.sha256);
    match (r.verified, &r.verify_error) {
        (Some(true), _) => outln!("  verifies    yes (webpki, serverAuth + clientAuth)"),
        (Some(false), Some(e)) => outln!("  verifies    NO: {e}"),
        _ => {}
    }
}

/// The inventory table (`ca list`).
fn list_text(entries: &[Entry]) -> String {
    use std::fmt::Write as _;
    if entries.is_empty() {
        return "no certificates issued yet\n".to_owned();
    }
    let mut text = format!(
        "{:<40}  {:<10}  {:<20}  {:<20}  {:<64}  SPIFFE ID\n",
        "SERIAL", "STATE", "NOT AFTER", "ISSUED AT", "SHA-256"
    );
    for e in entries {
        let _ = writeln!(
            text,
            "{:<40}  {:<10}  {:<20}  {:<20}  {:<64}  {}",
            e.serial,
            e.state.as_str(),
            e.not_after,
            e.issued_at,
            e.sha256,
            e.spiffe_id.as_deref().unwrap_or("-")
        );
    }
    text
}

/// The one place errors become text: `error: ...`, `help: ...`, and the exit code.
fn render(e: &CaError) -> ExitCode {
    eprintln!("error: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if !e.to_string().contains(&cause.to_string()) {
            eprintln!("  caused by: {cause}");
        }
        source = cause.source();
    }
    if let Some(help) = help(e) {
        eprintln!("help: {help}");
    }
    ExitCode::from(if e.is_refusal() { 1 } else { 2 })
}

fn help(e: &CaError) -> Option<String> {
    Some(match e {
        CaError::NoCa { dir } => {
            format!("run `ca init --dir {} --trust-domain <trust-domain>` first, or pass the --dir of an existing CA", dir.display())
        }
        CaError::AlreadyExists { .. } => "choose a new or empty --dir: an existing CA is never overwritten".into(),
        CaError::InvalidId { .. } => "write it as spiffe://<trust-domain>/<path>, e.g. spiffe://fintech.internal/payments".into(),
        CaError::ForeignTrustDomain { expected, .. } => {
            format!("this CA only issues for spiffe://{expected}/...; use the CA of that trust domain")
        }
        CaError::InvalidDnsName { .. } => "DNS SANs are host names such as api.fintech.internal (no IP addresses, ports or schemes)".into(),
        CaError::ZeroTtl => "pass a positive duration, e.g. --ttl 24h".into(),
        CaError::TtlBeyondCa { .. } => "pass a shorter --ttl, or rotate the root (`ca root rotate`) before issuing longer-lived certificates".into(),
        CaError::MalformedCsr { .. } => {
            "pass a PKCS#10 request, e.g. `openssl req -new -key key.pem -subj / -out req.csr`".into()
        }
        CaError::CsrSignature { .. } => "the request was altered or not signed by its own key: create it again with the workload's key".into(),
        CaError::Io { .. } => "check that the path exists and that this user may read and write it".into(),
        CaError::Corrupt { .. } => "the CA directory was changed outside `ca`; restore it from a backup".into(),
        CaError::BadCertificate { .. } => "pass a PEM file with the leaf certificate first (cert.pem from `ca issue`) and the right bundle.pem".into(),
        CaError::UnknownSerial { .. } | CaError::UnknownIdentity { .. } => "run `ca list --dir <dir>` to see what was issued".into(),
        CaError::UnknownReason { .. } => "use one of: unspecified, key-compromise, ca-compromise, affiliation-changed, superseded, cessation-of-operation, privilege-withdrawn".into(),
        CaError::NothingToRetire => "run `ca root rotate` first; `root retire` drops the roots that rotation superseded".into(),
        CaError::RootCrlNeeded { generation, .. } => format!("bring gen-{generation}/root.key back into the CA directory, run `ca crl --dir <dir> --out <crl.pem> --root-ttl 2160h` (signs and stores a 90-day root CRL), then move the key offline again"),
        CaError::RootInUse { .. } => "re-issue them (`ca rotate --dir <dir> <outdir>...`) or wait until they expire; `--force` retires anyway and they stop verifying".into(),
        CaError::TokenUnknown | CaError::TokenExpired { .. } | CaError::TokenUsed => "create a new join token with `ca token create --dir <dir> --spiffe-id <id>`".into(),
        CaError::ReservedPath { .. } => "pass the workload's own SPIFFE ID, e.g. spiffe://<td>/payments".into(),
        CaError::NotRotatable { .. } => "the directory must hold cert.pem and key.pem written by `ca issue` from this CA".into(),
        CaError::StoreUnavailable { .. } => "check that PostgreSQL is up and reachable from here (host, port, sslmode, PGSSLROOTCERT) and that the user may connect; nothing was recorded".into(),
        CaError::StoreConfig { .. } => "write the store as postgres://user:password@host:5432/db[?sslmode=require] (GATEHOUSE_CA_STORE also works)".into(),
        CaError::KeyStore { .. } => "check --pkcs11-module/GATEHOUSE_PKCS11_MODULE, the token label in the pkcs11: URI and the PIN (--pin-env, pin-source or GATEHOUSE_PKCS11_PIN); `softhsm2-util --show-slots` lists SoftHSM2 tokens".into(),
        CaError::OutputInsideCa { dir, .. } => format!(
            "write outputs outside {} (it holds only the CA's own keys and state), e.g. `--out ./crl.pem` or `--out ./certs/<service>` next to it",
            dir.display()
        ),
        _ => return None,
    })
}
