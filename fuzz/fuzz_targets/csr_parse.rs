//! `ca sign`'s CSR path before anything is signed: PEM or DER detection, PKCS#10 parsing and the
//! self-signature check (`gatehouse_ca::csr::parse_csr`).
#![no_main]
#![forbid(unsafe_code)]

use std::path::Path;

use gatehouse_ca::CaError;
use gatehouse_ca::csr::parse_csr;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match parse_csr(data, Path::new("fuzz.csr")) {
        Ok(params) => {
            let _ = params.public_key;
        }
        Err(e @ (CaError::MalformedCsr { .. } | CaError::CsrSignature { .. })) => {
            let _ = e.to_string();
        }
        Err(other) => panic!("unexpected error kind for a CSR: {other:?}"),
    }
});
