//! Property test: the compiled segment-trie matcher agrees with a naive reference that scans
//! every route linearly and computes specificity from the definition (segment by segment:
//! literal > `*` > end of pattern > `**`; then a route naming the method beats one that does
//! not; a trailing slash ignored), on generated policies, paths, methods and callers.

use gatehouse_policy::{Policy, SpiffeId};
use proptest::prelude::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(&'static str),
    Star,
}

#[derive(Debug, Clone)]
struct GenRoute {
    segs: Vec<Seg>,
    rest: bool,
    methods: Vec<&'static str>,
    allow: Vec<&'static str>,
}

const CALLERS: [&str; 4] = ["x", "y", "ns/z", "ns/deep/w"];
const ALLOW: [&str; 4] = [
    "spiffe://td/x",
    "spiffe://td/y",
    "spiffe://td/ns/*",
    "spiffe://td/ns/**",
];

fn route() -> impl Strategy<Value = GenRoute> {
    let seg = prop_oneof![
        Just(Seg::Lit("a")),
        Just(Seg::Lit("b")),
        Just(Seg::Lit("c")),
        Just(Seg::Star),
    ];
    let methods = prop_oneof![
        Just(vec![]),
        Just(vec!["GET"]),
        Just(vec!["POST"]),
        Just(vec!["GET", "POST"]),
    ];
    (
        prop::collection::vec(seg, 0..4),
        any::<bool>(),
        methods,
        prop::sample::subsequence(ALLOW.to_vec(), 1..=2),
    )
        .prop_map(|(segs, rest, methods, allow)| GenRoute {
            segs,
            rest,
            methods,
            allow,
        })
}

fn request_path() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "d"]), 0..5),
        any::<bool>(),
    )
        .prop_map(|(segs, trailing)| {
            let mut p = format!("/{}", segs.join("/"));
            if trailing && !segs.is_empty() {
                p.push('/');
            }
            p
        })
}

fn pattern_text(r: &GenRoute) -> String {
    let mut parts: Vec<&str> = r
        .segs
        .iter()
        .map(|s| match s {
            Seg::Lit(l) => *l,
            Seg::Star => "*",
        })
        .collect();
    if r.rest {
        parts.push("**");
    }
    format!("/{}", parts.join("/"))
}

/// Two routes the compiler would refuse as indistinguishable.
fn conflict(a: &GenRoute, b: &GenRoute) -> bool {
    let methods = (a.methods.is_empty() && b.methods.is_empty())
        || a.methods.iter().any(|m| b.methods.contains(m));
    a.segs == b.segs && a.rest == b.rest && methods
}

fn policy_text(routes: &[GenRoute]) -> String {
    let mut t = String::from("version = 1\ntrust_domain = \"td\"\n");
    for (i, r) in routes.iter().enumerate() {
        let quote = |v: &[&str]| {
            v.iter()
                .map(|m| format!("\"{m}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        t += &format!(
            "\n[[route]]\nname = \"r{i}\"\nmethods = [{}]\npath = \"{}\"\nallow = [{}]\n",
            quote(&r.methods),
            pattern_text(r),
            quote(&r.allow)
        );
    }
    t
}

/// The reference: specificity key of `r` for `path`, if it matches.
fn specificity(r: &GenRoute, path: &[&str], method: &str) -> Option<(Vec<u8>, u8)> {
    let method_rank = if r.methods.is_empty() {
        0
    } else if r.methods.contains(&method) {
        1
    } else {
        return None;
    };
    let mut key = Vec::new();
    for (i, seg) in r.segs.iter().enumerate() {
        let got = path.get(i)?;
        match seg {
            Seg::Lit(l) if got == l => key.push(3),
            Seg::Star if !got.is_empty() => key.push(2),
            _ => return None,
        }
    }
    if r.rest {
        // `**` takes whatever is left, including nothing.
        key.push(0);
    } else if path.len() == r.segs.len() {
        key.push(1);
    } else {
        return None;
    }
    Some((key, method_rank))
}

fn reference<'r>(
    routes: &'r [GenRoute],
    path: &str,
    method: &str,
) -> Option<(usize, &'r GenRoute)> {
    // The matcher ignores a trailing slash.
    let rest = path[1..].strip_suffix('/').unwrap_or(&path[1..]);
    let segs: Vec<&str> = if rest.is_empty() {
        vec![]
    } else {
        rest.split('/').collect()
    };
    routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| specificity(r, &segs, method).map(|k| (k, i, r)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, i, r)| (i, r))
}

fn admits(pattern: &str, caller: &str) -> bool {
    match pattern.strip_prefix("spiffe://td/") {
        Some("ns/*") => caller.strip_prefix("ns/").is_some_and(|r| !r.contains('/')),
        Some("ns/**") => caller.starts_with("ns/"),
        Some(exact) => exact == caller,
        None => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn trie_matcher_agrees_with_linear_reference(
        generated in prop::collection::vec(route(), 0..14),
        requests in prop::collection::vec(
            (request_path(), prop::sample::select(vec!["GET", "POST", "PUT", "PROPFIND"]), prop::sample::select(CALLERS.to_vec())),
            1..24,
        ),
    ) {
        // Keep the first of every pair the compiler would refuse.
        let mut routes: Vec<GenRoute> = Vec::new();
        for r in generated {
            if !routes.iter().any(|k| conflict(k, &r)) {
                routes.push(r);
            }
        }
        let policy = Policy::parse("gen.toml", &policy_text(&routes))
            .unwrap_or_else(|e| panic!("generated policy refused: {e:?}\n{}", policy_text(&routes)));
        for (path, method, caller) in requests {
            let id = SpiffeId::parse(&format!("spiffe://td/{caller}")).unwrap();
            let got = policy.decide(&id, method, &path);
            let want = reference(&routes, &path, method);
            let want_name = want.map(|(i, _)| format!("r{i}"));
            prop_assert_eq!(got.route_name().map(str::to_owned), want_name, "{} {} by {}", method, path, caller);
            let want_allowed = want.is_some_and(|(_, r)| r.allow.iter().any(|p| admits(p, caller)));
            prop_assert_eq!(got.is_allowed(), want_allowed, "{} {} by {}", method, path, caller);
        }
    }
}
