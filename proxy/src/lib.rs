//! Gatehouse sidecar library (filled by the sidecar issues).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
