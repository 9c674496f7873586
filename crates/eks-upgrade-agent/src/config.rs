//! Settings shared by the front ends: where data lives and how durable commits are.
//! Front ends layer defaults, `EUA_*` variables and flags into a [`Config`]
//! and pass it down explicitly.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::artifacts::{ArtifactsOptions, TestArtifactsManager};
use crate::blob::LocalBlobStore;
use crate::error::Result;
use crate::store::Durability;
use crate::store::sqlite::{SqliteOptions, SqliteStore};

/// Name of the data directory under the user's data home.
pub const APP_DIR: &str = "eks-upgrade-agent";

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory holding the database (and, later, blobs).
    pub data_dir: PathBuf,
    /// Commit durability.
    pub durability: Durability,
}

impl Config {
    /// Settings with the default data directory and durability.
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            durability: Durability::default(),
        }
    }

    /// Opens the embedded store these settings name.
    pub fn open_store(&self) -> Result<SqliteStore> {
        SqliteStore::open(
            &self.data_dir,
            &SqliteOptions {
                durability: self.durability,
                ..SqliteOptions::default()
            },
        )
    }
}

impl Config {
    /// Directory of the local blob store.
    pub fn blob_dir(&self) -> PathBuf {
        self.data_dir.join("blobs")
    }

    /// An artifacts manager over `store` (the index) and the local blob store.
    pub fn artifacts_manager(&self, store: Arc<SqliteStore>) -> Result<TestArtifactsManager> {
        let blobs = LocalBlobStore::open(&self.blob_dir(), self.durability)?;
        Ok(TestArtifactsManager::new(
            store,
            Arc::new(blobs),
            ArtifactsOptions::default(),
        ))
    }
}

/// The default data directory: `$XDG_DATA_HOME/eks-upgrade-agent`, else
/// `$HOME/.local/share/eks-upgrade-agent`, else `./.eks-upgrade-agent`.
pub fn default_data_dir() -> PathBuf {
    default_data_dir_from(
        std::env::var_os("XDG_DATA_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

fn default_data_dir_from(xdg: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
    match (xdg.filter(|p| p.is_absolute()), home) {
        (Some(x), _) => x.join(APP_DIR),
        (None, Some(h)) => h.join(".local/share").join(APP_DIR),
        (None, None) => Path::new(".eks-upgrade-agent").to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_follows_xdg_then_home() {
        assert_eq!(
            default_data_dir_from(Some("/x".into()), Some("/h".into())),
            PathBuf::from("/x/eks-upgrade-agent")
        );
        assert_eq!(
            default_data_dir_from(Some("rel".into()), Some("/h".into())),
            PathBuf::from("/h/.local/share/eks-upgrade-agent")
        );
        assert_eq!(
            default_data_dir_from(None, None),
            PathBuf::from(".eks-upgrade-agent")
        );
    }
}
