//! Kubernetes projected service-account tokens as an enrollment credential of `ca serve`.
//!
//! The token is a JWT verified with the `jsonwebtoken` crate (aws-lc-rs backend) against the
//! public keys of a JWKS file (the cluster's `/openid/v1/jwks`), the key chosen by the token's
//! `kid`. The algorithm is fixed per key (the JWK's `alg`, else RS256 for RSA, ES256/ES384 for
//! P-256/P-384, EdDSA for Ed25519): the token's header cannot choose another, and symmetric
//! (`oct`) keys are refused when the file is loaded. Checked: the signature, `iss` equal to the
//! configured issuer, `aud` containing the configured audience, `exp` in the future and `nbf`
//! (if present) in the past, each with [`LEEWAY_SECS`] of clock skew allowed.
//!
//! The identity is `spiffe://<td>/ns/<namespace>/sa/<serviceaccount>`, from the token's
//! `kubernetes.io` claim (or, without it, its `sub` `system:serviceaccount:<ns>:<sa>`); each
//! part must be one SPIFFE path segment (`[A-Za-z0-9._-]`, not `.` or `..`). With a mapping
//! table ([`K8sVerifier::with_map`]) the identity is the table's instead, and an account the
//! table does not list is refused.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;

use crate::{CaError, SpiffeId, TrustDomain};

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;
/// Default audience a token must carry (`--k8s-audience`).
pub const DEFAULT_AUDIENCE: &str = "gatehouse";

/// Why a service-account token was refused; [`JwtRefusal::code`] is the API's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtRefusal {
    /// Unknown `kid`, or the signature does not verify with the key of that `kid`.
    #[error("the service-account token's signature does not verify ({0})")]
    Signature(String),
    /// `iss` missing or not the configured issuer.
    #[error("the service-account token's issuer is not `{expected}`")]
    Issuer {
        /// The configured issuer.
        expected: String,
    },
    /// `aud` missing or without the configured audience.
    #[error("the service-account token's audience does not include `{expected}`")]
    Audience {
        /// The configured audience.
        expected: String,
    },
    /// `exp` missing or past, or `nbf` in the future.
    #[error("the service-account token is expired or not yet valid ({0})")]
    Expired(&'static str),
    /// Not a JWT, or without a usable service-account identity.
    #[error("the service-account token is malformed ({0})")]
    Malformed(String),
    /// A valid token for a service account the `--k8s-map` table does not list.
    #[error("the service account `{0}` is not in the CA's --k8s-map table")]
    Unmapped(String),
}

impl JwtRefusal {
    /// The stable error code of the API (`jwt_signature`, `jwt_issuer`, `jwt_audience`,
    /// `jwt_expired`, `jwt_malformed`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Signature(_) => "jwt_signature",
            Self::Issuer { .. } => "jwt_issuer",
            Self::Audience { .. } => "jwt_audience",
            Self::Expired(_) => "jwt_expired",
            Self::Malformed(_) => "jwt_malformed",
            Self::Unmapped(_) => "k8s_unmapped",
        }
    }

    /// What the caller should do next.
    pub fn advice(&self) -> &'static str {
        match self {
            Self::Signature(_) => {
                "send a token issued by the configured cluster; if its keys rotated, refresh the CA's --k8s-jwks file from the cluster's /openid/v1/jwks"
            }
            Self::Issuer { .. } => {
                "send a token from the cluster whose issuer the CA trusts (--k8s-issuer, the API server's --service-account-issuer)"
            }
            Self::Audience { .. } => {
                "project the token with the CA's audience (serviceAccountToken.audience in the pod spec, default `gatehouse`)"
            }
            Self::Expired(_) => {
                "read the projected token file again (the kubelet refreshes it) and retry; check the clocks if it keeps failing"
            }
            Self::Malformed(_) => {
                "send `Authorization: Bearer <projected service-account token>` with a token carrying the `kubernetes.io` namespace and service account"
            }
            Self::Unmapped(_) => {
                "ask the CA operator to add `\"<namespace>/<serviceaccount>\" = \"spiffe://…\"` to the --k8s-map file, or use a listed service account"
            }
        }
    }
}

/// Verifies service-account tokens for one cluster (issuer, audience, keys).
#[derive(Debug)]
pub struct K8sVerifier {
    keys: HashMap<String, (DecodingKey, Validation)>,
    issuer: String,
    audience: String,
    trust_domain: TrustDomain,
    /// `--k8s-map`: `"<ns>/<sa>"` to its SPIFFE ID; when set, the only accounts that enroll.
    map: Option<HashMap<String, SpiffeId>>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Deserialize)]
struct KubernetesClaim {
    namespace: String,
    serviceaccount: Named,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

impl K8sVerifier {
    /// Loads the JWKS file `jwks` (every key needs a `kid`; symmetric keys are refused).
    ///
    /// # Errors
    /// [`CaError::K8sJwks`] naming the file and what to fix.
    pub fn load(
        jwks: &Path,
        issuer: &str,
        audience: &str,
        trust_domain: TrustDomain,
    ) -> Result<Self, CaError> {
        let bad = |detail: String| CaError::K8sJwks {
            path: jwks.to_path_buf(),
            detail,
        };
        let text = std::fs::read(jwks).map_err(|e| bad(format!("cannot read it ({e})")))?;
        let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
            bad(format!(
                "not a JWKS ({e}): save the cluster's /openid/v1/jwks"
            ))
        })?;
        if issuer.is_empty() || audience.is_empty() {
            return Err(bad(
                "--k8s-issuer and --k8s-audience must not be empty".into()
            ));
        }
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| bad("a key has no `kid`: every key needs one".into()))?;
            let alg = key_algorithm(jwk).map_err(|d| bad(format!("key `{kid}`: {d}")))?;
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| bad(format!("key `{kid}` is not a usable public key ({e})")))?;
            let mut v = Validation::new(alg);
            v.leeway = LEEWAY_SECS;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = true;
            v.set_issuer(&[issuer]);
            v.set_audience(&[audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            if keys.insert(kid.clone(), (key, v)).is_some() {
                return Err(bad(format!("two keys share the `kid` `{kid}`")));
            }
        }
        if keys.is_empty() {
            return Err(bad("it holds no keys".into()));
        }
        Ok(Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            trust_domain,
            map: None,
        })
    }

    /// Replaces the default mapping by the table in the TOML file `path`
    /// (`"<namespace>/<serviceaccount>" = "spiffe://<td>/<path>"`): only the listed service
    /// accounts enroll, each as its listed ID (which must be in the CA's trust domain).
    ///
    /// # Errors
    /// [`CaError::K8sMap`] naming the file, the entry and what to fix.
    pub fn with_map(mut self, path: &Path) -> Result<Self, CaError> {
        let bad = |detail: String| CaError::K8sMap {
            path: path.to_path_buf(),
            detail,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
        let table: std::collections::BTreeMap<String, String> =
            toml::from_str(&text).map_err(|e| {
                bad(format!(
                    "not a table of \"<namespace>/<serviceaccount>\" = \"spiffe://…\" strings ({e})"
                ))
            })?;
        let mut map = HashMap::with_capacity(table.len());
        for (account, id) in table {
            let well_formed = account
                .split_once('/')
                .is_some_and(|(ns, sa)| is_segment(ns) && is_segment(sa));
            if !well_formed {
                return Err(bad(format!(
                    "key `{account}` is not `<namespace>/<serviceaccount>`"
                )));
            }
            let id = SpiffeId::parse(&id)
                .map_err(|e| bad(format!("`{account}`: invalid SPIFFE ID `{id}` ({e})")))?;
            if !id.is_member_of(&self.trust_domain) {
                return Err(bad(format!(
                    "`{account}`: {} is not in this CA's trust domain {}",
                    id.as_str(),
                    self.trust_domain.as_str()
                )));
            }
            map.insert(account, id);
        }
        self.map = Some(map);
        Ok(self)
    }

    /// Verifies `token` and returns the identity it maps to.
    ///
    /// # Errors
    /// The [`JwtRefusal`] for the first check that fails (the signature before any claim).
    pub fn verify(&self, token: &str) -> Result<SpiffeId, JwtRefusal> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| JwtRefusal::Malformed(format!("not a JWT: {e}")))?;
        let kid = header
            .kid
            .ok_or_else(|| JwtRefusal::Malformed("the header has no `kid`".into()))?;
        let (key, validation) = self.keys.get(&kid).ok_or_else(|| {
            JwtRefusal::Signature(format!("no key with kid `{kid}` in the JWKS file"))
        })?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| self.refusal(e.kind()))?;
        self.identity(&data.claims)
    }

    fn refusal(&self, kind: &ErrorKind) -> JwtRefusal {
        match kind {
            ErrorKind::InvalidSignature => JwtRefusal::Signature("bad signature".into()),
            ErrorKind::InvalidAlgorithm => {
                JwtRefusal::Signature("the algorithm is not the one of that key".into())
            }
            ErrorKind::InvalidIssuer => JwtRefusal::Issuer {
                expected: self.issuer.clone(),
            },
            ErrorKind::InvalidAudience => JwtRefusal::Audience {
                expected: self.audience.clone(),
            },
            ErrorKind::ExpiredSignature => JwtRefusal::Expired("`exp` has passed"),
            ErrorKind::ImmatureSignature => JwtRefusal::Expired("`nbf` is in the future"),
            ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
                "iss" => JwtRefusal::Issuer {
                    expected: self.issuer.clone(),
                },
                "aud" => JwtRefusal::Audience {
                    expected: self.audience.clone(),
                },
                "exp" => JwtRefusal::Expired("no `exp` claim"),
                other => JwtRefusal::Malformed(format!("missing claim `{other}`")),
            },
            other => JwtRefusal::Malformed(format!("{other:?}")),
        }
    }

    fn identity(&self, claims: &Claims) -> Result<SpiffeId, JwtRefusal> {
        let from_sub = claims.sub.as_deref().and_then(|s| {
            let rest = s.strip_prefix("system:serviceaccount:")?;
            rest.split_once(':')
        });
        let (ns, sa) = match (&claims.kubernetes, from_sub) {
            (Some(k), sub) => {
                let pair = (k.namespace.as_str(), k.serviceaccount.name.as_str());
                if sub.is_some_and(|s| s != pair) {
                    return Err(JwtRefusal::Malformed(
                        "`sub` and the `kubernetes.io` claim name different service accounts"
                            .into(),
                    ));
                }
                pair
            }
            (None, Some(pair)) => pair,
            (None, None) => {
                return Err(JwtRefusal::Malformed(
                    "no `kubernetes.io` claim and no `sub` of the form system:serviceaccount:<ns>:<sa>".into(),
                ));
            }
        };
        for (what, part) in [("namespace", ns), ("service account", sa)] {
            if !is_segment(part) {
                return Err(JwtRefusal::Malformed(format!(
                    "the {what} `{part}` is not a valid SPIFFE path segment"
                )));
            }
        }
        if let Some(map) = &self.map {
            let account = format!("{ns}/{sa}");
            return map
                .get(&account)
                .cloned()
                .ok_or(JwtRefusal::Unmapped(account));
        }
        SpiffeId::from_parts(&self.trust_domain, &format!("/ns/{ns}/sa/{sa}"))
            .map_err(|e| JwtRefusal::Malformed(e.to_string()))
    }
}

/// One SPIFFE path segment: non-empty `[A-Za-z0-9._-]`, not `.` or `..` (so no `/` either).
fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// The one algorithm a key verifies: its `alg`, else the usual one for its type.
fn key_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Result<Algorithm, String> {
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 | EllipticCurve::P384 => AlgorithmFamily::Ec,
            _ => return Err("unsupported curve (use P-256 or P-384)".into()),
        },
        AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
        _ => {
            return Err(
                "symmetric or unknown key type (only RSA, EC and OKP public keys are accepted)"
                    .into(),
            );
        }
    };
    let alg = match jwk.common.key_algorithm {
        Some(a) => {
            Algorithm::from_str(&a.to_string()).map_err(|_| format!("unsupported `alg` {a:?}"))?
        }
        None => match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                Algorithm::ES384
            }
            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
            _ => Algorithm::RS256,
        },
    };
    if alg.family() != family {
        return Err(format!("`alg` {alg:?} does not fit the key type"));
    }
    Ok(alg)
}

#[cfg(test)]
mod tests {
    use super::is_segment;

    #[test]
    fn segments() {
        assert!(is_segment("payments"));
        assert!(is_segment("default-sa_1.x"));
        for bad in ["", ".", "..", "a/b", "a:b", "ä", "a b"] {
            assert!(!is_segment(bad), "{bad:?}");
        }
    }
}
