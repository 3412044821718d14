//! The `x-request-id` rule both sides follow (which client ids are kept, how fresh ones are
//! made) and the W3C `traceparent` a request carries or is given: one rule on both sides keeps
//! a request's id and trace the same in the outbound and the inbound sidecar's audit lines.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rustls::crypto::CryptoProvider;

use crate::hexdigits;

/// `x-request-id`, parsed once.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The W3C Trace Context header (`version-traceid-parentid-flags`).
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The trace id (16 bytes, sent as 32 lowercase hex digits) of a request's `traceparent`, when it carries exactly
/// one that is valid under W3C Trace Context (version not `ff`; version `00` exactly 55
/// characters, later versions at least 55 with a `-` after the flags; ids lowercase hex and
/// not all zeros).
pub(crate) fn trace_id(headers: &HeaderMap) -> Option<[u8; 16]> {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let v = all.next()?.as_bytes();
    if all.next().is_some() {
        return None;
    }
    // `vv-<32 trace id>-<16 parent id>-ff`, then `-…` in a later version.
    let head: &[u8; 55] = v.get(..55)?.try_into().ok()?;
    let [v0, v1, b'-', trace @ .., b'-', _, _] = head else {
        return None;
    };
    let later = match (v0, v1) {
        (b'0', b'0') => false,
        (b'f', b'f') => return None,
        _ => true,
    };
    if v.len() > 55 && !(later && v[55] == b'-') {
        return None;
    }
    let (trace, rest) = trace.split_at(32);
    let [b'-', parent @ ..] = rest else {
        return None;
    };
    // One OR over every digit's value checks them all (`NOT_HEX` has high bits set).
    let digits = |d: &[u8]| d.iter().fold(0, |acc, &c| acc | hexdigits::value(c));
    let mut id = [0; 16];
    let mut seen = 0;
    for (o, pair) in id.iter_mut().zip(trace.chunks_exact(2)) {
        let (hi, lo) = (hexdigits::value(pair[0]), hexdigits::value(pair[1]));
        seen |= hi | lo;
        *o = (hi << 4) | lo;
    }
    let hex = seen | digits(parent) | digits(&[*v0, *v1]) | digits(&head[53..]);
    let nonzero = id != [0; 16] && parent.iter().any(|&c| c != b'0');
    (hex < 16 && nonzero).then_some(id)
}

/// The request's trace id, the same on both sides without a header on the sidecar-to-sidecar
/// hop: the valid `traceparent` the request carries (passed on as sent), or else one derived
/// from its `request_id` ([`derived_trace_id`]), which both sidecars hold by the one
/// `x-request-id` rule ([`keep_or_assign`], applied first). The outbound side (`start: false`)
/// adds nothing: the inbound side derives the same id from the same request id. The inbound
/// side (`start: true`) starts the `traceparent` its app gets, replacing an invalid or repeated
/// one. (Starting it at the outbound cost both sidecars an HPACK Huffman encode and decode of a
/// never-indexed 55-byte value per request: ~4k of the pair's ~120k instructions.)
pub(crate) fn keep_or_derive_trace(
    headers: &mut HeaderMap,
    request_id: &HeaderValue,
    start: bool,
) -> [u8; 16] {
    if let Some(id) = trace_id(headers) {
        return id;
    }
    let id = derived_trace_id(request_id);
    if start {
        // Replaces every value of the header (a repeated one included).
        headers.insert(TRACEPARENT, traceparent_for(&id));
    }
    id
}

/// The trace id of a request without a valid `traceparent`, from its `x-request-id`: the 16
/// bytes of a UUID-shaped id (what [`RequestIds::next`] makes: unique, random-looking), else
/// the first 16 bytes of the id's SHA-256 (an id the app chose). Never all zeros.
pub(crate) fn derived_trace_id(request_id: &HeaderValue) -> [u8; 16] {
    let b = request_id.as_bytes();
    let mut id = [0u8; 16];
    let dashes = b.len() == 36 && b[8] == b'-' && b[13] == b'-' && b[18] == b'-' && b[23] == b'-';
    let uuid = dashes && {
        // One OR over every digit's value checks them all (`NOT_HEX` has high bits set).
        let mut seen = 0;
        for (o, at) in id.iter_mut().zip(UUID_AT) {
            let (hi, lo) = (hexdigits::value(b[at]), hexdigits::value(b[at + 1]));
            seen |= hi | lo;
            *o = (hi << 4) | lo;
        }
        seen < 16
    };
    if !uuid {
        use sha2::Digest as _;
        id.copy_from_slice(&sha2::Sha256::digest(b)[..16]);
    }
    if id == [0; 16] {
        id[15] = 1;
    }
    id
}

/// `00-<trace id>-<parent id>-01` for a derived trace id (sampled: the audit line records the
/// request), its parent id mixed from the trace id (never zero), marked sensitive (unique per
/// request: never HPACK-indexed, see [`RequestIds::next`]).
fn traceparent_for(id: &[u8; 16]) -> HeaderValue {
    let (hi, lo) = id.split_at(8);
    let word = |h: &[u8]| u64::from_be_bytes(h.try_into().unwrap_or_default());
    let parent = mix(word(hi) ^ word(lo).rotate_left(17)) | 1;
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-01";
    // Trace id at 3..35, parent id at 36..52.
    hexdigits::encode_into(&mut text[3..35], id);
    hexdigits::encode_into(&mut text[36..52], &parent.to_be_bytes());
    // Invariant: lowercase hex and dashes are valid header bytes.
    let mut v = HeaderValue::from_bytes(&text).expect("hex is a valid header value");
    v.set_sensitive(true);
    v
}

/// Where each byte's two hex digits are in a UUID's 8-4-4-4-12 text.
const UUID_AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];

/// Longest client-sent `x-request-id` that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client-sent `x-request-id` is kept: 1 to 128 characters of letters, digits and
/// `-_.:` (safe in logs and JSON without escaping). Anything else is replaced by a fresh id.
pub(crate) fn is_acceptable_request_id(v: &HeaderValue) -> bool {
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
pub(crate) struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    /// A generator seeded from `provider`'s CSPRNG.
    pub(crate) fn new(provider: &CryptoProvider) -> Self {
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
    pub(crate) fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.prefix.to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        let mut text = *b"00000000-0000-0000-0000-000000000000";
        for (byte, at) in b.into_iter().zip(UUID_AT) {
            text[at..at + 2].copy_from_slice(&hexdigits::pair(byte));
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

/// The one `x-request-id` rule, both sides: the request's first `x-request-id` if it is
/// acceptable ([`is_acceptable_request_id`]), else a fresh one; either way the request then
/// carries exactly that one value, marked sensitive (never HPACK-indexed, see
/// [`RequestIds::next`]). The outbound side applies it to what the app sends, the inbound side
/// to what the peer sends, so both sidecars' audit lines carry the same id.
pub(crate) fn keep_or_assign(ids: &RequestIds, headers: &mut HeaderMap) -> HeaderValue {
    // One hash and probe of the name for the lookup and the insertion.
    match headers.entry(REQUEST_ID) {
        header::Entry::Occupied(mut e) => {
            let v = e.get_mut();
            if is_acceptable_request_id(v) {
                v.set_sensitive(true);
                let id = v.clone();
                if e.iter().nth(1).is_some() {
                    // A repeated header: only the id kept goes on.
                    e.insert(id.clone());
                }
                return id;
            }
            let id = ids.next();
            // Replaces every value of the header (a repeated one included).
            e.insert(id.clone());
            id
        }
        header::Entry::Vacant(e) => e.insert(ids.next()).clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_kept_when_valid_and_derived_from_the_request_id_otherwise() {
        let ids = RequestIds::new(&crate::tls::provider());
        let rid = ids.next();
        let sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(sent));
        let id = keep_or_derive_trace(&mut h, &rid, true);
        assert_eq!(hex::encode(id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(h[TRACEPARENT], sent);
        // A later version may append fields.
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x"),
        );
        assert!(trace_id(&h).is_some());
        let derived = derived_trace_id(&rid);
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
            // The outbound side derives and adds nothing; the inbound side derives the same id
            // and gives its app a valid header with it.
            assert_eq!(keep_or_derive_trace(&mut h, &rid, false), derived);
            assert_eq!(h[TRACEPARENT], bad);
            assert_eq!(keep_or_derive_trace(&mut h, &rid, true), derived);
            assert_eq!(h.get_all(TRACEPARENT).iter().count(), 1);
            assert_eq!(trace_id(&h), Some(derived), "{:?}", h[TRACEPARENT]);
        }
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(sent));
        h.append(TRACEPARENT, HeaderValue::from_static(sent));
        assert_eq!(trace_id(&h), None, "repeated");
        let mut none = HeaderMap::new();
        assert_eq!(keep_or_derive_trace(&mut none, &rid, false), derived);
        assert!(none.is_empty(), "the outbound side adds no header");
    }

    #[test]
    fn derived_trace_ids_are_the_uuid_bytes_or_a_hash_and_differ_per_request() {
        let ids = RequestIds::new(&crate::tls::provider());
        let (a, b) = (ids.next(), ids.next());
        let (ta, tb) = (derived_trace_id(&a), derived_trace_id(&b));
        assert_ne!(ta, tb);
        assert_eq!(hex::encode(ta), a.to_str().unwrap().replace('-', ""));
        // An id the app chose: a hash, the same on both sides, different per id.
        let app = |s: &'static str| derived_trace_id(&HeaderValue::from_static(s));
        assert_eq!(app("trace-1"), app("trace-1"));
        assert_ne!(app("trace-1"), app("trace-2"));
        assert_ne!(app("trace-1"), [0; 16]);
        // Upper-case hex is not a UUID of ours: hashed, not parsed.
        let upper = "0AF76519-16CD-43DD-8448-EB211C80319C";
        assert_ne!(
            hex::encode(app(upper)),
            upper.replace('-', "").to_lowercase()
        );
        let mut h = HeaderMap::new();
        keep_or_derive_trace(&mut h, &a, true);
        let tp = h[TRACEPARENT].to_str().unwrap().to_owned();
        assert_eq!(&tp[3..35], hex::encode(ta));
        assert!(h[TRACEPARENT].is_sensitive());
    }

    /// The trace-id rule written plainly, byte by byte: the table-driven parser must agree.
    fn plain_trace_id(v: &[u8]) -> Option<[u8; 16]> {
        let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        let nonzero = |b: &[u8]| b.iter().any(|&c| c != b'0');
        let ok = v.len() >= 55
            && hex(&v[..2])
            && &v[..2] != b"ff"
            && (if &v[..2] == b"00" {
                v.len() == 55
            } else {
                v.len() == 55 || v[55] == b'-'
            })
            && v[2] == b'-'
            && v[35] == b'-'
            && v[52] == b'-'
            && hex(&v[3..35])
            && nonzero(&v[3..35])
            && hex(&v[36..52])
            && nonzero(&v[36..52])
            && hex(&v[53..55]);
        ok.then(|| {
            let mut id = [0; 16];
            hex::decode_to_slice(&v[3..35], &mut id).expect("checked hex");
            id
        })
    }

    #[test]
    fn traceparent_parser_agrees_with_the_plain_rule_on_every_one_byte_change() {
        let good = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec();
        let mut cases = vec![
            good.clone(),
            b"cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x".to_vec(),
        ];
        for base in cases.clone() {
            for at in 0..base.len() {
                for c in [b'0', b'f', b'g', b'A', b'-', b' ', 0xff] {
                    let mut v = base.clone();
                    v[at] = c;
                    cases.push(v);
                }
            }
            cases.push(base[..54].to_vec());
            cases.push([&base[..], b"-"].concat());
            cases.push([&base[..], b"x"].concat());
        }
        cases.push(b"00-00000000000000000000000000000000-b7ad6b7169203331-01".to_vec());
        cases.push(b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01".to_vec());
        for v in cases {
            let mut h = HeaderMap::new();
            let Ok(value) = HeaderValue::from_bytes(&v) else {
                continue;
            };
            h.insert(TRACEPARENT, value);
            assert_eq!(
                trace_id(&h),
                plain_trace_id(&v),
                "{}",
                String::from_utf8_lossy(&v)
            );
        }
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
    fn request_id_is_kept_when_sane_and_replaced_otherwise() {
        let ids = RequestIds::new(&crate::tls::provider());
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(keep_or_assign(&ids, &mut h), "abc-123");

        let mut h = HeaderMap::new();
        // A fresh id from the generator (its UUID shape is tested in `crate::http::headers`).
        let fresh = keep_or_assign(&ids, &mut h);
        assert_eq!(fresh.len(), 36);
        assert!(is_acceptable_request_id(&fresh));
        assert_eq!(h.get(&REQUEST_ID), Some(&fresh));
        assert_ne!(fresh, keep_or_assign(&ids, &mut HeaderMap::new()));

        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        h.append(REQUEST_ID, HeaderValue::from_static("second"));
        let id = keep_or_assign(&ids, &mut h);
        assert_ne!(id, "has space");
        let sent: Vec<&HeaderValue> = h.get_all(&REQUEST_ID).iter().collect();
        assert_eq!(sent, [&id], "one value, the fresh id");

        // An id the inbound side would replace is replaced here already, so both sidecars'
        // audit lines carry the same one.
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("tenant/42"));
        assert_ne!(keep_or_assign(&ids, &mut h), "tenant/42");
    }

    #[test]
    fn request_ids_sent_upstream_are_never_hpack_indexed() {
        // A sensitive value is an HPACK never-indexed literal: unique ids must not churn the
        // h2 dynamic tables of the two sidecars.
        let ids = RequestIds::new(&crate::tls::provider());
        let mut kept = HeaderMap::new();
        kept.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        let mut fresh = HeaderMap::new();
        fresh.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        for mut h in [kept, fresh, HeaderMap::new()] {
            let id = keep_or_assign(&ids, &mut h);
            assert!(id.is_sensitive());
            assert!(h[&REQUEST_ID].is_sensitive(), "{:?}", h.get(&REQUEST_ID));
        }
    }

    #[test]
    fn a_repeated_acceptable_id_goes_on_once_as_the_inbound_side_always_sent_it() {
        let ids = RequestIds::new(&crate::tls::provider());
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("first-1"));
        h.append(REQUEST_ID, HeaderValue::from_static("second-2"));
        let id = keep_or_assign(&ids, &mut h);
        assert_eq!(id, "first-1");
        let sent: Vec<&HeaderValue> = h.get_all(&REQUEST_ID).iter().collect();
        assert_eq!(sent, [&id], "one value, the one kept");
        assert!(h[&REQUEST_ID].is_sensitive());
    }
}
