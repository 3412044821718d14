//! DNS discovery against a real DNS server (dnsmasq on a loopback port): every A record is an
//! endpoint, a record added is picked up on the next TTL, a failed resolution keeps the last
//! set, and an IP literal is one endpoint without DNS.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use gatehouse_proxy::balance::discover::{DiscoverConfig, Discovery, Target};
use gatehouse_tests::dns::Dnsmasq;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    SocketAddr::new(ip(s), 8443)
}

fn config(server: SocketAddr) -> DiscoverConfig {
    DiscoverConfig {
        // Short for the test; the default is 5 s … 60 s.
        min_ttl: Duration::from_millis(200),
        max_ttl: Duration::from_secs(60),
        resolver: Some(server),
    }
}

#[tokio::test]
async fn every_a_record_is_an_endpoint_and_changes_are_followed() {
    let name = "monolith.fleet.test";
    let dns = Dnsmasq::start(
        &[
            (name, ip("127.0.0.1")),
            (name, ip("127.0.0.2")),
            (name, ip("127.0.0.3")),
        ],
        1,
    );
    let d = Discovery::new(name, 8443, config(dns.addr())).unwrap();
    let (addrs, ttl) = d.resolve().await.unwrap();
    assert_eq!(addrs, [sa("127.0.0.1"), sa("127.0.0.2"), sa("127.0.0.3")]);
    assert!(
        ttl <= Duration::from_secs(1),
        "TTL 1 s from dnsmasq, got {ttl:?}"
    );

    let mut rx = d.spawn().await.unwrap();
    assert_eq!(rx.borrow_and_update().len(), 3);
    // A fourth record: published after the next re-resolution.
    dns.set_records(&[
        (name, ip("127.0.0.1")),
        (name, ip("127.0.0.2")),
        (name, ip("127.0.0.3")),
        (name, ip("127.0.0.4")),
    ]);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("the new record within 10 s")
        .unwrap();
    assert_eq!(rx.borrow_and_update().len(), 4);
    assert!(started.elapsed() < Duration::from_secs(10));
    // One removed: the set shrinks (the balancer drains it).
    dns.set_records(&[
        (name, ip("127.0.0.2")),
        (name, ip("127.0.0.3")),
        (name, ip("127.0.0.4")),
    ]);
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("the removal within 10 s")
        .unwrap();
    assert_eq!(
        **rx.borrow_and_update(),
        [sa("127.0.0.2"), sa("127.0.0.3"), sa("127.0.0.4")]
    );
    // DNS server gone: resolutions fail, the last set stays.
    drop(dns);
    let kept = tokio::time::timeout(Duration::from_secs(3), rx.changed()).await;
    assert!(kept.is_err(), "no change published while DNS fails");
    assert_eq!(rx.borrow().len(), 3);
}

#[tokio::test]
async fn unknown_name_is_an_error_and_ip_literal_needs_no_dns() {
    let dns = Dnsmasq::start(&[("other.fleet.test", ip("127.0.0.9"))], 1);
    let d = Discovery::new("missing.fleet.test", 8443, config(dns.addr())).unwrap();
    let e = d.resolve().await.unwrap_err().to_string();
    assert!(e.contains("missing.fleet.test"), "{e}");
    assert_eq!(
        Target::parse("127.0.0.7:8443").unwrap(),
        Target::Fixed(sa("127.0.0.7"))
    );
}
