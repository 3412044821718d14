//! SPIFFE identities: [`TrustDomain`], [`SpiffeId`] and the [`IdentityPattern`]s a policy's
//! `allow` lists are made of.
//!
//! Parsing follows the SPIFFE ID specification (SPIFFE-ID §2): the scheme is `spiffe`, the trust
//! domain is lowercase `[a-z0-9._-]`, the path is made of non-empty segments of `[A-Za-z0-9._-]`
//! that are neither `.` nor `..`, with no trailing slash, and the whole ID has no query,
//! fragment, port or userinfo and is at most 2048 bytes. Nothing past this module takes an
//! identity as a `&str`: parse once at the edge and carry the typed value.
//!
//! Workload identities (X.509-SVID §2) always have a path, so [`SpiffeId`] requires one; the
//! bare `spiffe://<trust-domain>` form is a [`TrustDomain`].

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted, in bytes (SPIFFE-ID §2.3).
pub const MAX_ID_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID, trust domain or identity pattern.
///
/// Each variant names the one rule that was broken, so error messages and tests can say which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input was empty.
    #[error("empty identity: write it as spiffe://<trust-domain>/<path>")]
    Empty,
    /// Longer than [`MAX_ID_LEN`] bytes.
    #[error("identity is {len} bytes long; SPIFFE IDs are at most 2048 bytes")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// Does not start with `spiffe://` (scheme missing, misspelt or not lowercase).
    #[error("identity must start with `spiffe://` (lowercase scheme)")]
    Scheme,
    /// Nothing between `spiffe://` and the path.
    #[error("the trust domain is empty: write spiffe://<trust-domain>/<path>")]
    EmptyTrustDomain,
    /// The authority carries a port (`:`).
    #[error("a SPIFFE ID has no port: remove `:` and what follows from the trust domain")]
    Port,
    /// The authority carries userinfo (`@`).
    #[error("a SPIFFE ID has no userinfo: remove `...@` from the trust domain")]
    UserInfo,
    /// A character outside `[a-z0-9._-]` in the trust domain (uppercase included).
    #[error(
        "invalid character {ch:?} in the trust domain: use lowercase letters, digits, `.`, `-` and `_`"
    )]
    TrustDomainChar {
        /// The offending character.
        ch: char,
    },
    /// A workload identity needs a path after the trust domain.
    #[error("a workload identity needs a path: write spiffe://<trust-domain>/<path>")]
    MissingPath,
    /// A `?` query part.
    #[error("a SPIFFE ID has no query: remove `?` and what follows")]
    Query,
    /// A `#` fragment part.
    #[error("a SPIFFE ID has no fragment: remove `#` and what follows")]
    Fragment,
    /// Two slashes in a row, or a slash right after the trust domain followed by nothing.
    #[error("empty path segment (`//`): every segment needs at least one character")]
    EmptySegment,
    /// The path ends with `/`.
    #[error("a SPIFFE ID has no trailing slash: remove the final `/`")]
    TrailingSlash,
    /// A `.` or `..` path segment.
    #[error("`.` and `..` are not allowed as path segments")]
    DotSegment,
    /// A character outside `[A-Za-z0-9._-]` in the path (percent-encoding included).
    #[error("invalid character {ch:?} in the path: use letters, digits, `.`, `-` and `_`")]
    PathChar {
        /// The offending character.
        ch: char,
    },
    /// An identity pattern with a wildcard that is not a whole, final segment.
    #[error("bad wildcard: `*` and `**` must be the whole last segment (spiffe://td/ns/*)")]
    Wildcard,
}

/// A SPIFFE trust domain, such as `fintech.internal`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a trust domain name (`fintech.internal`) or its ID form (`spiffe://fintech.internal`).
    ///
    /// # Errors
    /// The [`IdError`] naming the rule the input breaks.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: s.len() });
        }
        check_tail(name)?;
        if let Some(i) = name.find('/') {
            return Err(if i + 1 == name.len() {
                IdError::TrailingSlash
            } else {
                IdError::TrustDomainChar { ch: '/' }
            });
        }
        check_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID form, `spiffe://<name>`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

/// A workload's SPIFFE ID, such as `spiffe://fintech.internal/report-service`.
///
/// Always has a non-empty path. Equality is byte equality of the canonical string, which the
/// parser guarantees is the only spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, `spiffe://td/path`.
    full: String,
    /// Byte offset of the `/` that starts the path.
    path_at: usize,
}

impl SpiffeId {
    /// Parses a workload SPIFFE ID.
    ///
    /// # Errors
    /// The [`IdError`] naming the rule the input breaks.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let (td, path) = split(s)?;
        if path.is_empty() {
            return Err(IdError::MissingPath);
        }
        check_path(path)?;
        Ok(Self {
            full: s.to_owned(),
            path_at: SCHEME.len() + td.len(),
        })
    }

    /// Builds the ID `spiffe://<td><path>` from an already parsed trust domain and a path
    /// starting with `/`.
    ///
    /// # Errors
    /// The [`IdError`] naming the rule the path breaks.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, IdError> {
        Self::parse(&format!("{SCHEME}{}{path}", td.as_str()))
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain name, without scheme.
    pub fn trust_domain_str(&self) -> &str {
        &self.full[SCHEME.len()..self.path_at]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// Whether this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.path_at..]
    }

    /// The path segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path()[1..].split('/')
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Who a policy `allow` entry admits (after aliases are resolved).
///
/// The trust domain of every pattern is checked against the policy's when the policy is
/// compiled; `Any` means "any authenticated identity of the policy's trust domain" because the
/// verifier admits no other trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityPattern {
    /// `"*"`: any authenticated identity of the trust domain.
    Any,
    /// An exact SPIFFE ID.
    Exact(SpiffeId),
    /// `spiffe://td/a/*`: exactly one more segment below `prefix` (the path `/a`, or `` for
    /// `spiffe://td/*`).
    OneBelow {
        /// Trust domain of the pattern.
        trust_domain: TrustDomain,
        /// Path prefix without trailing slash; empty for the trust domain root.
        prefix: String,
    },
    /// `spiffe://td/a/**`: one or more segments below `prefix`.
    AnyBelow {
        /// Trust domain of the pattern.
        trust_domain: TrustDomain,
        /// Path prefix without trailing slash; empty for the trust domain root.
        prefix: String,
    },
}

impl IdentityPattern {
    /// Parses `"*"`, an exact SPIFFE ID, or `spiffe://td/prefix/*` / `spiffe://td/prefix/**`.
    ///
    /// # Errors
    /// The [`IdError`] naming the rule the input breaks.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s == "*" {
            return Ok(Self::Any);
        }
        let (base, deep) = if let Some(b) = s.strip_suffix("/**") {
            (b, true)
        } else if let Some(b) = s.strip_suffix("/*") {
            (b, false)
        } else {
            if s.contains('*') {
                return Err(IdError::Wildcard);
            }
            return SpiffeId::parse(s).map(Self::Exact);
        };
        if base.contains('*') {
            return Err(IdError::Wildcard);
        }
        let (td, prefix) = split(base)?;
        if !prefix.is_empty() {
            check_path(prefix)?;
        }
        let trust_domain = TrustDomain(td.to_owned());
        let prefix = prefix.to_owned();
        Ok(if deep {
            Self::AnyBelow {
                trust_domain,
                prefix,
            }
        } else {
            Self::OneBelow {
                trust_domain,
                prefix,
            }
        })
    }

    /// Whether `id` is admitted by this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(e) => e == id,
            Self::OneBelow {
                trust_domain,
                prefix,
            } => below(id, trust_domain, prefix).is_some_and(|rest| !rest.contains('/')),
            Self::AnyBelow {
                trust_domain,
                prefix,
            } => below(id, trust_domain, prefix).is_some(),
        }
    }

    /// The trust domain the pattern names, if it names one (`Any` does not).
    pub fn trust_domain_str(&self) -> Option<&str> {
        match self {
            Self::Any => None,
            Self::Exact(id) => Some(id.trust_domain_str()),
            Self::OneBelow { trust_domain, .. } | Self::AnyBelow { trust_domain, .. } => {
                Some(trust_domain.as_str())
            }
        }
    }

    /// Whether every identity `other` admits is also admitted by `self` (both taken within
    /// one trust domain, as in a compiled policy).
    pub fn covers(&self, other: &IdentityPattern) -> bool {
        match (self, other) {
            (Self::Any, _) => true,
            (_, Self::Any) => false,
            (_, Self::Exact(id)) => self.matches(id),
            (Self::Exact(_), _) => false,
            (
                Self::OneBelow {
                    trust_domain: t1,
                    prefix: p1,
                },
                Self::OneBelow {
                    trust_domain: t2,
                    prefix: p2,
                },
            ) => t1 == t2 && p1 == p2,
            (Self::OneBelow { .. }, Self::AnyBelow { .. }) => false,
            (
                Self::AnyBelow {
                    trust_domain: t1,
                    prefix: p1,
                },
                Self::OneBelow {
                    trust_domain: t2,
                    prefix: p2,
                }
                | Self::AnyBelow {
                    trust_domain: t2,
                    prefix: p2,
                },
            ) => {
                t1 == t2
                    && (p1 == p2
                        || p2
                            .strip_prefix(p1.as_str())
                            .is_some_and(|r| r.starts_with('/')))
            }
        }
    }

    /// Whether the pattern can admit more than one identity.
    pub fn is_wildcard(&self) -> bool {
        !matches!(self, Self::Exact(_))
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(id) => f.write_str(id.as_str()),
            Self::OneBelow {
                trust_domain,
                prefix,
            } => write!(f, "{SCHEME}{trust_domain}{prefix}/*"),
            Self::AnyBelow {
                trust_domain,
                prefix,
            } => write!(f, "{SCHEME}{trust_domain}{prefix}/**"),
        }
    }
}

/// The part of `id`'s path below `prefix` (without the separating `/`), if `id` is in
/// `trust_domain` and strictly below `prefix`.
fn below<'a>(id: &'a SpiffeId, trust_domain: &TrustDomain, prefix: &str) -> Option<&'a str> {
    if !id.is_member_of(trust_domain) {
        return None;
    }
    id.path()
        .strip_prefix(prefix)?
        .strip_prefix('/')
        .filter(|rest| !rest.is_empty())
}

/// Splits `spiffe://td/path` into `("td", "/path")` after the whole-string checks; the trust
/// domain is validated, the path is not.
fn split(s: &str) -> Result<(&str, &str), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    let rest = s.strip_prefix(SCHEME).ok_or(IdError::Scheme)?;
    check_tail(rest)?;
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    check_trust_domain(td)?;
    Ok((td, path))
}

/// Query and fragment are refused wherever they appear, before any character rule fires, so the
/// error names the real problem.
fn check_tail(rest: &str) -> Result<(), IdError> {
    match rest.find(['?', '#']).map(|i| rest.as_bytes()[i]) {
        Some(b'?') => Err(IdError::Query),
        Some(_) => Err(IdError::Fragment),
        None => Ok(()),
    }
}

fn check_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    if td.contains('@') {
        return Err(IdError::UserInfo);
    }
    if td.contains(':') {
        return Err(IdError::Port);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(ch) => Err(IdError::TrustDomainChar { ch }),
        None => Ok(()),
    }
}

/// Checks a non-empty path that starts with `/`.
fn check_path(path: &str) -> Result<(), IdError> {
    if path.len() > 1 && path.ends_with('/') {
        return Err(IdError::TrailingSlash);
    }
    for seg in path[1..].split('/') {
        if seg.is_empty() {
            return Err(if path == "/" {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment
            });
        }
        if seg == "." || seg == ".." {
            return Err(IdError::DotSegment);
        }
        if let Some(ch) = seg
            .chars()
            .find(|c| !matches!(c, 'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(IdError::PathChar { ch });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPIFFE ID table: valid IDs parse and round-trip, each invalid one breaks a named rule.
    #[test]
    fn spiffe_id_table() {
        let long_ok = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN - 12));
        let too_long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN - 11));
        let valid: &[&str] = &[
            "spiffe://fintech.internal/report-service",
            "spiffe://fintech.internal/monolith",
            "spiffe://td/a/b/c",
            "spiffe://example.org/ns/prod/sa/api_gateway",
            "spiffe://a-b_c.d9/x",
            "spiffe://td/A.Z-0_9",
            "spiffe://td/..a",
            "spiffe://td/a.",
            "spiffe://1.2.3.4/ip-like-td",
            &long_ok,
        ];
        for s in valid {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s} should parse: {e}"));
            assert_eq!(id.as_str(), *s);
        }
        use IdError::*;
        let invalid: &[(&str, IdError)] = &[
            ("", Empty),
            (
                &too_long,
                TooLong {
                    len: MAX_ID_LEN + 1,
                },
            ),
            ("http://td/a", Scheme),
            ("SPIFFE://td/a", Scheme),
            ("spiffe:/td/a", Scheme),
            ("td/a", Scheme),
            ("spiffe:///a", EmptyTrustDomain),
            ("spiffe://", EmptyTrustDomain),
            ("spiffe://td:8443/a", Port),
            ("spiffe://user@td/a", UserInfo),
            ("spiffe://Fintech.internal/a", TrustDomainChar { ch: 'F' }),
            ("spiffe://fin tech/a", TrustDomainChar { ch: ' ' }),
            ("spiffe://td%41/a", TrustDomainChar { ch: '%' }),
            ("spiffe://td", MissingPath),
            ("spiffe://td/", TrailingSlash),
            ("spiffe://td/a/", TrailingSlash),
            ("spiffe://td/a//b", EmptySegment),
            ("spiffe://td//a", EmptySegment),
            ("spiffe://td/a/./b", DotSegment),
            ("spiffe://td/a/..", DotSegment),
            ("spiffe://td/../a", DotSegment),
            ("spiffe://td/a?x=1", Query),
            ("spiffe://td/a#frag", Fragment),
            ("spiffe://td?x", Query),
            ("spiffe://td/a%20b", PathChar { ch: '%' }),
            ("spiffe://td/a b", PathChar { ch: ' ' }),
            ("spiffe://td/caf\u{e9}", PathChar { ch: '\u{e9}' }),
            ("spiffe://td/a:b", PathChar { ch: ':' }),
            ("spiffe://td/a*", PathChar { ch: '*' }),
        ];
        for (s, rule) in invalid {
            assert_eq!(SpiffeId::parse(s).as_ref(), Err(rule), "input {s:?}");
        }
        assert!(valid.len() + invalid.len() >= 30);
    }

    #[test]
    fn id_parts() {
        let id = SpiffeId::parse("spiffe://fintech.internal/ns/prod/api").unwrap();
        assert_eq!(id.trust_domain_str(), "fintech.internal");
        assert_eq!(id.path(), "/ns/prod/api");
        assert_eq!(id.segments().collect::<Vec<_>>(), ["ns", "prod", "api"]);
        let td = TrustDomain::parse("fintech.internal").unwrap();
        assert!(id.is_member_of(&td));
        assert_eq!(SpiffeId::from_parts(&td, "/ns/prod/api").unwrap(), id);
    }

    #[test]
    fn trust_domain_table() {
        assert_eq!(
            TrustDomain::parse("fintech.internal").unwrap().as_str(),
            "fintech.internal"
        );
        assert_eq!(
            TrustDomain::parse("spiffe://fintech.internal")
                .unwrap()
                .as_str(),
            "fintech.internal"
        );
        assert_eq!(TrustDomain::parse(""), Err(IdError::Empty));
        assert_eq!(
            TrustDomain::parse("Fintech"),
            Err(IdError::TrustDomainChar { ch: 'F' })
        );
        assert_eq!(TrustDomain::parse("td:1"), Err(IdError::Port));
        assert_eq!(
            TrustDomain::parse("spiffe://td/"),
            Err(IdError::TrailingSlash)
        );
        assert_eq!(
            TrustDomain::parse("spiffe://td/a"),
            Err(IdError::TrustDomainChar { ch: '/' })
        );
    }

    #[test]
    fn pattern_matching() {
        let id = |s| SpiffeId::parse(s).unwrap();
        let p = |s| IdentityPattern::parse(s).unwrap();
        assert!(p("*").matches(&id("spiffe://td/anything/deep")));
        assert!(p("spiffe://td/a").matches(&id("spiffe://td/a")));
        assert!(!p("spiffe://td/a").matches(&id("spiffe://td/a/b")));
        assert!(p("spiffe://td/ns/*").matches(&id("spiffe://td/ns/x")));
        assert!(!p("spiffe://td/ns/*").matches(&id("spiffe://td/ns/x/y")));
        assert!(!p("spiffe://td/ns/*").matches(&id("spiffe://td/ns")));
        assert!(!p("spiffe://td/ns/*").matches(&id("spiffe://td/nsx/y")));
        assert!(!p("spiffe://td/ns/*").matches(&id("spiffe://other/ns/x")));
        assert!(p("spiffe://td/ns/**").matches(&id("spiffe://td/ns/x/y")));
        assert!(!p("spiffe://td/ns/**").matches(&id("spiffe://td/ns")));
        assert!(p("spiffe://td/*").matches(&id("spiffe://td/x")));
        assert!(p("spiffe://td/**").matches(&id("spiffe://td/x/y")));
        assert_eq!(
            IdentityPattern::parse("spiffe://td/a*"),
            Err(IdError::Wildcard)
        );
        assert_eq!(
            IdentityPattern::parse("spiffe://td/*/a"),
            Err(IdError::Wildcard)
        );
        assert_eq!(
            IdentityPattern::parse("spiffe://td/a/*")
                .unwrap()
                .to_string(),
            "spiffe://td/a/*"
        );
    }

    #[test]
    fn pattern_coverage() {
        let p = |s| IdentityPattern::parse(s).unwrap();
        let cases = [
            ("*", "spiffe://td/a/**", true),
            ("spiffe://td/a/**", "*", false),
            ("spiffe://td/a", "spiffe://td/a", true),
            ("spiffe://td/a", "spiffe://td/b", false),
            ("spiffe://td/a", "spiffe://td/a/*", false),
            ("spiffe://td/a/*", "spiffe://td/a/b", true),
            ("spiffe://td/a/*", "spiffe://td/a/b/c", false),
            ("spiffe://td/a/*", "spiffe://td/a/*", true),
            ("spiffe://td/a/*", "spiffe://td/a/**", false),
            ("spiffe://td/a/**", "spiffe://td/a/b/c", true),
            ("spiffe://td/a/**", "spiffe://td/a/*", true),
            ("spiffe://td/a/**", "spiffe://td/a/b/**", true),
            ("spiffe://td/a/**", "spiffe://td/ab/*", false),
            ("spiffe://td/**", "spiffe://td/x/*", true),
            ("spiffe://td/a/**", "spiffe://other/a/b", false),
        ];
        for (outer, inner, covers) in cases {
            assert_eq!(p(outer).covers(&p(inner)), covers, "{outer} covers {inner}");
        }
    }
}
