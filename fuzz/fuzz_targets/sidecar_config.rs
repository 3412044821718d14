//! The sidecar configuration (`Config::parse`: TOML, then every validation rule), and what
//! `sidecar check` prints for an accepted one. Errors are rendered as `sidecar check` renders
//! them (`file:line:col`, so byte offsets must fall on character boundaries).
#![no_main]
#![forbid(unsafe_code)]

use std::path::Path;

use gatehouse_proxy::fuzzing::Config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("/etc/gatehouse/sidecar.toml")) {
        Ok(config) => {
            let _ = config.listeners();
            let _ = format!("{config:?}");
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "an error with no message");
            for e in &errors {
                let _ = (e.to_string(), e.location(), e.help());
            }
        }
    }
});
