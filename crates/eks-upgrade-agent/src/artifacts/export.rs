//! Export of a session to a directory (`{collection}/{export_name}`, verified, never
//! following a link out of it) and the atomic file write it and `get --out` use.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use uuid::Uuid;

use super::*;

/// Where an export reads from: a data dir's manager, or a server's API (the CLI's `--server`).
pub trait ExportSource {
    /// The session's summary (counts for the progress bar).
    fn session_summary(&self, session_id: &str) -> Result<SessionSummary>;
    /// The session's collections.
    fn collections(&self, session_id: &str) -> Result<Vec<ArtifactCollection>>;
    /// Every artifact of the session.
    fn for_each_artifact(
        &self,
        session_id: &str,
        f: &mut dyn FnMut(TestArtifact) -> Result<()>,
    ) -> Result<()>;
    /// The verified bytes of an artifact.
    fn open(&self, artifact_id: &str) -> Result<(TestArtifact, Box<dyn Read + Send>)>;
}

impl ExportSource for TestArtifactsManager {
    fn session_summary(&self, session_id: &str) -> Result<SessionSummary> {
        self.index.session_summary(session_id)
    }
    fn collections(&self, session_id: &str) -> Result<Vec<ArtifactCollection>> {
        self.index.collections(session_id)
    }
    fn for_each_artifact(
        &self,
        session_id: &str,
        f: &mut dyn FnMut(TestArtifact) -> Result<()>,
    ) -> Result<()> {
        self.index.for_each_artifact(Some(session_id), f)
    }
    fn open(&self, artifact_id: &str) -> Result<(TestArtifact, Box<dyn Read + Send>)> {
        TestArtifactsManager::open(self, artifact_id)
    }
}

/// Writes a session's artifacts, verified, to `dir/{collection}/{export_name}` (one directory
/// per collection, names made safe and unique). Refuses a non-empty `dir` unless `force`, and
/// never follows a link out of it. Failures of single files are reported, not fatal.
pub fn export_session_from(
    src: &dyn ExportSource,
    session_id: &str,
    dir: &Path,
    force: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportReport> {
    let summary = src.session_summary(session_id)?;
    if dir.exists() {
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        if !force && fs::read_dir(dir)?.next().is_some() {
            return Err(Error::invalid(format!(
                "{} is not empty; use --force to export into it anyway",
                dir.display()
            )));
        }
    }
    fs::create_dir_all(dir)?;
    let root = dir.canonicalize()?;
    // One directory per collection; names made safe and unique.
    let mut dirs: HashMap<String, PathBuf> = HashMap::new();
    let mut used: HashSet<String> = HashSet::new();
    for c in src.collections(session_id)? {
        let base = names::component(&c.name);
        let mut name = base.clone();
        let mut n = 2;
        while !used.insert(name.clone()) {
            name = format!("{base}~{n}");
            n += 1;
        }
        dirs.insert(c.collection_id, root.join(name));
    }
    let mut report = ExportReport::default();
    let mut p = Progress {
        files_total: summary.total_artifacts,
        bytes_total: summary.total_size_bytes,
        ..Progress::default()
    };
    progress(p);
    src.for_each_artifact(session_id, &mut |a| {
        if a.status == crate::model::ArtifactStatus::Deleted {
            return Ok(());
        }
        let Some(cdir) = dirs.get(&a.collection_id) else {
            return Ok(());
        };
        let target = cdir.join(&a.export_name);
        let result = (|| -> Result<u64> {
            let parent = target.parent().expect("export paths have a parent");
            fs::create_dir_all(parent)?;
            // Never follow a link out of the export directory (possible with --force).
            if !parent.canonicalize()?.starts_with(&root) {
                return Err(Error::invalid(format!(
                    "{} leads outside {}",
                    parent.display(),
                    root.display()
                )));
            }
            if fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(Error::invalid(format!(
                    "{} is a symbolic link",
                    target.display()
                )));
            }
            let (_, mut r) = src.open(&a.artifact_id)?;
            write_atomically(&target, &mut r)
        })();
        match result {
            Ok(bytes) => {
                report.files += 1;
                report.bytes += bytes;
            }
            Err(e) => report.failures.push((a.artifact_id.clone(), e.to_string())),
        }
        p.files_done += 1;
        p.bytes_done += a.file_size;
        progress(p);
        Ok(())
    })?;
    Ok(report)
}

/// Writes `reader` to `path` through a temp file in the same directory and a rename; on error
/// the temp file is removed and `path` is untouched.
pub fn write_atomically(path: &Path, reader: &mut dyn Read) -> Result<u64> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.part",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        Uuid::now_v7()
    ));
    let result = (|| -> Result<u64> {
        let mut f = File::create(&tmp)?;
        let n = io::copy(reader, &mut f)?;
        f.flush()?;
        fs::rename(&tmp, path)?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
