//! Where the CA's shared records live: the inventory, join tokens, revocations and the CRL
//! number. By default in the CA directory (`inventory.jsonl`, `tokens.json`, `ca.json`), as
//! before; with [`crate::Authority::with_store`], in a [`Store`] shared by several `ca serve`
//! replicas ([`crate::pg::PgStore`], PostgreSQL). How an [`crate::Authority`] reads and writes them,
//! store or directory alike: `records.rs`.
//!
//! The trait is synchronous: every caller already runs off the async threads (`ca serve` does
//! all CA work in `spawn_blocking`; the CLI is synchronous).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use crate::CaError;
use crate::inventory::Record;

/// A join token as a store keeps it (the secret itself is never stored).
#[derive(Debug, Clone)]
pub struct TokenRow {
    /// SHA-256 of the token string, lowercase hex.
    pub sha256: String,
    /// The identity an enrollment with it receives.
    pub spiffe_id: String,
    /// Unix seconds.
    pub expires: i64,
    /// Enrollments left.
    pub uses_left: u32,
}

/// The shared records of a CA, outside its directory.
pub trait Store: Send + Sync {
    /// The store, for messages (a connection string without its password).
    fn describe(&self) -> String;
    /// Every inventory record, oldest first.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] and store errors.
    fn records(&self) -> Result<Vec<Record>, CaError>;
    /// Appends one record; an `issued` record with a serial already present is refused.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] and store errors.
    fn append(&self, record: &Record) -> Result<(), CaError>;
    /// Whether a certificate with this serial was recorded.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] and store errors.
    fn serial_known(&self, serial: &str) -> Result<bool, CaError>;
    /// Serials revoked so far.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] and store errors.
    fn revoked_serials(&self) -> Result<HashSet<String>, CaError>;
    /// Stores a new join token.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] and store errors.
    fn create_token(&self, token: &TokenRow) -> Result<(), CaError>;
    /// The token with this hash, if any (not spent).
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] and store errors.
    fn find_token(&self, sha256: &str) -> Result<Option<TokenRow>, CaError>;
    /// Spends one use atomically: true when a use was left and the token had not expired.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] and store errors.
    fn spend_token(&self, sha256: &str, now: i64) -> Result<bool, CaError>;
    /// The next CRL number, strictly greater than any returned before by any replica.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] and store errors.
    fn next_crl_number(&self) -> Result<u64, CaError>;
    /// Raises the CRL number sequence to at least `floor` (the number a CA directory reached
    /// before it moved to the store), so numbers never go back. Never lowers it.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] and store errors.
    fn raise_crl_number(&self, floor: u64) -> Result<(), CaError>;
}

/// The store an [`crate::Authority`] uses (absent: the CA directory).
#[derive(Clone)]
pub(crate) struct SharedStore(pub Arc<dyn Store>);

impl fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.describe())
    }
}
