//! The CA directory: [`Authority::init`], [`Authority::open`], root rotation and retirement.
//!
//! ```text
//! DIR/                 0700
//!   ca.json            trust domain, key type, generations (one per root), CRL number
//!   gen-1/root.pem     root certificate          gen-1/root.key          PKCS#8, 0600
//!   gen-1/intermediate.pem (with --intermediate) gen-1/intermediate.key  PKCS#8, 0600
//!   gen-1/root.crl.pem (with --intermediate) the root's last CRL, reused while root.key is offline
//!   bundle.pem         the roots of every generation not yet retired (the trust bundle)
//!   inventory.jsonl    append-only ledger: one JSON line per issued or revoked certificate
//!   .lock              flock(2) target: every write to the directory holds it
//! ```
//!
//! One CA per trust domain. Leaves are signed by the current generation's intermediate (or its
//! root when there is no intermediate). `ca.json` and `bundle.pem` are replaced atomically
//! (temp + rename) under the lock; key files are written once and never modified.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{Issuer, KeyPair, SignatureAlgorithm};

use crate::keystore::{self, CaKey, KeyStoreRef, Role};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::inventory::{self, Source, fmt_time, parse_time};
use crate::store::{self, DirLock, KEY_MODE, PUBLIC_MODE};
use crate::{CaError, TrustDomain, profile};

const STATE_FILE: &str = "ca.json";
const BUNDLE_FILE: &str = "bundle.pem";
const STATE_FORMAT: u32 = 1;

/// The key algorithm of the CA and of the leaves it generates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// The command-line and file spelling: `ecdsa-p256`, `ecdsa-p384`, `ed25519`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Ed25519 => "ed25519",
        }
    }

    pub(crate) fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    /// Generates a fresh key pair of this type.
    ///
    /// # Errors
    /// [`CaError::Generate`] if the crypto provider fails.
    pub fn generate(self) -> Result<KeyPair, CaError> {
        Ok(KeyPair::generate_for(self.algorithm())?)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::EcdsaP256, Self::EcdsaP384, Self::Ed25519]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown key type `{s}`: use ecdsa-p256, ecdsa-p384 or ed25519"))
    }
}

/// What `ca init` creates.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The one trust domain this CA issues for.
    pub trust_domain: TrustDomain,
    /// Key algorithm of the CA keys and of generated leaf keys.
    pub key_type: KeyType,
    /// Lifetime of the root (and intermediate).
    pub ttl: std::time::Duration,
    /// Root + intermediate (leaves signed by the intermediate) instead of a single root.
    pub intermediate: bool,
}

/// `ca.json`: the CA's mutable state, rewritten atomically under the lock.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaState {
    pub format: u32,
    pub trust_domain: String,
    pub key_type: KeyType,
    pub intermediate: bool,
    /// TTL of each root, in seconds (reused by `root rotate`).
    pub ca_ttl_secs: u64,
    pub current: u32,
    pub generations: Vec<Generation>,
    /// Number of the last CRL written (0: none yet).
    pub crl_number: u64,
    /// Where CRLs are published (`ca crl --out`, `ca revoke --crl`), newest last: `root rotate`
    /// and `root retire` republish there, so the published CRLs always cover every root in
    /// `bundle.pem`. Absent from `ca.json` until a CRL is written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crl_outputs: Vec<CrlOutput>,
    /// The PKCS#11 token holding the CA keys; absent when they are `gen-N/*.key` files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_store: Option<KeyStoreRef>,
}

/// A file the CA publishes its CRLs to, and the validity it was written with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CrlOutput {
    /// Absolute path of the CRL file.
    pub path: PathBuf,
    /// Validity (next-update minus this-update) of the CRLs written there, in seconds.
    pub ttl_secs: u64,
}

/// One root (and its intermediate): created by `init` or `root rotate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    /// 1, 2, ...
    pub id: u32,
    /// When it was created, RFC 3339.
    pub created: String,
    /// Expiry of its root, RFC 3339.
    pub not_after: String,
    /// Dropped from the bundle by `root retire`.
    pub retired: bool,
}

/// A CA certificate with its key, able to sign.
pub(crate) struct Signer {
    pub generation: u32,
    pub issuer: Issuer<'static, CaKey>,
    /// PEM of the certificates that go after the leaf in `cert.pem` (the intermediate, if any).
    pub chain_pem: String,
    pub not_after: OffsetDateTime,
}

/// An opened CA directory.
#[derive(Debug, Clone)]
pub struct Authority {
    dir: PathBuf,
    trust_domain: TrustDomain,
    key_type: KeyType,
    /// The shared store of records (`--store`); `None`: the CA directory.
    store: Option<crate::ledger::SharedStore>,
    /// How long a new root is in the published bundle before online issuance signs with it
    /// ([`Authority::with_online_lead`]); zero outside `ca serve`.
    online_lead: std::time::Duration,
}

impl Authority {
    /// Creates a new CA in `dir` (created with mode 0700; it must not exist or be empty).
    ///
    /// Everything is built in a temporary sibling directory and renamed into place, so a failed
    /// `init` leaves nothing behind and a concurrent one cannot interleave.
    ///
    /// # Errors
    /// [`CaError::AlreadyExists`] when `dir` holds anything; [`CaError::ZeroTtl`]; I/O errors.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Authority, CaError> {
        Self::init_with_key_store(dir, opts, None)
    }

    /// [`Authority::init`] with the CA keys generated in a PKCS#11 token (`Some`) instead of
    /// PKCS#8 files: no key file is written, `ca.json` records the token URI (without PIN).
    ///
    /// # Errors
    /// As [`Authority::init`], and [`CaError::KeyStore`] for a bad URI, an Ed25519 key type
    /// or any token failure.
    pub fn init_with_key_store(
        dir: &Path,
        opts: &InitOptions,
        key_store: Option<KeyStoreRef>,
    ) -> Result<Authority, CaError> {
        if is_non_empty_dir(dir) || (dir.exists() && !dir.is_dir()) {
            return Err(CaError::AlreadyExists {
                dir: dir.to_path_buf(),
            });
        }
        let ttl = Duration::try_from(opts.ttl).map_err(|_| CaError::ZeroTtl)?;
        if ttl <= Duration::ZERO {
            return Err(CaError::ZeroTtl);
        }
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let state = CaState {
            format: STATE_FORMAT,
            trust_domain: opts.trust_domain.as_str().to_owned(),
            key_type: opts.key_type,
            intermediate: opts.intermediate,
            ca_ttl_secs: opts.ttl.as_secs(),
            current: 1,
            generations: vec![Generation {
                id: 1,
                created: fmt_time(now),
                not_after: fmt_time(now + ttl),
                retired: false,
            }],
            crl_number: 0,
            crl_outputs: Vec::new(),
            key_store,
        };
        if let Some(ks) = &state.key_store {
            keystore::Pkcs11Uri::parse(&ks.uri)?;
            if opts.key_type == KeyType::Ed25519 {
                return Err(CaError::KeyStore {
                    detail: "a PKCS#11 key store holds ECDSA keys: use --key-type ecdsa-p256 or ecdsa-p384".into(),
                });
            }
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .map_err(CaError::io("cannot create directory", &parent))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ca".into());
        let tmp = parent.join(format!(
            ".{name}.init-{}",
            hex::encode(store::random_bytes(6)?)
        ));
        store::create_dir(&tmp, 0o700)?;
        let built = (|| {
            let files = build_generation(&state, 1, now)?;
            write_generation(&tmp, 1, &files)?;
            store::write_new(&tmp.join(inventory::INVENTORY_FILE), b"", PUBLIC_MODE)?;
            store::write_new(&tmp.join(".lock"), b"", KEY_MODE)?;
            write_state(&tmp, &state)?;
            write_bundle(&tmp, &state)?;
            store::sync_dir(&tmp)
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            use std::io::ErrorKind::{AlreadyExists, DirectoryNotEmpty, NotADirectory};
            // rename(2) replaces only a missing or empty directory: anything else is a CA (or
            // other files) that appeared since the check above.
            return Err(match e.kind() {
                DirectoryNotEmpty | AlreadyExists | NotADirectory => CaError::AlreadyExists {
                    dir: dir.to_path_buf(),
                },
                _ => CaError::io("cannot rename into", dir)(e),
            });
        }
        store::sync_dir(&parent)?;
        Authority::open(dir)
    }

    /// Opens an existing CA directory.
    ///
    /// # Errors
    /// [`CaError::NoCa`] when `dir` has no `ca.json`; [`CaError::Corrupt`] when it is unreadable.
    pub fn open(dir: &Path) -> Result<Authority, CaError> {
        let state = read_state(dir)?;
        let trust_domain =
            TrustDomain::parse(&state.trust_domain).map_err(|e| CaError::Corrupt {
                path: dir.join(STATE_FILE),
                detail: format!("trust domain: {e}"),
            })?;
        Ok(Authority {
            dir: dir.to_path_buf(),
            trust_domain,
            key_type: state.key_type,
            store: None,
            online_lead: std::time::Duration::ZERO,
        })
    }

    /// This authority as `ca serve` runs it (`--bundle-lead`): after `ca root rotate`, the new
    /// root signs enrollments, renewals and the server's own certificate only once it has been
    /// in the published bundle for `lead`. Sidecars poll the bundle (`ca_poll`), so each trusts
    /// the new root before any peer presents a leaf of it; until then online issuance is signed
    /// by the newest root that has been in the bundle for the lead (or by the current one when
    /// that root would end before the certificate). Offline commands (`issue`, `sign`, `rotate`) always
    /// sign with the current root: the operator hands out the bundle first.
    #[must_use]
    pub fn with_online_lead(mut self, lead: std::time::Duration) -> Self {
        self.online_lead = lead;
        self
    }

    /// The generation whose CA signs a certificate from `source` now (see
    /// [`Authority::with_online_lead`]): for online issuance, the newest root that has been in
    /// the bundle for the lead (two rotations within one lead skip the middle root until its
    /// own lead has passed), or the oldest one in the bundle when none has yet.
    pub(crate) fn signing_generation(&self, state: &CaState, source: Source) -> u32 {
        if !source.is_online() {
            return state.current;
        }
        // The current root is the newest one: once past its lead, it is the one chosen here.
        let now = OffsetDateTime::now_utc();
        let in_bundle = || state.generations.iter().filter(|g| !g.retired);
        in_bundle()
            .filter(|g| self.lead_ends(g).is_none_or(|at| at <= now))
            .map(|g| g.id)
            .max()
            .or_else(|| in_bundle().map(|g| g.id).min())
            .unwrap_or(state.current)
    }

    /// The current root generation and when it starts signing online issuance
    /// ([`Authority::with_online_lead`]), while an older root signs it meanwhile. `None` when
    /// the current root signs already: its lead has passed, or it is the only root in the
    /// bundle (a CA made a moment ago).
    ///
    /// # Errors
    /// The CA directory's state cannot be read.
    pub fn pending_online_root(&self) -> Result<Option<(u32, OffsetDateTime)>, CaError> {
        let state = self.state()?;
        if self.signing_generation(&state, Source::Renew) == state.current {
            return Ok(None);
        }
        let current = state.generations.iter().find(|g| g.id == state.current);
        Ok(current
            .and_then(|g| self.lead_ends(g))
            .map(|at| (state.current, at)))
    }

    /// When `generation` has been in the bundle for the online lead (`None`: its creation time
    /// is unreadable, so it counts as published long ago).
    fn lead_ends(&self, generation: &Generation) -> Option<OffsetDateTime> {
        // `created` has whole seconds: the root was in the bundle by the next one.
        parse_time(&generation.created).map(|t| t + Duration::SECOND + self.online_lead)
    }

    /// Keeps the inventory, join tokens, revocations and CRL numbers in `store` instead of the
    /// CA directory (keys, certificates and `bundle.pem` stay in the directory). The store's
    /// CRL number is raised to the directory's, so numbers never go back.
    ///
    /// # Errors
    /// Store errors.
    pub fn with_store(
        mut self,
        store: std::sync::Arc<dyn crate::ledger::Store>,
    ) -> Result<Authority, CaError> {
        store.raise_crl_number(read_state(&self.dir)?.crl_number)?;
        self.store = Some(crate::ledger::SharedStore(store));
        Ok(self)
    }

    /// The shared store, when the CA uses one.
    pub fn store(&self) -> Option<&dyn crate::ledger::Store> {
        self.store.as_ref().map(|s| &*s.0)
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The one trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Refuses an output path that lands inside the CA directory ([`CaError::OutputInsideCa`]).
    ///
    /// Every command that writes a file or directory the user named (`issue --out`,
    /// `sign --out`, `crl --out`, `revoke --crl`, the `rotate` directories) calls it before
    /// signing anything, so a typo or a link can never replace a CA key, `ca.json`, the bundle
    /// or the inventory. Both sides are resolved first ([`store::resolve_output`]): symlinks
    /// anywhere in the path, `..`, and a not-yet-existing file whose parent resolves inside.
    /// There is no exception, not even for a CRL: the CA directory is private (0700) and holds
    /// only what `ca` itself manages; published files go next to it.
    ///
    /// # Errors
    /// [`CaError::OutputInsideCa`]; [`CaError::Io`] when the CA directory cannot be resolved.
    pub fn check_output(&self, out: &Path) -> Result<(), CaError> {
        let dir =
            std::fs::canonicalize(&self.dir).map_err(CaError::io("cannot resolve", &self.dir))?;
        let resolved = store::resolve_output(out)?;
        if resolved.starts_with(&dir) {
            return Err(CaError::OutputInsideCa {
                path: out.to_path_buf(),
                resolved,
                dir,
            });
        }
        Ok(())
    }

    /// Key algorithm of the CA and of generated leaf keys.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The trust bundle: the roots of every generation not yet retired, PEM.
    ///
    /// # Errors
    /// [`CaError::Io`] when `bundle.pem` cannot be read.
    pub fn bundle_pem(&self) -> Result<String, CaError> {
        store::read_string(&self.dir.join(BUNDLE_FILE))
    }

    /// The generations (roots) of this CA, oldest first, and the current one's id.
    ///
    /// # Errors
    /// [`CaError::Corrupt`] or I/O errors reading `ca.json`.
    pub fn generations(&self) -> Result<(Vec<Generation>, u32), CaError> {
        let state = read_state(&self.dir)?;
        Ok((state.generations, state.current))
    }

    /// The files the CA publishes its CRLs to (recorded by [`Authority::write_crl`]), which
    /// root rotation and retirement rewrite.
    ///
    /// # Errors
    /// [`CaError::Corrupt`] or I/O errors reading `ca.json`.
    pub fn crl_outputs(&self) -> Result<Vec<CrlOutput>, CaError> {
        Ok(read_state(&self.dir)?.crl_outputs)
    }

    /// Where each CA key lives (PKCS#8 file or PKCS#11 token object), oldest generation first.
    ///
    /// # Errors
    /// [`CaError::Corrupt`] or I/O errors reading `ca.json`.
    pub fn key_locations(&self) -> Result<Vec<keystore::KeyLocation>, CaError> {
        let state = read_state(&self.dir)?;
        let mut out = Vec::new();
        for g in &state.generations {
            out.push(keystore::describe(
                state.key_store.as_ref(),
                g.id,
                Role::Root,
            ));
            if state.intermediate {
                out.push(keystore::describe(
                    state.key_store.as_ref(),
                    g.id,
                    Role::Intermediate,
                ));
            }
        }
        Ok(out)
    }

    /// Takes the directory lock (blocks until free).
    pub(crate) fn lock(&self) -> Result<DirLock, CaError> {
        DirLock::acquire(&self.dir)
    }

    pub(crate) fn state(&self) -> Result<CaState, CaError> {
        read_state(&self.dir)
    }

    pub(crate) fn save_state(&self, state: &CaState) -> Result<(), CaError> {
        write_state(&self.dir, state)
    }

    /// The signer of generation `id` (its intermediate, or its root without one).
    pub(crate) fn signer(&self, state: &CaState, id: u32) -> Result<Signer, CaError> {
        let gen_dir = self.dir.join(format!("gen-{id}"));
        let role = if state.intermediate {
            Role::Intermediate
        } else {
            Role::Root
        };
        self.load_signer(state, &gen_dir, role, id, state.intermediate)
    }

    /// The root of generation `id` as a signer (for CRLs covering intermediates).
    pub(crate) fn root_signer(&self, id: u32) -> Result<Signer, CaError> {
        let gen_dir = self.dir.join(format!("gen-{id}"));
        let state = self.state()?;
        self.load_signer(&state, &gen_dir, Role::Root, id, false)
    }

    fn load_signer(
        &self,
        state: &CaState,
        gen_dir: &Path,
        role: Role,
        id: u32,
        chain: bool,
    ) -> Result<Signer, CaError> {
        let name = match role {
            Role::Root => "root",
            Role::Intermediate => "intermediate",
        };
        let cert_path = &gen_dir.join(format!("{name}.pem"));
        let cert_pem = store::read_string(cert_path)?;
        let corrupt = |path: &Path, e: rcgen::Error| CaError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
        let key = match &state.key_store {
            Some(ks) => keystore::open(ks, state.key_type, id, role)?,
            None => {
                let key_path = &gen_dir.join(format!("{name}.key"));
                let key_pem = store::read_string(key_path)?;
                CaKey::File(KeyPair::from_pem(&key_pem).map_err(|e| corrupt(key_path, e))?)
            }
        };
        let not_after = crate::inspect::not_after_of_pem(&cert_pem, cert_path)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| corrupt(cert_path, e))?;
        Ok(Signer {
            generation: id,
            issuer,
            chain_pem: if chain { cert_pem } else { String::new() },
            not_after,
        })
    }

    /// Creates a new root (and intermediate) and makes it current; `bundle.pem` then holds the old
    /// and new roots until [`Authority::retire_roots`]. Leaves issued afterwards chain to the new root.
    ///
    /// Every CRL file the CA publishes to ([`Authority::crl_outputs`]) is rewritten with CRLs of
    /// the new root's CAs too, *before* `bundle.pem` names the new root: a verifier that
    /// requires a CRL from each issuer (webpki's default) never sees the new root without one.
    ///
    /// # Errors
    /// Generation and I/O errors; `ca.json` and `bundle.pem` are unchanged on error (a CRL file
    /// already rewritten then also names a root that does not exist yet, which is harmless).
    pub fn rotate_root(&self) -> Result<Generation, CaError> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let now = OffsetDateTime::now_utc();
        let id = state.generations.iter().map(|g| g.id).max().unwrap_or(0) + 1;
        let ttl = Duration::seconds(i64::try_from(state.ca_ttl_secs).unwrap_or(i64::MAX / 2));
        let generation = Generation {
            id,
            created: fmt_time(now),
            not_after: fmt_time(now + ttl),
            retired: false,
        };
        let files = build_generation(&state, id, now)?;
        let gen_dir = self.dir.join(format!("gen-{id}"));
        let _ = std::fs::remove_dir_all(&gen_dir); // leftover of an interrupted rotation, never referenced
        write_generation(&self.dir, id, &files)?;
        state.generations.push(generation.clone());
        state.current = id;
        self.republish_crls(&mut state)?;
        write_bundle(&self.dir, &state)?;
        self.save_state(&state)?;
        Ok(generation)
    }

    /// Drops every non-current root from `bundle.pem`.
    ///
    /// Refuses with [`CaError::RootInUse`] while any unexpired, unrevoked certificate in the
    /// inventory chains to an old root, unless `force` (then those certificates stop verifying).
    /// Certificates already replaced by `ca rotate` (state `superseded`) do not block: their
    /// directories hold the re-issued certificate, which chains to the current root.
    /// Returns the retired generations and how many live certificates were cut off by `force`.
    /// Then the published CRL files ([`Authority::crl_outputs`]) are rewritten without the
    /// retired CAs (after `bundle.pem`: until then the old files still cover every root).
    ///
    /// # Errors
    /// [`CaError::NothingToRetire`], [`CaError::RootInUse`], I/O errors (a CRL file that cannot
    /// be rewritten is reported after the root was retired; the old file still covers the
    /// bundle).
    pub fn retire_roots(&self, force: bool) -> Result<(Vec<u32>, usize), CaError> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let old: Vec<u32> = state
            .generations
            .iter()
            .filter(|g| !g.retired && g.id != state.current)
            .map(|g| g.id)
            .collect();
        if old.is_empty() {
            return Err(CaError::NothingToRetire);
        }
        let now = OffsetDateTime::now_utc();
        let live: Vec<_> = self
            .entries(now)?
            .into_iter()
            .filter(|e| old.contains(&e.generation) && e.state == inventory::CertState::Valid)
            .collect();
        if let (Some(first), false) = (live.first(), force) {
            return Err(CaError::RootInUse {
                count: live.len(),
                first_serial: first.serial.clone(),
                first_id: first.spiffe_id.clone().unwrap_or_else(|| "-".into()),
            });
        }
        for g in &mut state.generations {
            if old.contains(&g.id) {
                g.retired = true;
            }
        }
        write_bundle(&self.dir, &state)?;
        self.save_state(&state)?;
        self.republish_crls(&mut state)?;
        self.save_state(&state)?;
        Ok((old, live.len()))
    }
}

fn is_non_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// PEM files of one generation: (root cert, root key, optional (intermediate cert, key)).
/// The keys are `None` when they live in a PKCS#11 token.
struct GenerationFiles {
    root_pem: String,
    root_key: Option<String>,
    intermediate: Option<(String, Option<String>)>,
}

/// A new CA key: a PKCS#8 key in memory, or generated inside the configured token.
fn new_ca_key(state: &CaState, id: u32, role: Role) -> Result<CaKey, CaError> {
    match &state.key_store {
        Some(ks) => keystore::generate(ks, state.key_type, id, role),
        None => Ok(CaKey::File(state.key_type.generate()?)),
    }
}

/// The PKCS#8 PEM to write for a file key; `None` for a token key.
fn key_file(key: &CaKey) -> Option<String> {
    match key {
        CaKey::File(k) => Some(k.serialize_pem()),
        CaKey::Token(_) => None,
    }
}

fn build_generation(
    state: &CaState,
    id: u32,
    now: OffsetDateTime,
) -> Result<GenerationFiles, CaError> {
    let ttl = Duration::seconds(i64::try_from(state.ca_ttl_secs).unwrap_or(i64::MAX / 2));
    let td = &state.trust_domain;
    let root_key = new_ca_key(state, id, Role::Root)?;
    let path_len = u8::from(state.intermediate);
    let root_params = profile::ca_params(
        &format!("Gatehouse root CA {td} g{id}"),
        path_len,
        now,
        now + ttl,
    )?;
    let root = root_params.self_signed(&root_key)?;
    let intermediate = if state.intermediate {
        let key = new_ca_key(state, id, Role::Intermediate)?;
        let params = profile::ca_params(
            &format!("Gatehouse intermediate CA {td} g{id}"),
            0,
            now,
            now + ttl,
        )?;
        let issuer = Issuer::new(root_params, &root_key);
        let cert = params.signed_by(&key, &issuer)?;
        Some((cert.pem(), key_file(&key)))
    } else {
        None
    };
    Ok(GenerationFiles {
        root_pem: root.pem(),
        root_key: key_file(&root_key),
        intermediate,
    })
}

fn write_generation(dir: &Path, id: u32, files: &GenerationFiles) -> Result<(), CaError> {
    let gen_dir = dir.join(format!("gen-{id}"));
    store::create_dir(&gen_dir, 0o700)?;
    if let Some(key) = &files.root_key {
        store::write_new(&gen_dir.join("root.key"), key.as_bytes(), KEY_MODE)?;
    }
    store::write_new(
        &gen_dir.join("root.pem"),
        files.root_pem.as_bytes(),
        PUBLIC_MODE,
    )?;
    if let Some((cert, key)) = &files.intermediate {
        if let Some(key) = key {
            store::write_new(&gen_dir.join("intermediate.key"), key.as_bytes(), KEY_MODE)?;
        }
        store::write_new(
            &gen_dir.join("intermediate.pem"),
            cert.as_bytes(),
            PUBLIC_MODE,
        )?;
    }
    store::sync_dir(&gen_dir)
}

fn write_bundle(dir: &Path, state: &CaState) -> Result<(), CaError> {
    let mut bundle = String::new();
    for g in state.generations.iter().filter(|g| !g.retired) {
        bundle.push_str(&store::read_string(
            &dir.join(format!("gen-{}/root.pem", g.id)),
        )?);
    }
    store::write_atomic(&dir.join(BUNDLE_FILE), bundle.as_bytes(), PUBLIC_MODE)
}

fn write_state(dir: &Path, state: &CaState) -> Result<(), CaError> {
    let mut json = serde_json::to_string_pretty(state).map_err(|e| CaError::Corrupt {
        path: dir.join(STATE_FILE),
        detail: e.to_string(),
    })?;
    json.push('\n');
    store::write_atomic(&dir.join(STATE_FILE), json.as_bytes(), PUBLIC_MODE)
}

fn read_state(dir: &Path) -> Result<CaState, CaError> {
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CaError::NoCa {
                dir: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(CaError::io("cannot read", &path)(e)),
    };
    let state: CaState = serde_json::from_str(&text).map_err(|e| CaError::Corrupt {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    if state.format != STATE_FORMAT {
        return Err(CaError::Corrupt {
            path,
            detail: format!("unsupported format {}", state.format),
        });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_names_round_trip() {
        for k in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519] {
            assert_eq!(k.as_str().parse::<KeyType>(), Ok(k));
        }
        assert!("rsa".parse::<KeyType>().is_err());
        assert_eq!(KeyType::default(), KeyType::EcdsaP256);
    }

    #[test]
    fn init_into_an_existing_empty_directory_works_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("ca");
        std::fs::create_dir(&dir).expect("mkdir");
        let opts = InitOptions {
            trust_domain: TrustDomain::parse("t.internal").expect("td"),
            key_type: KeyType::Ed25519,
            ttl: std::time::Duration::from_secs(3600),
            intermediate: false,
        };
        let ca = Authority::init(&dir, &opts).expect("init");
        assert_eq!(ca.trust_domain().as_str(), "t.internal");
        let mode = std::fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(matches!(
            Authority::init(&dir, &opts),
            Err(CaError::AlreadyExists { .. })
        ));
        assert!(matches!(
            Authority::open(tmp.path()),
            Err(CaError::NoCa { .. })
        ));
        let zero = InitOptions {
            ttl: std::time::Duration::ZERO,
            ..opts
        };
        assert!(matches!(
            Authority::init(&tmp.path().join("z"), &zero),
            Err(CaError::ZeroTtl)
        ));
        assert!(!tmp.path().join("z").exists());
    }

    /// Online issuance signs with the newest root that has been in the bundle for the lead;
    /// offline issuance with the current root. Two rotations within one lead skip the middle
    /// root until its own lead has passed; none past its lead: the oldest root in the bundle.
    #[test]
    fn online_issuance_waits_for_each_root_s_lead() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("ca");
        let opts = InitOptions {
            trust_domain: TrustDomain::parse("t.internal").expect("td"),
            key_type: KeyType::EcdsaP256,
            ttl: std::time::Duration::from_secs(3600),
            intermediate: false,
        };
        let ca = Authority::init(&dir, &opts)
            .expect("init")
            .with_online_lead(std::time::Duration::from_secs(60));
        assert_eq!(
            ca.pending_online_root().expect("state"),
            None,
            "a CA made a moment ago signs with its only root: nothing pending"
        );
        ca.rotate_root().expect("root 2");
        assert_eq!(
            ca.pending_online_root().expect("state").map(|(g, _)| g),
            Some(2),
            "root 1 signs until root 2's lead has passed"
        );
        ca.rotate_root().expect("root 3");
        let now = OffsetDateTime::now_utc();
        let signing = |ages_secs: [i64; 3], source: Source, retire_first: bool| {
            let mut state = ca.state().expect("state");
            for (g, age) in state.generations.iter_mut().zip(ages_secs) {
                g.created = fmt_time(now - Duration::seconds(age));
            }
            state.generations[0].retired = retire_first;
            ca.signing_generation(&state, source)
        };
        // Roots 2 and 3 made just now: the online side stays on root 1.
        assert_eq!(signing([600, 0, 0], Source::Renew, false), 1);
        assert_eq!(
            signing([600, 0, 0], Source::Issue, false),
            3,
            "offline: the current root"
        );
        // Root 2 past its lead, root 3 not yet.
        assert_eq!(signing([600, 120, 10], Source::Enroll, false), 2);
        assert_eq!(signing([600, 120, 120], Source::Serve, false), 3);
        // No root past its lead (a CA made a moment ago): the oldest in the bundle.
        assert_eq!(signing([5, 5, 5], Source::Renew, false), 1);
        // A retired root never signs.
        assert_eq!(signing([600, 0, 0], Source::Renew, true), 2);
    }
}
