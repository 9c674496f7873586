//! Settings shared by the front ends: where data lives and how durable commits are.
//! Front ends layer defaults, `EUA_*` variables and flags into a [`Config`]
//! and pass it down explicitly.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::artifacts::{ArtifactsOptions, TestArtifactsManager};
use crate::blob::LocalBlobStore;
use crate::error::Result;
use crate::notify::EventSink;
use crate::store::Durability;
use crate::store::sqlite::{SqliteOptions, SqliteStore};

/// Name of the data directory under the user's data home.
pub const APP_DIR: &str = "eks-upgrade-agent";

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory holding the database and the blobs.
    pub data_dir: PathBuf,
    /// Commit durability.
    pub durability: Durability,
    /// Notification sinks (all off by default).
    pub notify: NotifyConfig,
    /// Shared artifact storage in S3 (off by default).
    pub s3: S3Config,
    /// Team mode (a database): most bytes the local blob directory keeps as a cache of S3.
    pub blob_cache_bytes: u64,
}

/// S3 settings (reference names: `s3_bucket`, `s3_prefix`, `auto_upload`).
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// Bucket; S3 is used when set.
    pub s3_bucket: Option<String>,
    /// Key prefix [default: `eks-upgrade-agent/artifacts`].
    pub s3_prefix: Option<String>,
    /// Queue every added artifact for upload.
    pub auto_upload: bool,
}

/// Where notifications go (reference names: `eventbridge_bus_name`, `aws_region`).
#[derive(Clone, Default)]
pub struct NotifyConfig {
    /// EventBridge bus; the EventBridge sink is on when set.
    pub eventbridge_bus_name: Option<String>,
    /// EventBridge `Detail` format.
    pub eventbridge_format: crate::notify::Format,
    /// Whether `eventbridge_format` was given explicitly.
    pub eventbridge_format_set: bool,
    /// AWS region [default: the standard AWS configuration].
    pub aws_region: Option<String>,
    /// `Source` of notifications [default: `eks-upgrade-agent`].
    pub source: Option<String>,
    /// Webhook URL; the webhook sink is on when set.
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key for the webhook signature (hidden from `Debug`).
    pub webhook_secret: Option<String>,
    /// Webhook payload format.
    pub webhook_format: crate::notify::Format,
    /// Whether `webhook_format` was given explicitly (so a lower layer must not override it).
    pub webhook_format_set: bool,
    /// OpenTelemetry (OTLP/HTTP traces); the OTLP sink is on when it names an endpoint.
    pub otlp: crate::notify::otlp::OtlpSettings,
    /// Timeout of one delivery call.
    pub timeout: Option<std::time::Duration>,
}

impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("eventbridge_bus_name", &self.eventbridge_bus_name)
            .field("eventbridge_format", &self.eventbridge_format)
            .field("aws_region", &self.aws_region)
            .field("source", &self.source)
            .field(
                "webhook_url",
                &self.webhook_url.as_deref().map(crate::net::redact),
            )
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<hidden>"),
            )
            .field("webhook_format", &self.webhook_format)
            .field("otlp", &self.otlp)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl NotifyConfig {
    /// True when no sink is configured.
    pub fn is_empty(&self) -> bool {
        self.eventbridge_bus_name.is_none()
            && self.webhook_url.is_none()
            && self.otlp.endpoint.is_none()
    }

    /// Builds the configured sinks; the OTLP sink reads the spans' history from `traces` (the
    /// store whose outbox feeds it).
    pub fn sinks(
        &self,
        traces: Arc<dyn crate::notify::otlp::TraceSource>,
    ) -> Result<Vec<Arc<dyn EventSink>>> {
        let source = self
            .source
            .as_deref()
            .unwrap_or(crate::notify::DEFAULT_SOURCE);
        let timeout = self.timeout.unwrap_or(std::time::Duration::from_secs(10));
        let mut sinks: Vec<Arc<dyn EventSink>> = Vec::new();
        if let Some(bus) = &self.eventbridge_bus_name {
            #[cfg(feature = "aws")]
            sinks.push(Arc::new(crate::notify::EventBridgeSink::from_env(
                bus,
                source,
                self.eventbridge_format,
                self.aws_region.as_deref(),
                timeout,
            )?));
            #[cfg(not(feature = "aws"))]
            return Err(crate::Error::invalid(format!(
                "EventBridge bus {bus:?} configured, but this build has no AWS support (feature `aws`)"
            )));
        }
        if let Some(url) = &self.webhook_url {
            sinks.push(Arc::new(crate::notify::WebhookSink::new(
                url,
                self.webhook_secret.as_deref(),
                self.webhook_format,
                source,
                timeout,
            )?));
        }
        if self.otlp.endpoint.is_some() {
            sinks.push(Arc::new(crate::notify::OtlpSink::new(
                &self.otlp, traces, timeout,
            )?));
        }
        Ok(sinks)
    }
}

impl Config {
    /// Settings with the default data directory and durability.
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            durability: Durability::default(),
            notify: NotifyConfig::default(),
            s3: S3Config::default(),
            blob_cache_bytes: crate::blob::cached::DEFAULT_CACHE_BYTES,
        }
    }

    /// Opens the embedded store these settings name, creating the data directory and the
    /// store when missing (for commands that write).
    pub fn open_store(&self) -> Result<SqliteStore> {
        SqliteStore::open(&self.data_dir, &self.sqlite_options())
    }

    /// Opens the embedded store only if it exists: `NotFound` naming the directory otherwise,
    /// and nothing is created (for commands that only read).
    pub fn open_existing_store(&self) -> Result<SqliteStore> {
        SqliteStore::open_existing(&self.data_dir, &self.sqlite_options())
    }

    fn sqlite_options(&self) -> SqliteOptions {
        SqliteOptions {
            durability: self.durability,
            ..SqliteOptions::default()
        }
    }
}

impl Config {
    /// Directory of the local blob store.
    pub fn blob_dir(&self) -> PathBuf {
        self.data_dir.join("blobs")
    }

    /// An artifacts manager over `store` (the index) and the local blob store, with S3 when a
    /// bucket is configured.
    pub fn artifacts_manager(&self, store: Arc<SqliteStore>) -> Result<TestArtifactsManager> {
        let blobs = LocalBlobStore::open(&self.blob_dir(), self.durability)?;
        let manager = TestArtifactsManager::new(
            store,
            Arc::new(blobs),
            ArtifactsOptions {
                auto_upload: self.s3.auto_upload && self.s3.s3_bucket.is_some(),
                ..ArtifactsOptions::default()
            },
        );
        #[cfg(feature = "aws")]
        if let Some(s3) = self.s3_store()? {
            return Ok(manager.with_s3(Arc::new(s3)));
        }
        Ok(manager)
    }

    /// Team mode: an artifacts manager over the database's index, with the bytes in S3 (which
    /// is then required) and the local blob directory as a read-through cache of at most
    /// `blob_cache_bytes`. Every put is in S3 before its artifact row commits, so any replica
    /// serves any artifact.
    #[cfg(feature = "aws")]
    pub fn team_artifacts_manager(
        &self,
        index: Arc<crate::store::PostgresStore>,
    ) -> Result<TestArtifactsManager> {
        let Some(s3) = self.s3_store()? else {
            return Err(crate::Error::invalid(
                "with a database (--database-url, EUA_DATABASE_URL) artifacts are kept in S3: \
                 set --s3-bucket (or EUA_S3_BUCKET, or s3_bucket in the config file)",
            ));
        };
        let s3 = Arc::new(s3);
        let cache = LocalBlobStore::open(&self.blob_dir(), self.durability)?;
        let blobs = crate::blob::CachedBlobStore::new(s3.clone(), cache, self.blob_cache_bytes)?;
        Ok(TestArtifactsManager::new(
            index,
            Arc::new(blobs),
            ArtifactsOptions {
                auto_upload: self.s3.auto_upload,
                ..ArtifactsOptions::default()
            },
        )
        .with_s3(s3))
    }

    /// The configured S3 store, if any.
    #[cfg(feature = "aws")]
    pub fn s3_store(&self) -> Result<Option<crate::blob::S3BlobStore>> {
        match &self.s3.s3_bucket {
            Some(bucket) => Ok(Some(crate::blob::S3BlobStore::from_env(
                bucket,
                self.s3_prefix(),
            )?)),
            None => Ok(None),
        }
    }

    /// The key prefix of uploads.
    pub fn s3_prefix(&self) -> &str {
        self.s3
            .s3_prefix
            .as_deref()
            .unwrap_or("eks-upgrade-agent/artifacts")
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

    /// TR4: `Debug` of the settings shows no URL password (webhook, OTLP endpoint).
    #[test]
    fn debug_hides_url_passwords() {
        let n = NotifyConfig {
            webhook_url: Some("https://u:s3cr3t@hooks.example.com/h".into()),
            otlp: crate::notify::otlp::OtlpSettings {
                endpoint: Some("https://u:s3cr3t@collector.example/v1/traces".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let shown = format!("{n:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("u:***@hooks.example.com"), "{shown}");
        assert!(shown.contains("u:***@collector.example"), "{shown}");
    }

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
