//! An enrollment certificate (`ca enrollment issue`, the bootstrap credential of `ca serve`) is
//! useless for traffic: the real sidecar refuses it at the handshake, while an SVID for the same
//! identity from the same CA is served (the control).

use std::time::Duration;

use gatehouse_ca::SpiffeId;
use gatehouse_tests::harness::{CertDir, FakeApp, MtlsClient, Pki, Proto, Sidecar};

const TD: &str = "fintech.internal";
const MONOLITH: &str = "spiffe://fintech.internal/monolith";
const REPORTS: &str = "spiffe://fintech.internal/report-service";
const POLICY: &str = r#"
version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"

[[route]]
name    = "report data export"
methods = ["GET"]
path    = "/api/data/reports"
allow   = ["report-service"]
"#;

#[tokio::test]
async fn sidecar_refuses_an_enrollment_certificate_for_traffic() {
    let pki = Pki::new(TD);
    let app = FakeApp::start().await;
    let server = pki.issue(MONOLITH);
    let sidecar = Sidecar::inbound(&server, app.addr(), POLICY)
        .spawn()
        .await
        .expect("sidecar starts");
    let bound = SpiffeId::parse(REPORTS).expect("id");
    let enrollment = pki
        .authority()
        .issue_enrollment(&bound, Duration::from_secs(3600))
        .expect("enrollment certificate");
    let dir = CertDir {
        dir: pki.fresh_dir("enrollment"),
    };
    enrollment.write_to(&dir.dir).expect("write");
    let addr = sidecar.inbound_addr();

    let svid = MtlsClient::new(&pki.issue(REPORTS));
    let r = svid.get(addr, Proto::H1, "/api/data/reports").await;
    assert!(r.is_ok(), "control: the SVID is served, got {r:?}");
    let seen = app.count();

    let client = MtlsClient::new(&dir);
    for proto in [Proto::H1, Proto::H2] {
        let r = client.get(addr, proto, "/api/data/reports").await;
        assert!(
            r.is_err(),
            "enrollment certificate ({proto:?}) must be refused, got {r:?}"
        );
    }
    assert_eq!(app.count(), seen, "the app saw nothing from it");
}
