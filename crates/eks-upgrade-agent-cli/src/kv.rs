//! `KEY=VALUE` arguments (`--meta`, `--detail`). Values that parse as JSON scalars or
//! structures (`3`, `true`, `{"a":1}`, `"3"`) keep their type; anything else is a string.

use eks_upgrade_agent::model::JsonMap;
use serde_json::Value;

/// Parses one `KEY=VALUE`.
pub(crate) fn parse_kv(s: &str) -> Result<(String, Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("empty key in {s:?}"));
    }
    if k.chars().any(char::is_control) {
        return Err(format!("control character in key {k:?}"));
    }
    let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_owned()));
    Ok((k.to_owned(), value))
}

/// Collects parsed pairs into a JSON object (later keys win).
pub(crate) fn to_map(pairs: Vec<(String, Value)>) -> JsonMap {
    pairs.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_keep_json_types() {
        assert_eq!(parse_kv("nodes=3").unwrap(), ("nodes".into(), json!(3)));
        assert_eq!(parse_kv("ok=true").unwrap(), ("ok".into(), json!(true)));
        assert_eq!(
            parse_kv("az=eu-west-1a").unwrap(),
            ("az".into(), json!("eu-west-1a"))
        );
        assert_eq!(parse_kv("q=\"3\"").unwrap(), ("q".into(), json!("3")));
        assert_eq!(parse_kv("e=").unwrap(), ("e".into(), json!("")));
        assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), json!("b=c")));
    }

    #[test]
    fn malformed_pairs_are_rejected() {
        assert!(parse_kv("novalue").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_kv("=3").unwrap_err().contains("empty key"));
    }
}
