//! Gatehouse private CA (filled by the `ca` issue).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
