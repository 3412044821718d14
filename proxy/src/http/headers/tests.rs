use super::*;

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

#[test]
fn te_trailers_crosses_onto_http2_and_any_other_te_does_not() {
    assert_eq!(CONNECTION_SPECIFIC[5], header::TE);
    for (values, kept) in [
        (&["trailers"][..], true),
        (&["Trailers"], true),
        (&["gzip"], false),
        (&["trailers, gzip"], false),
        (&["trailers", "trailers"], false),
    ] {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::TE, HeaderValue::from_static(v));
        }
        h.insert(header::CONNECTION, HeaderValue::from_static("te"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        strip_for_h2(&mut h);
        assert!(h.get(header::CONNECTION).is_none(), "{values:?}");
        match kept {
            true => assert_eq!(
                h.get_all(header::TE).iter().collect::<Vec<_>>(),
                ["trailers"]
            ),
            false => assert!(h.get(header::TE).is_none(), "{values:?}: {h:?}"),
        }
        // HTTP/1.1 hops never carry it.
        let mut h1 = HeaderMap::new();
        h1.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h1);
        assert!(h1.is_empty());
    }
}
