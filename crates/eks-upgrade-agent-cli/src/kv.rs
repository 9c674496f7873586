//! `KEY=VALUE` arguments. `--meta` and `--detail` values are strings, always (`to=1.30` stays
//! the string `"1.30"`: Kubernetes versions are the main metadata here); `--meta-json` and
//! `--detail-json` take a JSON value (`nodes=3`, `ok=true`, `tags=["a","b"]`) for typed values.

use eks_upgrade_agent::model::JsonMap;
use serde_json::Value;

fn split(s: &str) -> Result<(String, &str), String> {
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
    Ok((k.to_owned(), v))
}

/// Parses one `KEY=VALUE`; the value is a string.
pub(crate) fn parse_kv(s: &str) -> Result<(String, Value), String> {
    let (k, v) = split(s)?;
    Ok((k, Value::String(v.to_owned())))
}

/// Parses one `KEY=JSON`; the value must be valid JSON.
pub(crate) fn parse_kv_json(s: &str) -> Result<(String, Value), String> {
    let (k, v) = split(s)?;
    let value = serde_json::from_str::<Value>(v).map_err(|e| {
        format!("the value of {k} is not valid JSON ({e}); use --meta/--detail for a plain string")
    })?;
    Ok((k, value))
}

/// Collects parsed pairs into a JSON object: plain pairs, then JSON pairs (later keys win).
pub(crate) fn to_map(plain: Vec<(String, Value)>, typed: Vec<(String, Value)>) -> JsonMap {
    plain.into_iter().chain(typed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_values_are_strings() {
        for (arg, value) in [
            ("to=1.30", "1.30"),
            ("from=1.29", "1.29"),
            ("nodes=3", "3"),
            ("ok=true", "true"),
            ("q=\"3\"", "\"3\""),
            ("e=", ""),
            ("a=b=c", "b=c"),
            ("az=eu-west-1a", "eu-west-1a"),
        ] {
            let (k, v) = parse_kv(arg).unwrap();
            assert_eq!(v, json!(value), "{arg}");
            assert_eq!(k, arg.split('=').next().unwrap());
        }
    }

    #[test]
    fn json_values_keep_their_type() {
        assert_eq!(
            parse_kv_json("nodes=3").unwrap(),
            ("nodes".into(), json!(3))
        );
        assert_eq!(
            parse_kv_json("ok=true").unwrap(),
            ("ok".into(), json!(true))
        );
        assert_eq!(
            parse_kv_json("v=\"1.30\"").unwrap(),
            ("v".into(), json!("1.30"))
        );
        assert_eq!(
            parse_kv_json("l=[1,{\"a\":null}]").unwrap(),
            ("l".into(), json!([1, {"a": null}]))
        );
        let err = parse_kv_json("v=1.30.1").unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn malformed_pairs_are_rejected() {
        assert!(parse_kv("novalue").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_kv("=3").unwrap_err().contains("empty key"));
        assert!(parse_kv_json("=3").unwrap_err().contains("empty key"));
    }

    #[test]
    fn typed_pairs_win_over_plain_ones() {
        let m = to_map(
            vec![("a".into(), json!("1")), ("b".into(), json!("x"))],
            vec![("a".into(), json!(1))],
        );
        assert_eq!(Value::Object(m), json!({"a": 1, "b": "x"}));
    }
}
