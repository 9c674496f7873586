//! Notification sinks on the command line: the global flags that configure them, the bounded
//! delivery after one-shot commands, and `eks-upgrade-agent notify status|flush`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use eks_upgrade_agent::SqliteStore;
use eks_upgrade_agent::config::NotifyConfig;
use eks_upgrade_agent::notify::otlp::{self, OtlpSettings};
use eks_upgrade_agent::notify::{Dispatcher, Format};

use crate::Ctx;
use crate::output::print_json;

#[derive(Debug, Args)]
#[command(next_help_heading = crate::help::NOTIFY_HEADING)]
pub(crate) struct NotifyArgs {
    /// Send notifications to this EventBridge bus (standard AWS credentials, region, endpoint)
    #[arg(
        long,
        global = true,
        env = "EUA_EVENTBRIDGE_BUS_NAME",
        value_name = "BUS"
    )]
    eventbridge_bus_name: Option<String>,
    /// EventBridge Detail: reference or cloudevents [default: reference]
    #[arg(
        long,
        global = true,
        env = "EUA_EVENTBRIDGE_FORMAT",
        value_name = "FORMAT"
    )]
    eventbridge_format: Option<Format>,
    /// AWS region [default: the standard AWS configuration, e.g. AWS_REGION]
    #[arg(long, global = true, env = "EUA_AWS_REGION", value_name = "REGION")]
    aws_region: Option<String>,
    /// Source of notifications [default: eks-upgrade-agent]
    #[arg(long, global = true, env = "EUA_EVENT_SOURCE", value_name = "SOURCE")]
    event_source: Option<String>,
    /// POST notifications as JSON to this URL
    #[arg(long, global = true, env = "EUA_WEBHOOK_URL", value_name = "URL")]
    webhook_url: Option<String>,
    /// Sign webhook bodies with HMAC-SHA256 (header X-EUA-Signature)
    #[arg(
        long,
        global = true,
        env = "EUA_WEBHOOK_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    webhook_secret: Option<String>,
    /// Webhook payload: reference or cloudevents [default: reference]
    #[arg(long, global = true, env = "EUA_WEBHOOK_FORMAT", value_name = "FORMAT")]
    webhook_format: Option<Format>,
    /// Send every upgrade as an OpenTelemetry trace (OTLP/HTTP protobuf) to this collector
    /// (`/v1/traces` is appended) [default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_ENDPOINT]
    #[arg(long, global = true, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// A header of every OTLP export, KEY=VALUE (repeatable; adds to OTEL_EXPORTER_OTLP_HEADERS)
    #[arg(long = "otlp-header", global = true, value_name = "KEY=VALUE")]
    otlp_headers: Vec<String>,
}

impl NotifyArgs {
    /// The flags and variables, the OTLP flags over the standard `OTEL_*` variables.
    pub(crate) fn into_config(self) -> anyhow::Result<NotifyConfig> {
        let mut flags = OtlpSettings {
            endpoint: self
                .otlp_endpoint
                .filter(|e| !e.trim().is_empty())
                .map(|e| otlp::endpoint_url(&e)),
            ..OtlpSettings::default()
        };
        for h in &self.otlp_headers {
            let (k, v) = otlp::parse_pair("--otlp-header", h)?;
            flags.headers.push((k, v));
        }
        let otlp = flags.over(OtlpSettings::from_env()?);
        Ok(NotifyConfig {
            eventbridge_bus_name: self.eventbridge_bus_name.filter(|s| !s.is_empty()),
            eventbridge_format: self.eventbridge_format.unwrap_or_default(),
            eventbridge_format_set: self.eventbridge_format.is_some(),
            aws_region: self.aws_region.filter(|s| !s.is_empty()),
            source: self.event_source.filter(|s| !s.is_empty()),
            webhook_url: self.webhook_url.filter(|s| !s.is_empty()),
            webhook_secret: self.webhook_secret.filter(|s| !s.is_empty()),
            webhook_format: self.webhook_format.unwrap_or_default(),
            webhook_format_set: self.webhook_format.is_some(),
            otlp,
            timeout: None,
        })
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum NotifyCmd {
    /// Pending, delivered and dead notifications per sink, and the last error
    Status,
    /// Deliver pending notifications now
    Flush {
        /// Give up after this many seconds
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

/// The dispatcher for a command that must not fail because of notifications: a sink that
/// cannot be set up is a warning (the notifications stay in the outbox).
pub(crate) fn dispatcher_or_warn(ctx: &Ctx, store: &Arc<SqliteStore>) -> Option<Arc<Dispatcher>> {
    match ctx.dispatcher(store) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "warning: notifications are kept in the outbox but not sent: {}",
                crate::output::printable(&format!("{e:#}"))
            );
            None
        }
    }
}

/// After a one-shot command committed: one delivery pass (it stops at the first failure, so an
/// outage costs at most one call's timeout), never failing the command for it.
pub(crate) fn after_commit(ctx: &Ctx, store: &Arc<SqliteStore>) {
    let Some(d) = dispatcher_or_warn(ctx, store) else {
        return;
    };
    match d.run_once() {
        Ok(_) => {
            let pending: u64 = d
                .status()
                .map(|s| s.iter().map(|x| x.pending).sum())
                .unwrap_or(0);
            if pending > 0 {
                eprintln!(
                    "warning: {pending} notification(s) not delivered yet; they are kept and will be sent by the next run or `eks-upgrade-agent notify flush`"
                );
            }
        }
        Err(e) => eprintln!(
            "warning: notifications not delivered yet: {}",
            crate::output::printable(&format!("{e:#}"))
        ),
    }
}

pub(crate) fn run(ctx: &Ctx, cmd: NotifyCmd) -> anyhow::Result<ExitCode> {
    // Nothing to show or deliver without a store: never create one here.
    let store = ctx.existing_store()?;
    let Some(d) = ctx.dispatcher(&store)? else {
        anyhow::bail!(
            "no notification sink is configured: set --eventbridge-bus-name, --webhook-url or --otlp-endpoint (or EUA_EVENTBRIDGE_BUS_NAME, EUA_WEBHOOK_URL, OTEL_EXPORTER_OTLP_ENDPOINT)"
        );
    };
    match cmd {
        NotifyCmd::Status => {
            let status = d.status()?;
            if ctx.json() {
                print_json(&status)?;
            } else {
                for s in &status {
                    println!(
                        "{}: {} pending, {} delivered, {} dead (of {}){}{}",
                        s.sink,
                        s.pending,
                        s.delivered,
                        s.dead,
                        s.total,
                        s.next_retry
                            .map(|t| format!("; next retry {}", t.format("%H:%M:%S")))
                            .unwrap_or_default(),
                        s.last_error
                            .as_ref()
                            .map(|e| format!("; last error: {}", crate::output::printable(e)))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        NotifyCmd::Flush { timeout } => {
            let report = d.flush(Duration::from_secs(timeout))?;
            let status = d.status()?;
            let pending: u64 = status.iter().map(|s| s.pending).sum();
            if ctx.json() {
                print_json(&json!({"report": report, "sinks": status}))?;
            } else {
                println!(
                    "delivered {}, will retry {}, dead {} ({} calls); {pending} still pending",
                    report.delivered, report.retried, report.dead, report.calls
                );
                for s in status
                    .iter()
                    .filter(|s| s.last_error.is_some() && s.pending > 0)
                {
                    println!(
                        "{}: {}",
                        s.sink,
                        crate::output::printable(s.last_error.as_deref().unwrap_or(""))
                    );
                }
            }
            Ok(if pending == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
