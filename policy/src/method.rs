//! Request method spelling: the one check the sidecar and the `policy` CLI both call before
//! [`crate::Policy::decide`], so that what the matcher decides on and what the app receives
//! are the same method.
//!
//! Methods are case-sensitive tokens (RFC 9110 §9.1): `get` is not `GET` but an extension
//! method, and the matcher lets extension methods match only routes that name no method. Many
//! apps upper-case the method before routing (Django, Werkzeug), so `get /export` would be
//! decided by a broader any-method route and then run the app's GET handler, past a GET-only
//! route that denies the caller. So a spelling of a standard method in any other case is
//! refused (the sidecar answers 400), rather than decided as an extension method or quietly
//! rewritten: a client that sends one is broken or probing, and a refusal says so.
//!
//! Extension methods (`PROPFIND`, `purge`) are not affected: they match any-method routes only.

use crate::matcher::METHODS;

/// Why a method was refused. An HTTP 400 in the sidecar; `"refused"` in `policy test`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MethodError {
    /// A standard method spelled in another case (`get`, `Post`).
    #[error(
        "not the standard spelling of `{canonical}` (methods are case-sensitive, RFC 9110 §9.1): send `{canonical}`"
    )]
    NonCanonical {
        /// The standard method it spells.
        canonical: &'static str,
    },
}

/// Accepts `method` unless it is a standard method ([`METHODS`]) in a spelling other than its
/// upper-case one. Allocates nothing; a method without a lower-case letter (every standard
/// spelling) costs one pass over its bytes.
///
/// # Errors
/// [`MethodError::NonCanonical`] for `get`, `Get`, `pOST` and the like.
pub fn check(method: &str) -> Result<(), MethodError> {
    if !method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Ok(());
    }
    match METHODS.iter().find(|m| m.eq_ignore_ascii_case(method)) {
        Some(canonical) => Err(MethodError::NonCanonical { canonical }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_spellings_and_extension_methods_pass() {
        for ok in METHODS
            .iter()
            .copied()
            .chain(["PROPFIND", "purge", "M-SEARCH", "GETS"])
        {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn other_spellings_of_standard_methods_are_refused() {
        for (bad, canonical) in [
            ("get", "GET"),
            ("Get", "GET"),
            ("gET", "GET"),
            ("post", "POST"),
            ("Delete", "DELETE"),
            ("patch", "PATCH"),
            ("options", "OPTIONS"),
            ("connect", "CONNECT"),
            ("trace", "TRACE"),
            ("head", "HEAD"),
            ("put", "PUT"),
        ] {
            assert_eq!(
                check(bad),
                Err(MethodError::NonCanonical { canonical }),
                "{bad}"
            );
        }
        let msg = check("get").unwrap_err().to_string();
        assert!(
            msg.contains("`GET`") && msg.contains("case-sensitive"),
            "{msg}"
        );
    }
}
