//! `Policy::decide` at 10, 1,000 and 10,000 routes: the cost must not grow with the number of
//! routes (segment trie), and a decision at 10,000 routes must stay under 1 µs.
//!
//! Run: `cargo bench -p gatehouse-policy --bench decide -- --warm-up-time 1 --measurement-time 3`

#![allow(
    missing_docs,
    reason = "criterion_group! generates an undocumented pub fn"
)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gatehouse_policy::path::{NormalizeOptions, normalize};
use gatehouse_policy::{Policy, SpiffeId};

/// A policy with `n` routes shaped like a real service's: `/api/v{k}/svc{i}/items`,
/// `/api/v{k}/svc{i}/items/*` (GET), `/api/v{k}/svc{i}/**`, across 10 callers.
fn policy(n: usize) -> Policy {
    Policy::parse("bench.toml", &policy_text(n)).expect("bench policy compiles")
}

fn policy_text(n: usize) -> String {
    let mut t = String::from("version = 1\ntrust_domain = \"bench.internal\"\n\n[identities]\n");
    for c in 0..10 {
        t += &format!("caller{c} = \"spiffe://bench.internal/ns/prod/caller{c}\"\n");
    }
    for i in 0..n {
        let svc = i / 3;
        let (methods, path) = match i % 3 {
            0 => ("[\"GET\", \"POST\"]", format!("/api/v1/svc{svc}/items")),
            1 => ("[\"GET\"]", format!("/api/v1/svc{svc}/items/*")),
            _ => ("[]", format!("/api/v1/svc{svc}/**")),
        };
        t += &format!(
            "\n[[route]]\nname = \"route {i}\"\nmethods = {methods}\npath = \"{path}\"\nallow = [\"caller{}\", \"caller{}\"]\n",
            i % 10,
            (i + 3) % 10
        );
    }
    t
}

fn bench_decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for n in [10usize, 1_000, 10_000] {
        let p = policy(n);
        assert_eq!(p.route_count(), n);
        // The last service with all three of its routes.
        let last_svc = n / 3 - 1;
        let caller = SpiffeId::parse("spiffe://bench.internal/ns/prod/caller4").unwrap();
        let item = format!("/api/v1/svc{last_svc}/items/12345");
        let deep = format!("/api/v1/svc{last_svc}/reports/2024/01");
        // Sanity: the benchmarked requests take the paths we think they do.
        assert!(p.decide(&caller, "GET", &item).route_name().is_some());
        assert!(p.decide(&caller, "GET", &deep).route_name().is_some());
        assert!(
            p.decide(&caller, "GET", "/nothing/here")
                .route_name()
                .is_none()
        );
        group.bench_with_input(BenchmarkId::new("star_route", n), &item, |b, path| {
            b.iter(|| black_box(p.decide(black_box(&caller), "GET", black_box(path))).is_allowed())
        });
        group.bench_with_input(BenchmarkId::new("rest_route", n), &deep, |b, path| {
            b.iter(|| black_box(p.decide(black_box(&caller), "GET", black_box(path))).is_allowed())
        });
        group.bench_with_input(
            BenchmarkId::new("no_route", n),
            "/nothing/here",
            |b, path| {
                b.iter(|| {
                    black_box(p.decide(black_box(&caller), "GET", black_box(path))).is_allowed()
                })
            },
        );
    }
    group.finish();
}

/// `decide` then `limits_for` (what the inbound does per request) at 1,000 routes with a limit
/// per caller, a `*` limit and 100 route-specific limits: the lookup is a per-route candidate
/// list filtered by pattern, so it must stay well under a microsecond.
fn bench_limits(c: &mut Criterion) {
    let mut t = policy_text(1_000);
    for c in 0..10 {
        t += &format!("\n[[limit]]\ncaller = \"caller{c}\"\nrate = \"100/s\"\nconcurrency = 8\n");
    }
    t += "\n[[limit]]\ncaller = \"*\"\nconcurrency = 64\n";
    for i in (0..1_000).step_by(10) {
        t += &format!(
            "\n[[limit]]\ncaller = \"caller{}\"\nroute = \"route {i}\"\nrate = \"5/s\"\n",
            i % 10
        );
    }
    let p = Policy::parse("bench.toml", &t).expect("bench policy compiles");
    let caller = SpiffeId::parse("spiffe://bench.internal/ns/prod/caller0").unwrap();
    let path = "/api/v1/svc330/items";
    let route = p.decide(&caller, "GET", path).route();
    assert_eq!(
        p.limits_for(&caller, route).count(),
        3,
        "own, `*` and route limit"
    );
    c.bench_function("limits_for/1000_routes_111_limits", |b| {
        b.iter(|| {
            let d = p.decide(black_box(&caller), "GET", black_box(path));
            black_box(p.limits_for(&caller, d.route()).count())
        })
    });
}

fn bench_normalize(c: &mut Criterion) {
    let opts = NormalizeOptions::default();
    let mut group = c.benchmark_group("normalize");
    for (name, path) in [
        ("already_normal", "/api/v1/svc42/items/12345?page=2"),
        ("needs_rewrite", "/api//v1/./svc42/%69tems/12345"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| normalize(black_box(path), &opts).map(|p| p.len()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decide, bench_limits, bench_normalize);
criterion_main!(benches);
