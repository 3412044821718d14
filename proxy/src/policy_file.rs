//! Reading a policy file into a compiled [`Policy`] and the SHA-256 of its text: the one path
//! of the `[inbound]` policy and every `[[tcp_inbound]]` policy, at startup and on reload.

use gatehouse_policy::{Policy, SourceFile};
use sha2::{Digest, Sha256};

use crate::error::LoadError;
use crate::input::Input;

/// Compiles the policy read from `path` into `file`; the errors name the file (and line and
/// column where the policy compiler knows them).
pub(crate) fn load(
    path: &std::path::Path,
    file: &Input,
) -> Result<(Policy, String), Vec<LoadError>> {
    let bytes = file.bytes().map_err(|e| vec![LoadError::File(e)])?;
    let text = std::str::from_utf8(bytes).map_err(|e| {
        vec![LoadError::Policy(gatehouse_policy::Diagnostic::whole_file(
            path.display().to_string(),
            format!("the file is not UTF-8 text: {e}"),
            "save the policy as UTF-8 TOML",
        ))]
    })?;
    let src = SourceFile::new(path.display().to_string(), text);
    let sha = hex::encode(Sha256::digest(src.text().as_bytes()));
    let policy = Policy::compile(&src)
        .map_err(|ds| ds.into_iter().map(LoadError::Policy).collect::<Vec<_>>())?;
    Ok((policy, sha))
}
