use gatehouse_policy::SpiffeId;

use super::super::chain::verify;
use super::*;
use crate::outcome::Outcome;

/// A writer into shared memory that counts its `write` calls.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<(Vec<u8>, usize)>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let mut g = lock(&self.0);
        g.0.extend_from_slice(b);
        g.1 += 1;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8(lock(&self.0).0.clone()).expect("UTF-8")
    }
    fn writes(&self) -> usize {
        lock(&self.0).1
    }
}

fn caller() -> SpiffeId {
    "spiffe://fintech.internal/gateway".parse().expect("id")
}

fn inbound<'a>(caller: &'a SpiffeId, path: &'a str, route: Option<&'a str>) -> AuditRecord<'a> {
    AuditRecord {
        request_id: "id-1",
        trace_id: Some(&[
            0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80,
            0x31, 0x9c,
        ]),
        caller,
        caller_serial: "01ab",
        policy_sha256: "ff00",
        method: "GET",
        path,
        route,
        outcome: Outcome::Decided {
            decision: "allow",
            reason: "allowed",
            status: http::StatusCode::OK,
        },
        duration: Duration::from_micros(1_234_567),
    }
}

#[test]
fn json_strings_are_escaped() {
    for s in [
        "plain",
        "quo\"te",
        "back\\slash",
        "ctl\u{1}\n\t\r\u{1f}",
        "ünï",
        "\"ü\u{1f}é\\",
        "",
    ] {
        let mut buf = Vec::new();
        push_json_str(&mut buf, s);
        let back: String = serde_json::from_slice(&buf).expect("valid JSON string");
        assert_eq!(back, s);
    }
}

#[test]
fn every_byte_that_needs_an_escape_is_found_at_every_position_and_length() {
    // The scan runs sixteen bytes at a time with a padded tail: check block edges and tails.
    for len in 0..50 {
        for at in 0..len {
            for bad in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                let mut raw = vec![b'a'; len];
                raw[at] = bad;
                let s = String::from_utf8(raw).expect("ascii");
                let mut buf = Vec::new();
                push_json_str(&mut buf, &s);
                let back: String = serde_json::from_slice(&buf).expect("valid JSON string");
                assert_eq!(back, s, "len {len}, {bad:#x} at {at}");
            }
        }
        let plain = "é".repeat(len / 2) + &"~".repeat(len % 2);
        let mut buf = Vec::new();
        push_json_str(&mut buf, &plain);
        assert_eq!(buf, format!("\"{plain}\"").into_bytes(), "copied as it is");
    }
}

#[test]
fn line_times_are_what_time_formats_as_rfc3339() {
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;
    let mut clock = Clock::default();
    let base = 1_796_000_000u64;
    for (secs, nanos) in [
        (base, 0),
        (base, 1),
        (base, 120_000_000),
        (base, 123_456_789),
        (base + 1, 999_999_999),
        (base + 1, 500_000),
        (base + 86_400 * 400 + 7, 10),
        (0, 0),
    ] {
        let d = Duration::new(secs, nanos);
        let mut ours = Vec::new();
        clock.push_rfc3339(&mut ours, d);
        let t = OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(secs) * 1_000_000_000 + i128::from(nanos),
        )
        .expect("in range");
        let want = t.format(&Rfc3339).expect("formats");
        assert_eq!(String::from_utf8(ours).expect("ascii"), want);
    }
}

#[test]
fn numbers_and_durations() {
    for (n, s) in [
        (0, "0"),
        (7, "7"),
        (200, "200"),
        (u64::MAX, "18446744073709551615"),
    ] {
        let mut b = Vec::new();
        push_u64(&mut b, n);
        assert_eq!(b, s.as_bytes());
    }
    for (d, s) in [
        (Duration::ZERO, "0.000"),
        (Duration::from_nanos(499), "0.000"),
        (Duration::from_nanos(500), "0.001"),
        (Duration::from_micros(1_234_567), "1234.567"),
        (Duration::from_micros(45_020), "45.020"),
    ] {
        let mut b = Vec::new();
        push_millis(&mut b, d);
        assert_eq!(String::from_utf8(b).expect("ascii"), s);
    }
}

#[test]
fn lines_have_every_field_in_order_and_parse() {
    let out = Shared::default();
    let sink = Sink::new(Box::new(out.clone()), false, Duration::ZERO).expect("sink");
    let id = caller();
    sink.record(&inbound(&id, "/a\"b\n", Some("report")));
    sink.record(&inbound(&id, "/x", None));
    sink.record_outbound(&OutboundRecord {
        request_id: "id-2",
        trace_id: None,
        upstream: "monolith",
        server_id: "spiffe://fintech.internal/monolith",
        server_serial: None,
        method: "POST",
        path: "/api",
        outcome: Outcome::Failed {
            reason: "connect_failed",
            status: http::StatusCode::BAD_GATEWAY,
        },
        duration: Duration::from_micros(3_000),
    });
    let text = out.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(out.writes(), 3, "flush interval 0: one write per line");
    let keys = |l: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
        // Field order as written (serde_json's Map keeps insertion order only with a
        // feature), so read the keys off the text.
        let obj = v.as_object().expect("object");
        let mut ks: Vec<(usize, String)> = obj
            .keys()
            .map(|k| (l.find(&format!("\"{k}\":")).expect("key"), k.clone()))
            .collect();
        ks.sort();
        ks.into_iter().map(|(_, k)| k).collect()
    };
    let inbound_keys = [
        "time",
        "direction",
        "request_id",
        "trace_id",
        "caller",
        "caller_serial",
        "policy_sha256",
        "method",
        "path",
        "route",
        "decision",
        "reason",
        "status",
        "duration_ms",
        "prev",
    ];
    let mut first = inbound_keys.to_vec();
    first.insert(first.len() - 1, "chain_start");
    assert_eq!(
        keys(lines[0]),
        first,
        "the sink's first line starts the chain"
    );
    assert_eq!(keys(lines[1]), inbound_keys);
    assert_eq!(
        keys(lines[2]),
        [
            "time",
            "direction",
            "request_id",
            "trace_id",
            "upstream",
            "server_id",
            "server_serial",
            "method",
            "path",
            "status",
            "reason",
            "duration_ms",
            "prev"
        ]
    );
    let l0: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    assert_eq!(l0["path"], "/a\"b\n");
    assert_eq!(l0["caller"], "spiffe://fintech.internal/gateway");
    assert_eq!(l0["status"], 200);
    assert_eq!(l0["duration_ms"].as_f64(), Some(1234.567));
    let time = l0["time"].as_str().expect("time");
    let parsed = OffsetDateTime::parse(time, &Rfc3339).expect("RFC 3339");
    assert!((OffsetDateTime::now_utc() - parsed).whole_seconds().abs() < 60);
    assert!(time.ends_with('Z'), "{time}");
    let l1: serde_json::Value = serde_json::from_str(lines[1]).expect("JSON");
    assert!(l1["route"].is_null());
    assert!(
        lines[1].contains("\"route\":null,\"decision\""),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("\"status\":502,\"reason\":\"connect_failed\",\"duration_ms\":3.000,"),
        "{}",
        lines[2]
    );
    assert_eq!(l0["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(l0["caller_serial"], "01ab");
    assert_eq!(l0["policy_sha256"], "ff00");
    assert_eq!(l0["prev"], GENESIS);
    assert!(lines[2].contains("\"trace_id\":null,"), "{}", lines[2]);
}

#[test]
fn buffered_lines_wait_for_the_interval_then_go_in_one_write() {
    let out = Shared::default();
    let sink = Sink::new(Box::new(out.clone()), false, Duration::from_millis(500)).expect("sink");
    let id = caller();
    for _ in 0..10 {
        sink.record(&inbound(&id, "/x", None));
    }
    assert_eq!(out.writes(), 0, "nothing written before the interval");
    let start = Instant::now();
    while out.writes() == 0 && start.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(5));
    }
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(2), "flushed after {waited:?}");
    assert_eq!(out.writes(), 1, "one write for the batch");
    assert_eq!(out.text().lines().count(), 10);
}

#[test]
fn a_full_buffer_is_written_without_waiting_for_the_interval() {
    let out = Shared::default();
    let sink = Sink::new(Box::new(out.clone()), false, Duration::from_secs(3600)).expect("sink");
    let id = caller();
    let path = "/p".repeat(100);
    let mut n = 0;
    // Until the line that takes the buffer past FLUSH_BYTES. The flusher may already have
    // taken it (and cleared `urgent`) by the time we look, so a buffer that shrank counts too:
    // recording on would fill a second batch while a slow flusher is still writing the first.
    let mut last_len = 0;
    loop {
        sink.record(&inbound(&id, &path, None));
        n += 1;
        let len = lock(&sink.inner.buf).cur.len();
        if len >= FLUSH_BYTES
            || len < last_len
            || sink.inner.urgent.load(Ordering::Acquire)
            || out.writes() > 0
        {
            break;
        }
        last_len = len;
    }
    let start = Instant::now();
    while out.writes() == 0 && start.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(out.writes(), 1, "the flusher wrote the full buffer at once");
    assert!(out.text().len() >= FLUSH_BYTES);
    // What is still buffered is written by `flush` (shutdown) and by dropping the sink.
    sink.record(&inbound(&id, "/last", None));
    sink.flush();
    assert_eq!(out.text().lines().count(), n + 1);
    assert_eq!(out.writes(), 2);
    sink.record(&inbound(&id, "/after", None));
    drop(sink);
    assert_eq!(out.text().lines().count(), n + 2);
    assert!(out.text().contains(
        "\"/after\",\"route\":null,\"decision\":\"allow\",\"reason\":\"allowed\",\"status\":200,\"duration_ms\":1234.567,\"prev\":\""
    ));
}

/// Each line's `prev` is the SHA-256 of the line before it, across batches.
fn assert_chained(text: &str, first_prev: &str) {
    let mut prev = first_prev.to_owned();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(v["prev"], prev.as_str(), "line {}: {line}", i + 1);
        assert_eq!(v.get("chain_start").is_some(), i == 0, "line {}", i + 1);
        prev = hex::encode(Sha256::digest(line.as_bytes()));
    }
}

#[test]
fn lines_are_hash_chained_across_batches_in_file_and_pipe_mode() {
    for pipe in [false, true] {
        let out = Shared::default();
        let sink = Sink::with_chain(
            Box::new(out.clone()),
            pipe,
            Duration::from_secs(3600),
            [7; 32],
        )
        .expect("sink");
        let id = caller();
        let long = "/l".repeat(900);
        for round in 0..3 {
            for i in 0..(10 + round) {
                let path = if i % 4 == 0 { long.as_str() } else { "/x" };
                sink.record(&inbound(&id, path, None));
            }
            sink.flush();
        }
        let text = out.text();
        assert_eq!(text.lines().count(), 33);
        assert!(
            out.writes() > 3 || !pipe,
            "pipe batches cut: {}",
            out.writes()
        );
        assert_chained(&text, &hex::encode([7u8; 32]));
    }
}

#[test]
fn a_sink_appending_to_a_file_continues_its_chain_and_verify_checks_it() {
    let dir = std::env::temp_dir().join(format!("gh-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("audit.log");
    let _ = std::fs::remove_file(&path);
    let config = |p: &Path| AuditConfig {
        enabled: true,
        path: Some(p.to_owned()),
        flush_interval: Duration::ZERO,
    };
    let id = caller();
    for _run in 0..2 {
        let sink = Sink::from_config(&config(&path))
            .expect("open")
            .expect("enabled");
        for _ in 0..3 {
            sink.record(&inbound(&id, "/x", None));
        }
    }
    let v = verify(std::slice::from_ref(&path)).expect("verifies");
    assert_eq!((v.lines, v.starts), (6, 2));
    assert!(v.continues_from.is_none());
    let text = std::fs::read_to_string(&path).expect("read");
    let lines: Vec<&str> = text.lines().collect();
    let l3: serde_json::Value = serde_json::from_str(lines[3]).expect("JSON");
    assert_eq!(l3["chain_start"], true);
    assert_eq!(l3["prev"], hex::encode(Sha256::digest(lines[2].as_bytes())));
    // Rotated away (moved): the next sidecar starts a new file that continues the chain
    // from the anchor file.
    let rotated = dir.join("audit.log.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    {
        let sink = Sink::from_config(&config(&path))
            .expect("open")
            .expect("enabled");
        sink.record(&inbound(&id, "/x", None));
    }
    let v = verify(&[rotated.clone(), path.clone()]).expect("verifies across rotation");
    assert_eq!((v.lines, v.starts), (7, 3));
    let v = verify(std::slice::from_ref(&path)).expect("continues");
    assert_eq!(
        v.continues_from.as_deref(),
        Some(&*hex::encode(Sha256::digest(lines[5].as_bytes())))
    );
    std::fs::rename(&rotated, &path).expect("back");
    // Edit line 2: line 3 no longer names it.
    let edited = text
        .replacen("\"/x\"", "\"/y\"", 2)
        .replacen("\"/y\"", "\"/x\"", 1);
    std::fs::write(&path, edited).expect("write");
    let e = verify(std::slice::from_ref(&path)).expect_err("edited");
    assert!(
        e.contains("audit.log:3: broken chain") && e.contains("audit.log:2)"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).expect("clean");
}

#[test]
fn pipe_writes_are_cut_at_line_ends_within_pipe_buf() {
    let out = Shared::default();
    let mut o = Output {
        w: Box::new(out.clone()),
        last: [0; 32],
        anchor: None,
        pipe: true,
    };
    let line = format!("{}\n", "x".repeat(99));
    let long = format!("{}\n", "y".repeat(PIPE_BUF + 10));
    let batch = format!("{}{long}{}", line.repeat(50), line.repeat(3));
    o.write_batch(batch.as_bytes()).expect("write");
    assert_eq!(out.text(), batch);
    // 50 short lines (5000 bytes): 40 + 10 lines; the long line alone; 3 lines.
    assert_eq!(out.writes(), 4);
}
