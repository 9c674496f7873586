//! [`S3BlobStore`]: the content-addressed [`BlobStore`] in an S3 bucket, with `object_store`
//! and the standard AWS settings (`AWS_REGION`/`AWS_DEFAULT_REGION`, credentials,
//! `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`; path-style requests when an endpoint is set; plain
//! http only for loopback endpoints).
//!
//! Keys: `{prefix}/blobs/sha256/ab/cdef...`. A put hashes while it streams; content up to
//! [`SINGLE_PUT_MAX`] is uploaded to its final key in one request, larger content as a multipart
//! upload (several parts in flight) to `{prefix}/tmp/<uuid>`, then copied onto its final key and
//! the temp object deleted, so no partial object is ever visible under a digest.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, WriteMultipart,
};
use sha2::{Digest as _, Sha256};
use tokio::runtime::Runtime;
use uuid::Uuid;

use super::{BlobInfo, BlobMeta, BlobStore, Digest, VerifyingReader};
use crate::error::{Error, Result};

/// Content up to this size is uploaded in one request.
pub const SINGLE_PUT_MAX: usize = 8 * 1024 * 1024;
/// Part size of multipart uploads.
const PART: usize = 8 * 1024 * 1024;
/// Parts in flight during a multipart upload.
const PARTS_IN_FLIGHT: usize = 4;
/// Temp objects older than this are leftovers of interrupted puts.
const TMP_GRACE: Duration = Duration::from_secs(3600);
/// The longest one request may take (a large part upload).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Retries of a failed request stop this long after the first attempt.
pub(crate) const RETRY_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests a delete makes at most (`delete_if_older`: the age check, `delete`'s check, the
/// delete); what the bound on a release mark's age is checked against.
#[cfg(test)]
pub(crate) const DELETE_REQUESTS: u32 = 3;

/// Where an [`S3BlobStore`] lives.
#[derive(Clone, Default)]
pub struct S3Options {
    /// Bucket.
    pub bucket: String,
    /// Key prefix.
    pub prefix: String,
    /// Endpoint URL (path-style requests; http only for loopback).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id and secret (hidden from `Debug`); the credential chain when `None`.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field(
                "endpoint",
                &self.endpoint.as_deref().map(crate::net::redact),
            )
            .field("region", &self.region)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

/// Blobs in an S3 bucket.
pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    runtime: Arc<Runtime>,
    /// Whether a region was given (options or `AWS_REGION` / `AWS_DEFAULT_REGION`); without
    /// one, requests go to us-east-1.
    region_configured: bool,
}

impl std::fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3BlobStore")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

pub(crate) use crate::net::{is_loopback, is_plain_http};

/// Checks an AWS endpoint URL: it parses, and uses plain http only towards loopback.
pub(crate) fn check_endpoint(what: &str, e: &str) -> Result<()> {
    let shown = crate::net::redact(e);
    if url::Url::parse(e).is_err() {
        return Err(Error::invalid(format!(
            "invalid {what} endpoint {shown:?}: expected a URL such as https://s3.example.com"
        )));
    }
    if is_plain_http(e) && !is_loopback(e) {
        return Err(Error::invalid(format!(
            "refusing plain http to {shown}: only loopback endpoints (localhost, 127.0.0.0/8, \
             [::1]) may use http"
        )));
    }
    Ok(())
}

fn backend(what: String, e: object_store::Error) -> Error {
    match e {
        // A missing bucket is not a missing object: say which.
        e @ object_store::Error::NotFound { .. } => match aws_cause(&what, &e) {
            Some(cause) if cause.starts_with("bucket ") => {
                Error::backend(format!("{what}: {cause}"), e)
            }
            _ => Error::not_found(what),
        },
        e @ (object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }) => Error::backend(
            format!(
                "{what}: {}; check the AWS credentials and the bucket policy",
                access_denied(&what)
            ),
            e,
        ),
        other => match aws_cause(&what, &other) {
            Some(cause) => Error::backend(format!("{what}: {cause}"), other),
            None => Error::backend(what, other),
        },
    }
}

/// `access denied to s3://BUCKET` for `what` naming `s3://BUCKET/...`.
fn access_denied(what: &str) -> String {
    format!("access denied to s3://{}", bucket_of(what))
}

/// The bucket of the first `s3://BUCKET/...` in `what`.
fn bucket_of(what: &str) -> &str {
    what.split("s3://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ' ', '"']).next())
        .unwrap_or("?")
}

/// What people can act on, when an S3 error is one of the usual ones: no credentials, access
/// denied, no such bucket (the same words for every artifact, so a report can say it once).
pub fn aws_cause(what: &str, e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut text = format!("{e:?}");
    let mut source = e.source();
    while let Some(s) = source {
        text.push('\n');
        text.push_str(&s.to_string());
        source = s.source();
    }
    let lower = text.to_ascii_lowercase();
    // No credentials in the environment: the last place looked is the instance metadata
    // service, whose failure is what comes back.
    if lower.contains("169.254.169.254")
        || lower.contains("/latest/api/token")
        || lower.contains("/latest/meta-data")
        || lower.contains("missing credentials")
        || lower.contains("instance metadata")
    {
        Some(NO_CREDENTIALS.to_owned())
    } else if lower.contains("nosuchbucket") || lower.contains("specified bucket does not exist") {
        Some(format!("bucket {} does not exist", bucket_of(what)))
    } else if lower.contains("accessdenied")
        || lower.contains("access denied")
        || lower.contains("403 forbidden")
    {
        Some(access_denied(what))
    } else {
        None
    }
}

/// What an S3 failure says when no region was configured and S3 refused the request the way it
/// refuses one sent to the wrong region (a 400 or a redirect).
pub const NO_REGION: &str = "no AWS region configured (set AWS_REGION to the bucket's region)";

/// Whether `e` is how S3 answers a request signed for, or sent to, the wrong region: a 400
/// (`AuthorizationHeaderMalformed`; a `HEAD` gets no body) or a redirect (`PermanentRedirect`).
fn wrong_region(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut text = format!("{e:?}");
    let mut source = e.source();
    while let Some(s) = source {
        text.push('\n');
        text.push_str(&s.to_string());
        source = s.source();
    }
    let lower = text.to_ascii_lowercase();
    [
        "authorizationheadermalformed",
        "permanentredirect",
        "status 400",
        "400 bad request",
        "status 301",
        "redirect",
    ]
    .iter()
    .any(|k| lower.contains(k))
}

/// What [`aws_cause`] says when no credentials were found.
pub const NO_CREDENTIALS: &str =
    "no AWS credentials found (environment, profile, instance metadata)";

impl S3BlobStore {
    /// A store in `bucket` under `prefix`, configured from the environment.
    pub fn from_env(bucket: &str, prefix: &str) -> Result<S3BlobStore> {
        S3BlobStore::new(&S3Options {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: std::env::var("AWS_ENDPOINT_URL_S3")
                .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
                .ok()
                .filter(|e| !e.is_empty()),
            region: std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()),
            credentials: None,
        })
    }

    /// A store with explicit settings; what they leave out comes from the environment.
    pub fn new(options: &S3Options) -> Result<S3BlobStore> {
        let bucket = options.bucket.as_str();
        if bucket.trim().is_empty() {
            return Err(Error::invalid("the S3 bucket name must not be empty"));
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // Every upload carries x-amz-checksum-sha256; S3 rejects bytes that do not match.
            .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
            // A few quick retries for transient errors; the upload queue does the long ones.
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: RETRY_TIMEOUT,
                ..object_store::RetryConfig::default()
            })
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(REQUEST_TIMEOUT),
            );
        if let Some(region) = &options.region {
            b = b.with_region(region);
        }
        if let Some((key, secret)) = &options.credentials {
            b = b.with_access_key_id(key).with_secret_access_key(secret);
        }
        if let Some(e) = &options.endpoint {
            check_endpoint("S3", e)?;
            b = b
                .with_endpoint(e)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(is_plain_http(e));
        }
        let prefix = options.prefix.as_str().trim_matches('/');
        if !prefix.is_empty() {
            object_path(prefix).map_err(|e| {
                Error::invalid(format!("invalid S3 key prefix {:?}: {e}", options.prefix))
            })?;
        }
        let store = b
            .build()
            .map_err(|e| Error::backend(format!("cannot configure S3 bucket {bucket:?}"), e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("eua-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::backend("cannot start the S3 client runtime", e))?;
        let region_configured = options.region.is_some()
            || ["AWS_REGION", "AWS_DEFAULT_REGION"]
                .iter()
                .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()));
        Ok(S3BlobStore {
            region_configured,
            store: Arc::new(store),
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            runtime: Arc::new(runtime),
        })
    }

    /// [`backend`], naming the missing region when none was configured and S3 answered as it
    /// does to the wrong region.
    fn backend(&self, what: String, e: object_store::Error) -> Error {
        if !self.region_configured && wrong_region(&e) {
            return Error::backend(format!("{what}: {NO_REGION}"), e);
        }
        backend(what, e)
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn under_prefix(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_owned()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    /// The object key of a blob.
    pub fn key(&self, digest: &Digest) -> String {
        let hex = digest.to_hex();
        self.under_prefix(&format!("blobs/sha256/{}/{}", &hex[..2], &hex[2..]))
    }

    fn blob_dir(&self) -> Result<ObjPath> {
        object_path(&self.under_prefix("blobs/sha256"))
    }

    fn path(&self, digest: &Digest) -> Result<ObjPath> {
        object_path(&self.key(digest))
    }

    fn tmp_dir(&self) -> Result<ObjPath> {
        object_path(&self.under_prefix("tmp"))
    }

    fn head(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.runtime.block_on(self.store.head(&self.path(digest)?)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend(
                format!("cannot read s3://{}/{}", self.bucket, self.key(digest)),
                e,
            )),
        }
    }

    /// Multipart upload of `first` and the rest of `reader` to a temp key; returns the digest,
    /// size and temp key.
    fn upload_large(
        &self,
        first: Vec<u8>,
        reader: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(Digest, u64, ObjPath)> {
        let tmp = self.tmp_dir()?.join(format!("{}.part", Uuid::now_v7()));
        let store = Arc::clone(&self.store);
        let rt = &self.runtime;
        // Parts are uploaded by tasks spawned on the runtime's workers while this thread reads.
        let _context = rt.enter();
        let upload = rt.block_on(store.put_multipart(&tmp)).map_err(|e| {
            self.backend(
                format!("cannot start an upload to s3://{}/{tmp}", self.bucket),
                e,
            )
        })?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut chunk = first;
        let result = (|| -> Result<()> {
            loop {
                if chunk.is_empty() {
                    return Ok(());
                }
                hasher.update(&chunk);
                total += chunk.len() as u64;
                rt.block_on(writer.wait_for_capacity(PARTS_IN_FLIGHT))
                    .map_err(|e| {
                        self.backend(format!("upload to s3://{}/{tmp} failed", self.bucket), e)
                    })?;
                writer.put(Bytes::from(std::mem::take(&mut chunk)));
                progress(total);
                let mut next = vec![0u8; PART];
                let n = super::local::fill(reader, &mut next)?;
                next.truncate(n);
                chunk = next;
            }
        })();
        match result {
            Ok(()) => {
                rt.block_on(writer.finish()).map_err(|e| {
                    self.backend(format!("upload to s3://{}/{tmp} failed", self.bucket), e)
                })?;
                Ok((Digest(hasher.finalize().into()), total, tmp))
            }
            Err(e) => {
                let _ = rt.block_on(writer.abort());
                Err(e)
            }
        }
    }
}

/// Uploads of artifacts under their reference keys (`{prefix}/{session}/{collection}/{name}`),
/// next to the content-addressed blobs of the same bucket.
impl S3BlobStore {
    /// The `file-hash` user metadata of the object at `key`, `None` if there is no object.
    pub fn object_hash(&self, key: &str) -> Result<Option<String>> {
        let path = object_path(key)?;
        let opts = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match self.runtime.block_on(self.store.get_opts(&path, opts)) {
            Ok(r) => Ok(r
                .attributes
                .get(&Attribute::Metadata("file-hash".into()))
                .map(|v| v.as_ref().to_owned())
                .or(Some(String::new()))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend(format!("cannot read s3://{}/{key}", self.bucket), e)),
        }
    }

    /// Uploads `size` bytes of `reader` to `key` with user `metadata`: one request up to
    /// `multipart_threshold`, else a multipart upload with parts in flight, streaming.
    pub fn upload_object(
        &self,
        key: &str,
        reader: &mut dyn Read,
        size: u64,
        metadata: &[(&'static str, String)],
        multipart_threshold: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let path = object_path(key)?;
        let mut attributes = Attributes::new();
        for (k, v) in metadata {
            attributes.insert(
                Attribute::Metadata((*k).into()),
                AttributeValue::from(v.clone()),
            );
        }
        let fail = |e: object_store::Error| {
            self.backend(format!("upload to s3://{}/{key} failed", self.bucket), e)
        };
        if size <= multipart_threshold {
            let mut body = Vec::with_capacity(size as usize);
            reader.read_to_end(&mut body)?;
            let opts = PutOptions {
                attributes,
                ..PutOptions::default()
            };
            let n = body.len() as u64;
            self.runtime
                .block_on(self.store.put_opts(&path, PutPayload::from(body), opts))
                .map_err(fail)?;
            progress(n);
            return Ok(());
        }
        let _context = self.runtime.enter();
        let opts = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        let upload = self
            .runtime
            .block_on(self.store.put_multipart_opts(&path, opts))
            .map_err(fail)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut total = 0u64;
        let result = (|| -> Result<()> {
            loop {
                let mut chunk = vec![0u8; PART];
                let n = super::local::fill(reader, &mut chunk)?;
                if n == 0 {
                    return Ok(());
                }
                chunk.truncate(n);
                self.runtime
                    .block_on(writer.wait_for_capacity(PARTS_IN_FLIGHT))
                    .map_err(fail)?;
                writer.put(Bytes::from(chunk));
                total += n as u64;
                progress(total);
            }
        })();
        match result {
            Ok(()) => {
                self.runtime.block_on(writer.finish()).map_err(fail)?;
                Ok(())
            }
            Err(e) => {
                let _ = self.runtime.block_on(writer.abort());
                Err(e)
            }
        }
    }

    /// A reader of the object at `key` that verifies it hashes to `digest`.
    pub fn open_object(&self, key: &str, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        let path = object_path(key)?;
        let got = self
            .runtime
            .block_on(self.store.get(&path))
            .map_err(|e| self.backend(format!("s3://{}/{key}", self.bucket), e))?;
        Ok(Box::new(VerifyingReader::new(
            ObjectReader {
                runtime: Arc::clone(&self.runtime),
                stream: got.into_stream(),
                current: Bytes::new(),
            },
            *digest,
        )))
    }

    /// A reader of the object at `key`, not verified (for objects without a known digest, such
    /// as manifests).
    pub fn open_object_unverified(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        let path = object_path(key)?;
        let got = self
            .runtime
            .block_on(self.store.get(&path))
            .map_err(|e| self.backend(format!("s3://{}/{key}", self.bucket), e))?;
        Ok(Box::new(ObjectReader {
            runtime: Arc::clone(&self.runtime),
            stream: got.into_stream(),
            current: Bytes::new(),
        }))
    }

    /// Deletes the object at `key` (no error if it is absent).
    pub fn delete_object(&self, key: &str) -> Result<()> {
        self.runtime
            .block_on(self.store.delete(&object_path(key)?))
            .map_err(|e| self.backend(format!("cannot delete s3://{}/{key}", self.bucket), e))
    }
}

/// The object path of the S3 key `key`, exactly as written. `ObjPath::from` would
/// percent-encode characters such as `~`, `[` or `#` into the key itself (`report~2.xml`
/// stored as `report%7E2.xml`); `parse` takes the key as is and refuses only empty, `.` and
/// `..` segments and control characters.
pub(crate) fn object_path(key: &str) -> Result<ObjPath> {
    ObjPath::parse(key).map_err(|e| Error::invalid(format!("invalid S3 key {key:?}: {e}")))
}

/// A blocking reader over an object's byte stream.
struct ObjectReader {
    runtime: Arc<Runtime>,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.runtime.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

impl BlobStore for S3BlobStore {
    fn put(&self, reader: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<BlobInfo> {
        let mut head = vec![0u8; SINGLE_PUT_MAX + 1];
        let n = super::local::fill(reader, &mut head)?;
        head.truncate(n);
        if n <= SINGLE_PUT_MAX {
            let digest = Digest::of(&head);
            // An object already there is not trusted: these bytes (known to hash to the
            // digest) replace it, which also refreshes its modification time.
            let existed = self.head(&digest)?.is_some();
            let key = self.path(&digest)?;
            self.runtime
                .block_on(self.store.put(&key, PutPayload::from(head)))
                .map_err(|e| {
                    self.backend(format!("cannot upload s3://{}/{key}", self.bucket), e)
                })?;
            progress(n as u64);
            return Ok(BlobInfo {
                digest,
                size: n as u64,
                created: !existed,
            });
        }
        let (digest, size, tmp) = self.upload_large(head, reader, progress)?;
        // As above: the verified upload replaces whatever is under the digest.
        let existed = self.head(&digest)?.is_some();
        let key = self.path(&digest)?;
        self.runtime
            .block_on(self.store.copy(&tmp, &key))
            .map_err(|e| self.backend(format!("cannot store s3://{}/{key}", self.bucket), e))?;
        let created = !existed;
        let _ = self.runtime.block_on(self.store.delete(&tmp));
        Ok(BlobInfo {
            digest,
            size,
            created,
        })
    }

    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        let key = self.path(digest)?;
        let got = self.runtime.block_on(self.store.get(&key)).map_err(|e| {
            self.backend(
                format!("blob sha256:{digest} (s3://{}/{key})", self.bucket),
                e,
            )
        })?;
        Ok(Box::new(VerifyingReader::new(
            ObjectReader {
                runtime: Arc::clone(&self.runtime),
                stream: got.into_stream(),
                current: Bytes::new(),
            },
            *digest,
        )))
    }

    fn exists(&self, digest: &Digest) -> Result<bool> {
        Ok(self.head(digest)?.is_some())
    }

    fn size(&self, digest: &Digest) -> Result<u64> {
        self.head(digest)?
            .ok_or_else(|| Error::not_found(format!("blob sha256:{digest}")))
    }

    fn delete(&self, digest: &Digest) -> Result<bool> {
        if self.head(digest)?.is_none() {
            return Ok(false);
        }
        let key = self.path(digest)?;
        self.runtime
            .block_on(self.store.delete(&key))
            .map_err(|e| self.backend(format!("cannot delete s3://{}/{key}", self.bucket), e))?;
        Ok(true)
    }

    fn list(&self, f: &mut dyn FnMut(BlobMeta) -> Result<()>) -> Result<()> {
        let prefix = self.blob_dir()?;
        let mut stream = self.store.list(Some(&prefix));
        while let Some(item) = self.runtime.block_on(stream.next()) {
            let meta = item.map_err(|e| {
                self.backend(format!("cannot list s3://{}/{prefix}", self.bucket), e)
            })?;
            let parts: Vec<String> = meta
                .location
                .parts()
                .map(|p| p.as_ref().to_owned())
                .collect();
            let n = parts.len();
            if n < 2 {
                continue;
            }
            let Ok(digest) = format!("{}{}", parts[n - 2], parts[n - 1]).parse::<Digest>() else {
                continue;
            };
            f(BlobMeta {
                digest,
                size: meta.size,
                modified: Some(SystemTime::from(meta.last_modified)),
            })?;
        }
        Ok(())
    }

    fn delete_if_older(&self, digest: &Digest, cutoff: SystemTime) -> Result<bool> {
        // S3 has no conditional delete on age: check, then delete (a put landing in between
        // is the one race left; gc's grace period makes it unlikely).
        let path = self.path(digest)?;
        let modified = match self.runtime.block_on(self.store.head(&path)) {
            Ok(meta) => SystemTime::from(meta.last_modified),
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => {
                return Err(self.backend(
                    format!("cannot read s3://{}/{}", self.bucket, self.key(digest)),
                    e,
                ));
            }
        };
        if modified > cutoff {
            return Ok(false);
        }
        self.delete(digest)
    }

    fn sweep_incomplete(&self) -> Result<u64> {
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(TMP_GRACE).unwrap_or_default();
        let tmp = self.tmp_dir()?;
        let mut stream = self.store.list(Some(&tmp));
        let mut removed = 0;
        while let Some(item) = self.runtime.block_on(stream.next()) {
            let meta = item
                .map_err(|e| self.backend(format!("cannot list s3://{}/{tmp}", self.bucket), e))?;
            if meta.last_modified < cutoff
                && self
                    .runtime
                    .block_on(self.store.delete(&meta.location))
                    .is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Moto;

    /// TR4: an endpoint's password never reaches the refusal (S3 and EventBridge share it).
    #[test]
    fn endpoint_refusals_hide_passwords() {
        for e in ["http://u:s3cr3t@s3.example.com", "http://u:s3cr3t@[s3"] {
            let err = check_endpoint("S3", e).unwrap_err().to_string();
            assert!(err.contains("u:***@") && !err.contains("s3cr3t"), "{err}");
        }
        assert!(check_endpoint("S3", "http://u:s3cr3t@127.0.0.1:9000").is_ok());
        // Nor does Debug show them.
        let options = S3Options {
            bucket: "b".into(),
            endpoint: Some("http://u:s3cr3t@127.0.0.1:9000".into()),
            ..S3Options::default()
        };
        let shown = format!("{options:?}");
        assert!(
            shown.contains("u:***@127.0.0.1") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn loopback_detection() {
        for yes in [
            "http://127.0.0.1:9000",
            "http://127.1.2.3",
            "http://localhost:9000/x",
            "http://LOCALHOST",
            "http://[::1]:9",
            "http://[::1]",
            // Loopback is about the host: user info does not change it.
            "http://user:pw@127.0.0.1:9000",
            "http://user@localhost/",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "http://s3.example.com",
            "http://127.evil.example:9",
            "http://127.0.0.1.evil.example",
            "http://localhost.evil",
            "http://localhost.evil:9000",
            "http://127.0.0.1@evil.example",
            "http://127.0.0.1:9000@evil.example/",
            "http://evil.example#@127.0.0.1",
            "http://evil.example?127.0.0.1",
            "http://[::2]:9",
            "http://10.0.0.1",
            "http://0.0.0.0:9",
            "not a url",
            "",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
        for hostile in [
            "http://127.evil.example:9",
            "http://127.0.0.1.evil.example",
            "http://localhost.evil",
            "http://127.0.0.1@evil.example",
            "HTTP://evil.example",
        ] {
            let err = S3BlobStore::new(&S3Options {
                bucket: "b".into(),
                endpoint: Some(hostile.into()),
                ..S3Options::default()
            })
            .unwrap_err();
            assert!(
                err.to_string().contains(
                    "only loopback endpoints (localhost, 127.0.0.0/8, [::1]) may use http"
                ),
                "{hostile}: {err}"
            );
        }
        let err = S3BlobStore::new(&S3Options {
            bucket: "b".into(),
            endpoint: Some("http://s3.example.com".into()),
            ..S3Options::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("only loopback endpoints"), "{err}");
    }

    #[test]
    fn conformance_against_moto() {
        let moto = Moto::start();
        moto.create_bucket("blobs");
        let options = S3Options {
            bucket: "blobs".into(),
            prefix: String::new(),
            endpoint: Some(moto.url.clone()),
            region: Some("us-east-1".into()),
            credentials: Some(("testing".into(), "testing".into())),
        };
        conformance_on(options);
    }

    #[test]
    fn large_content_goes_through_multipart_and_leaves_no_temp_object() {
        let moto = Moto::start();
        moto.create_bucket("big");
        let store = S3BlobStore::new(&S3Options {
            bucket: "big".into(),
            prefix: "p".into(),
            endpoint: Some(moto.url.clone()),
            region: Some("us-east-1".into()),
            credentials: Some(("testing".into(), "testing".into())),
        })
        .unwrap();
        let mut x = 7u64;
        let data: Vec<u8> = (0..20 * 1024 * 1024 + 3)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut seen = 0;
        let info = store.put(&mut data.as_slice(), &mut |b| seen = b).unwrap();
        assert!(info.created);
        assert_eq!(
            (info.digest, info.size, seen),
            (Digest::of(&data), data.len() as u64, data.len() as u64)
        );
        let mut back = Vec::new();
        store
            .open(&info.digest)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data, "round trip through multipart");
        assert!(
            !store
                .put(&mut data.as_slice(), &mut |_| {})
                .unwrap()
                .created,
            "dedupe"
        );
        // A reader failing half way leaves nothing behind.
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(1);
                self.0 -= n;
                Ok(n)
            }
        }
        assert!(
            store
                .put(&mut Failing(12 * 1024 * 1024), &mut |_| {})
                .is_err()
        );
        let all: Vec<String> = store.runtime.block_on(
            store
                .store
                .list(None)
                .map(|m| m.unwrap().location.to_string())
                .collect::<Vec<_>>(),
        );
        assert_eq!(
            all,
            [store.key(&info.digest)],
            "only the blob, no temp object"
        );
    }

    fn conformance_on(options: S3Options) {
        let counter = std::sync::atomic::AtomicUsize::new(0);
        crate::blob::conformance::run(&|| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let store = Arc::new(
                S3BlobStore::new(&S3Options {
                    prefix: format!("run-{n}"),
                    ..options.clone()
                })
                .unwrap(),
            );
            let handle = Arc::clone(&store);
            let corrupt: Box<dyn Fn(&Digest)> = Box::new(move |d: &Digest| {
                let key = handle.path(d).unwrap();
                handle
                    .runtime
                    .block_on(
                        handle
                            .store
                            .put(&key, PutPayload::from(b"not the original bytes".to_vec())),
                    )
                    .unwrap();
            });
            (Box::new(store) as Box<dyn BlobStore>, corrupt)
        });
    }

    #[test]
    fn conformance_against_s3s_fs_with_sigv4_and_wrong_credentials() {
        use crate::test_support::{S3S_KEY, S3sFs};
        let server = S3sFs::start("eua");
        let options = S3Options {
            bucket: "eua".into(),
            prefix: String::new(),
            endpoint: Some(server.url.clone()),
            region: Some("us-east-1".into()),
            credentials: Some((S3S_KEY.0.into(), S3S_KEY.1.into())),
        };
        conformance_on(options.clone());
        // Wrong credentials: a clear error naming the bucket and the cause.
        let wrong = S3BlobStore::new(&S3Options {
            credentials: Some((S3S_KEY.0.into(), "not-the-secret".into())),
            ..options
        })
        .unwrap();
        let err = wrong.put(&mut &b"x"[..], &mut |_| {}).unwrap_err();
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            chain.push_str(&format!(": {s}"));
            source = s.source();
        }
        assert!(chain.contains("s3://eua/"), "{chain}");
        assert!(
            chain.contains("access denied to s3://eua; check the AWS credentials"),
            "{chain}"
        );
        assert!(chain.contains("403"), "{chain}");
    }
}
