//! File events: the directories holding the watched files (see the module docs of
//! [`crate::reload`] for why directories).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Reloader;

impl Reloader {
    /// Starts watching the directories of the watched files; `None` (polling only) when
    /// notify cannot watch them.
    pub(super) fn watch(
        &self,
        tx: mpsc::UnboundedSender<()>,
    ) -> Option<notify::RecommendedWatcher> {
        use notify::{EventKind, RecursiveMode, Watcher};
        let dirs: BTreeSet<PathBuf> = self
            .paths
            .iter()
            .flatten()
            .map(|p| p.parent().unwrap_or(Path::new("/")).to_path_buf())
            .collect();
        let handler = move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && !matches!(ev.kind, EventKind::Access(_))
            {
                let _ = tx.send(());
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "cannot start the file watcher: reloading by polling only");
                return None;
            }
        };
        for dir in &dirs {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                warn!(dir = %dir.display(), error = %e, "cannot watch directory: changes there are seen by polling only");
            }
        }
        debug!(dirs = ?dirs, "watching for changes");
        Some(watcher)
    }
}
