//! The configuration file: TOML with the reference's setting names. Values in it sit between the
//! defaults and the `EUA_*` variables and flags. Unknown keys are errors, so a typo is reported
//! instead of ignored.
//!
//! ```toml
//! data_dir = "/var/lib/eks-upgrade-agent"
//! database_url = "postgres://eua:...@db.example.com/eua"   # team mode: PostgreSQL instead of the data dir
//! durability = "power_loss"            # or "process_crash" (default)
//! eventbridge_bus_name = "upgrade-events"
//! eventbridge_format = "reference"     # or "cloudevents"
//! aws_region = "eu-west-1"
//! event_source = "eks-upgrade-agent"
//! webhook_url = "https://hooks.example.com/eks"
//! webhook_secret = "..."
//! webhook_format = "cloudevents"       # or "reference" (default)
//! otlp_endpoint = "https://otel.example.com:4318"   # traces go to .../v1/traces
//! otlp_headers = ["x-honeycomb-team=..."]
//! otlp_compression = "gzip"            # or "none" (default)
//! otlp_service_name = "eks-upgrade-agent"
//! otlp_resource_attributes = ["deployment.environment=prod"]
//! s3_bucket = "team-upgrade-artifacts"
//! s3_prefix = "eks-upgrade-agent/artifacts"
//! auto_upload = true
//! blob_cache_size = "10GiB"            # team mode: the local cache of S3 blobs (default 1GiB)
//! tokens = ["<read token>:read", "<write token>:write"]   # for `serve`
//! public_urls = ["https://eua.example.com"]  # for `serve`: names and origins it answers to
//! allowed_hosts = ["upgrade-box:8080"]
//! allowed_origins = ["https://tools.example.com"]
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use eks_upgrade_agent::config::NotifyConfig;
use eks_upgrade_agent::notify::Format;
use eks_upgrade_agent::notify::otlp::{self, OtlpSettings};
use eks_upgrade_agent::store::Durability;

/// Settings read from the file; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) data_dir: Option<PathBuf>,
    /// `--database-url`: PostgreSQL instead of the data dir.
    pub(crate) database_url: Option<String>,
    pub(crate) durability: Option<Durability>,
    eventbridge_bus_name: Option<String>,
    eventbridge_format: Option<Format>,
    aws_region: Option<String>,
    event_source: Option<String>,
    webhook_url: Option<String>,
    webhook_secret: Option<String>,
    webhook_format: Option<Format>,
    otlp_endpoint: Option<String>,
    otlp_headers: Option<Vec<String>>,
    otlp_compression: Option<String>,
    otlp_service_name: Option<String>,
    otlp_resource_attributes: Option<Vec<String>>,
    pub(crate) s3_bucket: Option<String>,
    pub(crate) s3_prefix: Option<String>,
    pub(crate) auto_upload: Option<bool>,
    /// `--blob-cache-size`: team mode's local cache of S3 blobs, e.g. "10GiB".
    pub(crate) blob_cache_size: Option<String>,
    /// `serve`'s bearer tokens, `TOKEN:ROLE`.
    pub(crate) tokens: Option<Vec<String>>,
    /// `serve --public-url`.
    pub(crate) public_urls: Option<Vec<String>>,
    /// `serve --allowed-host`.
    pub(crate) allowed_hosts: Option<Vec<String>>,
    /// `serve --allowed-origin`.
    pub(crate) allowed_origins: Option<Vec<String>>,
}

/// `serve`'s allowed hosts and origins from the file.
#[derive(Debug, Default, Clone)]
pub(crate) struct FileGuard {
    pub(crate) public_urls: Vec<String>,
    pub(crate) allowed_hosts: Vec<String>,
    pub(crate) allowed_origins: Vec<String>,
}

impl FileConfig {
    /// `serve`'s allowed hosts and origins.
    pub(crate) fn guard(&self) -> FileGuard {
        FileGuard {
            public_urls: self.public_urls.clone().unwrap_or_default(),
            allowed_hosts: self.allowed_hosts.clone().unwrap_or_default(),
            allowed_origins: self.allowed_origins.clone().unwrap_or_default(),
        }
    }

    /// Fills what the flags and variables left unset.
    pub(crate) fn notify(&self, mut n: NotifyConfig) -> anyhow::Result<NotifyConfig> {
        n.eventbridge_bus_name = n.eventbridge_bus_name.or(self.eventbridge_bus_name.clone());
        n.aws_region = n.aws_region.or(self.aws_region.clone());
        if !n.eventbridge_format_set
            && let Some(f) = self.eventbridge_format
        {
            n.eventbridge_format = f;
        }
        n.source = n.source.or(self.event_source.clone());
        n.webhook_url = n.webhook_url.or(self.webhook_url.clone());
        n.webhook_secret = n.webhook_secret.or(self.webhook_secret.clone());
        if !n.webhook_format_set
            && let Some(f) = self.webhook_format
        {
            n.webhook_format = f;
        }
        let pairs = |key: &str, items: &Option<Vec<String>>| {
            items
                .iter()
                .flatten()
                .map(|i| otlp::parse_pair(key, i))
                .collect::<eks_upgrade_agent::Result<Vec<_>>>()
        };
        let file = OtlpSettings {
            endpoint: self
                .otlp_endpoint
                .as_deref()
                .filter(|e| !e.trim().is_empty())
                .map(otlp::endpoint_url),
            headers: pairs("otlp_headers", &self.otlp_headers)?,
            compression: self
                .otlp_compression
                .as_deref()
                .map(str::parse)
                .transpose()?,
            service_name: self.otlp_service_name.clone(),
            resource_attributes: pairs("otlp_resource_attributes", &self.otlp_resource_attributes)?,
            timeout: None,
        };
        n.otlp = std::mem::take(&mut n.otlp).over(file);
        Ok(n)
    }
}

fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("eks-upgrade-agent").join("config.toml"))
}

/// Reads `explicit` (which must exist), else the default file if it exists, else nothing.
pub(crate) fn load(explicit: Option<&Path>) -> anyhow::Result<FileConfig> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match default_path().filter(|p| p.exists()) {
            Some(p) => p,
            None => return Ok(FileConfig::default()),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
        .with_context(|| format!("invalid configuration file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_fill_only_what_flags_left_unset() {
        let f: FileConfig = toml::from_str(
            "eventbridge_bus_name = \"bus\"\nwebhook_format = \"cloudevents\"\ndurability = \"power_loss\"",
        )
        .unwrap();
        assert_eq!(f.durability, Some(Durability::PowerLoss));
        let n = f.notify(NotifyConfig::default()).unwrap();
        assert_eq!(n.eventbridge_bus_name.as_deref(), Some("bus"));
        assert_eq!(n.webhook_format, Format::Cloudevents);
        let flagged = NotifyConfig {
            eventbridge_bus_name: Some("flag".into()),
            webhook_format_set: true,
            ..NotifyConfig::default()
        };
        let n = f.notify(flagged).unwrap();
        assert_eq!(n.eventbridge_bus_name.as_deref(), Some("flag"));
        assert_eq!(n.webhook_format, Format::Reference);
        let err = toml::from_str::<FileConfig>("eventbridge_bus = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `eventbridge_bus`"), "{err}");
    }
}
