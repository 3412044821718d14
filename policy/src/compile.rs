//! From the file as written to the compiled [`Policy`]: aliases resolved, identities checked
//! against the trust domain, path patterns and methods validated, indistinguishable routes
//! refused. Every problem is collected, each with `file:line:col` and a `help:` line, so one
//! run of `policy check` shows them all.
//!
//! What is not here: the TOML mirror (`file.rs`), the trie (`matcher.rs`), review warnings
//! (`review.rs`).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use toml::Spanned;

use crate::file::{self, RawPolicy, RawRoute};
use crate::identity::{IdError, IdentityPattern, SpiffeId, TrustDomain};
use crate::limit::Limits;
use crate::matcher::{self, AllowEntry, Loc, METHODS, Matcher, MethodSet, Route, Segment};
use crate::path::{self, NormalizeOptions};
use crate::source::{Diagnostic, SourceFile};

/// The only policy file version this build reads.
pub const SUPPORTED_VERSION: i64 = 1;

/// A compiled policy: immutable, `Send + Sync`, cheap to query. Build it with
/// [`Policy::load`] or [`Policy::compile`].
pub struct Policy {
    pub(crate) source_name: String,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) audit: bool,
    pub(crate) mode_loc: Option<Loc>,
    pub(crate) aliases: Vec<Alias>,
    /// Exact-ID aliases by ID string, for [`Policy::caller_label`].
    exact_aliases: HashMap<String, usize>,
    pub(crate) routes: Vec<Route>,
    pub(crate) matcher: Matcher,
    pub(crate) limits: Limits,
    pub(crate) tcp: Vec<crate::tcp::TcpEntry>, // issue 17: `[[tcp]]` entries
}

/// A name from `[identities]`.
#[derive(Debug, Clone)]
pub struct Alias {
    pub(crate) name: String,
    pub(crate) pattern: IdentityPattern,
    pub(crate) loc: Loc,
}

impl Alias {
    /// The alias name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The identity (or pattern) it stands for.
    pub fn pattern(&self) -> &IdentityPattern {
        &self.pattern
    }

    /// The line of its definition in the policy file.
    pub fn line(&self) -> usize {
        self.loc.line
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("source", &self.source_name)
            .field("trust_domain", &self.trust_domain)
            .field("audit", &self.audit)
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Reads and compiles a policy file.
    ///
    /// # Errors
    /// Every problem found, each a [`Diagnostic`] with `file:line:col` and a `help:` line.
    pub fn load(path: &Path) -> Result<Policy, Vec<Diagnostic>> {
        let src = SourceFile::read(path).map_err(|d| vec![d])?;
        Self::compile(&src)
    }

    /// Compiles policy text; `name` is the file name diagnostics print.
    ///
    /// # Errors
    /// As [`Policy::load`].
    pub fn parse(name: &str, text: &str) -> Result<Policy, Vec<Diagnostic>> {
        Self::compile(&SourceFile::new(name, text))
    }

    /// Compiles an already read source file.
    ///
    /// # Errors
    /// As [`Policy::load`].
    pub fn compile(src: &SourceFile) -> Result<Policy, Vec<Diagnostic>> {
        let raw = file::parse(src.text()).map_err(|e| vec![toml_diagnostic(src, &e)])?;
        Compiler {
            src,
            errors: Vec::new(),
        }
        .run(raw)
    }

    /// The trust domain every identity in the policy belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// How many routes the policy has.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// The routes, in file order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The `[identities]` aliases, in file order.
    pub fn aliases(&self) -> &[Alias] {
        &self.aliases
    }

    /// Whether `mode = "audit"`: would-be denials are allowed (and reported as such).
    pub fn is_audit_mode(&self) -> bool {
        self.audit
    }

    /// The line of `mode = ...` in the policy file, if the file sets it.
    pub fn mode_line(&self) -> Option<usize> {
        self.mode_loc.map(|l| l.line)
    }

    /// The file name the policy was compiled from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// A bounded metric label for `caller`: the alias whose exact ID is `caller`, else
    /// `"other"`.
    pub fn caller_label<'a>(&'a self, caller: &SpiffeId) -> &'a str {
        self.exact_aliases
            .get(caller.as_str())
            .map_or("other", |&i| self.aliases[i].name.as_str())
    }

    /// Resolves an alias name or a SPIFFE ID to a caller identity (for the CLI and tests).
    ///
    /// # Errors
    /// When `s` is neither an exact-ID alias of this policy nor a valid SPIFFE ID.
    pub fn resolve_caller(&self, s: &str) -> Result<SpiffeId, CallerError> {
        match self.aliases.iter().find(|a| a.name == s) {
            Some(Alias {
                pattern: IdentityPattern::Exact(id),
                ..
            }) => Ok(id.clone()),
            Some(a) => Err(CallerError::WildcardAlias {
                alias: a.name.clone(),
                pattern: a.pattern.to_string(),
            }),
            None => SpiffeId::parse(s).map_err(CallerError::Invalid),
        }
    }
}

/// Why a caller given to [`Policy::resolve_caller`] is not one identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallerError {
    /// The alias stands for a pattern, which admits many identities.
    #[error("alias `{alias}` stands for the pattern `{pattern}`, not one identity")]
    WildcardAlias {
        /// The alias.
        alias: String,
        /// What it stands for.
        pattern: String,
    },
    /// Not an alias, and not a valid SPIFFE ID.
    #[error("not an alias of the policy, and not a SPIFFE ID: {0}")]
    Invalid(#[source] IdError),
}

/// Turns a TOML syntax, unknown-key or type error into a diagnostic.
pub(crate) fn toml_diagnostic(src: &SourceFile, e: &toml::de::Error) -> Diagnostic {
    let message = e.message().trim().replace('\n', " ");
    let help = if message.contains("unknown field") {
        "remove the key or fix its spelling; the message lists the keys allowed here (every key: docs/POLICY.md)"
    } else if message.contains("missing field") {
        "add the missing key"
    } else if message.contains("invalid type") {
        "write the value with the type the message asks for (strings need quotes)"
    } else {
        "fix the TOML syntax at this position"
    };
    match e.span() {
        Some(span) => src.diagnostic(span, message, help),
        None => Diagnostic::whole_file(src.name(), message, help),
    }
}

/// One validation pass over the raw file; collects diagnostics instead of stopping.
pub(crate) struct Compiler<'s> {
    pub(crate) src: &'s SourceFile,
    pub(crate) errors: Vec<Diagnostic>,
}

impl Compiler<'_> {
    pub(crate) fn error(
        &mut self,
        span: Range<usize>,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.errors.push(self.src.diagnostic(span, message, help));
    }

    pub(crate) fn loc(&self, span: &Range<usize>) -> Loc {
        let (line, col) = self.src.line_col(span.start);
        Loc { line, col }
    }

    fn run(mut self, raw: RawPolicy) -> Result<Policy, Vec<Diagnostic>> {
        self.version(raw.version.as_ref());
        let trust_domain = self.trust_domain(raw.trust_domain.as_ref());
        let audit = self.mode(raw.mode.as_ref());
        let td = trust_domain.as_ref();
        let aliases = self.aliases(raw.identities.as_ref(), td);
        let mut routes: Vec<Route> = raw
            .route
            .iter()
            .filter_map(|r| self.route(r, &aliases, td))
            .collect();
        for (i, r) in routes.iter_mut().enumerate() {
            r.index = u32::try_from(i).unwrap_or(u32::MAX);
        }
        self.route_names(&routes);
        let limits = self.limits(&raw.limit, &aliases, td, &routes);
        let tcp = self.tcp(&raw.tcp, &aliases, td); // issue 17
        self.errors
            .extend(matcher::indistinguishable(&routes, self.src.name()));
        let (Some(trust_domain), true) = (trust_domain, self.errors.is_empty()) else {
            self.errors.sort_by_key(|d| (d.line, d.col));
            return Err(self.errors);
        };
        let exact_aliases = aliases
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match &a.pattern {
                IdentityPattern::Exact(id) => Some((id.as_str().to_owned(), i)),
                _ => None,
            })
            .collect();
        Ok(Policy {
            source_name: self.src.name().to_owned(),
            trust_domain,
            audit,
            mode_loc: raw.mode.as_ref().map(|m| self.loc(&m.span())),
            aliases,
            exact_aliases,
            matcher: Matcher::build(&routes),
            limits,
            routes,
            tcp, // issue 17
        })
    }

    fn version(&mut self, version: Option<&Spanned<i64>>) {
        match version {
            None => self.error(
                0..0,
                "`version` is missing",
                format!("add `version = {SUPPORTED_VERSION}` at the top of the file"),
            ),
            Some(v) if *v.get_ref() != SUPPORTED_VERSION => self.error(
                v.span(),
                format!("unsupported policy version {}", v.get_ref()),
                format!("this gatehouse reads `version = {SUPPORTED_VERSION}` policy files"),
            ),
            Some(_) => {}
        }
    }

    fn trust_domain(&mut self, td: Option<&Spanned<String>>) -> Option<TrustDomain> {
        let Some(td) = td else {
            self.error(
                0..0,
                "`trust_domain` is missing",
                "add `trust_domain = \"<your trust domain>\"`, e.g. \"fintech.internal\"",
            );
            return None;
        };
        TrustDomain::parse(td.get_ref())
            .map_err(|e| {
                self.error(
                    td.span(),
                    format!("invalid trust domain `{}`: {e}", td.get_ref()),
                    "write the trust domain name as in the CA, e.g. \"fintech.internal\"",
                );
            })
            .ok()
    }

    /// `true` for audit mode.
    fn mode(&mut self, mode: Option<&Spanned<String>>) -> bool {
        match mode.map(|m| (m.get_ref().as_str(), m.span())) {
            None | Some(("enforce", _)) => false,
            Some(("audit", _)) => true,
            Some((other, span)) => {
                self.error(
                    span,
                    format!("unknown mode `{other}`"),
                    "write mode = \"enforce\" (the default) or mode = \"audit\" (log would-be denials, allow them)",
                );
                false
            }
        }
    }

    fn aliases(
        &mut self,
        identities: Option<&Spanned<std::collections::BTreeMap<Spanned<String>, Spanned<String>>>>,
        td: Option<&TrustDomain>,
    ) -> Vec<Alias> {
        let Some(map) = identities else {
            return Vec::new();
        };
        let mut entries: Vec<_> = map.get_ref().iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        let mut out = Vec::new();
        for (name, value) in entries {
            let n = name.get_ref();
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                self.error(
                    name.span(),
                    format!("invalid alias name `{n}`"),
                    "alias names use letters, digits, `-`, `_` and `.`, e.g. report-service",
                );
                continue;
            }
            if let Some(pattern) = self.identity(value, td, "alias") {
                out.push(Alias {
                    name: n.clone(),
                    pattern,
                    loc: self.loc(&name.span()),
                });
            }
        }
        out
    }

    /// Parses a SPIFFE ID or pattern (not an alias) and checks its trust domain.
    fn identity(
        &mut self,
        value: &Spanned<String>,
        td: Option<&TrustDomain>,
        what: &str,
    ) -> Option<IdentityPattern> {
        let s = value.get_ref();
        let pattern = match IdentityPattern::parse(s) {
            Ok(p) => p,
            Err(e) => {
                self.error(
                    value.span(),
                    format!("invalid identity `{s}` in {what}: {e}"),
                    "write spiffe://<trust-domain>/<path>, a pattern ending in /* or /**, or \"*\"",
                );
                return None;
            }
        };
        if let (Some(found), Some(td)) = (pattern.trust_domain_str(), td)
            && found != td.as_str()
        {
            self.error(
                value.span(),
                format!("identity `{s}` belongs to trust domain `{found}`, not `{td}`"),
                format!(
                    "callers of other trust domains are refused at the handshake; use a spiffe://{td}/... identity"
                ),
            );
            return None;
        }
        Some(pattern)
    }

    fn route(
        &mut self,
        raw: &Spanned<RawRoute>,
        aliases: &[Alias],
        td: Option<&TrustDomain>,
    ) -> Option<Route> {
        let span = raw.span();
        let r = raw.get_ref();
        let name = self.route_name(r, &span);
        let methods = self.methods(r.methods.as_ref());
        let segments = self.path_pattern(r.path.as_ref(), &span);
        let allow = self.allow(r.allow.as_ref(), &span, aliases, td);
        let (name, methods, segments, allow) = (name?, methods?, segments?, allow?);
        let path = r.path.as_ref()?;
        Some(Route {
            index: 0, // numbered in `run`, after invalid routes are dropped
            name,
            methods,
            path: path.get_ref().clone(),
            segments,
            allow,
            loc: self.loc(&span),
            path_loc: self.loc(&path.span()),
        })
    }

    fn route_name(&mut self, r: &RawRoute, span: &Range<usize>) -> Option<String> {
        match &r.name {
            Some(n) if !n.get_ref().trim().is_empty() => Some(n.get_ref().clone()),
            Some(n) => {
                self.error(
                    n.span(),
                    "empty route name",
                    "name the route for reviewers and audit logs, e.g. name = \"report data export\"",
                );
                None
            }
            None => {
                self.error(
                    span.clone(),
                    "route has no `name`",
                    "add name = \"...\": it appears in audit lines, metrics and `policy` output",
                );
                None
            }
        }
    }

    fn route_names(&mut self, routes: &[Route]) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for r in routes {
            if let Some(line) = seen.insert(&r.name, r.loc.line) {
                self.errors.push(Diagnostic {
                    file: self.src.name().to_owned(),
                    line: r.loc.line,
                    col: r.loc.col,
                    message: format!("route name `{}` is already used on line {line}", r.name),
                    help: "give each route its own name: audit lines and metrics identify routes by name"
                        .to_owned(),
                });
            }
        }
    }

    fn methods(&mut self, methods: Option<&Spanned<Vec<Spanned<String>>>>) -> Option<MethodSet> {
        let mut set = MethodSet::default();
        let mut ok = true;
        for m in methods.map(|m| m.get_ref().as_slice()).unwrap_or_default() {
            let name = m.get_ref();
            match MethodSet::bit(name) {
                Some(bit) if set.0 & bit != 0 => {
                    self.error(
                        m.span(),
                        format!("method `{name}` is listed twice"),
                        "list each method once",
                    );
                    ok = false;
                }
                Some(bit) => set.0 |= bit,
                None if MethodSet::bit(&name.to_ascii_uppercase()).is_some() => {
                    self.error(
                        m.span(),
                        format!("method `{name}` must be upper case"),
                        format!(
                            "write \"{}\": HTTP methods are case-sensitive",
                            name.to_ascii_uppercase()
                        ),
                    );
                    ok = false;
                }
                None => {
                    self.error(
                        m.span(),
                        format!("unknown method `{name}`"),
                        format!(
                            "use one of {}, or omit `methods` to match any method",
                            METHODS.join(", ")
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(set)
    }

    fn path_pattern(
        &mut self,
        path: Option<&Spanned<String>>,
        span: &Range<usize>,
    ) -> Option<Vec<Segment>> {
        let Some(path) = path else {
            self.error(
                span.clone(),
                "route has no `path`",
                "add path = \"/exact/path\", with `*` for one segment or a trailing `/**`",
            );
            return None;
        };
        match parse_path_pattern(path.get_ref()) {
            Ok(segments) => Some(segments),
            Err(problem) => {
                self.error(
                    path.span(),
                    format!("bad path pattern `{}`: {problem}", path.get_ref()),
                    problem.help(),
                );
                None
            }
        }
    }

    pub(crate) fn allow(
        &mut self,
        allow: Option<&Spanned<Vec<Spanned<String>>>>,
        span: &Range<usize>,
        aliases: &[Alias],
        td: Option<&TrustDomain>,
    ) -> Option<Vec<AllowEntry>> {
        let Some(allow) = allow else {
            self.error(
                span.clone(),
                "route has no `allow` list",
                "add allow = [\"<alias or spiffe:// ID>\"]; a path nobody may call needs no route (no route = deny)",
            );
            return None;
        };
        if allow.get_ref().is_empty() {
            self.error(
                allow.span(),
                "empty allow-list",
                "list at least one caller; a path nobody may call needs no route (no route = deny)",
            );
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for entry in allow.get_ref() {
            match self.allow_entry(entry, aliases, td) {
                Some(pattern) => out.push(AllowEntry {
                    written: entry.get_ref().clone(),
                    pattern,
                    loc: self.loc(&entry.span()),
                }),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    pub(crate) fn allow_entry(
        &mut self,
        entry: &Spanned<String>,
        aliases: &[Alias],
        td: Option<&TrustDomain>,
    ) -> Option<IdentityPattern> {
        let s = entry.get_ref();
        if s == "*" || s.starts_with("spiffe://") || s.contains(':') {
            return self.identity(entry, td, "allow");
        }
        if let Some(alias) = aliases.iter().find(|a| &a.name == s) {
            return Some(alias.pattern.clone());
        }
        let known: Vec<&str> = aliases.iter().map(|a| a.name.as_str()).collect();
        let help = if known.is_empty() {
            "define it under [identities] or write the full spiffe:// ID".to_owned()
        } else {
            format!(
                "define it under [identities] or write the full spiffe:// ID (known aliases: {})",
                known.join(", ")
            )
        };
        self.error(entry.span(), format!("unknown identity alias `{s}`"), help);
        None
    }
}

/// What is wrong with a path pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatternError {
    #[error("it must start with `/`")]
    NotAbsolute,
    #[error("empty segment (`//` or a trailing `/`)")]
    EmptySegment,
    #[error("`.` and `..` segments are not allowed")]
    DotSegment,
    #[error("`**` must be the last segment")]
    RestNotLast,
    #[error("`*` must be a whole segment (`/a/*`, not `/a*`)")]
    PartialWildcard,
    #[error("{0}")]
    Refused(path::PathError),
    #[error("not in normal form; requests are matched as `{0}`")]
    NotNormal(String),
}

impl PatternError {
    fn help(&self) -> String {
        match self {
            Self::NotAbsolute => "start the pattern with `/`, e.g. \"/api/reports\"".to_owned(),
            Self::EmptySegment => {
                "remove the extra `/`: requests are matched with `//` merged and a trailing slash ignored".to_owned()
            }
            Self::DotSegment => "write the path the dot segments resolve to".to_owned(),
            Self::RestNotLast => {
                "use `*` for one segment in the middle; `/**` only at the end matches any depth".to_owned()
            }
            Self::PartialWildcard => "use `*` as a whole segment, or a literal segment".to_owned(),
            Self::Refused(_) => {
                "requests containing this are refused with 400 before matching, so no route can match it".to_owned()
            }
            Self::NotNormal(n) => format!("write the path as \"{n}\""),
        }
    }
}

/// Parses and validates a route's path pattern.
pub(crate) fn parse_path_pattern(p: &str) -> Result<Vec<Segment>, PatternError> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(PatternError::NotAbsolute);
    };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<&str> = rest.split('/').collect();
    let mut segments = Vec::with_capacity(raw.len());
    for (i, seg) in raw.iter().enumerate() {
        segments.push(match *seg {
            "" => return Err(PatternError::EmptySegment),
            "." | ".." => return Err(PatternError::DotSegment),
            "**" if i + 1 == raw.len() => Segment::Rest,
            "**" => return Err(PatternError::RestNotLast),
            "*" => Segment::Star,
            s if s.contains('*') => return Err(PatternError::PartialWildcard),
            s => Segment::Literal(s.into()),
        });
    }
    // The literal parts must be spelled exactly as `path::normalize` outputs requests, or the
    // route could never match. `*` is an ordinary path character to the normalizer.
    match path::normalize(p, &NormalizeOptions::default()) {
        Ok(n) if n == p => Ok(segments),
        Ok(n) => Err(PatternError::NotNormal(n.into_owned())),
        // `;` may be legitimate if the sidecar allows matrix parameters.
        Err(path::PathError::MatrixParam) => {
            let opts = NormalizeOptions {
                allow_matrix_params: true,
            };
            match path::normalize(p, &opts) {
                Ok(n) if n == p => Ok(segments),
                Ok(n) => Err(PatternError::NotNormal(n.into_owned())),
                Err(e) => Err(PatternError::Refused(e)),
            }
        }
        Err(e) => Err(PatternError::Refused(e)),
    }
}
