//! [`WebhookSink`]: POSTs a JSON array of notifications (reference or CloudEvents format) to a
//! URL, optionally signed with HMAC-SHA256 in `X-EUA-Signature: sha256=<hex>`, with a timeout.
//! 2xx delivers the batch; 400, 413 and 422 reject it (never retried); anything else, or no
//! answer, is retried.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{EntryResult, EventSink, Format, Notification};

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-EUA-Signature";

/// HTTP POST of JSON to a URL.
pub struct WebhookSink {
    /// The delivery-state key (holds the URL: never shown).
    name: String,
    /// What people see: `webhook:HOST#digest`, without the URL's path or credentials.
    label: String,
    url: String,
    secret: Option<Vec<u8>>,
    format: Format,
    source: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("label", &self.label)
            .field("secret", &self.secret.as_ref().map(|_| "<hidden>"))
            .field("format", &self.format)
            .finish()
    }
}

/// The signature of `body` under `secret`, as sent in [`SIGNATURE_HEADER`].
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `webhook:HOST[:PORT]#xxxxxx`: the host without credentials, path or query (a webhook URL's
/// path is often its secret), and 6 hex digits of the URL's SHA-256 so two hooks on one host
/// stay apart.
fn label(url: &str) -> String {
    use sha2::Digest as _;
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let digest = hex::encode(&Sha256::digest(url.as_bytes())[..3]);
    format!("webhook:{host}#{digest}")
}

impl WebhookSink {
    /// A sink posting to `url`.
    pub fn new(
        url: &str,
        secret: Option<&str>,
        format: Format,
        source: &str,
        timeout: Duration,
    ) -> crate::Result<WebhookSink> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(crate::Error::invalid(format!(
                "invalid webhook URL {:?}: expected http:// or https://",
                crate::net::redact(url)
            )));
        }
        // Credentials in the URL travel as a Basic Authorization header: in clear text over
        // plain http, readable by anyone on the path.
        if crate::net::is_plain_http(url)
            && crate::net::has_credentials(url)
            && !crate::net::is_loopback(url)
        {
            return Err(crate::Error::invalid(format!(
                "refusing to send the credentials of webhook URL {} over plain http: use \
                 https:// (plain http with credentials is only for localhost, 127.0.0.0/8, [::1])",
                crate::net::redact(url)
            )));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(WebhookSink {
            name: format!("webhook:{url}"),
            label: label(url),
            url: url.to_owned(),
            secret: secret.map(|s| s.as_bytes().to_vec()),
            format,
            source: source.to_owned(),
            agent,
        })
    }
}

impl EventSink for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn label(&self) -> &str {
        &self.label
    }

    fn deliver(&self, batch: &[Notification]) -> Vec<EntryResult> {
        let body: Vec<serde_json::Value> = batch
            .iter()
            .map(|n| n.encode(self.format, &self.source))
            .collect();
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(secret) = &self.secret {
            req = req.header(SIGNATURE_HEADER, &sign(secret, &body));
        }
        let all = |r: EntryResult| vec![r; batch.len()];
        match req.send(&body[..]) {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match status {
                    200..=299 => all(EntryResult::Delivered),
                    400 | 413 | 422 => all(EntryResult::Reject(format!(
                        "{} answered {status}",
                        self.label
                    ))),
                    _ => all(EntryResult::Retry(format!(
                        "{} answered {status}",
                        self.label
                    ))),
                }
            }
            Err(e) => all(EntryResult::Retry(format!(
                "{}: {}",
                self.label,
                e.to_string().replace(&self.url, "<url>")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_hide_the_path_and_credentials() {
        let a = label("https://user:pw@hooks.example.com:8443/T0/B1/s3cr3t?k=v");
        assert!(a.starts_with("webhook:hooks.example.com:8443#"), "{a}");
        assert_eq!(a.len(), "webhook:hooks.example.com:8443#".len() + 6, "{a}");
        for secret in ["s3cr3t", "user", "pw", "k=v"] {
            assert!(!a.contains(secret), "{a}");
        }
        assert_ne!(a, label("https://hooks.example.com:8443/other"));
        let sink = WebhookSink::new(
            "http://127.0.0.1:9/hook/s3cr3t",
            None,
            Format::Reference,
            "s",
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!format!("{sink:?}").contains("s3cr3t"));
        assert!(!sink.label().contains("s3cr3t"));
    }

    /// TR3: credentials in a webhook URL never travel over plain http beyond this machine,
    /// and the refusal names https without showing the password.
    #[test]
    fn plain_http_with_credentials_is_refused_beyond_loopback() {
        let new =
            |url: &str| WebhookSink::new(url, None, Format::Reference, "s", Duration::from_secs(1));
        for refused in [
            "http://user:s3cr3t@hooks.example.com/h",
            "http://user:s3cr3t@10.0.0.1:8080/h",
            "http://user:s3cr3t@127.0.0.1.evil.example/h",
            "http://s3cr3t@hooks.example.com/h",
        ] {
            let e = new(refused).unwrap_err().to_string();
            assert!(
                e.contains("over plain http") && e.contains("use https://"),
                "{refused}: {e}"
            );
            assert!(!e.contains("s3cr3t") && e.contains("***@"), "{e}");
        }
        for allowed in [
            "https://user:s3cr3t@hooks.example.com/h",
            "http://user:s3cr3t@127.0.0.1:9/h",
            "http://user:s3cr3t@localhost:9/h",
            "http://hooks.example.com/h",
        ] {
            assert!(new(allowed).is_ok(), "{allowed}");
        }
        let e = new("ftp://user:s3cr3t@h/").unwrap_err().to_string();
        assert!(e.contains("user:***@h") && !e.contains("s3cr3t"), "{e}");
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(
            WebhookSink::new(
                "ftp://x",
                None,
                Format::Reference,
                "s",
                Duration::from_secs(1)
            )
            .is_err()
        );
    }
}
