//! What `artifacts upload` and `artifacts pull` ask for: built by `artifacts`, sent as is to a
//! server by `remote_artifacts` (so neither module imports the other for them).

/// What `artifacts upload` asks for.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct UploadRequest {
    pub(crate) session: Option<String>,
    pub(crate) artifact: Option<String>,
    pub(crate) all: bool,
    pub(crate) retry_failed: bool,
    pub(crate) multipart_threshold: Option<u64>,
}

/// What `artifacts pull` asks for.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct PullRequest {
    pub(crate) session_id: String,
    pub(crate) bucket: String,
    pub(crate) prefix: Option<String>,
    pub(crate) eager: bool,
}
