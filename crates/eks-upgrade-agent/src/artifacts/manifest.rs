//! The session manifest, `{prefix}/{session_id}/manifest.json`: what it holds, the S3 layout
//! its keys follow, and [`SessionManifest::validate`], which treats a pulled manifest as the
//! untrusted input it is (every field checked as a command would, every key recomputed from the
//! layout). Pure functions: no S3 here.

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ArtifactCollection, TestArtifact, TestSession};

/// What `{prefix}/{session_id}/manifest.json` holds: enough to rebuild the session's index on
/// another machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionManifest {
    /// Format version (1).
    pub format: u32,
    /// The session.
    pub session: TestSession,
    /// Its collections.
    pub collections: Vec<ArtifactCollection>,
    /// Its artifacts, with digests, keys, tags and metadata.
    pub artifacts: Vec<TestArtifact>,
}

/// Largest manifest `pull` reads.
pub const MAX_MANIFEST_BYTES: u64 = 256 * 1024 * 1024;

/// Latest timestamp a manifest may carry, relative to now (clock skew between machines).
const MAX_CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::days(1);

impl SessionManifest {
    /// Checks a manifest read from `s3://{bucket}/{prefix}/{session_id}/manifest.json` as the
    /// untrusted input it is, and returns what may be stored: every field passes the rules the
    /// commands apply (ids, names, tags, metadata and description sizes, retention in
    /// 1..=36,500 days, timestamps between 1970 and now), every artifact belongs to the
    /// session and one of its collections, names are already in their normal form, ids and
    /// export names are unique, `file_hash` is normalised to 64 lower-case hex digits, and every
    /// `s3_key` is exactly the layout key `{prefix}/{session}/{collection}/{export name}`
    /// (refused otherwise). Bucket and URL are not taken from the manifest: an uploaded
    /// artifact is recorded in `bucket`, the one the manifest was read from. Pure: no I/O.
    pub fn validate(
        &self,
        bucket: &str,
        prefix: &str,
        session_id: &str,
    ) -> Result<SessionManifest> {
        use crate::store::domain::command::{check_id, check_json, check_name};
        use std::collections::HashSet;

        let now = Utc::now();
        let latest = now.checked_add_signed(MAX_CLOCK_SKEW).unwrap_or(now);
        let check_time = |field: &str, t: &chrono::DateTime<Utc>| -> Result<()> {
            if t.timestamp() < 0 || *t > latest {
                return Err(Error::invalid(format!(
                    "{field} {t} is not between 1970 and now"
                )));
            }
            Ok(())
        };
        let check_description = |field: &str, d: &Option<String>| -> Result<()> {
            match d {
                Some(d) => crate::store::domain::command::check_text(field, d),
                None => Ok(()),
            }
        };
        let in_manifest =
            |e: Error| Error::invalid(format!("manifest of session {session_id:?}: {e}"));

        if self.format != 1 {
            return Err(Error::invalid(format!(
                "manifest of session {session_id:?} has format {}; this version reads format 1",
                self.format
            )));
        }
        check_id("session_id", session_id)?;
        let s = &self.session;
        if s.session_id != session_id {
            return Err(Error::invalid(format!(
                "the manifest of session {session_id:?} describes session {:?}",
                s.session_id
            )));
        }
        (|| -> Result<()> {
            check_id("upgrade_id", &s.upgrade_id)?;
            check_name("cluster_name", &s.cluster_name)?;
            check_name("session name", &s.name)?;
            check_description("session description", &s.description)?;
            super::check_retention_days(s.retention_days)?;
            check_time("started_at", &s.started_at)?;
            if let Some(c) = &s.completed_at {
                check_time("completed_at", c)?;
                if *c < s.started_at {
                    return Err(Error::invalid(format!(
                        "completed_at {c} is before started_at {}",
                        s.started_at
                    )));
                }
            }
            Ok(())
        })()
        .map_err(in_manifest)?;

        let mut collection_ids = HashSet::new();
        let mut collection_names = HashSet::new();
        for c in &self.collections {
            (|| -> Result<()> {
                check_id("collection_id", &c.collection_id)?;
                if c.session_id != session_id {
                    return Err(Error::invalid(format!(
                        "collection {:?} belongs to session {:?}",
                        c.collection_id, c.session_id
                    )));
                }
                check_name("collection name", &c.name)?;
                check_description("collection description", &c.description)?;
                if let Some(t) = &c.task_id {
                    check_id("task_id", t)?;
                }
                check_time("collection created_at", &c.created_at)?;
                if !collection_ids.insert(c.collection_id.as_str()) {
                    return Err(Error::invalid(format!(
                        "collection {:?} appears twice",
                        c.collection_id
                    )));
                }
                if !collection_names.insert(c.name.as_str()) {
                    return Err(Error::invalid(format!(
                        "two collections are named {:?}",
                        c.name
                    )));
                }
                Ok(())
            })()
            .map_err(in_manifest)?;
        }

        let mut artifact_ids = HashSet::new();
        let mut export_names = HashSet::new();
        let mut artifacts = Vec::with_capacity(self.artifacts.len());
        for a in &self.artifacts {
            let checked = (|| -> Result<TestArtifact> {
                check_id("artifact_id", &a.artifact_id)?;
                let what = format!("artifact {:?}", a.artifact_id);
                if a.session_id != session_id {
                    return Err(Error::invalid(format!(
                        "{what} belongs to session {:?}",
                        a.session_id
                    )));
                }
                if !collection_ids.contains(a.collection_id.as_str()) {
                    return Err(Error::invalid(format!(
                        "{what} names collection {:?}, which the manifest does not have",
                        a.collection_id
                    )));
                }
                if a.upgrade_id != s.upgrade_id {
                    return Err(Error::invalid(format!(
                        "{what} belongs to upgrade {:?}, the session to {:?}",
                        a.upgrade_id, s.upgrade_id
                    )));
                }
                for (field, name) in [("name", &a.name), ("export_name", &a.export_name)] {
                    let normal = super::names::sanitize_name(name)?;
                    if normal != *name {
                        return Err(Error::invalid(format!(
                            "{what}: {field} {name:?} is not in normal form ({normal:?})"
                        )));
                    }
                }
                check_description("description", &a.description)?;
                if a.file_size > i64::MAX as u64 {
                    return Err(Error::invalid(format!(
                        "{what}: file_size {} is too large",
                        a.file_size
                    )));
                }
                let hash = a.file_hash.to_ascii_lowercase();
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Error::invalid(format!(
                        "{what}: file_hash {:?} is not 64 hex digits",
                        a.file_hash
                    )));
                }
                if let Some(t) = &a.task_id {
                    check_id("task_id", t)?;
                }
                if let Some(t) = &a.step_id {
                    check_id("step_id", t)?;
                }
                super::check_tags(&a.tags)?;
                check_json("metadata", &a.metadata)?;
                check_time("created_at", &a.created_at)?;
                if let Some(t) = &a.uploaded_at {
                    check_time("uploaded_at", t)?;
                }
                if !artifact_ids.insert(a.artifact_id.as_str()) {
                    return Err(Error::invalid(format!("{what} appears twice")));
                }
                if !export_names.insert((a.collection_id.as_str(), a.export_name.as_str())) {
                    return Err(Error::invalid(format!(
                        "two artifacts of collection {:?} export as {:?}",
                        a.collection_id, a.export_name
                    )));
                }
                let mut out = a.clone();
                out.file_hash = hash;
                match &a.s3_key {
                    Some(key) => {
                        let expected = object_key(prefix, a);
                        if *key != expected {
                            return Err(Error::invalid(format!(
                                "{what} claims S3 key {key:?}; its key in this bucket is {expected:?}"
                            )));
                        }
                        out.s3_bucket = Some(bucket.to_owned());
                        out.s3_url = Some(format!("s3://{bucket}/{expected}"));
                        out.s3_key = Some(expected);
                    }
                    None => {
                        if a.status == crate::model::ArtifactStatus::Uploaded {
                            return Err(Error::invalid(format!("{what} is uploaded but has no S3 key")));
                        }
                        out.s3_bucket = None;
                        out.s3_url = None;
                    }
                }
                Ok(out)
            })()
            .map_err(in_manifest)?;
            artifacts.push(checked);
        }
        Ok(SessionManifest {
            format: 1,
            session: s.clone(),
            collections: self.collections.clone(),
            artifacts,
        })
    }
}

/// The key of a session's manifest.
pub fn manifest_key(prefix: &str, session_id: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        format!("{session_id}/manifest.json")
    } else {
        format!("{prefix}/{session_id}/manifest.json")
    }
}

/// The object key of an artifact.
pub fn object_key(prefix: &str, a: &TestArtifact) -> String {
    let prefix = prefix.trim_matches('/');
    let rest = format!("{}/{}/{}", a.session_id, a.collection_id, a.export_name);
    if prefix.is_empty() {
        rest
    } else {
        format!("{prefix}/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{ArtifactStatus, ArtifactType, JsonMap};

    const PREFIX: &str = "eks-upgrade-agent/artifacts";

    fn hostile() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just(" ".to_owned()),
            Just("..".to_owned()),
            Just("../../etc/passwd".to_owned()),
            Just("/abs".to_owned()),
            Just("a/b".to_owned()),
            Just("a\\b".to_owned()),
            Just("a//b/".to_owned()),
            Just("x\u{1b}[31m".to_owned()),
            Just("S1".to_owned()),
            Just("c2".to_owned()),
            Just("other-team/secret-backup.tar".to_owned()),
            Just("x".repeat(600)),
            "[a-zA-Z0-9/._ \\\\-]{0,12}",
            ".{0,6}",
        ]
    }

    /// `valid` most of the time, else something hostile.
    fn field(valid: &'static str) -> impl Strategy<Value = String> {
        prop_oneof![4 => Just(valid.to_owned()), 1 => hostile()]
    }

    fn time() -> impl Strategy<Value = chrono::DateTime<Utc>> {
        prop_oneof![
            4 => Just(chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap()),
            1 => any::<i32>().prop_map(|s| chrono::DateTime::from_timestamp(i64::from(s) * 1000, 0).unwrap()),
            1 => Just(chrono::DateTime::<Utc>::MAX_UTC),
            1 => Just(chrono::DateTime::<Utc>::MIN_UTC),
        ]
    }

    #[derive(Debug, Clone)]
    enum KeyChoice {
        None,
        Layout,
        OtherPrefix,
        Given(String),
    }

    fn artifact() -> impl Strategy<Value = (TestArtifact, KeyChoice)> {
        let ids = (field("a1"), field("S1"), field("c1"), field("u1"));
        let names = (field("logs/kubelet.log"), field("logs/kubelet.log"));
        let hash = prop_oneof![
            3 => Just("ab".repeat(32)),
            1 => Just("AB".repeat(32)),
            1 => "[0-9a-fA-Fg]{0,70}",
            1 => hostile(),
        ];
        let key = prop_oneof![
            2 => Just(KeyChoice::Layout),
            1 => Just(KeyChoice::None),
            1 => Just(KeyChoice::OtherPrefix),
            1 => hostile().prop_map(KeyChoice::Given),
        ];
        let bucket = prop_oneof![
            Just(None),
            Just(Some("team".to_owned())),
            Just(Some("other".to_owned()))
        ];
        let tags = prop::collection::vec(field("smoke"), 0..3);
        let misc = (
            any::<u64>(),
            prop::sample::select(ArtifactStatus::ALL),
            prop::sample::select(ArtifactType::ALL),
            time(),
            prop::option::of(field("t1")),
            prop_oneof![4 => Just(0usize), 1 => Just(70_000usize)],
        );
        (ids, names, hash, key, bucket, tags, misc).prop_map(
            |(
                (id, sid, cid, uid),
                (name, export),
                hash,
                key,
                bucket,
                tags,
                (size, status, ty, at, task, meta),
            )| {
                let mut metadata = JsonMap::new();
                if meta > 0 {
                    metadata.insert("big".into(), "x".repeat(meta).into());
                }
                (
                    TestArtifact {
                        artifact_id: id,
                        session_id: sid,
                        collection_id: cid,
                        name,
                        export_name: export,
                        description: None,
                        artifact_type: ty,
                        file_size: size,
                        file_hash: hash,
                        status,
                        s3_bucket: bucket,
                        s3_key: None,
                        s3_url: Some("s3://other/x".into()),
                        created_at: at,
                        uploaded_at: None,
                        task_id: task,
                        step_id: None,
                        upgrade_id: uid,
                        tags,
                        metadata,
                    },
                    key,
                )
            },
        )
    }

    fn manifest() -> impl Strategy<Value = SessionManifest> {
        let session = (
            (field("S1"), field("u1"), field("prod"), field("nightly")),
            prop_oneof![4 => Just(30u32), 1 => any::<u32>()],
            time(),
            prop::option::of(time()),
            prop_oneof![9 => Just(1u32), 1 => any::<u32>()],
        );
        let collections =
            prop::collection::vec((field("c1"), field("S1"), field("logs"), time()), 0..3);
        (
            session,
            collections,
            prop::collection::vec(artifact(), 0..4),
        )
            .prop_map(
                |(
                    ((sid, uid, cluster, name), retention, started, completed, format),
                    cols,
                    arts,
                )| {
                    let artifacts = arts
                        .into_iter()
                        .map(|(mut a, key)| {
                            a.s3_key = match key {
                                KeyChoice::None => None,
                                KeyChoice::Layout => Some(object_key(PREFIX, &a)),
                                KeyChoice::OtherPrefix => Some(object_key("elsewhere", &a)),
                                KeyChoice::Given(k) => Some(k),
                            };
                            a
                        })
                        .collect();
                    SessionManifest {
                        format,
                        session: TestSession {
                            session_id: sid,
                            upgrade_id: uid,
                            cluster_name: cluster,
                            name,
                            description: None,
                            started_at: started,
                            completed_at: completed,
                            retention_days: retention,
                        },
                        collections: cols
                            .into_iter()
                            .map(|(id, sid, name, at)| ArtifactCollection {
                                collection_id: id,
                                session_id: sid,
                                name,
                                description: None,
                                task_id: None,
                                created_at: at,
                            })
                            .collect(),
                        artifacts,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Whatever a manifest holds, validation never panics, and what it accepts is only
        /// ever valid fields and layout keys in the bucket pulled from.
        #[test]
        fn hostile_manifests_never_yield_a_key_outside_the_layout(m in manifest()) {
            let Ok(v) = m.validate("team", PREFIX, "S1") else { return Ok(()) };
            prop_assert_eq!(&v.session.session_id, "S1");
            prop_assert!((1..=36_500).contains(&v.session.retention_days));
            crate::store::domain::command::check_id("upgrade_id", &v.session.upgrade_id).unwrap();
            let cols: std::collections::HashSet<&str> =
                v.collections.iter().map(|c| c.collection_id.as_str()).collect();
            for c in &v.collections {
                prop_assert_eq!(&c.session_id, "S1");
                crate::store::domain::command::check_id("collection_id", &c.collection_id).unwrap();
            }
            for a in &v.artifacts {
                prop_assert_eq!(&a.session_id, "S1");
                prop_assert!(cols.contains(a.collection_id.as_str()));
                prop_assert_eq!(&a.upgrade_id, &v.session.upgrade_id);
                prop_assert_eq!(crate::artifacts::names::sanitize_name(&a.name).unwrap(), a.name.clone());
                prop_assert_eq!(crate::artifacts::names::sanitize_name(&a.export_name).unwrap(), a.export_name.clone());
                prop_assert!(a.file_hash.len() == 64
                    && a.file_hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
                prop_assert!(a.file_size <= i64::MAX as u64);
                match &a.s3_key {
                    Some(k) => {
                        prop_assert_eq!(k, &object_key(PREFIX, a));
                        let dir = format!("{}/S1/{}/", PREFIX, a.collection_id);
                        prop_assert!(k.starts_with(&dir));
                        prop_assert!(!k.split('/').any(|c| c == ".." || c == "." || c.is_empty()));
                        prop_assert_eq!(a.s3_bucket.as_deref(), Some("team"));
                        prop_assert_eq!(a.s3_url.clone(), Some(format!("s3://team/{k}")));
                    }
                    None => prop_assert!(a.s3_bucket.is_none() && a.s3_url.is_none()),
                }
            }
            // Validation is idempotent: what it returns passes again unchanged.
            prop_assert_eq!(v.validate("team", PREFIX, "S1").unwrap(), v);
        }
    }

    #[test]
    fn a_valid_manifest_passes_and_a_wrong_key_is_named() {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let mut a = TestArtifact {
            artifact_id: "a1".into(),
            session_id: "S1".into(),
            collection_id: "c1".into(),
            name: "r.xml".into(),
            export_name: "r.xml".into(),
            description: None,
            artifact_type: ArtifactType::TestResult,
            file_size: 3,
            file_hash: "AB".repeat(32),
            status: ArtifactStatus::Uploaded,
            s3_bucket: Some("other".into()),
            s3_key: None,
            s3_url: None,
            created_at: at,
            uploaded_at: Some(at),
            task_id: None,
            step_id: None,
            upgrade_id: "u1".into(),
            tags: vec![],
            metadata: JsonMap::new(),
        };
        a.s3_key = Some(object_key(PREFIX, &a));
        let mut m = SessionManifest {
            format: 1,
            session: TestSession {
                session_id: "S1".into(),
                upgrade_id: "u1".into(),
                cluster_name: "prod".into(),
                name: "n".into(),
                description: None,
                started_at: at,
                completed_at: Some(at),
                retention_days: 30,
            },
            collections: vec![ArtifactCollection {
                collection_id: "c1".into(),
                session_id: "S1".into(),
                name: "logs".into(),
                description: None,
                task_id: None,
                created_at: at,
            }],
            artifacts: vec![a],
        };
        let v = m.validate("team", PREFIX, "S1").unwrap();
        assert_eq!(v.artifacts[0].s3_bucket.as_deref(), Some("team"));
        assert_eq!(v.artifacts[0].file_hash, "ab".repeat(32));
        m.artifacts[0].s3_key = Some("eks-upgrade-agent/artifacts/VICTIM/c1/r.xml".into());
        let err = m.validate("team", PREFIX, "S1").unwrap_err().to_string();
        assert!(
            err.contains("claims S3 key") && err.contains("S1/c1/r.xml"),
            "{err}"
        );
        m.artifacts[0].s3_key = Some(object_key(PREFIX, &m.artifacts[0]));
        m.session.retention_days = u32::MAX;
        let err = m.validate("team", PREFIX, "S1").unwrap_err().to_string();
        assert!(err.contains("retention_days must be in 1..=36500"), "{err}");
    }
}
