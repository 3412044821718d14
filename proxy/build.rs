//! Link order of the `sidecar` binary's code (issue 20, idle RSS).
//!
//! A sidecar runs about 2 MB of its 8 MB of machine code. The kernel maps code in large
//! blocks around each page it runs (fault-around, large page-cache folios), so code spread
//! over the whole `.text` keeps most of the binary resident. `symbol-order.txt` lists the
//! functions that ran in a profile of both sides (start-up, checks, requests with the audit log
//! on and off, full handshakes), hottest first; lld places them together at the start of
//! `.text`. Regenerate it with `python3 bench/profile.py --order-file proxy/symbol-order.txt`
//! after a change of toolchain, dependencies or the request path; a stale line is ignored.
//!
//! Only where lld links: release builds for x86_64-unknown-linux-gnu with rustc 1.90 or later
//! (its default linker there). Elsewhere (GNU ld does not know the option) nothing changes.
//! `GATEHOUSE_NO_SYMBOL_ORDER=1` turns it off.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=GATEHOUSE_NO_SYMBOL_ORDER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let off = env::var_os("GATEHOUSE_NO_SYMBOL_ORDER").is_some_and(|v| v != "0");
    if !release || !target || off || !rustc_links_with_lld() {
        return;
    }
    let file = std::path::Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("symbol-order.txt");
    if file.exists() {
        println!(
            "cargo:rustc-link-arg-bin=sidecar=-Wl,--symbol-ordering-file={}",
            file.display()
        );
        println!("cargo:rustc-link-arg-bin=sidecar=-Wl,--no-warn-symbol-ordering");
    }
}

/// rustc 1.90 and later link x86_64-unknown-linux-gnu with its bundled lld by default.
fn rustc_links_with_lld() -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    let version = String::from_utf8_lossy(&out.stdout);
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let mut parts = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
