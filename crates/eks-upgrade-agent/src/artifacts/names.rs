//! Name rules for artifacts and collections. A name is used as a relative path on disk (export)
//! and in S3 keys, so it must never be able to escape a directory.
//!
//! Artifact names: `/`-separated relative paths (files added from a directory keep their path
//! below it); `\` is taken as `/`; empty and `.` components are dropped; `..`, absolute paths and
//! control characters are rejected; at most [`MAX_COMPONENT_BYTES`] per component and
//! [`MAX_NAME_BYTES`] in all.

use crate::error::{Error, Result};

/// Longest artifact name, in bytes.
pub const MAX_NAME_BYTES: usize = 512;
/// Longest path component, in bytes (the usual file system limit).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Checks and normalises an artifact name.
pub fn sanitize_name(raw: &str) -> Result<String> {
    if let Some(c) = raw.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(format!(
            "artifact name {raw:?} contains the control character {c:?}"
        )));
    }
    let unified = raw.replace('\\', "/");
    if unified.starts_with('/') || unified.get(1..3) == Some(":/") {
        return Err(Error::invalid(format!(
            "artifact name {raw:?} must be a relative path"
        )));
    }
    let mut parts = Vec::new();
    for part in unified.split('/') {
        match part.trim() {
            "" | "." => {}
            ".." => {
                return Err(Error::invalid(format!(
                    "artifact name {raw:?} must not contain '..'"
                )));
            }
            _ if part.len() > MAX_COMPONENT_BYTES => {
                return Err(Error::invalid(format!(
                    "a component of artifact name {raw:?} is {} bytes long; the limit is {MAX_COMPONENT_BYTES}",
                    part.len()
                )));
            }
            _ => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(Error::invalid(format!("artifact name {raw:?} is empty")));
    }
    let name = parts.join("/");
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(format!(
            "artifact name is {} bytes long; the limit is {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    Ok(name)
}

/// One safe path component for a collection's export directory: `/` and `\` become `_`, and
/// `.`/`..`/empty become `_`.
pub fn component(raw: &str) -> String {
    let s: String = raw
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let s = s.trim().to_owned();
    if s.is_empty() || s == "." || s == ".." {
        "_".to_owned()
    } else {
        s.chars().take(MAX_COMPONENT_BYTES / 4).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_or_rejected() {
        assert_eq!(sanitize_name("kubelet.log").unwrap(), "kubelet.log");
        assert_eq!(
            sanitize_name("nodes\\ip-1//./kubelet.log").unwrap(),
            "nodes/ip-1/kubelet.log"
        );
        for (bad, needle) in [
            ("../etc/passwd", "'..'"),
            ("a/../../b", "'..'"),
            ("/etc/passwd", "relative"),
            ("C:\\Windows", "relative"),
            ("a\nb", "control"),
            ("./", "empty"),
            ("", "empty"),
        ] {
            let err = sanitize_name(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
        assert!(
            sanitize_name(&"x".repeat(256))
                .unwrap_err()
                .to_string()
                .contains("limit is 255")
        );
        let long = vec!["y".repeat(200); 3].join("/");
        assert!(
            sanitize_name(&long)
                .unwrap_err()
                .to_string()
                .contains("limit is 512")
        );
    }

    #[test]
    fn components_never_traverse() {
        assert_eq!(component("Upgrade Logs"), "Upgrade Logs");
        assert_eq!(component("../x"), ".._x");
        assert_eq!(component(".."), "_");
        assert_eq!(component("a/b"), "a_b");
        assert_eq!(component(""), "_");
    }
}
