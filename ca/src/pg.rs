//! [`PgStore`]: the CA's shared records in PostgreSQL (`--store postgres://…`), so several
//! `ca serve` replicas issue from one inventory.
//!
//! - Single use is enforced by the database: `UPDATE … SET uses_left = uses_left - 1 WHERE
//!   sha256 = $1 AND uses_left > 0 AND expires > $2` (row lock), never by a process.
//! - Serials are unique by a unique index; CRL numbers come from a sequence (monotonic across
//!   replicas).
//! - Versioned migrations (`gatehouse_schema_version`) run at connect under an advisory lock,
//!   so replicas starting together apply each version once.
//! - A pool (deadpool, up to 16 connections); a broken connection is dropped and re-made, so a
//!   database that comes back is used again without a restart. While it is away every call
//!   fails with [`CaError::StoreUnavailable`] (`ca serve` answers 503).
//! - TLS with rustls (aws-lc-rs) when the URL says `sslmode=require` (the CA certificate from
//!   `PGSSLROOTCERT`); the password is never printed ([`redact`]).
//! - Async client, synchronous [`Store`]: calls block on the store's own small runtime, from
//!   threads that may block (`spawn_blocking`, the CLI).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::SslMode;

use crate::CaError;
use crate::inventory::Record;
use crate::ledger::{Store, TokenRow};

/// Versioned schema: (version, SQL). Append only; never edit an applied version.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE gatehouse_records (
         id BIGSERIAL PRIMARY KEY,
         kind TEXT NOT NULL CHECK (kind IN ('issued', 'revoked')),
         serial TEXT NOT NULL,
         record JSONB NOT NULL,
         recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
     );
     CREATE UNIQUE INDEX gatehouse_records_issued_serial ON gatehouse_records (serial) WHERE kind = 'issued';
     CREATE INDEX gatehouse_records_revoked ON gatehouse_records (serial) WHERE kind = 'revoked';
     CREATE TABLE gatehouse_tokens (
         sha256 TEXT PRIMARY KEY,
         spiffe_id TEXT NOT NULL,
         expires BIGINT NOT NULL,
         uses_left INTEGER NOT NULL CHECK (uses_left >= 0),
         created_at TIMESTAMPTZ NOT NULL DEFAULT now()
     );
     CREATE SEQUENCE gatehouse_crl_number;",
)];

/// Advisory lock key of the migrations ("gatehouse" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x6761_7465_686f_7573;

/// How long a call waits for a pooled connection (or to make one) before it answers 503.
const POOL_TIMEOUT: Duration = Duration::from_secs(3);

/// The CA's records in PostgreSQL.
pub struct PgStore {
    pool: Pool,
    rt: Option<tokio::runtime::Runtime>,
    described: String,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // A runtime must not be dropped where blocking is forbidden (an async task).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `url` with the password replaced by `***` (for messages and logs).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<connection string>".into();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let host = match host.split_once('?') {
        Some((h, q)) => {
            let q: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=***".into(),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{h}?{}", q.join("&"))
        }
        None => host.to_owned(),
    };
    match auth {
        Some(a) => {
            let user = a.split_once(':').map_or(a, |(u, _)| u);
            let masked = if a.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{masked}@{host}")
        }
        None => format!("{scheme}://{host}"),
    }
}

fn unavailable(described: &str) -> impl Fn(String) -> CaError + '_ {
    move |detail| CaError::StoreUnavailable {
        store: described.to_owned(),
        detail,
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/db?sslmode=…`), runs the
    /// migrations and returns the store.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`] when the database cannot be reached or migrated;
    /// [`CaError::StoreConfig`] for a bad URL or TLS setting.
    pub fn connect(url: &str) -> Result<Arc<PgStore>, CaError> {
        let described = redact(url);
        let bad = |detail: String| CaError::StoreConfig {
            store: described.clone(),
            detail,
        };
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| bad(format!("not a PostgreSQL URL: {e}")))?;
        config.connect_timeout(POOL_TIMEOUT);
        config.application_name("gatehouse-ca");
        let tls = tls_config(&mut config).map_err(bad)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ca-store")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the store runtime: {e}")))?;
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| bad(format!("cannot build the connection pool: {e}")))?;
        let store = PgStore {
            pool,
            rt: Some(rt),
            described,
        };
        store.migrate()?;
        Ok(Arc::new(store))
    }

    fn run<T>(
        &self,
        f: impl AsyncFnOnce(&mut deadpool_postgres::Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, CaError> {
        let down = unavailable(&self.described);
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| down("the store is shut down".into()))?;
        rt.block_on(async {
            let mut client = self.pool.get().await.map_err(|e| down(e.to_string()))?;
            f(&mut client).await.map_err(|e| {
                // The pool drops a closed connection at its next checkout.
                down(db_error_text(&e))
            })
        })
    }

    fn migrate(&self) -> Result<(), CaError> {
        self.run(async |client| {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS gatehouse_schema_version (
                     version INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await?;
            let applied: i32 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM gatehouse_schema_version",
                    &[],
                )
                .await?
                .get(0);
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO gatehouse_schema_version (version) VALUES ($1)",
                    &[version],
                )
                .await?;
            }
            tx.commit().await
        })
    }

    /// The schema version the database is at.
    ///
    /// # Errors
    /// [`CaError::StoreUnavailable`].
    pub fn schema_version(&self) -> Result<i32, CaError> {
        self.run(async |c| {
            Ok(
                c.query_one("SELECT MAX(version) FROM gatehouse_schema_version", &[])
                    .await?
                    .get(0),
            )
        })
    }
}

/// The text of a database error (its SQLSTATE message, never the connection string).
fn db_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// rustls for `sslmode=require` (roots from `PGSSLROOTCERT`); `prefer` without roots becomes
/// `disable` (say so), since a handshake we cannot verify would fail anyway.
fn tls_config(
    config: &mut tokio_postgres::Config,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let root_file = std::env::var_os("PGSSLROOTCERT");
    if let Some(path) = &root_file {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("PGSSLROOTCERT {}: {e}", path.to_string_lossy()))?
        {
            let cert =
                cert.map_err(|e| format!("PGSSLROOTCERT {}: {e}", path.to_string_lossy()))?;
            roots
                .add(cert)
                .map_err(|e| format!("PGSSLROOTCERT {}: {e}", path.to_string_lossy()))?;
        }
    }
    match (config.get_ssl_mode(), root_file.is_some()) {
        (SslMode::Require, false) => {
            return Err(
                "sslmode=require needs the database's CA certificate: set PGSSLROOTCERT=<file> (RDS: the region's global-bundle.pem)"
                    .into(),
            );
        }
        (SslMode::Prefer, false) => {
            config.ssl_mode(SslMode::Disable);
        }
        _ => {}
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(client))
}

fn record_kind(record: &Record) -> (&'static str, &str) {
    match record {
        Record::Issued(i) => ("issued", &i.serial),
        Record::Revoked(r) => ("revoked", &r.serial),
    }
}

impl Store for PgStore {
    fn describe(&self) -> String {
        self.described.clone()
    }

    fn records(&self) -> Result<Vec<Record>, CaError> {
        let rows = self.run(async |c| {
            c.query(
                "SELECT record::text FROM gatehouse_records ORDER BY id",
                &[],
            )
            .await
        })?;
        rows.into_iter()
            .map(|row| {
                let text: String = row.get(0);
                serde_json::from_str(&text).map_err(|e| CaError::Corrupt {
                    path: self.described.clone().into(),
                    detail: format!("gatehouse_records: {e}"),
                })
            })
            .collect()
    }

    fn append(&self, record: &Record) -> Result<(), CaError> {
        let (kind, serial) = record_kind(record);
        let json = serde_json::to_string(record).map_err(|e| CaError::Corrupt {
            path: self.described.clone().into(),
            detail: e.to_string(),
        })?;
        self.run(async |c| {
            c.execute(
                "INSERT INTO gatehouse_records (kind, serial, record) VALUES ($1, $2, $3::text::jsonb)",
                &[&kind, &serial, &json],
            )
            .await
        })
        .map(|_| ())
    }

    fn serial_known(&self, serial: &str) -> Result<bool, CaError> {
        self.run(async |c| {
            Ok(c.query_opt(
                "SELECT 1 FROM gatehouse_records WHERE kind = 'issued' AND serial = $1",
                &[&serial],
            )
            .await?
            .is_some())
        })
    }

    fn revoked_serials(&self) -> Result<HashSet<String>, CaError> {
        self.run(async |c| {
            Ok(c.query(
                "SELECT DISTINCT serial FROM gatehouse_records WHERE kind = 'revoked'",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn create_token(&self, t: &TokenRow) -> Result<(), CaError> {
        let uses = i32::try_from(t.uses_left).unwrap_or(i32::MAX);
        self.run(async |c| {
            c.execute(
                "INSERT INTO gatehouse_tokens (sha256, spiffe_id, expires, uses_left) VALUES ($1, $2, $3, $4)",
                &[&t.sha256, &t.spiffe_id, &t.expires, &uses],
            )
            .await
        })
        .map(|_| ())
    }

    fn find_token(&self, sha256: &str) -> Result<Option<TokenRow>, CaError> {
        let row = self.run(async |c| {
            c.query_opt(
                "SELECT spiffe_id, expires, uses_left FROM gatehouse_tokens WHERE sha256 = $1",
                &[&sha256],
            )
            .await
        })?;
        Ok(row.map(|r| TokenRow {
            sha256: sha256.to_owned(),
            spiffe_id: r.get(0),
            expires: r.get(1),
            uses_left: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
        }))
    }

    fn spend_token(&self, sha256: &str, now: i64) -> Result<bool, CaError> {
        self.run(async |c| {
            Ok(c.query_opt(
                "UPDATE gatehouse_tokens SET uses_left = uses_left - 1
                 WHERE sha256 = $1 AND uses_left > 0 AND expires > $2 RETURNING uses_left",
                &[&sha256, &now],
            )
            .await?
            .is_some())
        })
    }

    fn next_crl_number(&self) -> Result<u64, CaError> {
        let n: i64 = self.run(async |c| {
            Ok(c.query_one("SELECT nextval('gatehouse_crl_number')", &[])
                .await?
                .get(0))
        })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn raise_crl_number(&self, floor: u64) -> Result<(), CaError> {
        let floor = i64::try_from(floor).unwrap_or(i64::MAX);
        if floor < 1 {
            return Ok(());
        }
        self.run(async |c| {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            let (last, called): (i64, bool) = {
                let r = tx
                    .query_one(
                        "SELECT last_value, is_called FROM gatehouse_crl_number",
                        &[],
                    )
                    .await?;
                (r.get(0), r.get(1))
            };
            if !called || last < floor {
                tx.execute(
                    "SELECT setval('gatehouse_crl_number', GREATEST($1, (SELECT last_value FROM gatehouse_crl_number)), true)",
                    &[&floor],
                )
                .await?;
            }
            tx.commit().await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://ca:s3cret@db.internal:5432/gatehouse?sslmode=require"),
            "postgres://ca:***@db.internal:5432/gatehouse?sslmode=require"
        );
        assert_eq!(
            redact("postgres://db/x?user=ca&password=s3cret"),
            "postgres://db/x?user=ca&password=***"
        );
        assert_eq!(redact("postgres://ca@db/x"), "postgres://ca@db/x");
        assert!(!redact("host=db password=s3cret").contains("s3cret"));
    }
}
