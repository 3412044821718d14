//! Where the CA's private keys live: PKCS#8 files in the CA directory (the default) or objects
//! in a PKCS#11 token (`ca init --key-store "pkcs11:token=…;object=…"`).
//!
//! A token key never leaves the token: it is generated there (`CKA_SENSITIVE`, not
//! `CKA_EXTRACTABLE`), found again by its label, and every certificate and CRL signature is a
//! `C_Sign` with `CKM_ECDSA` over a digest computed here. What `ca.json` records is the
//! RFC 7512 URI without any PIN (`pin-value` is dropped; `pin-source`, a file *name*, is kept)
//! and the module path. The PIN comes from, in order: `--pin-env VAR`, the URI's `pin-source`,
//! `GATEHOUSE_PKCS11_PIN`. The module from `--pkcs11-module`, `GATEHOUSE_PKCS11_MODULE`, the
//! URI's `module-path`, then the path recorded at `init`.
//!
//! The PKCS#11 library is loaded and initialized once per process; each key keeps one logged-in
//! session behind a mutex (sessions are not shareable between threads), cached by module, token
//! and label, so `ca serve` does not log in per request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeType, KeyType as P11KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{CaError, KeyType};

/// Environment variable naming the PKCS#11 module (shared library) when no option does.
pub const MODULE_ENV: &str = "GATEHOUSE_PKCS11_MODULE";
/// Environment variable holding the token's user PIN when no option or `pin-source` does.
pub const PIN_ENV: &str = "GATEHOUSE_PKCS11_PIN";

/// Process-wide overrides from the command line (`--pkcs11-module`, `--pin-env`).
#[derive(Debug, Clone, Default)]
pub struct Pkcs11Options {
    /// The module to load, overriding the environment and `ca.json`.
    pub module: Option<PathBuf>,
    /// The environment variable to read the PIN from, overriding `pin-source` and
    /// [`PIN_ENV`].
    pub pin_env: Option<String>,
}

static OPTIONS: OnceLock<Pkcs11Options> = OnceLock::new();

/// A `pin-value` given in the `ca init --key-store` URI: used by this process, never recorded.
static URI_PIN: OnceLock<String> = OnceLock::new();

/// Sets the process-wide PKCS#11 options (the `ca` binary does it once, before any command).
/// A second call is ignored.
pub fn configure(opts: Pkcs11Options) {
    let _ = OPTIONS.set(opts);
}

fn options() -> &'static Pkcs11Options {
    OPTIONS.get_or_init(Pkcs11Options::default)
}

/// The key store recorded in `ca.json` (absent: PKCS#8 files in the CA directory).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyStoreRef {
    /// RFC 7512 URI naming the token and the object label prefix, without any PIN.
    pub uri: String,
    /// Path of the PKCS#11 module used at `init` (used when no option or environment names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<PathBuf>,
}

impl KeyStoreRef {
    /// The reference `ca init --key-store URI` records: the URI without PIN, and the module
    /// that will be used (option, environment or the URI's `module-path`).
    ///
    /// # Errors
    /// [`CaError::KeyStore`] for a bad URI or when no module is named anywhere.
    pub fn for_init(uri: &str) -> Result<KeyStoreRef, CaError> {
        let parsed = Pkcs11Uri::parse(uri)?;
        let module = module_path(&parsed, None)?;
        if let Some(pin) = &parsed.pin_value {
            let _ = URI_PIN.set(pin.clone());
        }
        Ok(KeyStoreRef {
            uri: parsed.stored(),
            module: Some(module),
        })
    }
}

/// Where one CA key lives, as `ca init`, `ca list` and `ca inspect --dir` print it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyLocation {
    /// The generation (root) the key belongs to.
    pub generation: u32,
    /// `root` or `intermediate`.
    pub role: &'static str,
    /// `file gen-N/root.key` or the key's `pkcs11:` URI.
    pub location: String,
}

/// A parsed `pkcs11:` URI (RFC 7512): the attributes this CA uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`: the token label (required).
    pub token: String,
    /// `object=`: the label prefix of the CA's keys (default `gatehouse-ca`).
    pub object: String,
    /// `module-path=` (query).
    pub module_path: Option<PathBuf>,
    /// `pin-source=` (query): a file holding the PIN (`file:` URI or plain path).
    pub pin_source: Option<PathBuf>,
    /// `pin-value=` (query): accepted, never stored.
    pin_value: Option<String>,
}

impl Pkcs11Uri {
    /// Parses `pkcs11:token=…;object=…[?module-path=…&pin-source=…]`.
    ///
    /// # Errors
    /// [`CaError::KeyStore`] naming the attribute at fault.
    pub fn parse(uri: &str) -> Result<Pkcs11Uri, CaError> {
        let bad = |detail: String| CaError::KeyStore {
            detail: format!("key store `{}`: {detail}", redact(uri)),
        };
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad("only pkcs11: URIs (RFC 7512) are supported".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut out = Pkcs11Uri {
            token: String::new(),
            object: "gatehouse-ca".into(),
            module_path: None,
            pin_source: None,
            pin_value: None,
        };
        let attrs = path
            .split(';')
            .map(|a| (a, false))
            .chain(query.split('&').map(|a| (a, true)));
        for (attr, in_query) in attrs.filter(|(a, _)| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| bad(format!("`{attr}` is not name=value")))?;
            let v = pct_decode(v).ok_or_else(|| bad(format!("bad %-escape in `{k}`")))?;
            match (k, in_query) {
                ("token", false) => out.token = v,
                ("object", false) => out.object = v,
                ("module-path", true) => out.module_path = Some(PathBuf::from(v)),
                ("pin-source", true) => {
                    let p = v.strip_prefix("file:").unwrap_or(&v);
                    out.pin_source = Some(PathBuf::from(p));
                }
                ("pin-value", true) => out.pin_value = Some(v),
                ("type", false) if v == "private" => {}
                _ => {
                    return Err(bad(format!(
                        "unsupported attribute `{k}`: use token=…;object=… and the query attributes module-path, pin-source or pin-value"
                    )));
                }
            }
        }
        if out.token.is_empty() {
            return Err(bad("`token=<label>` is required".into()));
        }
        if out.object.is_empty() || out.object.contains('/') {
            return Err(bad(
                "`object=` must be a non-empty label prefix without `/`".into(),
            ));
        }
        Ok(out)
    }

    /// The URI to record: token, object and `pin-source` (a file name, not a secret); never
    /// `pin-value` or `module-path` (recorded separately).
    pub fn stored(&self) -> String {
        let mut s = format!(
            "pkcs11:token={};object={}",
            pct_encode(&self.token),
            pct_encode(&self.object)
        );
        if let Some(p) = &self.pin_source {
            s.push_str("?pin-source=");
            s.push_str(&pct_encode(&p.to_string_lossy()));
        }
        s
    }

    /// The label of one CA key: `<object>-g<generation>-<role>`.
    pub fn label(&self, generation: u32, role: Role) -> String {
        format!("{}-g{generation}-{}", self.object, role.as_str())
    }

    /// The URI of one key, as `ca inspect`/`ca list` show it.
    pub fn key_uri(&self, generation: u32, role: Role) -> String {
        format!(
            "pkcs11:token={};object={};type=private",
            pct_encode(&self.token),
            pct_encode(&self.label(generation, role))
        )
    }
}

/// A URI with any `pin-value` blanked, for messages.
fn redact(uri: &str) -> String {
    match uri.find("pin-value=") {
        Some(i) => {
            let end = uri[i..].find('&').map_or(uri.len(), |e| i + e);
            format!("{}pin-value=***{}", &uri[..i], &uri[end..])
        }
        None => uri.to_owned(),
    }
}

fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/:".contains(&c) {
            out.push(char::from(c));
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// Which CA key of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The root.
    Root,
    /// The intermediate.
    Intermediate,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Intermediate => "intermediate",
        }
    }
}

/// A CA signing key: a PKCS#8 key in memory, or a key held by a PKCS#11 token.
pub enum CaKey {
    /// Read from `gen-N/*.key`.
    File(KeyPair),
    /// A token object; only its public half is here.
    Token(Arc<TokenKey>),
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::File(k) => k.der_bytes(),
            CaKey::Token(k) => &k.public,
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            CaKey::File(k) => k.algorithm(),
            CaKey::Token(k) => k.key_type.algorithm(),
        }
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::File(k) => k.sign(msg),
            CaKey::Token(k) => k.sign(msg).map_err(|e| {
                report_sign_failure(&e);
                rcgen::Error::RemoteKeyError
            }),
        }
    }
}

/// rcgen's error cannot carry the cause; print it so the operator sees why the token refused.
fn report_sign_failure(e: &CaError) {
    eprintln!("warning: PKCS#11 signature failed: {e}");
}

/// A private key inside a PKCS#11 token.
pub struct TokenKey {
    key_type: KeyType,
    /// The uncompressed EC point (what rcgen puts in subjectPublicKey).
    public: Vec<u8>,
    handle: ObjectHandle,
    session: Mutex<Session>,
}

impl TokenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, CaError> {
        let digest = match self.key_type {
            KeyType::EcdsaP384 => sha2::Sha384::digest(msg).to_vec(),
            _ => sha2::Sha256::digest(msg).to_vec(),
        };
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let raw = session
            .sign(&Mechanism::Ecdsa, self.handle, &digest)
            .map_err(p11("C_Sign"))?;
        ecdsa_raw_to_der(&raw).ok_or_else(|| CaError::KeyStore {
            detail: format!("the token returned a {}-byte ECDSA signature", raw.len()),
        })
    }
}

fn p11(what: &'static str) -> impl Fn(P11Error) -> CaError {
    move |e| CaError::KeyStore {
        detail: format!("{what}: {e}"),
    }
}

/// Where one CA key lives, for `ca inspect --dir` and `ca list`.
pub fn describe(store: Option<&KeyStoreRef>, generation: u32, role: Role) -> KeyLocation {
    let location = match store.and_then(|s| Pkcs11Uri::parse(&s.uri).ok()) {
        Some(uri) => uri.key_uri(generation, role),
        None => format!("file gen-{generation}/{}.key", role.as_str()),
    };
    KeyLocation {
        generation,
        role: role.as_str(),
        location,
    }
}

struct Module {
    path: PathBuf,
    ctx: Pkcs11,
    keys: Mutex<HashMap<(String, String), Arc<TokenKey>>>,
}

static MODULE: OnceLock<Mutex<Option<Arc<Module>>>> = OnceLock::new();

fn module_path(uri: &Pkcs11Uri, recorded: Option<&Path>) -> Result<PathBuf, CaError> {
    options()
        .module
        .clone()
        .or_else(|| std::env::var_os(MODULE_ENV).map(PathBuf::from))
        .or_else(|| uri.module_path.clone())
        .or_else(|| recorded.map(Path::to_path_buf))
        .ok_or_else(|| CaError::KeyStore {
            detail: format!(
                "no PKCS#11 module: pass --pkcs11-module <lib.so> or set {MODULE_ENV} (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
            ),
        })
}

fn module(path: &Path) -> Result<Arc<Module>, CaError> {
    let mut slot = MODULE
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(m) = slot.as_ref() {
        if m.path == path {
            return Ok(m.clone());
        }
        return Err(CaError::KeyStore {
            detail: format!(
                "this process already uses the PKCS#11 module {}; one module per process",
                m.path.display()
            ),
        });
    }
    let ctx = Pkcs11::new(path).map_err(|e| CaError::KeyStore {
        detail: format!("cannot load PKCS#11 module {}: {e}", path.display()),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(p11("C_Initialize")(e)),
    }
    let m = Arc::new(Module {
        path: path.to_path_buf(),
        ctx,
        keys: Mutex::new(HashMap::new()),
    });
    *slot = Some(m.clone());
    Ok(m)
}

fn pin(uri: &Pkcs11Uri) -> Result<AuthPin, CaError> {
    let missing = || CaError::KeyStore {
        detail: format!(
            "no PIN for token `{}`: set {PIN_ENV}, pass --pin-env <VAR>, or add ?pin-source=<file> to the key-store URI",
            uri.token
        ),
    };
    if let Some(var) = &options().pin_env {
        return std::env::var(var)
            .map(AuthPin::from)
            .map_err(|_| CaError::KeyStore {
                detail: format!("--pin-env {var}: the variable is not set"),
            });
    }
    if let Some(v) = uri.pin_value.as_ref().or(URI_PIN.get()) {
        return Ok(AuthPin::from(v.clone()));
    }
    if let Some(path) = &uri.pin_source {
        let text =
            std::fs::read_to_string(path).map_err(CaError::io("cannot read PIN file", path))?;
        return Ok(AuthPin::from(
            text.trim_end_matches(['\r', '\n']).to_owned(),
        ));
    }
    std::env::var(PIN_ENV)
        .map(AuthPin::from)
        .map_err(|_| missing())
}

/// A logged-in read-write session on the token the URI names.
fn open_session(m: &Module, uri: &Pkcs11Uri) -> Result<Session, CaError> {
    let slots = m
        .ctx
        .get_slots_with_initialized_token()
        .map_err(p11("C_GetSlotList"))?;
    let mut labels = Vec::new();
    for slot in slots {
        let info = m.ctx.get_token_info(slot).map_err(p11("C_GetTokenInfo"))?;
        let label = info.label().trim_end().to_owned();
        if label == uri.token {
            let session = m.ctx.open_rw_session(slot).map_err(p11("C_OpenSession"))?;
            match session.login(UserType::User, Some(&pin(uri)?)) {
                Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(p11("C_Login")(e)),
            }
            return Ok(session);
        }
        labels.push(label);
    }
    Err(CaError::KeyStore {
        detail: format!(
            "no token labelled `{}` in {} (tokens: {}); create one, e.g. `softhsm2-util --init-token --free --label {}`",
            uri.token,
            m.path.display(),
            if labels.is_empty() {
                "none".into()
            } else {
                labels.join(", ")
            },
            uri.token
        ),
    })
}

fn ec_params(key_type: KeyType) -> Result<Vec<u8>, CaError> {
    match key_type {
        // OID 1.2.840.10045.3.1.7 (prime256v1) and 1.3.132.0.34 (secp384r1), DER.
        KeyType::EcdsaP256 => Ok(vec![
            0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
        ]),
        KeyType::EcdsaP384 => Ok(vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]),
        KeyType::Ed25519 => Err(CaError::KeyStore {
            detail: "a PKCS#11 key store holds ECDSA keys: use --key-type ecdsa-p256 or ecdsa-p384"
                .into(),
        }),
    }
}

fn point_len(key_type: KeyType) -> usize {
    if key_type == KeyType::EcdsaP384 {
        97
    } else {
        65
    }
}

/// Generates a CA key inside the token (refuses when the label exists).
///
/// # Errors
/// [`CaError::KeyStore`] for every token failure, and when an object with the label exists.
pub fn generate(
    store: &KeyStoreRef,
    key_type: KeyType,
    generation: u32,
    role: Role,
) -> Result<CaKey, CaError> {
    let (uri, m) = resolve(store)?;
    let label = uri.label(generation, role);
    let session = open_session(&m, &uri)?;
    let existing = session
        .find_objects(&[Attribute::Label(label.clone().into_bytes())])
        .map_err(p11("C_FindObjects"))?;
    if !existing.is_empty() {
        return Err(CaError::KeyStore {
            detail: format!(
                "token `{}` already holds an object labelled `{label}`: choose another object= prefix (an existing key is never reused or overwritten)",
                uri.token
            ),
        });
    }
    let id = crate::store::random_bytes(16)?;
    let public_template = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(ec_params(key_type)?),
        Attribute::Label(label.clone().into_bytes()),
        Attribute::Id(id.clone()),
    ];
    let private_template = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Label(label.clone().into_bytes()),
        Attribute::Id(id),
    ];
    session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &public_template,
            &private_template,
        )
        .map_err(p11("C_GenerateKeyPair"))?;
    drop(session);
    find(&m, &uri, &label, key_type)
}

/// Opens a CA key held by the token (cached per process).
///
/// # Errors
/// [`CaError::KeyStore`] when the module, token, PIN or object is missing.
pub fn open(
    store: &KeyStoreRef,
    key_type: KeyType,
    generation: u32,
    role: Role,
) -> Result<CaKey, CaError> {
    let (uri, m) = resolve(store)?;
    find(&m, &uri, &uri.label(generation, role), key_type)
}

/// The parsed URI of `store` and its loaded module.
fn resolve(store: &KeyStoreRef) -> Result<(Pkcs11Uri, Arc<Module>), CaError> {
    let uri = Pkcs11Uri::parse(&store.uri)?;
    let m = module(&module_path(&uri, store.module.as_deref())?)?;
    Ok((uri, m))
}

fn find(m: &Module, uri: &Pkcs11Uri, label: &str, key_type: KeyType) -> Result<CaKey, CaError> {
    let cache_key = (uri.token.clone(), label.to_owned());
    if let Some(k) = m
        .keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&cache_key)
    {
        return Ok(CaKey::Token(k.clone()));
    }
    let session = open_session(m, uri)?;
    let one = |class: ObjectClass| -> Result<ObjectHandle, CaError> {
        let found = session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::KeyType(P11KeyType::EC),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(p11("C_FindObjects"))?;
        match found.as_slice() {
            [h] => Ok(*h),
            [] => Err(CaError::KeyStore {
                detail: format!(
                    "token `{}` holds no {} EC key labelled `{label}`",
                    uri.token,
                    if class == ObjectClass::PUBLIC_KEY {
                        "public"
                    } else {
                        "private"
                    }
                ),
            }),
            _ => Err(CaError::KeyStore {
                detail: format!(
                    "token `{}` holds several keys labelled `{label}`",
                    uri.token
                ),
            }),
        }
    };
    let handle = one(ObjectClass::PRIVATE_KEY)?;
    let public_handle = one(ObjectClass::PUBLIC_KEY)?;
    let attrs = session
        .get_attributes(public_handle, &[AttributeType::EcPoint])
        .map_err(p11("C_GetAttributeValue"))?;
    let point = attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .and_then(|p| unwrap_point(p, point_len(key_type)))
        .ok_or_else(|| CaError::KeyStore {
            detail: format!(
                "the public key `{label}` is not an uncompressed {} point",
                key_type.as_str()
            ),
        })?;
    let key = Arc::new(TokenKey {
        key_type,
        public: point,
        handle,
        session: Mutex::new(session),
    });
    m.keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(cache_key, key.clone());
    Ok(CaKey::Token(key))
}

/// `CKA_EC_POINT` is a DER OCTET STRING holding the point (some modules return the bare point).
fn unwrap_point(p: Vec<u8>, len: usize) -> Option<Vec<u8>> {
    if p.len() == len && p[0] == 0x04 {
        return Some(p);
    }
    let inner = match p.as_slice() {
        [0x04, n, rest @ ..] if usize::from(*n) == rest.len() && *n < 0x80 => rest,
        [0x04, 0x81, n, rest @ ..] if usize::from(*n) == rest.len() => rest,
        _ => return None,
    };
    (inner.len() == len && inner[0] == 0x04).then(|| inner.to_vec())
}

/// `r || s` (PKCS#11 CKM_ECDSA) to the DER `SEQUENCE { INTEGER r, INTEGER s }` X.509 wants.
fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let int = |v: &[u8]| {
        let v = match v.iter().position(|&b| b != 0) {
            Some(i) => &v[i..],
            None => &[0u8][..],
        };
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        out.push(u8::try_from(v.len() + usize::from(pad)).unwrap_or(0));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let (r, s) = (int(r), int(s));
    let body_len = r.len() + s.len();
    let mut der = vec![0x30];
    if body_len >= 0x80 {
        der.push(0x81);
    }
    der.push(u8::try_from(body_len).ok()?);
    der.extend(r);
    der.extend(s);
    Some(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parses_and_never_stores_the_pin() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=Gatehouse%20CA;object=fin?pin-value=1234&module-path=/usr/lib/softhsm/libsofthsm2.so",
        )
        .expect("parse");
        assert_eq!(u.token, "Gatehouse CA");
        assert_eq!(u.object, "fin");
        assert_eq!(u.stored(), "pkcs11:token=Gatehouse%20CA;object=fin");
        assert!(!u.stored().contains("1234"));
        assert_eq!(u.label(2, Role::Intermediate), "fin-g2-intermediate");
        let e = Pkcs11Uri::parse("pkcs11:object=x?pin-value=9876").expect_err("no token");
        assert!(!e.to_string().contains("9876"), "{e}");
        assert!(Pkcs11Uri::parse("file:/tmp/x").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:token=t;slot-id=3").is_err());
    }

    #[test]
    fn raw_ecdsa_signatures_become_der() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[32] = 0x00; // s starts with zeros: stripped
        raw[33] = 0x01;
        let der = ecdsa_raw_to_der(&raw).expect("der");
        assert_eq!(&der[..4], &[0x30, 0x44, 0x02, 0x21]);
        assert_eq!(der[4], 0x00);
        assert_eq!(der.len(), 2 + 0x44);
        assert!(ecdsa_raw_to_der(&[1, 2, 3]).is_none());
    }
}
