//! Browser attacks over real TCP: DNS rebinding (a `Host` that is not ours), cross-site
//! changes (a foreign `Origin`, a `text/plain` body a page may send without preflight) and
//! cross-site WebSockets, with and without tokens.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use eks_upgrade_agent_server::{Auth, Guard};

use crate::util::*;

/// Sends `head` (request line and headers, without the final blank line) and `body`; returns
/// the status and the JSON body.
async fn http(addr: SocketAddr, head: &str, body: &str) -> (u16, Value) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).await.unwrap();
    let status = resp[9..12].parse().unwrap();
    let json = resp
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

const CREATE: &str = r#"{"upgrade_id":"u9","plan_id":"p","cluster_name":"c"}"#;

async fn upgrades(addr: SocketAddr, auth: &str) -> usize {
    let (st, v) = http(
        addr,
        &format!("GET /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1{auth}"),
        "",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v.as_array().unwrap().len()
}

#[tokio::test]
async fn foreign_hosts_origins_and_content_types_are_refused() {
    const W: &str = "wwwwwwwwwwwwwwwwwwww";
    for tokens in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(dir.path());
        let auth = if tokens {
            s = s.with_auth(Auth::from_specs(&[format!("{W}:write")]).unwrap());
            format!("\r\nAuthorization: Bearer {W}")
        } else {
            String::new()
        };
        let server = Server::start(s).await;
        let addr = server.addr;
        let port = addr.port();

        // DNS rebinding: a name that resolves to us but is not ours, for reads and writes.
        let (st, v) = http(
            addr,
            &format!("GET /api/v1/upgrades HTTP/1.1\r\nHost: evil.example:{port}{auth}"),
            "",
        )
        .await;
        assert_eq!(st, 403, "{v}");
        assert_eq!(v["error"]["code"], "host_not_allowed", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("--allowed-host") && msg.contains("--public-url"),
            "{msg}"
        );
        let (st, _) = http(
            addr,
            &format!(
                "POST /api/v1/upgrades HTTP/1.1\r\nHost: evil.example:{port}\r\nContent-Type: application/json{auth}"
            ),
            CREATE,
        )
        .await;
        assert_eq!(st, 403);
        // A page's simple request: text/plain needs no preflight.
        for ct in ["text/plain", "application/x-www-form-urlencoded"] {
            let (st, v) = http(
                addr,
                &format!(
                    "POST /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ct}{auth}"
                ),
                CREATE,
            )
            .await;
            assert_eq!(st, 415, "{v}");
            assert_eq!(v["error"]["code"], "unsupported_media_type");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("application/json")
            );
        }
        // No content type with a body: refused too; an empty body needs none.
        let (st, _) = http(
            addr,
            &format!("POST /api/v1/maintenance/cleanup HTTP/1.1\r\nHost: 127.0.0.1{auth}"),
            r#"{"dry_run":false}"#,
        )
        .await;
        assert_eq!(st, 415);
        // A foreign Origin, even with the right content type.
        let (st, v) = http(
            addr,
            &format!(
                "POST /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://evil.example\r\nContent-Type: application/json{auth}"
            ),
            CREATE,
        )
        .await;
        assert_eq!(st, 403, "{v}");
        assert_eq!(v["error"]["code"], "origin_not_allowed");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--allowed-origin")
        );
        assert_eq!(upgrades(addr, &auth).await, 0, "nothing changed");

        // The server's own origin (the dashboard), loopback names and the listen address work.
        for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            let (st, v) = http(
                addr,
                &format!(
                    "POST /api/v1/upgrades/u0/start HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}{auth}"
                ),
                "",
            )
            .await;
            assert_eq!(st, 404, "{host}: {v}");
        }
        let (st, v) = http(
            addr,
            &format!(
                "POST /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8{auth}"
            ),
            CREATE,
        )
        .await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(upgrades(addr, &auth).await, 1);

        // WebSockets: a foreign Origin is refused, our own is accepted.
        let url = format!(
            "{}{}",
            server.ws_url("/api/v1/ws"),
            if tokens {
                format!("?access_token={W}")
            } else {
                String::new()
            }
        );
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("origin", "https://evil.example".parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 403)
            }
            other => panic!("expected 403, got {other:?}"),
        }
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut().insert(
            "origin",
            format!("http://127.0.0.1:{port}").parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "progress_summary");
    }
}

#[tokio::test]
async fn configured_hosts_and_origins_are_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let guard = Guard::from_specs(
        &["https://eua.example.com"],
        &["lan-box:8080"],
        &["http://tool.example:3000"],
    )
    .unwrap();
    let server = Server::start(state(dir.path()).with_guard(guard)).await;
    for host in ["eua.example.com", "lan-box:8080"] {
        let (st, v) = http(
            server.addr,
            &format!("GET /api/v1/upgrades HTTP/1.1\r\nHost: {host}"),
            "",
        )
        .await;
        assert_eq!(st, 200, "{host}: {v}");
    }
    let (st, _) = http(
        server.addr,
        "GET /api/v1/upgrades HTTP/1.1\r\nHost: lan-box:8081",
        "",
    )
    .await;
    assert_eq!(st, 403);
    for origin in ["https://eua.example.com", "http://tool.example:3000"] {
        let (st, v) = http(
            server.addr,
            &format!(
                "POST /api/v1/upgrades HTTP/1.1\r\nHost: eua.example.com\r\nOrigin: {origin}\r\nContent-Type: application/json"
            ),
            &CREATE.replace("u9", &format!("u{}", origin.len())),
        )
        .await;
        assert_eq!(st, 201, "{origin}: {v}");
    }
}
