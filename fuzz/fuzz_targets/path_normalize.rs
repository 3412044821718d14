//! `gatehouse_policy::path::normalize`: never panics, and its output is a fixed point.
//!
//! Input: the first byte picks the options (bit 0: `allow_matrix_params`), the rest is the raw
//! request target as the sidecar receives it (any bytes; HTTP libraries hand us `&str`, so
//! non-UTF-8 input is skipped).
#![no_main]
#![forbid(unsafe_code)]

use std::borrow::Cow;

use gatehouse_policy::path::{NormalizeOptions, normalize};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(raw) = std::str::from_utf8(rest) else {
        return;
    };
    let opts = NormalizeOptions {
        allow_matrix_params: flags & 1 == 1,
    };
    let Ok(normal) = normalize(raw, &opts) else {
        return;
    };
    // One spelling per path: normalizing the normal form changes nothing and allocates nothing.
    match normalize(&normal, &opts) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, &*normal, "not a fixed point: {raw:?}"),
        other => panic!("{raw:?} -> {normal:?} -> {other:?}: the normal form is not normal"),
    }
    assert!(normal.starts_with('/'), "{raw:?} -> {normal:?}");
    assert!(!normal.contains("//"), "{raw:?} -> {normal:?}");
    for segment in normal.split('/') {
        assert!(segment != "." && segment != "..", "{raw:?} -> {normal:?}");
    }
    assert!(
        !normal.contains('?') && !normal.contains('#'),
        "{raw:?} -> {normal:?}"
    );
});
