//! Gatehouse test harness and fake services.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
pub mod dns;
pub mod docs;
pub mod fintech;
pub mod harness;
pub mod load;
