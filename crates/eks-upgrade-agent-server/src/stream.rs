//! Live streams: WebSocket (`.../ws`) and SSE (`.../events/stream`), both fed by the [`Hub`].
//!
//! WebSocket messages (the reference types, kept):
//! - server -> client: `{"type":"progress_summary","seq":N,"data":...}` on connect and on
//!   `get_summary` (`data` is the upgrade's summary, or an array of every upgrade's summary on
//!   `/api/v1/ws`); `{"type":"progress_event","seq":N,"data":{event}}` per event;
//!   `{"type":"pong"}`; `{"type":"heartbeat","seq":N}` when idle, where every event up to `N`
//!   has been sent; `{"type":"resync","seq":N,"data":summary}` when the client fell too far
//!   behind: events up to `N` were skipped, `data` is a fresh summary (the skipped events can
//!   be fetched with `GET .../events?since=`), also sent when `since` is beyond the store's
//!   last seq (`N` is then that seq); `{"type":"error","message":...}` for a bad
//!   client message.
//! - client -> server: `{"type":"ping"}`, `{"type":"get_summary"}`.
//!
//! `?since=SEQ` replays every event after `SEQ` from the store before going live: no gap, no
//! duplicate. SSE sends the same JSON as `data:`, with `id: seq` and `Last-Event-ID` resume.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use serde::Deserialize;
use serde_json::{Value, json};

use eks_upgrade_agent::model::ProgressSummary;

use crate::AppState;
use crate::error::{ApiError, ApiResult, blocking};
use crate::hub::{Item, Subscription};

/// Most messages written before one flush.
const BATCH: usize = 256;
/// Read buffer per socket: clients only send small control messages. (tungstenite's default,
/// 128 KiB, is zero-filled before every read and would cost 128 MiB per 1,000 clients.)
const READ_BUFFER: usize = 4096;

#[derive(Debug, Deserialize)]
pub(crate) struct StreamQuery {
    since: Option<u64>,
}

async fn check_upgrade(s: &AppState, upgrade: &str) -> ApiResult<()> {
    let tracker = Arc::clone(&s.tracker);
    let id = upgrade.to_owned();
    blocking(move || tracker.upgrade(&id).map(drop)).await
}

/// The summary of one upgrade, or of all.
async fn summary(s: &AppState, upgrade: Option<&str>) -> ApiResult<Value> {
    let tracker = Arc::clone(&s.tracker);
    let id = upgrade.map(str::to_owned);
    blocking(move || {
        Ok(match id {
            Some(id) => serde_json::to_value(tracker.summary(&id)?).unwrap_or_default(),
            None => {
                // One page (the first 10,000 upgrades); `GET /api/v1/upgrades` pages on.
                let all: Vec<ProgressSummary> = tracker
                    .upgrades_page(None, eks_upgrade_agent::store::MAX_PAGE)?
                    .iter()
                    .map(|u| tracker.summary_of(u))
                    .collect::<Result<_, _>>()?;
                serde_json::to_value(all).unwrap_or_default()
            }
        })
    })
    .await
}

async fn summary_message(s: &AppState, upgrade: Option<&str>, kind: &str, seq: u64) -> Message {
    let data = match summary(s, upgrade).await {
        Ok(v) => v,
        Err(e) => json!({"error": e.message()}),
    };
    Message::Text(
        json!({"type": kind, "seq": seq, "data": data})
            .to_string()
            .into(),
    )
}

/// `GET /api/v1/upgrades/{id}/ws`
pub(crate) async fn upgrade_ws(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
    q: Result<Query<StreamQuery>, QueryRejection>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let Query(q) = q?;
    check_upgrade(&s, &upgrade).await?;
    let sub = s.hub.subscribe(Some(upgrade.clone()), q.since).await?;
    Ok(ws
        .read_buffer_size(READ_BUFFER)
        .max_message_size(crate::MAX_WS_MESSAGE)
        .max_frame_size(crate::MAX_WS_MESSAGE)
        .on_upgrade(move |socket| ws_client(socket, s, Some(upgrade), sub)))
}

/// `GET /api/v1/ws`
pub(crate) async fn all_ws(
    State(s): State<AppState>,
    q: Result<Query<StreamQuery>, QueryRejection>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let sub = s.hub.subscribe(None, q.since).await?;
    Ok(ws
        .read_buffer_size(READ_BUFFER)
        .max_message_size(crate::MAX_WS_MESSAGE)
        .max_frame_size(crate::MAX_WS_MESSAGE)
        .on_upgrade(move |socket| ws_client(socket, s, None, sub)))
}

async fn ws_client(
    mut socket: WebSocket,
    s: AppState,
    upgrade: Option<String>,
    mut sub: Subscription,
) {
    let u = upgrade.as_deref();
    let first = summary_message(&s, u, "progress_summary", sub.position()).await;
    if socket.send(first).await.is_err() {
        return;
    }
    // One timer per client for its whole life (not one per message).
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + s.heartbeat, s.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = tokio::time::Instant::now();
    loop {
        if sub.replaying() {
            while let Some(e) = sub.next_replayed() {
                if socket.feed(Message::Text(e.text.clone())).await.is_err() {
                    return;
                }
            }
            if socket.flush().await.is_err() {
                return;
            }
            match sub.replay_page().await {
                Ok(Some(Item::Resync { seq })) => {
                    if socket
                        .send(summary_message(&s, u, "resync", seq).await)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "stream replay failed");
                    let msg = json!({"type": "error", "message": "cannot read events; reconnect with ?since="});
                    let _ = socket.send(Message::Text(msg.to_string().into())).await;
                    return;
                }
            }
            continue;
        }
        tokio::select! {
            item = sub.next_live() => {
                let Some(first) = item else { return };
                // Write what is ready (up to BATCH messages), then flush once. Only take an
                // item that will be written: taking one moves the client's position past it.
                let (mut item, mut written) = (Some(first), 0);
                while let Some(it) = item.take() {
                    let msg = match it {
                        Item::Event(e) => Message::Text(e.text.clone()),
                        Item::Resync { seq } => summary_message(&s, u, "resync", seq).await,
                        Item::CatchUp => break,
                    };
                    if socket.feed(msg).await.is_err() {
                        return;
                    }
                    written += 1;
                    if written < BATCH {
                        item = sub.try_next_live();
                    }
                }
                if socket.flush().await.is_err() {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
            msg = socket.recv() => {
                let reply = match msg {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Text(t))) => client_message(&s, u, &t, sub.position()).await,
                    Some(Ok(_)) => None, // pings are answered by the library; binary ignored
                };
                if let Some(reply) = reply
                    && socket.send(reply).await.is_err()
                {
                    return;
                }
            }
            _ = heartbeat.tick() => {
                // Only when idle: a busy stream shows it is alive with events.
                if last_sent.elapsed() < s.heartbeat / 2 {
                    continue;
                }
                let msg = json!({"type": "heartbeat", "seq": sub.idle_position()});
                if socket.send(Message::Text(msg.to_string().into())).await.is_err() {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
        }
    }
}

async fn client_message(
    s: &AppState,
    upgrade: Option<&str>,
    text: &Utf8Bytes,
    seq: u64,
) -> Option<Message> {
    #[derive(Deserialize)]
    struct ClientMessage {
        #[serde(rename = "type")]
        kind: String,
    }
    let error = |m: String| {
        Some(Message::Text(
            json!({"type": "error", "message": m}).to_string().into(),
        ))
    };
    match serde_json::from_str::<ClientMessage>(text.as_str()) {
        Ok(m) if m.kind == "ping" => Some(Message::Text(r#"{"type":"pong"}"#.into())),
        Ok(m) if m.kind == "get_summary" => {
            Some(summary_message(s, upgrade, "progress_summary", seq).await)
        }
        Ok(m) => error(format!(
            "unknown message type {:?}: expected \"ping\" or \"get_summary\"",
            m.kind
        )),
        Err(e) => error(format!(
            "malformed message: {e}; send {{\"type\":\"ping\"}} or {{\"type\":\"get_summary\"}}"
        )),
    }
}

fn since_of(headers: &HeaderMap, q: &StreamQuery) -> ApiResult<Option<u64>> {
    match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_input",
                    "Last-Event-ID must be a seq (a non-negative integer)",
                )
            }),
        None => Ok(q.since),
    }
}

/// `GET /api/v1/upgrades/{id}/events/stream`: SSE of the upgrade's events.
pub(crate) async fn upgrade_sse(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
    q: Result<Query<StreamQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let since = since_of(&headers, &q)?;
    check_upgrade(&s, &upgrade).await?;
    // Without a position the SSE stream starts at the beginning, like `GET .../events`.
    let sub = s
        .hub
        .subscribe(Some(upgrade), Some(since.unwrap_or(0)))
        .await?;
    Ok(sse(s, sub))
}

/// `GET /api/v1/events/stream`: SSE of every upgrade's events.
pub(crate) async fn all_sse(
    State(s): State<AppState>,
    q: Result<Query<StreamQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let since = since_of(&headers, &q)?;
    let sub = s.hub.subscribe(None, since).await?;
    Ok(sse(s, sub))
}

fn sse(s: AppState, sub: Subscription) -> Response {
    let heartbeat = s.heartbeat;
    let stream = futures_util::stream::unfold(
        (sub, VecDeque::new()),
        move |(mut sub, mut out)| async move {
            loop {
                if let Some(ev) = out.pop_front() {
                    return Some((Ok::<Event, Infallible>(ev), (sub, out)));
                }
                if sub.replaying() {
                    if let Some(e) = sub.next_replayed() {
                        out.push_back(event_of(e.seq, "progress_event", &e.text));
                        continue;
                    }
                    match sub.replay_page().await {
                        Ok(Some(Item::Resync { seq })) => {
                            let data = json!({"type": "resync", "seq": seq}).to_string();
                            out.push_back(event_of(seq, "resync", &data));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "stream replay failed");
                            return None;
                        }
                    }
                    continue;
                }
                match tokio::time::timeout(heartbeat, sub.next_live()).await {
                    Ok(Some(Item::Event(e))) => {
                        out.push_back(event_of(e.seq, "progress_event", &e.text))
                    }
                    Ok(Some(Item::CatchUp)) => {}
                    Ok(Some(Item::Resync { seq })) => {
                        let data = json!({"type": "resync", "seq": seq}).to_string();
                        out.push_back(event_of(seq, "resync", &data));
                    }
                    Ok(None) => return None,
                    Err(_) => {
                        let seq = sub.idle_position();
                        let data = json!({"type": "heartbeat", "seq": seq}).to_string();
                        out.push_back(event_of(seq, "heartbeat", &data));
                    }
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn event_of(seq: u64, kind: &str, data: &str) -> Event {
    Event::default().id(seq.to_string()).event(kind).data(data)
}
