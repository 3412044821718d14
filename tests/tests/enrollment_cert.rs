//! An enrollment certificate (`ca enrollment issue`, the bootstrap credential of `ca serve`) is
//! useless for traffic: the real sidecar refuses it at the handshake, while an SVID for the same
//! identity from the same CA is served (the control).

use std::time::Duration;

use gatehouse_ca::SpiffeId;
use gatehouse_tests::harness::{
    CertDir, FINTECH_TD, FakeApp, MONOLITH_ID, MtlsClient, Pki, Proto, REPORT_EXPORT_POLICY,
    REPORT_SERVICE_ID, Sidecar,
};

#[tokio::test]
async fn sidecar_refuses_an_enrollment_certificate_for_traffic() {
    let pki = Pki::new(FINTECH_TD);
    let app = FakeApp::start().await;
    let server = pki.issue(MONOLITH_ID);
    let sidecar = Sidecar::inbound(&server, app.addr(), REPORT_EXPORT_POLICY)
        .spawn()
        .await
        .expect("sidecar starts");
    let bound = SpiffeId::parse(REPORT_SERVICE_ID).expect("id");
    let enrollment = pki
        .authority()
        .issue_enrollment(&bound, Duration::from_secs(3600))
        .expect("enrollment certificate");
    let dir = CertDir {
        dir: pki.fresh_dir("enrollment"),
    };
    enrollment.write_to(&dir.dir).expect("write");
    let addr = sidecar.inbound_addr();

    let svid = MtlsClient::new(&pki.issue(REPORT_SERVICE_ID));
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
