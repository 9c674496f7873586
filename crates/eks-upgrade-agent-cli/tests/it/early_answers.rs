//! A server's refusal reaches a client that is still streaming the body: the CLI prints the
//! server's error, never "broken pipe" or "connection reset". Small bodies are drained by the
//! server (the connection stays usable); a body far above the socket buffers (50 MiB) is not,
//! so the CLI must read the answer after its write fails.

use crate::util::{Env, serve};

const WRITE: &str = "early-answer-write-token";
const READ: &str = "early-answer-read-token-";

fn on(url: &str, token: &str, args: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["--server", url, "--token", token]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(args.iter().map(|s| s.to_string()));
    a
}

/// TR1: refusals before the body is read (a read token, a collection of another session, a
/// bad file name) reach `artifacts add` and `tests ingest` streaming 1 MiB and 50 MiB.
#[test]
fn refusals_reach_a_cli_that_is_still_sending_the_body() {
    let server_env = Env::new();
    let served = serve(
        &server_env,
        &[("EUA_TOKENS", &format!("{WRITE}:write,{READ}:read"))],
    );
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let json = |token: &str, args: &[&str]| {
        let a = on(&url, token, args);
        client.json(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    json(
        WRITE,
        &[
            "progress",
            "upgrade",
            "create",
            "u1",
            "--plan",
            "p",
            "--cluster",
            "prod",
        ],
    );
    let session = |name: &str| {
        let s = json(
            WRITE,
            &[
                "artifacts",
                "session",
                "create",
                "--upgrade",
                "u1",
                "--cluster",
                "prod",
                "--name",
                name,
            ],
        );
        let s = s["session_id"].as_str().unwrap().to_owned();
        let c = json(
            WRITE,
            &["artifacts", "collection", "create", &s, "--name", "logs"],
        );
        (s, c["collection_id"].as_str().unwrap().to_owned())
    };
    let (s1, _) = session("one");
    let (s2, c2) = session("two");
    let files = tempfile::tempdir().unwrap();
    for mib in [1usize, 50] {
        let file = files.path().join(format!("report-{mib}.xml"));
        std::fs::write(&file, vec![b'x'; mib * 1024 * 1024]).unwrap();
        // A control character in the file name: the server refuses the name (a pure query
        // check) before the body.
        let odd = files.path().join(format!("bad\u{1}name-{mib}.xml"));
        std::fs::copy(&file, &odd).unwrap();
        let file = file.to_str().unwrap();
        let odd = odd.to_str().unwrap();
        let cases: [(&str, Vec<&str>, &str); 5] = [
            (
                WRITE,
                vec!["artifacts", "add", &s1, &c2, file],
                "belongs to session",
            ),
            (
                READ,
                vec!["artifacts", "add", &s2, &c2, file],
                "changes need a write token",
            ),
            (
                READ,
                vec!["tests", "ingest", file, "--upgrade", "u1", "--phase", "pre"],
                "changes need a write token",
            ),
            (
                WRITE,
                vec!["tests", "ingest", odd, "--upgrade", "u1", "--phase", "pre"],
                "invalid file name",
            ),
            (
                WRITE,
                vec![
                    "tests",
                    "ingest",
                    file,
                    "--upgrade",
                    "nope",
                    "--phase",
                    "pre",
                ],
                "not found",
            ),
        ];
        for (token, args, expected) in cases {
            let a = on(&url, token, &args);
            let out = client.run(&a.iter().map(String::as_str).collect::<Vec<_>>());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && stderr.contains(expected),
                "{mib} MiB, {args:?}: expected the server's error {expected:?}, got: {stderr}"
            );
            let lower = stderr.to_lowercase();
            assert!(
                !lower.contains("broken pipe") && !lower.contains("reset"),
                "{mib} MiB, {args:?}: {stderr}"
            );
        }
    }
    // A bad phase or artifact type never leaves the CLI (its arguments are typed): sent by
    // the CLI's streaming client itself, they are refused by the server the same way.
    let remote = eks_upgrade_agent::store::remote::RemoteStore::new(&url, Some(WRITE)).unwrap();
    for mib in [1usize, 50] {
        let body = vec![b'x'; mib * 1024 * 1024];
        for (path, expected) in [
            (
                "/api/v1/tests/ingest?upgrade=u1&phase=bogus&name=r.xml",
                "phase",
            ),
            (
                &*format!("/api/v1/sessions/{s2}/collections/{c2}/artifacts?name=a.log&type=bogus"),
                "type",
            ),
        ] {
            let resp = remote
                .post_stream(path, "application/octet-stream", &mut &body[..])
                .unwrap_or_else(|e| panic!("{mib} MiB, {path}: {e}"));
            let e = remote
                .answer::<serde_json::Value>(resp)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(expected) && !e.to_lowercase().contains("broken pipe"),
                "{mib} MiB, {path}: expected the server's error about {expected:?}, got: {e}"
            );
        }
    }
    // Nothing was stored.
    let stats = json(READ, &["artifacts", "stats"]);
    assert_eq!(stats["total_artifacts"], 0, "{stats}");
}
