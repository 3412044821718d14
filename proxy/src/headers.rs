//! Header handling both directions share: hop-by-hop headers, and `x-request-id` (which ids are
//! kept, how fresh ones are made). One rule on both sides keeps a request's id the same in the
//! outbound and the inbound sidecar's audit lines.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rustls::crypto::CryptoProvider;

/// `x-request-id`, parsed once.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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

/// A bit per length (capped at 31) of [`CONNECTION_SPECIFIC_NAMES`]: 2, 7, 10, 16, 17, 18 and
/// 19. Most names a message carries (`host`, `date`, `content-type`, `content-length`,
/// `x-request-id`, …) have another length, so one mask test rules them out instead of nine
/// name comparisons (`strip` ran about 1.5 k instructions a request on the inbound side).
const CONNECTION_SPECIFIC_LENGTHS: u32 = {
    let mut mask = 0u32;
    let mut i = 0;
    while i < CONNECTION_SPECIFIC_NAMES.len() {
        mask |= length_bit(CONNECTION_SPECIFIC_NAMES[i].len());
        i += 1;
    }
    mask
};

const fn length_bit(len: usize) -> u32 {
    1 << if len < 31 { len } else { 31 }
}

/// Removes hop-by-hop headers, including those the `Connection` header names: they describe
/// one connection and must not be forwarded to the next.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    strip(h, &CONNECTION_SPECIFIC[..HOP_BY_HOP]);
}

/// What [`strip_hop_by_hop`] removes and `transfer-encoding` too: what a message must not
/// carry onto an HTTP/2 hop (`h2` refuses to send it).
pub fn strip_for_h2(h: &mut HeaderMap) {
    strip(h, &CONNECTION_SPECIFIC);
}

fn strip(h: &mut HeaderMap, names: &[HeaderName]) {
    // One pass over the names, noting which of `names` are there (most requests carry none;
    // most HTTP/1.1 responses only `connection: keep-alive`), then a removal for each of
    // those only.
    let mut present = 0u16;
    for k in h.keys() {
        if CONNECTION_SPECIFIC_LENGTHS & length_bit(k.as_str().len()) == 0 {
            continue;
        }
        if let Some(i) = names.iter().position(|n| n == k) {
            present |= 1 << i;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
