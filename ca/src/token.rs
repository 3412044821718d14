//! One-time join tokens (`ca token create`, the `token` credential of `POST /v1/enroll`).
//!
//! A token is 256 random bits, printed once as `gh1_<64 hex>`. The CA directory keeps only its
//! SHA-256 (in `tokens.json`, 0600, rewritten atomically under the directory lock) with the one
//! SPIFFE ID it is bound to, its expiry and its remaining uses. Spending a use and signing the
//! certificate happen under one hold of the lock ([`Authority::sign_csr_with_token`]), so two
//! concurrent enrollments can never both spend the last use. Entries expired for more than a day
//! are pruned on the next write; until then an expired or spent token is reported as such (the
//! caller learns what to do) rather than as unknown.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::inventory::fmt_time;
use crate::ledger::Store;
use crate::{Authority, CaError, SpiffeId, store};

/// File name of the token store inside the CA directory.
pub const TOKENS_FILE: &str = "tokens.json";
/// Prefix of every join token (recognisable in logs and secret scanners).
pub const TOKEN_PREFIX: &str = "gh1_";

/// A newly created join token: the secret is only in this value.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JoinToken {
    /// The secret, `gh1_<64 hex>`.
    pub token: String,
    /// The identity an enrollment with it receives.
    pub spiffe_id: SpiffeId,
    /// When it stops working.
    pub expires: OffsetDateTime,
    /// How many enrollments it allows.
    pub uses: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<StoredToken>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredToken {
    /// SHA-256 of the token string, lowercase hex.
    sha256: String,
    spiffe_id: String,
    /// Unix seconds.
    expires: i64,
    uses_left: u32,
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Authority {
    fn tokens_path(&self) -> PathBuf {
        self.dir().join(TOKENS_FILE)
    }

    fn read_tokens(&self) -> Result<TokenFile, CaError> {
        let path = self.tokens_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| CaError::Corrupt {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
            Err(e) => Err(CaError::io("cannot read", &path)(e)),
        }
    }

    fn write_tokens(&self, file: &mut TokenFile, now: i64) -> Result<(), CaError> {
        file.tokens.retain(|t| t.expires + 86_400 > now);
        let bytes = serde_json::to_vec_pretty(file).map_err(|e| CaError::Corrupt {
            path: self.tokens_path(),
            detail: e.to_string(),
        })?;
        store::write_atomic(&self.tokens_path(), &bytes, store::KEY_MODE)
    }

    /// Creates a join token for `id`, valid for `ttl` and `uses` enrollments.
    ///
    /// # Errors
    /// [`CaError::ForeignTrustDomain`], [`CaError::ZeroTtl`] (also for `uses == 0`: a token that
    /// can never be used), I/O errors.
    pub fn create_token(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        uses: u32,
    ) -> Result<JoinToken, CaError> {
        if !id.is_member_of(self.trust_domain()) {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                expected: self.trust_domain().clone(),
            });
        }
        let ttl = time::Duration::try_from(ttl).map_err(|_| CaError::ZeroTtl)?;
        if ttl <= time::Duration::ZERO || uses == 0 {
            return Err(CaError::ZeroTtl);
        }
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(store::random_bytes(32)?));
        let now = OffsetDateTime::now_utc();
        let expires = now + ttl;
        if let Some(store) = self.store() {
            store.create_token(&crate::ledger::TokenRow {
                sha256: hash(&token),
                spiffe_id: id.as_str().to_owned(),
                expires: expires.unix_timestamp(),
                uses_left: uses,
            })?;
            return Ok(JoinToken {
                token,
                spiffe_id: id.clone(),
                expires,
                uses,
            });
        }
        let _lock = self.lock()?;
        let mut file = self.read_tokens()?;
        file.tokens.push(StoredToken {
            sha256: hash(&token),
            spiffe_id: id.as_str().to_owned(),
            expires: expires.unix_timestamp(),
            uses_left: uses,
        });
        self.write_tokens(&mut file, now.unix_timestamp())?;
        Ok(JoinToken {
            token,
            spiffe_id: id.clone(),
            expires,
            uses,
        })
    }

    /// The SPIFFE ID of a usable `token`, without spending it. The caller holds the lock.
    pub(crate) fn peek_token_locked(&self, token: &str) -> Result<SpiffeId, CaError> {
        if let Some(store) = self.store() {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            return Self::store_peek_token(store, &hash(token), now);
        }
        let file = self.read_tokens()?;
        self.check_token(&file, token).map(|(id, _)| id)
    }

    /// Spends one use of `token` and returns its SPIFFE ID. The caller holds the directory lock.
    pub(crate) fn spend_token_locked(&self, token: &str) -> Result<SpiffeId, CaError> {
        if let Some(store) = self.store() {
            // One conditional UPDATE: the database decides which replica's request wins.
            let (h, now) = (hash(token), OffsetDateTime::now_utc().unix_timestamp());
            let id = Self::store_peek_token(store, &h, now)?;
            if !store.spend_token(&h, now)? {
                // Spent or expired since the peek: say which.
                Self::store_peek_token(store, &h, now)?;
                return Err(CaError::TokenUsed);
            }
            return Ok(id);
        }
        let mut file = self.read_tokens()?;
        let (id, i) = self.check_token(&file, token)?;
        file.tokens[i].uses_left -= 1;
        self.write_tokens(&mut file, OffsetDateTime::now_utc().unix_timestamp())?;
        Ok(id)
    }

    fn check_token(&self, file: &TokenFile, token: &str) -> Result<(SpiffeId, usize), CaError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let h = hash(token);
        let i = file
            .tokens
            .iter()
            .position(|t| t.sha256 == h)
            .ok_or(CaError::TokenUnknown)?;
        let t = &file.tokens[i];
        let id = usable_id(t.expires, t.uses_left, &t.spiffe_id, now, || {
            self.tokens_path()
        })?;
        Ok((id, i))
    }

    /// The SPIFFE ID of a usable token in the store (not spent).
    pub(crate) fn store_peek_token(
        store: &dyn Store,
        sha256: &str,
        now: i64,
    ) -> Result<SpiffeId, CaError> {
        let t = store.find_token(sha256)?.ok_or(CaError::TokenUnknown)?;
        usable_id(t.expires, t.uses_left, &t.spiffe_id, now, || {
            store.describe().into()
        })
    }
}

/// The identity of a token that has neither expired nor been spent, file or store alike
/// (`source` names where it is kept, for a corrupt identity).
fn usable_id(
    expires: i64,
    uses_left: u32,
    spiffe_id: &str,
    now: i64,
    source: impl FnOnce() -> PathBuf,
) -> Result<SpiffeId, CaError> {
    if expires <= now {
        return Err(CaError::TokenExpired {
            expired: OffsetDateTime::from_unix_timestamp(expires)
                .map(fmt_time)
                .unwrap_or_default(),
        });
    }
    if uses_left == 0 {
        return Err(CaError::TokenUsed);
    }
    SpiffeId::parse(spiffe_id).map_err(|e| CaError::Corrupt {
        path: source(),
        detail: e.to_string(),
    })
}
