//! Resource exhaustion before authentication (issue 21, findings 5 and 8), against the real
//! `sidecar` binary: a path-building bomb from several attacker threads, and a flood of idle
//! TCP connections from one address. Run `cargo build --workspace --bins` first.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gatehouse_tests::harness::{
    CertDir, FINTECH_TD, FakeApp, MONOLITH_ID, MtlsClient, Pki, Proto, REPORT_EXPORT_POLICY,
    REPORT_SERVICE_ID, Sidecar, eventually,
};
use http::StatusCode;
use tokio::io::AsyncReadExt;

const ATTACKER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The route the legit client calls.
const PATH: &str = "/api/data/reports";

struct Setup {
    pki: Pki,
    _app: FakeApp,
    sidecar: Sidecar,
    caller: MtlsClient,
}

async fn setup(inbound_options: &[&str]) -> Setup {
    let pki = Pki::new(FINTECH_TD);
    let app = FakeApp::start().await;
    let server = pki.issue(MONOLITH_ID);
    let mut b = Sidecar::inbound(&server, app.addr(), REPORT_EXPORT_POLICY);
    for line in inbound_options {
        b = b.inbound_option(line);
    }
    let sidecar = b.spawn().await.expect("sidecar starts");
    let caller = MtlsClient::new(&pki.issue(REPORT_SERVICE_ID));
    Setup {
        pki,
        _app: app,
        sidecar,
        caller,
    }
}

/// One legit request on a fresh connection; its latency.
async fn legit_once(caller: &MtlsClient, addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(5), caller.get(addr, Proto::H1, PATH))
        .await
        .expect("the legit request completes within 5 s")
        .expect("the legit request succeeds");
    assert_eq!(resp.status, StatusCode::OK);
    started.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn legit_p50(caller: &MtlsClient, addr: SocketAddr, n: usize) -> Duration {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(legit_once(caller, addr).await);
    }
    median(samples)
}

/// A leaf of our trust domain signed by one of `n` untrusted self-issued CAs that all share one
/// subject, followed by all `n` CAs: webpki's path search over them is exponential.
fn bomb_chain(pki: &Pki, n: usize) -> CertDir {
    let subject = {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "bomb CA");
        dn
    };
    let mut cas = Vec::with_capacity(n);
    for _ in 0..n {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = subject.clone();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-signed CA");
        cas.push((params, key, cert));
    }
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let (ca_params, ca_key, _) = cas.first().expect("at least one CA");
    let issuer = rcgen::Issuer::new(ca_params.clone(), ca_key);
    let leaf = pki
        .params_now("spiffe://fintech.internal/attacker")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    let mut pem = leaf.pem();
    for (_, _, cert) in &cas {
        pem.push_str(&cert.pem());
    }
    let dir = pki.fresh_dir("bomb");
    std::fs::write(dir.join("cert.pem"), pem).expect("write chain");
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).expect("write key");
    std::fs::write(
        dir.join("bundle.pem"),
        pki.authority().bundle_pem().expect("bundle"),
    )
    .expect("write bundle");
    CertDir { dir }
}

/// Presents the bomb in a loop from [`ATTACKER_IP`] until `stop`, on its own OS thread and
/// runtime; counts the attempts.
fn attacker(
    bomb: MtlsClient,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut tls) = bomb.connect_from(addr, Proto::H1, Some(ATTACKER_IP)).await {
                    // TLS 1.3: the refusal arrives on the first read.
                    let mut buf = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
                }
                attempts.fetch_add(1, Ordering::Relaxed);
            }
        });
    })
}

/// Finding 5: a chain of a leaf and 12 self-issued CAs of one subject is refused before path
/// building, and 4 attacker threads presenting it in a loop leave a legit sequential client's
/// median latency under twice its unattacked median.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_building_bomb_does_not_starve_legit_clients() {
    const SAMPLES: usize = 41;
    let s = setup(&[]).await;
    let addr = s.sidecar.inbound_addr();
    let bomb = MtlsClient::new(&bomb_chain(&s.pki, 12));

    for _ in 0..5 {
        legit_once(&s.caller, addr).await; // warm-up
    }
    let unattacked = legit_p50(&s.caller, addr, SAMPLES).await;

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| attacker(bomb.clone(), addr, stop.clone(), attempts.clone()))
        .collect();
    eventually(
        "the attackers are running",
        Duration::from_secs(10),
        async || (attempts.load(Ordering::Relaxed) >= 4).then_some(()),
    )
    .await
    .expect("attack started");
    let before = attempts.load(Ordering::Relaxed);
    let attacked = legit_p50(&s.caller, addr, SAMPLES).await;
    let during = attempts.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("attacker thread");
    }
    eprintln!(
        "legit p50 unattacked {unattacked:?}, under the bomb from 4 threads {attacked:?} \
         ({during} bomb handshakes ended during the attacked samples, {} in all)",
        attempts.load(Ordering::Relaxed)
    );
    assert!(
        attacked < unattacked * 2,
        "legit p50 under attack {attacked:?} is not under 2x the unattacked {unattacked:?}"
    );
    let refused = s
        .sidecar
        .metric(
            "gatehouse_tls_handshakes_total",
            &[("result", "error"), ("reason", "chain_too_long")],
        )
        .await
        .expect("metrics");
    assert!(
        refused >= 1.0,
        "bomb chains are counted as chain_too_long ({refused})"
    );
}

/// Finding 8: 5,000 idle TCP connections from 127.0.0.2 do not keep a legit client from
/// 127.0.0.1 waiting: it is served in under 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_flood_from_one_address_does_not_block_others() {
    const FLOOD: usize = 5000;
    // A long handshake timeout, so that before the fix no slot frees while the test runs (the
    // finding: slots free only at the timeout).
    let s = setup(&["handshake_timeout = \"60s\""]).await;
    let addr = s.sidecar.inbound_addr();
    legit_once(&s.caller, addr).await; // warm-up

    // Connects in waves small enough for the listen backlog; each socket is held to the end.
    let flood_started = Instant::now();
    let flood = async {
        let mut held = Vec::with_capacity(FLOOD);
        for w in 0..FLOOD / 250 {
            let wave: Vec<_> = (0..250)
                .map(|i| tokio::spawn(idle_connect(addr, flood_port(w * 250 + i))))
                .collect();
            for t in wave {
                held.push(t.await.expect("connect task").expect("idle connect"));
            }
        }
        held
    };
    // Before the fix the sidecar stops accepting once its slots are full, and the backlog
    // behind them fills: the connects themselves stall.
    let held = tokio::time::timeout(Duration::from_secs(60), flood)
        .await
        .expect("the sidecar keeps taking connections off its backlog");
    eprintln!("{FLOOD} connects done after {:?}", flood_started.elapsed());
    // Measure once the sidecar has taken most of the flood off its backlog: admitted or
    // refused, or (before the fix) holding its 4,096 slots.
    eventually(
        "the flood reaches the sidecar",
        Duration::from_secs(15),
        async || {
            let refused = s
                .sidecar
                .metric("gatehouse_inbound_connections_refused_total", &[])
                .await
                .ok()?;
            let active = s
                .sidecar
                .metric("gatehouse_inbound_active_connections", &[])
                .await
                .ok()?;
            (refused + active >= 4000.0).then_some(())
        },
    )
    .await
    .expect("the flood reached the sidecar");
    let active = s
        .sidecar
        .metric("gatehouse_inbound_active_connections", &[])
        .await
        .expect("metrics");
    eprintln!(
        "flood reached the sidecar after {:?}; {active} connections open in it",
        flood_started.elapsed()
    );
    let mut samples = Vec::new();
    for _ in 0..5 {
        samples.push(legit_once(&s.caller, addr).await);
    }
    eprintln!("legit latency with {FLOOD} idle connects from 127.0.0.2: {samples:?}");
    let p50 = median(samples);
    assert!(
        p50 < Duration::from_millis(100),
        "legit client served in {p50:?} (median of 5), not under 100 ms"
    );
    let refused = s
        .sidecar
        .metric(
            "gatehouse_inbound_connections_refused_total",
            &[("reason", "source_handshakes")],
        )
        .await
        .expect("metrics");
    assert!(
        refused >= 1.0,
        "idle connects over the per-source cap are counted ({refused})"
    );
    drop(held);
}

/// The `i`th flood connection's source port, below the kernel's ephemeral range.
fn flood_port(i: usize) -> u16 {
    u16::try_from(20_000 + i).expect("fits")
}

/// One TCP connection from [`ATTACKER_IP`] that will never send a byte. The source port is
/// chosen (`port`, or any free one if that is taken): binding thousands of sockets to port 0
/// makes the kernel search its whole table for each.
async fn idle_connect(addr: SocketAddr, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if socket.bind(SocketAddr::new(ATTACKER_IP, port)).is_err() {
        socket.bind(SocketAddr::new(ATTACKER_IP, 0))?;
    }
    socket.connect(addr).await
}
