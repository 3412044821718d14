//! Issue 21, findings 1-4: what a hostile client can make the app believe through request
//! headers and framing, against the real `sidecar` binary, real TLS, and a fake app that
//! records exactly the headers it received:
//! 1. look-alike identity headers (`x_client_spiffe_id`) never reach the app;
//! 2. `get` is refused with 400, not matched as an extension method past a GET-only route;
//! 3. `Transfer-Encoding` reaches the app only as the framing the sidecar sends (`chunked`);
//!    other codings get 501, `chunked` twice 400 (raw HTTP/1.1 bytes over TLS; HTTP/2 cannot
//!    carry `Transfer-Encoding` at all, `h2` refuses it);
//! 4. `Connection: x-request-id` cannot remove the request id the audit lines record, on the
//!    inbound side and through the outbound side over both upstream protocols.

use std::time::Duration;

use bytes::Bytes;
use gatehouse_tests::harness::fixtures::{GATEWAY, MONOLITH, REPORTS, TD};
use gatehouse_tests::harness::{
    CertDir, FakeApp, MtlsClient, Pki, Proto, Sidecar, eventually, raw_exchange,
};
use gatehouse_tests::{bulk_transfer_route, fintech_policy_head, report_export_route};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use tokio::net::TcpStream;

const POLICY: &str = concat!(
    fintech_policy_head!(),
    r#"api-gateway    = "spiffe://fintech.internal/api-gateway"
"#,
    report_export_route!(),
    bulk_transfer_route!(),
    r#"
[[route]]
name    = "v2 export"
methods = ["GET"]
path    = "/v2/export"
allow   = ["report-service"]

[[route]]
name  = "v2 api"
path  = "/v2/**"
allow = ["api-gateway"]
"#
);

/// Every header the sidecar sets on a request to the app, as a statement of identity or as
/// the request id.
const OURS: [&str; 5] = [
    "x-forwarded-client-cert",
    "x-client-spiffe-id",
    "client-cert",
    "client-cert-chain",
    "x-request-id",
];

struct Setup {
    pki: Pki,
    app: FakeApp,
    sidecar: Sidecar,
}

async fn setup() -> Setup {
    let pki = Pki::new(TD);
    let app = FakeApp::start().await;
    let sidecar = Sidecar::inbound(&pki.issue(MONOLITH), app.addr(), POLICY)
        .spawn()
        .await
        .expect("sidecar starts");
    Setup { pki, app, sidecar }
}

/// `name` as a CGI-style app reads it: upper case, `-` as `_`.
fn cgi(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

#[tokio::test]
async fn issue_21_look_alike_identity_headers_never_reach_the_app() {
    let s = setup().await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let addr = s.sidecar.inbound_addr();
    let admin = "spiffe://fintech.internal/admin";
    for proto in [Proto::H1, Proto::H2] {
        let req = Request::get("/api/data/reports")
            .header("x_client_spiffe_id", admin)
            .header("x_forwarded_client_cert", format!("By=x;URI={admin}"))
            .header("x-forwarded_client-cert", "By=x")
            .header("client_cert", ":Zm9v:")
            .header("client_cert_chain", ":YmFy:")
            .header("x_request_id", "spoofed-id")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = client.request(addr, proto, req).await.expect("response");
        assert_eq!(resp.status, StatusCode::OK, "{proto:?}: {:?}", resp.body);
    }
    // Mixed case on the wire (HTTP/1.1 header names are case-insensitive).
    let mut tls = client.connect(addr, Proto::H1).await.expect("handshake");
    let raw = format!(
        "GET /api/data/reports HTTP/1.1\r\nHost: localhost\r\nX_Client_SPIFFE_ID: {admin}\r\n\
         X_Forwarded_Client_Cert: By=x;URI={admin}\r\nClient_Cert: :Zm9v:\r\n\
         Connection: close\r\n\r\n"
    );
    let resp = raw_exchange(&mut tls, raw.as_bytes()).await.expect("raw");
    assert_eq!(resp.status, 200, "{}", resp.head);

    let seen = s.app.requests();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        let h = &r.headers;
        for name in h.keys() {
            let var = cgi(name.as_str());
            if let Some(ours) = OURS.iter().find(|o| cgi(o) == var) {
                assert_eq!(
                    name.as_str(),
                    *ours,
                    "a client header that reads as {var} reached the app: {h:?}"
                );
            }
        }
        let ids: Vec<_> = h.get_all("x-client-spiffe-id").iter().collect();
        assert_eq!(ids, [REPORTS], "{h:?}");
        let xfcc: Vec<_> = h.get_all("x-forwarded-client-cert").iter().collect();
        assert_eq!(xfcc.len(), 1, "{h:?}");
        assert!(
            xfcc[0]
                .to_str()
                .unwrap()
                .ends_with(&format!("URI={REPORTS}")),
            "{xfcc:?}"
        );
        assert_eq!(h.get_all("x-request-id").iter().count(), 1, "{h:?}");
        assert_ne!(h["x-request-id"], "spoofed-id");
    }
}

#[tokio::test]
async fn issue_21_non_canonical_method_gets_400_instead_of_passing_a_get_only_route() {
    let s = setup().await;
    let gateway = MtlsClient::new(&s.pki.issue(GATEWAY));
    let addr = s.sidecar.inbound_addr();
    let send = async |proto: Proto, method: &[u8]| {
        let req = Request::builder()
            .method(Method::from_bytes(method).expect("token"))
            .uri("/v2/export")
            .body(Full::new(Bytes::new()))
            .expect("request");
        gateway.request(addr, proto, req).await.expect("response")
    };
    // The GET-only route denies the gateway.
    assert_eq!(send(Proto::H1, b"GET").await.status, StatusCode::FORBIDDEN);
    for proto in [Proto::H1, Proto::H2] {
        for method in [&b"get"[..], b"Get"] {
            let resp = send(proto, method).await;
            assert_eq!(
                resp.status,
                StatusCode::BAD_REQUEST,
                "{proto:?} {}: {:?}",
                String::from_utf8_lossy(method),
                resp.body
            );
            let message = resp.json()["message"].as_str().unwrap().to_owned();
            assert!(message.contains("`GET`"), "{message}");
        }
    }
    assert_eq!(
        s.app.count(),
        0,
        "a non-canonical GET never reaches the app"
    );
    let audit = s.sidecar.wait_audit(5).await.expect("audit lines");
    assert_eq!(audit[0]["reason"], "not_allowed");
    for line in &audit[1..5] {
        assert_eq!(line["decision"], "reject", "{line}");
        assert_eq!(line["reason"], "bad_method", "{line}");
        assert_eq!(line["status"], 400, "{line}");
    }
    // Extension methods still match the any-method route only.
    let resp = send(Proto::H1, b"PURGE").await;
    assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.body);
    assert_eq!(s.app.requests()[0].method.as_str(), "PURGE");
}

/// A chunked request for `/bulk` with the given `Transfer-Encoding` lines.
fn chunked_post(te_lines: &[&str]) -> String {
    let mut req = String::from("POST /bulk HTTP/1.1\r\nHost: localhost\r\n");
    for te in te_lines {
        req.push_str(&format!("Transfer-Encoding: {te}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    req
}

#[tokio::test]
async fn issue_21_transfer_encoding_reaches_the_app_only_as_the_framing_we_send() {
    let s = setup().await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let addr = s.sidecar.inbound_addr();
    let cases: [(&[&str], u16, &str); 6] = [
        (&["CHUNKED"], 200, "allowed"),
        (&["identity, chunked"], 501, "unsupported_transfer_coding"),
        (&["gzip,chunked"], 501, "unsupported_transfer_coding"),
        (&["gzip", "chunked"], 501, "unsupported_transfer_coding"),
        (&["chunked,chunked"], 400, "bad_transfer_encoding"),
        (&["chunked", "chunked"], 400, "bad_transfer_encoding"),
    ];
    for (te, status, _) in cases {
        let mut tls = client.connect(addr, Proto::H1).await.expect("handshake");
        let resp = raw_exchange(&mut tls, chunked_post(te).as_bytes())
            .await
            .expect("response");
        assert_eq!(resp.status, status, "{te:?}: {}", resp.head);
    }
    let seen = s.app.requests();
    assert_eq!(seen.len(), 1, "only the plain chunked request is forwarded");
    let framing: Vec<_> = seen[0]
        .headers
        .get_all("transfer-encoding")
        .iter()
        .collect();
    assert_eq!(
        framing,
        ["chunked"],
        "exactly the framing the sidecar sends"
    );
    assert_eq!(seen[0].body_len, 5);
    let audit = s.sidecar.wait_audit(cases.len()).await.expect("audit");
    for (line, (te, status, reason)) in audit.iter().zip(cases) {
        assert_eq!(line["reason"], reason, "{te:?}: {line}");
        assert_eq!(line["status"], status, "{te:?}: {line}");
    }
}

#[tokio::test]
async fn issue_21_connection_header_cannot_remove_the_request_id_or_identity() {
    let s = setup().await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let mut tls = client
        .connect(s.sidecar.inbound_addr(), Proto::H1)
        .await
        .expect("handshake");
    let raw = "GET /api/data/reports HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: issue21-inbound\r\n\
               Connection: close, x-request-id, X-Client-Spiffe-Id, x-forwarded-client-cert, host\r\n\r\n";
    let resp = raw_exchange(&mut tls, raw.as_bytes()).await.expect("raw");
    assert_eq!(resp.status, 200, "{}", resp.head);
    let seen = s.app.requests();
    let h = &seen[0].headers;
    assert_eq!(h["x-request-id"], "issue21-inbound", "{h:?}");
    assert_eq!(h["x-client-spiffe-id"], REPORTS, "{h:?}");
    assert!(h.contains_key("x-forwarded-client-cert"), "{h:?}");
    assert_eq!(h["host"], "localhost", "{h:?}");
    let audit = s.sidecar.wait_audit(1).await.expect("audit");
    assert_eq!(audit[0]["request_id"], "issue21-inbound");
}

/// The report service's sidecar with one `[[outbound]]` entry per upstream protocol, both to
/// the monolith's inbound sidecar.
async fn outbound_pair(s: &Setup, report: &CertDir) -> Sidecar {
    let connect = format!("127.0.0.1:{}", s.sidecar.inbound_addr().port());
    let mut section = String::new();
    for protocol in ["h2", "http1"] {
        section.push_str(&format!(
            "[[outbound]]\nname = \"{protocol}\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{connect}\"\n\
             server_id = \"{MONOLITH}\"\nsni = \"localhost\"\nprotocol = \"{protocol}\"\n\n"
        ));
    }
    Sidecar::builder(report)
        .section(&section)
        .spawn()
        .await
        .expect("outbound sidecar starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_21_through_the_outbound_side_the_request_id_stays_and_odd_framing_is_refused() {
    let s = setup().await;
    let report = s.pki.issue(REPORTS);
    let outbound = outbound_pair(&s, &report).await;
    for protocol in ["h2", "http1"] {
        let listen = outbound.listener(&format!("outbound:{protocol}"));
        let id = format!("issue21-out-{protocol}");
        let mut tcp = TcpStream::connect(listen).await.expect("connect");
        let raw = format!(
            "GET /api/data/reports HTTP/1.1\r\nHost: monolith\r\nX-Request-Id: {id}\r\n\
             Connection: close, x-request-id\r\n\r\n"
        );
        let resp = raw_exchange(&mut tcp, raw.as_bytes()).await.expect("raw");
        assert_eq!(resp.status, 200, "{protocol}: {}", resp.head);
        let seen = s.app.requests();
        let last = seen.last().expect("forwarded");
        assert_eq!(last.headers["x-request-id"], id.as_str(), "{protocol}");
        let in_both = eventually(
            "the id in both audit logs",
            Duration::from_secs(10),
            async || {
                let has = |sc: &Sidecar| sc.audit().iter().any(|l| l["request_id"] == id.as_str());
                (has(&s.sidecar) && has(&outbound)).then_some(())
            },
        )
        .await;
        assert!(
            in_both.is_ok(),
            "{protocol}: {id} missing from an audit log"
        );

        // Framing: refused by the outbound side whichever protocol carries it upstream.
        for (te, status) in [("gzip, chunked", 501), ("chunked, chunked", 400)] {
            let mut tcp = TcpStream::connect(listen).await.expect("connect");
            let raw = format!(
                "POST /bulk HTTP/1.1\r\nHost: monolith\r\nTransfer-Encoding: {te}\r\n\
                 Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            );
            let resp = raw_exchange(&mut tcp, raw.as_bytes()).await.expect("raw");
            assert_eq!(resp.status, status, "{protocol} {te}: {}", resp.head);
        }
    }
    assert_eq!(s.app.count(), 2, "only the two GETs reached the app");
}
