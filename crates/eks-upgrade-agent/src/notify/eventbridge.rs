//! [`EventBridgeSink`]: AWS EventBridge `PutEvents` with the official SDK and the standard AWS
//! configuration (credential chain, `AWS_REGION`, `AWS_ENDPOINT_URL`). Entries use the reference
//! envelope: `Source` (default `eks-upgrade-agent`), `DetailType` (`task.failed`, ...), `Detail`
//! (the reference fields as JSON, or the whole CloudEvent in the CloudEvents format), `Time`. Per-entry failures (`FailedEntryCount`, `ErrorCode`) are reported per entry:
//! throttling and internal errors are retried, everything else is dead-lettered.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_eventbridge::Client;
use aws_sdk_eventbridge::primitives::DateTime as AwsDateTime;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;

use super::{EntryResult, EventSink, Format, Notification};
use crate::error::{Error, Result};

/// Sends notifications to an EventBridge bus.
pub struct EventBridgeSink {
    name: String,
    bus: String,
    source: String,
    format: Format,
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for EventBridgeSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBridgeSink")
            .field("bus", &self.bus)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl EventBridgeSink {
    /// A sink for `bus`, configured from the environment (and `region` when given).
    pub fn from_env(
        bus: &str,
        source: &str,
        format: Format,
        region: Option<&str>,
        timeout: Duration,
    ) -> Result<EventBridgeSink> {
        Self::build(bus, source, format, region, timeout, |l| l)
    }

    /// [`from_env`](Self::from_env), then `customize` on the AWS configuration (tests: an
    /// endpoint and static credentials).
    fn build(
        bus: &str,
        source: &str,
        format: Format,
        region: Option<&str>,
        timeout: Duration,
        customize: impl FnOnce(aws_config::ConfigLoader) -> aws_config::ConfigLoader,
    ) -> Result<EventBridgeSink> {
        if bus.trim().is_empty() {
            return Err(Error::invalid("the EventBridge bus name must not be empty"));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::backend("cannot start the AWS client runtime", e))?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            // The dispatcher retries with its own backoff; the SDK tries once.
            .retry_config(RetryConfig::standard().with_max_attempts(1))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(timeout.min(Duration::from_secs(3)))
                    .operation_timeout(timeout)
                    .build(),
            );
        if let Some(r) = region {
            loader = loader.region(aws_config::Region::new(r.to_owned()));
        }
        let config = runtime.block_on(customize(loader).load());
        // Events go signed but unencrypted over plain http: only to this machine.
        let service_endpoint = std::env::var("AWS_ENDPOINT_URL_EVENTBRIDGE")
            .ok()
            .filter(|e| !e.is_empty());
        for e in service_endpoint
            .iter()
            .map(String::as_str)
            .chain(config.endpoint_url())
        {
            crate::blob::s3::check_endpoint("EventBridge", e)?;
        }
        if config.region().is_none() {
            return Err(Error::invalid(
                "no AWS region configured for EventBridge: set AWS_REGION or --aws-region",
            ));
        }
        Ok(EventBridgeSink {
            name: format!("eventbridge:{bus}"),
            bus: bus.to_owned(),
            source: source.to_owned(),
            format,
            client: Client::new(&config),
            runtime,
        })
    }
}

/// What people can act on, when a failed call is one of the usual AWS failures (the same
/// words as the S3 reports): no credentials, access denied, no such bus. `None` keeps the
/// SDK's own text.
fn cause(bus: &str, detail: &str) -> Option<String> {
    let lower = detail.to_ascii_lowercase();
    if lower.contains("credentialsnotloaded")
        || lower.contains("no providers in chain provided credentials")
        || lower.contains("failed to load credentials")
    {
        Some(crate::blob::s3::NO_CREDENTIALS.to_owned())
    } else if lower.contains("resourcenotfoundexception") || lower.contains("does not exist") {
        Some(format!("event bus {bus} does not exist"))
    } else if lower.contains("accessdenied")
        || lower.contains("not authorized")
        || lower.contains("unrecognizedclientexception")
        || lower.contains("invalidsignatureexception")
        || lower.contains("403 forbidden")
    {
        Some(format!(
            "access denied to event bus {bus}; check the AWS credentials and the bus policy"
        ))
    } else {
        None
    }
}

fn retryable(code: &str) -> bool {
    matches!(
        code,
        "InternalException" | "InternalFailure" | "ThrottlingException" | "ServiceUnavailable"
    )
}

impl EventSink for EventBridgeSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver(&self, batch: &[Notification]) -> Vec<EntryResult> {
        let entries: Vec<PutEventsRequestEntry> = batch
            .iter()
            .map(|n| {
                PutEventsRequestEntry::builder()
                    .source(&self.source)
                    .detail_type(&n.detail_type)
                    .detail(
                        match self.format {
                            Format::Reference => serde_json::to_string(&n.detail),
                            Format::Cloudevents => {
                                serde_json::to_string(&n.cloudevent(&self.source))
                            }
                        }
                        .unwrap_or_default(),
                    )
                    .event_bus_name(&self.bus)
                    .time(AwsDateTime::from_millis(n.time.timestamp_millis()))
                    .build()
            })
            .collect();
        let call = self.client.put_events().set_entries(Some(entries)).send();
        match self.runtime.block_on(call) {
            Ok(out) => {
                let results = out.entries();
                (0..batch.len())
                    .map(|i| match results.get(i) {
                        Some(r) => match r.error_code() {
                            None => EntryResult::Delivered,
                            Some(code) => {
                                let msg = format!("{code}: {}", r.error_message().unwrap_or(""));
                                if retryable(code) {
                                    EntryResult::Retry(msg)
                                } else {
                                    EntryResult::Reject(msg)
                                }
                            }
                        },
                        None => EntryResult::Retry(
                            "PutEvents returned fewer results than entries".into(),
                        ),
                    })
                    .collect()
            }
            Err(e) => {
                let detail = format!("{}", aws_sdk_eventbridge::error::DisplayErrorContext(&e));
                let msg = format!(
                    "PutEvents to bus {}: {}",
                    self.bus,
                    cause(&self.bus, &detail).unwrap_or(detail)
                );
                vec![EntryResult::Retry(msg); batch.len()]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    use super::*;
    use crate::model::JsonMap;

    #[test]
    fn usual_failures_get_plain_words() {
        assert_eq!(
            cause("b", "dispatch failure: other: the credential provider was not enabled: no providers in chain provided credentials (DispatchFailure(..))").as_deref(),
            Some(crate::blob::s3::NO_CREDENTIALS)
        );
        assert_eq!(
            cause(
                "b",
                "service error: ResourceNotFoundException: Event bus b does not exist."
            )
            .as_deref(),
            Some("event bus b does not exist")
        );
        assert!(
            cause(
                "b",
                "service error: AccessDeniedException: User is not authorized"
            )
            .unwrap()
            .starts_with("access denied to event bus b")
        );
        assert_eq!(cause("b", "io error: connection refused"), None);
    }

    /// A PutEvents endpoint on loopback that answers every call with `body` (HTTP 200).
    fn endpoint(body: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut req = vec![0; len];
                let _ = reader.read_exact(&mut req);
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        url
    }

    fn notification(i: u64) -> Notification {
        Notification {
            nid: i,
            event_id: format!("e{i}"),
            seq: i,
            upgrade_id: "u".into(),
            detail_type: "task.failed".into(),
            time: chrono::Utc::now(),
            detail: JsonMap::new(),
        }
    }

    /// `FailedEntryCount` with per-entry codes: throttling and internal errors are retried,
    /// anything else (validation, access) is rejected for good, entries without a code are
    /// delivered, and a reply shorter than the batch retries the rest.
    #[test]
    fn per_entry_errors_map_to_retry_or_reject() {
        let url = endpoint(
            r#"{"FailedEntryCount":5,"Entries":[
                {"EventId":"a"},
                {"ErrorCode":"ThrottlingException","ErrorMessage":"slow down"},
                {"ErrorCode":"InternalFailure","ErrorMessage":"oops"},
                {"ErrorCode":"ValidationException","ErrorMessage":"bad detail"},
                {"ErrorCode":"AccessDeniedException","ErrorMessage":"no"},
                {"ErrorCode":"ServiceUnavailable","ErrorMessage":"later"}]}"#,
        );
        let sink = EventBridgeSink::build(
            "bus",
            "eks-upgrade-agent",
            Format::Reference,
            Some("us-east-1"),
            Duration::from_secs(5),
            |l| {
                l.endpoint_url(url).credentials_provider(
                    aws_sdk_eventbridge::config::Credentials::new(
                        "test", "test", None, None, "test",
                    ),
                )
            },
        )
        .unwrap();
        let batch: Vec<Notification> = (0..7).map(notification).collect();
        let got = sink.deliver(&batch);
        assert_eq!(got.len(), 7);
        assert_eq!(got[0], EntryResult::Delivered);
        assert!(matches!(&got[1], EntryResult::Retry(m) if m.starts_with("ThrottlingException")));
        assert!(matches!(&got[2], EntryResult::Retry(m) if m.starts_with("InternalFailure")));
        assert!(matches!(&got[3], EntryResult::Reject(m) if m.contains("bad detail")));
        assert!(matches!(&got[4], EntryResult::Reject(m) if m.starts_with("AccessDenied")));
        assert!(matches!(&got[5], EntryResult::Retry(m) if m.starts_with("ServiceUnavailable")));
        assert!(matches!(&got[6], EntryResult::Retry(m) if m.contains("fewer results")));
    }
}
