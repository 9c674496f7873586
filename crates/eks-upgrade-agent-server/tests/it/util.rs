//! Shared test setup: a state over a fresh SQLite store, a served instance on 127.0.0.1:0,
//! WebSocket helpers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};

use eks_upgrade_agent_server::AppState;

pub(crate) fn tracker(dir: &std::path::Path) -> Arc<ProgressTracker> {
    let store = SqliteStore::open(dir, &SqliteOptions::default()).unwrap();
    Arc::new(ProgressTracker::new(Arc::new(store)))
}

/// A state over a fresh store in `dir`, with artifacts (local blobs) enabled.
pub(crate) fn state(dir: &std::path::Path) -> AppState {
    let cfg = eks_upgrade_agent::config::Config::new(dir);
    let store = Arc::new(cfg.open_store().unwrap());
    let artifacts = Arc::new(cfg.artifacts_manager(Arc::clone(&store)).unwrap());
    let tracker = Arc::new(ProgressTracker::new(store.clone()));
    let tests = Arc::new(eks_upgrade_agent::TestResults::new(store.clone()));
    AppState::new(tracker)
        .with_artifacts(artifacts, Some(store))
        .with_test_results(tests)
}

/// `state` served on 127.0.0.1 until dropped.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub(crate) async fn start(state: AppState) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(eks_upgrade_agent_server::serve(listener, state, async {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub(crate) fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn ws_connect(url: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// The next JSON text message (ignoring control frames), within 10 s.
pub(crate) async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("the socket stays open")
            .unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

/// Reads messages until one of type `kind`; returns the messages skipped and the match.
pub(crate) async fn until_type(ws: &mut Ws, kind: &str) -> (Vec<Value>, Value) {
    let mut skipped = Vec::new();
    loop {
        let v = next_json(ws).await;
        if v["type"] == kind {
            return (skipped, v);
        }
        skipped.push(v);
    }
}

pub(crate) async fn ws_send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
}

/// Seqs of the `progress_event` messages among `msgs`.
pub(crate) fn seqs(msgs: &[Value]) -> Vec<u64> {
    msgs.iter()
        .filter(|m| m["type"] == "progress_event")
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// Creates and starts upgrade `id` with one task `a`.
pub(crate) fn seed(t: &ProgressTracker, id: &str) {
    use eks_upgrade_agent::model::TaskType;
    use eks_upgrade_agent::progress::NewTask;
    t.create_upgrade(id, "plan", "prod", Default::default())
        .unwrap();
    t.start_upgrade(id, Some("plan")).unwrap();
    t.add_task(id, NewTask::new("a", "Task A", TaskType::UpgradeStep))
        .unwrap();
}
