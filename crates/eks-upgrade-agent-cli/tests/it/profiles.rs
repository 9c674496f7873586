//! Build profiles: the release binary carries no debug info (it measured 36.5 MiB, the target
//! being at most 40 MiB, where line tables made it 165 MiB); `profiling` and the benches keep
//! line tables for perf and flame graphs.

fn profiles() -> toml::Table {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let root: toml::Table = text.parse().unwrap();
    root["profile"].as_table().unwrap().clone()
}

#[test]
fn release_strips_debug_info_and_profiling_keeps_line_tables() {
    let p = profiles();
    let release = p["release"].as_table().unwrap();
    assert!(
        matches!(
            release.get("debug"),
            Some(toml::Value::Boolean(false)) | Some(toml::Value::Integer(0))
        ),
        "release must not carry debug info: {release:?}"
    );
    assert!(
        matches!(
            release.get("strip").and_then(|s| s.as_str()),
            Some("debuginfo" | "symbols")
        ),
        "release strips the debug info of the standard library too: {release:?}"
    );
    for name in ["profiling", "bench"] {
        let prof = p[name].as_table().unwrap();
        assert_eq!(
            prof.get("debug").and_then(|d| d.as_str()),
            Some("line-tables-only"),
            "{name}: {prof:?}"
        );
        assert_eq!(
            prof.get("strip").and_then(|d| d.as_str()),
            Some("none"),
            "{name} must not inherit release's strip: {prof:?}"
        );
    }
    assert_eq!(
        p["profiling"]["inherits"].as_str(),
        Some("release"),
        "profiling measures the release code"
    );
}
