//! Request path normalization: the one function the sidecar and the `policy` CLI both call, so
//! that what the matcher sees, what the CLI tests and what the app receives are the same string.
//!
//! [`normalize`] either returns the path in its single canonical spelling or refuses it (the
//! sidecar answers 400). It follows RFC 3986 §6.2.2 (syntax-based normalization) and §5.2.4
//! (remove dot segments) and then refuses everything an app behind us might read differently
//! from the matcher. Every rule is documented next to the code that applies it.
//!
//! What does not live here: matching (see `matcher.rs`) and the query string, which is cut off
//! and ignored because routes never look at it.

use std::borrow::Cow;

/// Knobs for [`normalize`]. The default is the strict setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NormalizeOptions {
    /// Accept `;` inside a segment (matrix parameters). Off by default: Spring and Tomcat strip
    /// `;...` from each segment before routing, so `/public/..;/admin` reaches `/admin` in the
    /// app while the matcher would see a segment called `..;` under `/public`. Turn it on only
    /// for an app that treats `;` as an ordinary character.
    pub allow_matrix_params: bool,
}

/// Why a path was refused. Each refusal is an HTTP 400 in the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// Empty, or not starting with `/` (`*`, `http://host/x` or a relative path).
    #[error("the path does not start with `/`")]
    NotAbsolute,
    /// A `..` segment (raw or percent-encoded) would climb above the root.
    #[error("`..` climbs above the root")]
    Climbs,
    /// `%2F`: an encoded `/` that an app may decode into a separator after we matched.
    #[error("encoded slash `%2F` in the path")]
    EncodedSlash,
    /// A raw `\`, which some servers (IIS, some Java and Node routers) treat as `/`.
    #[error("backslash `\\` in the path")]
    Backslash,
    /// `%5C`: an encoded backslash.
    #[error("encoded backslash `%5C` in the path")]
    EncodedBackslash,
    /// `%00`: an encoded NUL byte, which truncates the path in C-based apps.
    #[error("encoded NUL `%00` in the path")]
    EncodedNul,
    /// A control character (0x00-0x1F or 0x7F), raw or percent-encoded.
    #[error("control character 0x{byte:02X} in the path")]
    ControlChar {
        /// The byte value.
        byte: u8,
    },
    /// The percent-encoded bytes of a segment are not valid UTF-8.
    #[error("percent-encoded bytes that are not valid UTF-8 in the path")]
    InvalidUtf8,
    /// A raw (not percent-encoded) non-ASCII character.
    #[error("raw non-ASCII character {ch:?} in the path (it must be percent-encoded)")]
    NonAscii {
        /// The character.
        ch: char,
    },
    /// A `%` not followed by two hexadecimal digits.
    #[error("malformed percent-encoding in the path")]
    BadPercentEncoding,
    /// A `;` inside a segment while matrix parameters are not allowed.
    #[error("`;` (matrix parameter) in a path segment")]
    MatrixParam,
    /// A `#` fragment: clients never send one, so it is an attack or a broken client.
    #[error("`#` fragment in the request path")]
    Fragment,
}

/// Normalizes a request path (the query, if present, is cut off and ignored).
///
/// Returns [`Cow::Borrowed`] when `raw_path` is already normal, so the common case allocates
/// nothing. Applied, in this order per segment:
/// - percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §2.3) are
///   decoded, and the hex digits of the others are upper-cased (§6.2.2.1–2), so a path has one
///   spelling: `/%61pi` and `/api` are the same route; sub-delimiters, `:` and `@` are decoded
///   too (see `decodes` for why) and characters not allowed raw in a path are encoded;
/// - `.` segments are removed and `..` removes the previous segment (§5.2.4), after decoding,
///   so `%2e%2e` counts as `..`;
/// - empty segments from repeated slashes are merged (`/a//b` is `/a/b`); a trailing slash is
///   kept, because some apps treat `/a/` and `/a` differently (the matcher ignores it, see
///   `matcher.rs`).
///
/// # Errors
/// A [`PathError`] naming what was refused; see its variants for the reasons.
pub fn normalize<'a>(
    raw_path: &'a str,
    opts: &NormalizeOptions,
) -> Result<Cow<'a, str>, PathError> {
    // The query plays no part in routing; it is forwarded untouched by the sidecar.
    let path = raw_path.split_once('?').map_or(raw_path, |(p, _)| p);
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let mut rewrite = false;
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let is_last = segments.peek().is_none();
        rewrite |= check_segment(segment, opts)?;
        // `//` (an empty segment that is not the trailing one) and dot segments change.
        rewrite |= (segment.is_empty() && !is_last) || segment == "." || segment == "..";
    }
    if !rewrite {
        return Ok(Cow::Borrowed(path));
    }
    rebuild(path).map(Cow::Owned)
}

/// Validates one raw segment; `Ok(true)` when its percent-encodings need rewriting.
fn check_segment(segment: &str, opts: &NormalizeOptions) -> Result<bool, PathError> {
    let bytes = segment.as_bytes();
    let mut rewrite = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (value, hex_is_canonical) = decode_escape(bytes, i)?;
                refuse_decoded(value)?;
                rewrite |= decodes(value) || !hex_is_canonical;
                i += 3;
                continue;
            }
            // Some servers treat `\` as `/`; there is no reading of it that is safe to match.
            b'\\' => return Err(PathError::Backslash),
            b'#' => return Err(PathError::Fragment),
            b';' if !opts.allow_matrix_params => return Err(PathError::MatrixParam),
            0x00..=0x1F | 0x7F => return Err(PathError::ControlChar { byte: b }),
            // One spelling per path: `é` raw and `%C3%A9` would otherwise be two routes.
            0x80.. => {
                let ch = segment[i..].chars().next().unwrap_or('\u{FFFD}');
                return Err(PathError::NonAscii { ch });
            }
            // Characters RFC 3986 does not allow raw in a path (space, `"`, `<`, `{`, ...) are
            // percent-encoded, again so that there is one spelling.
            _ => rewrite |= !is_path_char(b),
        }
        i += 1;
    }
    check_utf8(segment)?;
    Ok(rewrite)
}

/// Refusals that apply to a percent-decoded byte.
fn refuse_decoded(value: u8) -> Result<(), PathError> {
    match value {
        // An app that decodes `%2F` after routing sees a different path than we matched.
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::EncodedBackslash),
        // NUL truncates strings in C-based servers and file APIs.
        0x00 => Err(PathError::EncodedNul),
        // Decoded control characters end up in logs and headers (log and header injection).
        0x01..=0x1F | 0x7F => Err(PathError::ControlChar { byte: value }),
        _ => Ok(()),
    }
}

/// The byte encoded at `bytes[i..i + 3]` (`%XX`) and whether its hex digits are upper case.
fn decode_escape(bytes: &[u8], i: usize) -> Result<(u8, bool), PathError> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some((b - b'0', true)),
        b'A'..=b'F' => Some((b - b'A' + 10, true)),
        b'a'..=b'f' => Some((b - b'a' + 10, false)),
        _ => None,
    };
    match (
        bytes.get(i + 1).and_then(|&b| hex(b)),
        bytes.get(i + 2).and_then(|&b| hex(b)),
    ) {
        (Some((hi, u1)), Some((lo, u2))) => Ok((hi << 4 | lo, u1 && u2)),
        _ => Err(PathError::BadPercentEncoding),
    }
}

/// Percent-encoded bytes must decode to UTF-8: apps decode them, and invalid sequences are
/// read differently by different decoders (replacement character, Latin-1, error). Checked one
/// character at a time on the stack, so a normal path costs no allocation.
fn check_utf8(segment: &str) -> Result<(), PathError> {
    let bytes = segment.as_bytes();
    let mut char_buf = [0u8; 4];
    let (mut have, mut need) = (0usize, 0usize);
    let mut i = 0;
    while i < bytes.len() {
        let b = if bytes[i] == b'%' {
            i += 3;
            decode_escape(bytes, i - 3)?.0
        } else {
            i += 1;
            bytes[i - 1]
        };
        if have == 0 {
            need = match b {
                0x00..=0x7F => continue,
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => return Err(PathError::InvalidUtf8),
            };
        }
        char_buf[have] = b;
        have += 1;
        if have == need {
            // Rejects bad continuation bytes, overlong forms and surrogates.
            std::str::from_utf8(&char_buf[..need]).map_err(|_| PathError::InvalidUtf8)?;
            have = 0;
        }
    }
    if have == 0 {
        Ok(())
    } else {
        Err(PathError::InvalidUtf8)
    }
}

/// RFC 3986 §2.3 unreserved characters.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters allowed raw in a path segment (RFC 3986 §3.3 `pchar`, without `%`).
fn is_path_char(b: u8) -> bool {
    is_unreserved(b) || b"!$&'()*+,;=:@".contains(&b)
}

/// Escapes decoded in the normal form: unreserved characters (RFC 3986 §6.2.2.2) and, beyond
/// the RFC, the sub-delimiters, `:` and `@`. Apps decode those before routing, so leaving
/// `%21` encoded would let `/admin%21` slip past a route for `/admin!` to a broader route
/// while reaching the same handler. Not decoded: `;` (it would become a matrix parameter
/// separator), and everything that is not a path character (`%2F`, `%3F`, `%23`, `%25`, space...),
/// whose decoding would change the path's structure.
fn decodes(b: u8) -> bool {
    is_path_char(b) && b != b';'
}

/// Writes a segment with [`decodes`] escapes decoded, other escapes upper-cased and raw
/// non-path characters encoded.
fn canonical_segment(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // `check_segment` validated every escape before we got here.
            let (value, _) = decode_escape(bytes, i).unwrap_or((b'%', true));
            if decodes(value) {
                out.push(char::from(value));
            } else {
                out.push_str(&format!("%{value:02X}"));
            }
            i += 3;
        } else {
            let b = bytes[i];
            if is_path_char(b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
            i += 1;
        }
    }
    out
}

/// The slow path: builds the normal form of an already validated path (RFC 3986 §5.2.4).
fn rebuild(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0usize;
    let mut segments = path[1..].split('/').peekable();
    while let Some(raw) = segments.next() {
        let is_last = segments.peek().is_none();
        let segment = canonical_segment(raw);
        match segment.as_str() {
            // `//` merges; `.` is "this directory". Both leave a trailing slash when last.
            "" | "." => {}
            ".." => {
                // Refused rather than clamped at the root: an attacker probing for traversal
                // gets a 400, and no app ever resolves it differently.
                if depth == 0 {
                    return Err(PathError::Climbs);
                }
                depth -= 1;
                let cut = out.rfind('/').unwrap_or(0);
                out.truncate(cut);
            }
            _ => {
                depth += 1;
                out.push('/');
                out.push_str(&segment);
                continue;
            }
        }
        if is_last {
            out.push('/');
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(p: &str) -> Result<Cow<'_, str>, PathError> {
        normalize(p, &NormalizeOptions::default())
    }

    /// Accepted paths: (input, normal form, whether the input was already normal).
    #[test]
    fn normalization_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("/", "/", true),
            ("/api/data/reports", "/api/data/reports", true),
            ("/a/b/", "/a/b/", true),
            ("/a/./b", "/a/b", false),
            ("/a//b", "/a/b", false),
            ("//a///b//", "/a/b/", false),
            ("/a/b/../c", "/a/c", false),
            ("/a/b/..", "/a/", false),
            ("/a/.", "/a/", false),
            ("/a/..", "/", false),
            // Decoded before dot-segment removal: `%2e%2e` is `..`, which stays below the root.
            ("/a/%2e%2e/b", "/b", false),
            ("/a/b/%2E%2E/c", "/a/c", false),
            ("/a/%2e/b", "/a/b", false),
            ("/%61pi", "/api", false),
            ("/%7Euser/%5F%2D", "/~user/_-", false),
            // Structural characters stay encoded, with upper-case hex.
            ("/a%20b", "/a%20b", true),
            ("/a%3bb%3Fc%23d%25e", "/a%3Bb%3Fc%23d%25e", false),
            // Sub-delimiters, `:` and `@` are decoded: apps read `%21` as `!`.
            ("/admin%21", "/admin!", false),
            ("/a%3A%40%2C%3D%2a", "/a:@,=*", false),
            // Characters not allowed raw in a path are encoded.
            ("/a b", "/a%20b", false),
            ("/a\"<>{|}^`[]", "/a%22%3C%3E%7B%7C%7D%5E%60%5B%5D", false),
            ("/caf%c3%a9", "/caf%C3%A9", false),
            ("/caf%C3%A9", "/caf%C3%A9", true),
            ("/%F0%9F%A6%80", "/%F0%9F%A6%80", true),
            ("/a:b/@c/!$&'()*+,=", "/a:b/@c/!$&'()*+,=", true),
            // The query plays no part in matching.
            ("/api/data?x=1", "/api/data", true),
            ("/api/./data?next=/../admin", "/api/data", false),
            ("/?", "/", true),
        ];
        for &(input, want, borrowed) in cases {
            let got = strict(input).unwrap_or_else(|e| panic!("{input:?} refused: {e}"));
            assert_eq!(got, want, "input {input:?}");
            assert_eq!(matches!(got, Cow::Borrowed(_)), borrowed, "input {input:?}");
            // Normal forms are fixed points.
            assert!(
                matches!(strict(&got), Ok(Cow::Borrowed(_))),
                "{want:?} not stable"
            );
        }
    }

    /// Refused paths: each names the rule it broke.
    #[test]
    fn refusal_table() {
        use PathError::*;
        let cases: &[(&str, PathError)] = &[
            ("/../a", Climbs),
            ("/..", Climbs),
            ("/a/../../b", Climbs),
            ("/%2e%2e/etc/passwd", Climbs),
            ("/a/b/../../..", Climbs),
            ("/public/..;/admin", MatrixParam),
            ("/a;x=1/b", MatrixParam),
            ("/a%2Fb", EncodedSlash),
            ("/a%2fb", EncodedSlash),
            ("/a%5Cb", EncodedBackslash),
            ("/a%5cb", EncodedBackslash),
            ("/a\\b", Backslash),
            ("/a%00", EncodedNul),
            ("/a%0Ab", ControlChar { byte: 0x0A }),
            ("/a%7f", ControlChar { byte: 0x7F }),
            ("/a\tb", ControlChar { byte: 0x09 }),
            ("/a\u{7f}", ControlChar { byte: 0x7F }),
            ("/a%FF", InvalidUtf8),
            ("/a%C3%28", InvalidUtf8),
            ("/a%C3", InvalidUtf8),
            ("/a%C3/b", InvalidUtf8),
            ("/a%C3a", InvalidUtf8),
            ("/a%C0%AF", InvalidUtf8),       // overlong `/`
            ("/a%ED%A0%80", InvalidUtf8),    // UTF-16 surrogate
            ("/a%F4%90%80%80", InvalidUtf8), // above U+10FFFF
            ("/caf\u{e9}", NonAscii { ch: '\u{e9}' }),
            ("/a%", BadPercentEncoding),
            ("/a%4", BadPercentEncoding),
            ("/a%zz", BadPercentEncoding),
            ("/a#frag", Fragment),
            ("", NotAbsolute),
            ("a/b", NotAbsolute),
            ("*", NotAbsolute),
            ("http://evil/a", NotAbsolute),
            ("?x=1", NotAbsolute),
        ];
        for (input, rule) in cases {
            assert_eq!(strict(input), Err(*rule), "input {input:?}");
        }
    }

    #[test]
    fn matrix_params_can_be_allowed() {
        let opts = NormalizeOptions {
            allow_matrix_params: true,
        };
        assert_eq!(normalize("/a;x=1/b", &opts).unwrap(), "/a;x=1/b");
        // Allowing `;` does not make `..;` a dot segment: it is an ordinary segment name.
        assert_eq!(
            normalize("/public/..;/admin", &opts).unwrap(),
            "/public/..;/admin"
        );
    }

    #[test]
    fn refusals_explain_themselves() {
        assert_eq!(
            strict("/a%2Fb").unwrap_err().to_string(),
            "encoded slash `%2F` in the path"
        );
        assert_eq!(
            strict("/a%0d").unwrap_err().to_string(),
            "control character 0x0D in the path"
        );
    }
}
