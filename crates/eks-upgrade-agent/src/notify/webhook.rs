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
    name: String,
    url: String,
    secret: Option<Vec<u8>>,
    format: Format,
    source: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("name", &self.name)
            .field("url", &self.url)
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
                "invalid webhook URL {url:?}: expected http:// or https://"
            )));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(WebhookSink {
            name: format!("webhook:{url}"),
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
                        self.url
                    ))),
                    _ => all(EntryResult::Retry(format!(
                        "{} answered {status}",
                        self.url
                    ))),
                }
            }
            Err(e) => all(EntryResult::Retry(format!("{}: {e}", self.url))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
