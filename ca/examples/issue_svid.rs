//! Creates a throwaway CA for `example.internal`, issues an X.509-SVID for
//! `spiffe://example.internal/payments`, writes it to a certificate directory and verifies it.
//!
//! `cargo run -p gatehouse-ca --example issue_svid [DIR]` (default: a new directory under the
//! system temp dir).

use std::path::PathBuf;
use std::time::Duration;

use gatehouse_ca::{Authority, InitOptions, IssueRequest, KeyType, SpiffeId, TrustDomain, inspect};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("gatehouse-example-{}", std::process::id())),
    };
    let ca = Authority::init(
        &base.join("ca"),
        &InitOptions {
            trust_domain: TrustDomain::parse("example.internal")?,
            key_type: KeyType::EcdsaP256,
            ttl: Duration::from_secs(365 * 24 * 3600),
            intermediate: true,
        },
    )?;
    let svid = ca.issue(&IssueRequest {
        spiffe_id: SpiffeId::parse("spiffe://example.internal/payments")?,
        dns: vec!["payments.example.internal".into()],
        ttl: Duration::from_secs(24 * 3600),
    })?;
    let out = base.join("payments");
    svid.write_to(&out)?;
    inspect::verify_chain(
        &svid.cert_pem,
        &out.join("cert.pem"),
        &svid.bundle_pem,
        &out.join("bundle.pem"),
        time::OffsetDateTime::now_utc(),
    )?;
    println!(
        "issued {} serial {} (valid until {})",
        svid.spiffe_id, svid.serial_hex, svid.not_after
    );
    println!(
        "wrote {}/{{cert,key,bundle}}.pem; the chain verifies against bundle.pem",
        out.display()
    );
    Ok(())
}
