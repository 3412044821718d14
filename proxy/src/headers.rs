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

use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rustls::crypto::CryptoProvider;

/// `x-request-id`, parsed once.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The W3C Trace Context header (`version-traceid-parentid-flags`).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The trace id (16 bytes, sent as 32 lowercase hex digits) of a request's `traceparent`, when it carries exactly
/// one that is valid under W3C Trace Context (version not `ff`; version `00` exactly 55
/// characters, later versions at least 55 with a `-` after the flags; ids lowercase hex and
/// not all zeros).
pub fn trace_id(headers: &HeaderMap) -> Option<[u8; 16]> {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let v = all.next()?.as_bytes();
    if all.next().is_some() || v.len() < 55 {
        return None;
    }
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |b: &[u8]| b.iter().any(|&c| c != b'0');
    let version_ok = hex(&v[..2])
        && &v[..2] != b"ff"
        && if &v[..2] == b"00" {
            v.len() == 55
        } else {
            v.len() == 55 || v[55] == b'-'
        };
    let ok = version_ok
        && v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(&v[3..35])
        && nonzero(&v[3..35])
        && hex(&v[36..52])
        && nonzero(&v[36..52])
        && hex(&v[53..55]);
    if !ok {
        return None;
    }
    let mut id = [0; 16];
    for (o, pair) in id.iter_mut().zip(v[3..35].chunks_exact(2)) {
        *o = (nibble(pair[0]) << 4) | nibble(pair[1]);
    }
    Some(id)
}

/// The value of one lowercase hex digit (checked by the caller).
fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => c - b'a' + 10,
    }
}

/// The request's trace id: the app's valid `traceparent` is kept as sent; otherwise one is
/// started (`00-<trace id>-<parent id>-01`, from `ids`) and set on the request, replacing
/// an invalid or repeated one.
pub fn keep_or_start_trace(ids: &RequestIds, headers: &mut HeaderMap) -> [u8; 16] {
    if let Some(id) = trace_id(headers) {
        return id;
    }
    let (value, id) = ids.next_traceparent();
    // Replaces every value of the header (a repeated one included).
    headers.insert(TRACEPARENT, value);
    id
}

/// Longest client-sent `x-request-id` that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;

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
pub const OWN_NAMES: [&str; 5] = [
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
pub const NOT_NAMEABLE: [&str; 8] = [
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
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let found = scan(h, false);
    remove_connection_specific(h, HOP_BY_HOP, found.connection_specific);
}

/// What [`strip_hop_by_hop`] removes and `transfer-encoding` too: what a message must not
/// carry onto an HTTP/2 hop (`h2` refuses to send it).
pub fn strip_for_h2(h: &mut HeaderMap) {
    let found = scan(h, false);
    remove_connection_specific(h, CONNECTION_SPECIFIC.len(), found.connection_specific);
}

/// Fits a client's request head (either protocol) for the app's HTTP/1.1 hop, in one pass
/// over the names: refuses a `Transfer-Encoding` other than the framing we send (and makes
/// an accepted one exactly `chunked`), removes hop-by-hop headers as [`strip_hop_by_hop`]
/// does, and removes every header that is, or normalizes to, one of [`OWN_NAMES`] (but
/// `x-request-id` itself). The caller adds ours afterwards.
///
/// # Errors
/// A `Transfer-Encoding` we do not forward ([`FramingError`]); the head is left unchanged.
pub fn strip_for_app(h: &mut HeaderMap) -> Result<(), FramingError> {
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
pub enum FramingError {
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
    pub fn status(self) -> StatusCode {
        match self {
            Self::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            Self::Malformed => StatusCode::BAD_REQUEST,
        }
    }

    /// The audit and metric reason.
    pub fn reason(self) -> &'static str {
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
pub fn check_transfer_encoding(h: &mut HeaderMap) -> Result<(), FramingError> {
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

/// Whether a client-sent `x-request-id` is kept: 1 to 128 characters of letters, digits and
/// `-_.:` (safe in logs and JSON without escaping). Anything else is replaced by a fresh id.
pub fn is_acceptable_request_id(v: &HeaderValue) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&v.len())
        && v.as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Fresh request ids: UUID-shaped (version 4 and RFC 4122 variant bits set) from a random
/// 64-bit prefix drawn from the TLS provider's CSPRNG and a counter starting at a random value,
/// so they are unique without a random draw per request (the draw cost more than the rest of
/// the request's header handling).
#[derive(Debug)]
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    /// A generator seeded from `provider`'s CSPRNG.
    pub fn new(provider: &CryptoProvider) -> Self {
        let mut seed = [0u8; 16];
        if provider.secure_random.fill(&mut seed).is_err() {
            // The CSPRNG failing is not a reason to fail: fall back to the clock, ids only need
            // to be unique enough to follow a request through two logs.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            seed = nanos.to_le_bytes();
        }
        let (a, b) = seed.split_at(8);
        Self {
            prefix: u64::from_le_bytes(a.try_into().unwrap_or_default()),
            counter: AtomicU64::new(u64::from_le_bytes(b.try_into().unwrap_or_default())),
        }
    }

    /// The next id, marked sensitive: HPACK sends it as a never-indexed literal. An id is
    /// unique, so indexing it only churns the h2 dynamic tables on both sides, evicting the
    /// entries (path, authority) that let every other header be sent as an index.
    pub fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.prefix.to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        // Where each byte's two hex digits go in 8-4-4-4-12.
        const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
        let mut text = *b"00000000-0000-0000-0000-000000000000";
        for (byte, at) in b.into_iter().zip(AT) {
            text[at] = HEX[usize::from(byte >> 4)];
            text[at + 1] = HEX[usize::from(byte & 0xf)];
        }
        // Invariant: lowercase hex and dashes are valid header bytes.
        let mut id = HeaderValue::from_bytes(&text).expect("hex is a valid header value");
        id.set_sensitive(true);
        id
    }
}

/// A bijective 64-bit mix (the SplitMix64 finalizer): distinct counters give distinct,
/// random-looking values.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl RequestIds {
    /// A fresh `traceparent` (sampled flag set: the audit line records the request) and its
    /// trace id: the generator's prefix, mixed, then the next counter value, mixed; unique
    /// like the request ids, without a random draw per request.
    pub fn next_traceparent(&self) -> (HeaderValue, [u8; 16]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut raw = [0u8; 24];
        raw[..8].copy_from_slice(&mix(self.prefix ^ 0x7472_6163_6570_6172).to_be_bytes());
        raw[8..16].copy_from_slice(&mix(n).to_be_bytes());
        // The parent (span) id must not be all zeros either.
        raw[16..].copy_from_slice(&(mix(n ^ self.prefix) | 1).to_be_bytes());
        if raw[..16] == [0; 16] {
            raw[15] = 1;
        }
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-01";
        // Trace id at 3..35, parent id at 36..52.
        for (i, byte) in raw.into_iter().enumerate() {
            let at = if i < 16 { 3 + 2 * i } else { 36 + 2 * (i - 16) };
            text[at] = HEX[usize::from(byte >> 4)];
            text[at + 1] = HEX[usize::from(byte & 0xf)];
        }
        let mut id = [0; 16];
        id.copy_from_slice(&raw[..16]);
        // Invariant: lowercase hex and dashes are valid header bytes.
        let mut v = HeaderValue::from_bytes(&text).expect("hex is a valid header value");
        // Unique per request: never HPACK-indexed (see `next`).
        v.set_sensitive(true);
        (v, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_kept_when_valid_and_started_otherwise() {
        let ids = RequestIds::new(&crate::tls::provider());
        let sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(sent));
        let id = keep_or_start_trace(&ids, &mut h);
        assert_eq!(hex::encode(id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(h[TRACEPARENT], sent);
        // A later version may append fields.
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x"),
        );
        assert!(trace_id(&h).is_some());
        for bad in [
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_static(bad));
            assert_eq!(trace_id(&h), None, "{bad}");
            let id = keep_or_start_trace(&ids, &mut h);
            assert_eq!(h.get_all(TRACEPARENT).iter().count(), 1);
            assert_eq!(
                trace_id(&h),
                Some(id),
                "replaced by a valid one: {:?}",
                h[TRACEPARENT]
            );
        }
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(sent));
        h.append(TRACEPARENT, HeaderValue::from_static(sent));
        assert_eq!(trace_id(&h), None, "repeated");
        let a = keep_or_start_trace(&ids, &mut HeaderMap::new());
        let b = keep_or_start_trace(&ids, &mut HeaderMap::new());
        assert_ne!(a, b);
    }

    #[test]
    fn fresh_ids_are_prefix_and_counter_in_uuid_layout() {
        let ids = RequestIds {
            prefix: 0x0123_4567_89ab_cdef,
            counter: AtomicU64::new(0xfedc_ba98_7654_3210),
        };
        assert_eq!(ids.next(), "01234567-89ab-4def-bedc-ba9876543210");
        assert_eq!(ids.next(), "01234567-89ab-4def-bedc-ba9876543211");
    }

    #[test]
    fn fresh_ids_are_unique_uuids_and_never_hpack_indexed() {
        let ids = RequestIds::new(&crate::tls::provider());
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        for id in [a, b] {
            assert!(id.is_sensitive());
            let text = id.to_str().expect("ascii");
            assert_eq!(text.len(), 36);
            for (i, c) in text.bytes().enumerate() {
                match i {
                    8 | 13 | 18 | 23 => assert_eq!(c, b'-', "{text}"),
                    14 => assert_eq!(c, b'4', "version 4: {text}"),
                    19 => assert!(b"89ab".contains(&c), "RFC 4122 variant: {text}"),
                    _ => assert!(matches!(c, b'0'..=b'9' | b'a'..=b'f'), "{text}"),
                }
            }
            assert!(is_acceptable_request_id(&id), "our own ids pass our rule");
        }
    }

    #[test]
    fn acceptable_request_ids() {
        for ok in ["abc-123", "a", "trace:1.2_3", &"x".repeat(128)] {
            assert!(
                is_acceptable_request_id(&HeaderValue::from_str(ok).unwrap()),
                "{ok}"
            );
        }
        for bad in ["", "has space", "a/b", "quote\"", "é", &"x".repeat(129)] {
            let v = HeaderValue::from_bytes(bad.as_bytes()).unwrap();
            assert!(!is_acceptable_request_id(&v), "{bad}");
        }
    }

    #[test]
    fn the_length_filter_lets_every_connection_specific_name_through() {
        for n in &CONNECTION_SPECIFIC {
            assert_ne!(
                CONNECTION_SPECIFIC_LENGTHS & length_bit(n.as_str().len()),
                0,
                "{n}"
            );
        }
        // Parsed to the same names as `http`'s own constants (so `==` is a cheap comparison).
        assert_eq!(CONNECTION_SPECIFIC[0], header::CONNECTION);
        assert_eq!(CONNECTION_SPECIFIC[8], header::TRANSFER_ENCODING);
        // And it rules out the names most messages carry.
        for n in [
            "host",
            "date",
            "content-type",
            "content-length",
            "x-request-id",
        ] {
            assert_eq!(CONNECTION_SPECIFIC_LENGTHS & length_bit(n.len()), 0, "{n}");
        }
    }

    #[test]
    fn the_app_request_filter_lets_every_own_name_through() {
        for n in OWN_NAMES {
            assert_ne!(APP_REQUEST_LENGTHS & length_bit(n.len()), 0, "{n}");
        }
        for n in [
            "host",
            "date",
            "accept",
            "content-length",
            "accept-encoding",
        ] {
            assert_eq!(APP_REQUEST_LENGTHS & length_bit(n.len()), 0, "{n}");
        }
    }

    #[test]
    fn headers_that_normalize_to_ours_never_reach_the_app() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("x_client_spiffe_id", "spiffe://fintech.internal/admin"),
            ("x-client-spiffe-id", "spiffe://fintech.internal/admin"),
            (
                "x_forwarded_client_cert",
                "By=x;URI=spiffe://fintech.internal/admin",
            ),
            ("x-forwarded_client-cert", "By=x"),
            ("client_cert", ":Zm9v:"),
            ("client-cert", ":Zm9v:"),
            ("client_cert_chain", ":YmFy:"),
            ("x_request_id", "other-id"),
            ("x-request-id", "kept-id"),
            ("x-client-spiffe-ids", "not ours: kept"),
            ("content-type", "application/json"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        strip_for_app(&mut h).unwrap();
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "content-type",
                "traceparent",
                "x-client-spiffe-ids",
                "x-request-id"
            ],
        );
        assert_eq!(h[REQUEST_ID], "kept-id");
        // Upper case arrives folded by `http`; `is_own_look_alike` folds it anyway.
        assert!(is_own_look_alike("X_Client_Spiffe_Id"));
        assert!(!is_own_look_alike("x-request-id"));
        assert!(is_own_look_alike("X-Request_ID"));
    }

    #[test]
    fn connection_cannot_name_our_headers_away() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static(
                "X-Request-Id, x-client-spiffe-id, host, content-length, transfer-encoding, x-gone",
            ),
        );
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let mut h1 = h.clone();
        strip_hop_by_hop(&mut h1);
        let mut left: Vec<&str> = h1.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host", "x-request-id"]);
        strip_for_h2(&mut h);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h[REQUEST_ID], "abc");
    }

    fn te(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_chunked_once_is_forwarded_and_as_exactly_chunked() {
        for ok in [
            &["chunked"][..],
            &["CHUNKED"],
            &["Chunked "],
            &[" ,chunked,"],
            &["", "chunked"],
        ] {
            let mut h = te(ok);
            assert_eq!(check_transfer_encoding(&mut h), Ok(()), "{ok:?}");
            let sent: Vec<_> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
            assert_eq!(sent, ["chunked"], "{ok:?}");
        }
        assert_eq!(check_transfer_encoding(&mut HeaderMap::new()), Ok(()));
        for (bad, err) in [
            (&["identity, chunked"][..], FramingError::UnsupportedCoding),
            (&["gzip,chunked"], FramingError::UnsupportedCoding),
            (&["gzip", "chunked"], FramingError::UnsupportedCoding),
            (&["chunked;ext=1"], FramingError::UnsupportedCoding),
            (&["chunked,chunked"], FramingError::Malformed),
            (&["chunked", "CHUNKED"], FramingError::Malformed),
            (&[" , "], FramingError::Malformed),
        ] {
            let mut h = te(bad);
            let before = h.clone();
            assert_eq!(check_transfer_encoding(&mut h), Err(err), "{bad:?}");
            assert_eq!(h, before, "unchanged on refusal");
        }
        assert_eq!(FramingError::UnsupportedCoding.status(), 501);
        assert_eq!(FramingError::Malformed.status(), 400);
        // `strip_for_app` applies the same rule.
        let mut h = te(&["gzip, chunked"]);
        assert_eq!(strip_for_app(&mut h), Err(FramingError::UnsupportedCoding));
        let mut h = te(&["CHUNKED"]);
        strip_for_app(&mut h).unwrap();
        assert_eq!(h[header::TRANSFER_ENCODING], "chunked");
    }

    #[test]
    fn transfer_encoding_is_kept_for_http1_and_dropped_for_http2() {
        let head = || {
            let mut h = HeaderMap::new();
            h.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
            h.insert("x-hop", HeaderValue::from_static("1"));
            h.insert("x-kept", HeaderValue::from_static("yes"));
            h
        };
        let mut h1 = head();
        strip_hop_by_hop(&mut h1);
        assert_eq!(h1.len(), 2, "{h1:?}");
        assert_eq!(h1[header::TRANSFER_ENCODING], "chunked");
        let mut h2 = head();
        strip_for_h2(&mut h2);
        assert_eq!(h2.len(), 1, "{h2:?}");
        assert_eq!(h2["x-kept"], "yes");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");

        // Tokens in any case, `close`, several `Connection` lines; a lone hop-by-hop header.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Other"),
        );
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(header::TRAILER, HeaderValue::from_static("x-t"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");

        // The outbound side's case: upgrade and proxy credentials dropped, end-to-end kept.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("x"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));
    }
}
