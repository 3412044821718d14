//! Header handling both directions share: hop-by-hop headers, the headers the sidecar owns
//! (identity statements and `x-request-id`: which client ids are kept, how fresh ones are
//! made), and the request framing we forward. One rule on both sides keeps a request's id the
//! same in the outbound and the inbound sidecar's audit lines.
//!
//! Three rules protect what the app is told (issue 21):
//! - a client cannot send a header that normalizes (ASCII case, `_` for `-`) to one the
//!   sidecar sets: CGI-style apps (WSGI, PHP, nginx with `underscores_in_headers`) read
//!   `x_client_spiffe_id` and `x-client-spiffe-id` as one variable and would join the two;
//! - a client's `Connection` header cannot name away a header the sidecar sets or decides
//!   ([`NOT_NAMEABLE`]): hop-by-hop stripping happens first, ours are added after it;
//! - `Transfer-Encoding` is forwarded only as the framing we send (`chunked`, RFC 9112 §6.1):
//!   other codings are refused with 501, `chunked` twice with 400.

mod ids;
#[cfg(test)]
mod tests;

pub(crate) use ids::{REQUEST_ID, RequestIds, keep_or_assign, keep_or_derive_trace};

use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus `proxy-connection` which old clients send, and
/// then `transfer-encoding`: HTTP/1.1 framing, which HTTP/2 refuses with the others (RFC 9113
/// §8.2.2).
// At most 16 (a bit each in `strip`); `connection` first.
const CONNECTION_SPECIFIC_NAMES: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
];

/// [`CONNECTION_SPECIFIC_NAMES`] parsed. A `static`: a `const` array of `HeaderName`s is built
/// and dropped wherever it is used.
static CONNECTION_SPECIFIC: [HeaderName; 9] = {
    const fn n(i: usize) -> HeaderName {
        HeaderName::from_static(CONNECTION_SPECIFIC_NAMES[i])
    }
    [n(0), n(1), n(2), n(3), n(4), n(5), n(6), n(7), n(8)]
};

/// How many of [`CONNECTION_SPECIFIC`] are hop-by-hop: all but `transfer-encoding`, which an
/// HTTP/1.1 hop frames itself.
const HOP_BY_HOP: usize = 8;

/// The bit of `transfer-encoding` among [`CONNECTION_SPECIFIC`].
const TRANSFER_ENCODING_BIT: u16 = 1 << HOP_BY_HOP;

/// Headers the sidecar sets on a request to the app: the identity statements
/// (`x-forwarded-client-cert`, `x-client-spiffe-id`, and RFC 9440 `client-cert` and
/// `client-cert-chain`, which it never sets but an app may trust), then `x-request-id`.
/// Whatever the client sent under an identity name, or a name that normalizes to one of these
/// (`X_Client_Spiffe_Id`), is removed before ours are added. `x-request-id` in its own
/// spelling follows [`is_acceptable_request_id`]; any other spelling is removed.
pub(crate) const OWN_NAMES: [&str; 5] = [
    "x-forwarded-client-cert",
    "x-client-spiffe-id",
    "client-cert",
    "client-cert-chain",
    "x-request-id",
];

/// Of [`OWN_NAMES`], the one a client may send in its exact spelling.
const KEPT_OWN: &str = OWN_NAMES[4];

/// Names a `Connection` header cannot remove ([`strip_hop_by_hop`] ignores them there): the
/// headers the sidecar sets ([`OWN_NAMES`]) and those it decides for the next hop (the target
/// and the framing). `Connection: x-request-id` would otherwise drop the id the audit line
/// records, and `Connection: content-length` the body's length.
pub(crate) const NOT_NAMEABLE: [&str; 8] = [
    OWN_NAMES[0],
    OWN_NAMES[1],
    OWN_NAMES[2],
    OWN_NAMES[3],
    OWN_NAMES[4],
    "host",
    "content-length",
    "transfer-encoding",
];

/// A bit per length (capped at 31) of [`CONNECTION_SPECIFIC_NAMES`]: 2, 7, 10, 16, 17, 18 and
/// 19. Most names a message carries (`host`, `date`, `content-type`, `content-length`,
/// `x-request-id`, …) have another length, so one mask test rules them out instead of nine
/// name comparisons (`strip` ran about 1.5 k instructions a request on the inbound side).
const CONNECTION_SPECIFIC_LENGTHS: u32 = length_mask(&CONNECTION_SPECIFIC_NAMES);

/// [`CONNECTION_SPECIFIC_LENGTHS`] and the lengths of [`OWN_NAMES`] (11, 12, 17, 18, 23): what
/// [`strip_for_app`] looks at more closely.
const APP_REQUEST_LENGTHS: u32 = CONNECTION_SPECIFIC_LENGTHS | length_mask(&OWN_NAMES);

const fn length_mask(names: &[&str]) -> u32 {
    let mut mask = 0u32;
    let mut i = 0;
    while i < names.len() {
        mask |= length_bit(names[i].len());
        i += 1;
    }
    mask
}

const fn length_bit(len: usize) -> u32 {
    1 << if len < 31 { len } else { 31 }
}

/// Removes hop-by-hop headers, including those the `Connection` header names (except
/// [`NOT_NAMEABLE`] ones): they describe one connection and must not be forwarded to the next.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let found = scan(h, false);
    remove_connection_specific(h, HOP_BY_HOP, found.connection_specific);
}

/// What [`strip_hop_by_hop`] removes and `transfer-encoding` too: what a message must not
/// carry onto an HTTP/2 hop (`h2` refuses to send it). The one exception is `te: trailers`,
/// which HTTP/2 allows (RFC 9113 §8.2.2) and gRPC requires (issue 17): it is kept, spelled
/// exactly `trailers`; any other `te` is removed.
pub(crate) fn strip_for_h2(h: &mut HeaderMap) {
    let mut found = scan(h, false).connection_specific;
    if found & TE_BIT != 0 && is_te_trailers(h) {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        found &= !TE_BIT;
    }
    remove_connection_specific(h, CONNECTION_SPECIFIC.len(), found);
}

/// The bit of `te` among [`CONNECTION_SPECIFIC`].
const TE_BIT: u16 = 1 << 5;

/// The request says `te: trailers` and nothing else (one value, any case): what HTTP/2 and
/// gRPC allow.
pub(crate) fn is_te_trailers(h: &HeaderMap) -> bool {
    let mut values = h.get_all(header::TE).iter();
    matches!(
        (values.next(), values.next()),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers")
    )
}

/// Fits a client's request head (either protocol) for the app's HTTP/1.1 hop, in one pass
/// over the names: refuses a `Transfer-Encoding` other than the framing we send (and makes
/// an accepted one exactly `chunked`), removes hop-by-hop headers as [`strip_hop_by_hop`]
/// does, and removes every header that is, or normalizes to, one of [`OWN_NAMES`] (but
/// `x-request-id` itself). The caller adds ours afterwards.
///
/// # Errors
/// A `Transfer-Encoding` we do not forward ([`FramingError`]); the head is left unchanged.
pub(crate) fn strip_for_app(h: &mut HeaderMap) -> Result<(), FramingError> {
    let found = scan(h, true);
    if found.connection_specific & TRANSFER_ENCODING_BIT != 0 {
        check_transfer_encoding(h)?;
    }
    remove_connection_specific(h, HOP_BY_HOP, found.connection_specific);
    if found.own_look_alike {
        // Rare (a spoofing attempt, or a proxy in front of the caller): allocating is fine.
        let doomed: Vec<HeaderName> = h
            .keys()
            .filter(|k| is_own_look_alike(k.as_str()))
            .cloned()
            .collect();
        for n in doomed {
            h.remove(n);
        }
    }
    Ok(())
}

/// Which of the names [`scan`] looks for a head carries.
struct Found {
    /// A bit per [`CONNECTION_SPECIFIC`] entry present.
    connection_specific: u16,
    /// A name [`is_own_look_alike`] accepts is present.
    own_look_alike: bool,
}

/// One pass over the names (most requests carry none of those looked for; most HTTP/1.1
/// responses only `connection: keep-alive`), for [`CONNECTION_SPECIFIC`] names and, with
/// `own`, [`OWN_NAMES`] look-alikes too; a name is compared only when its length is one of
/// theirs.
fn scan(h: &HeaderMap, own: bool) -> Found {
    let lengths = if own {
        APP_REQUEST_LENGTHS
    } else {
        CONNECTION_SPECIFIC_LENGTHS
    };
    let mut found = Found {
        connection_specific: 0,
        own_look_alike: false,
    };
    for k in h.keys() {
        let name = k.as_str();
        let bit = length_bit(name.len());
        if lengths & bit == 0 {
            continue;
        }
        if CONNECTION_SPECIFIC_LENGTHS & bit != 0
            && let Some(i) = CONNECTION_SPECIFIC.iter().position(|n| n == k)
        {
            found.connection_specific |= 1 << i;
        } else if own && is_own_look_alike(name) {
            found.own_look_alike = true;
        }
    }
    found
}

/// [`OWN_NAMES`] by length, as index + 1 (0: none of that length). Their lengths all differ
/// (checked here at compile time), so a name is compared with one of them at most.
const OWN_BY_LENGTH: [u8; 32] = {
    let mut table = [0u8; 32];
    let mut i = 0;
    while i < OWN_NAMES.len() {
        let len = OWN_NAMES[i].len();
        assert!(
            len < 32 && table[len] == 0,
            "OWN_NAMES need distinct lengths < 32"
        );
        table[len] = i as u8 + 1;
        i += 1;
    }
    table
};

/// Whether a client's header `name` must not reach the app: it normalizes (ASCII case, `_`
/// for `-`) to one of [`OWN_NAMES`], other than `x-request-id` spelled exactly.
fn is_own_look_alike(name: &str) -> bool {
    let Some(&i) = OWN_BY_LENGTH.get(name.len()) else {
        return false;
    };
    let Some(own) = OWN_NAMES.get(usize::from(i).wrapping_sub(1)) else {
        return false;
    };
    if name == *own {
        return *own != KEPT_OWN;
    }
    own.bytes().zip(name.bytes()).all(|(o, c)| {
        let c = if c == b'_' { b'-' } else { c };
        o == c.to_ascii_lowercase()
    })
}

/// Removes the first `count` of [`CONNECTION_SPECIFIC`] that `present` marks, and the names
/// the `Connection` header lists (except [`NOT_NAMEABLE`] ones).
fn remove_connection_specific(h: &mut HeaderMap, count: usize, present: u16) {
    let names = &CONNECTION_SPECIFIC[..count];
    let present = present & ((1 << count) - 1);
    if present == 0 {
        return;
    }
    // Names the `Connection` header lists, other than those of `names` removed below
    // anyway (no allocation for the usual `keep-alive`, `close` is looked up like any name).
    let mut named: Vec<HeaderName> = Vec::new();
    if present & 1 != 0 {
        for v in &h.get_all(header::CONNECTION) {
            let Ok(v) = v.to_str() else { continue };
            for n in v.split(',').map(str::trim) {
                if !names.iter().any(|h| h.as_str().eq_ignore_ascii_case(n))
                    && !NOT_NAMEABLE.iter().any(|p| p.eq_ignore_ascii_case(n))
                    && let Ok(n) = HeaderName::from_bytes(n.as_bytes())
                {
                    named.push(n);
                }
            }
        }
    }
    for n in named {
        h.remove(n);
    }
    for (i, n) in names.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
}

/// Why a request's `Transfer-Encoding` is not forwarded. We send a request body to the next
/// hop either chunked (HTTP/1.1) or in DATA frames (HTTP/2), never with another transfer
/// coding, so a request that claims one is refused rather than passed on with a header that
/// no longer describes its body (RFC 9112 §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum FramingError {
    /// A transfer coding other than `chunked` (`gzip`, `identity`, `deflate`, parameters):
    /// 501 (RFC 9112 §6.1: a server that does not understand a coding answers 501).
    #[error(
        "unsupported transfer coding: only `Transfer-Encoding: chunked` is accepted (compress the content and say so with `Content-Encoding` instead)"
    )]
    UnsupportedCoding,
    /// `chunked` more than once, an empty value or bytes that are not text: 400.
    #[error("malformed `Transfer-Encoding`: `chunked` must be listed exactly once (RFC 9112 §6.1)")]
    Malformed,
}

impl FramingError {
    /// The status the client gets.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Self::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            Self::Malformed => StatusCode::BAD_REQUEST,
        }
    }

    /// The audit and metric reason.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::UnsupportedCoding => "unsupported_transfer_coding",
            Self::Malformed => "bad_transfer_encoding",
        }
    }
}

/// Accepts a request's `Transfer-Encoding` only when it says `chunked` once and nothing else
/// (any case, any number of lines, empty list elements ignored), and leaves it as the one
/// value `chunked`: the framing the HTTP/1.1 hop sends. No `Transfer-Encoding` is fine.
///
/// # Errors
/// [`FramingError::UnsupportedCoding`] for any other coding, [`FramingError::Malformed`] for
/// `chunked` twice or a value without any coding; the header is left unchanged.
pub(crate) fn check_transfer_encoding(h: &mut HeaderMap) -> Result<(), FramingError> {
    let mut values = h.get_all(header::TRANSFER_ENCODING).iter();
    let canonical = match (values.next(), values.next()) {
        (None, _) => return Ok(()),
        (Some(v), None) => v == "chunked",
        _ => false,
    };
    if canonical {
        return Ok(());
    }
    let mut chunked = 0;
    for v in &h.get_all(header::TRANSFER_ENCODING) {
        let v = v.to_str().map_err(|_| FramingError::Malformed)?;
        for coding in v.split(',').map(|c| c.trim_matches([' ', '\t'])) {
            if coding.is_empty() {
                continue;
            }
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(FramingError::UnsupportedCoding);
            }
            chunked += 1;
        }
    }
    if chunked != 1 {
        return Err(FramingError::Malformed);
    }
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    Ok(())
}
