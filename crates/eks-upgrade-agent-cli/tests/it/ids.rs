//! Abbreviated ids: a unique prefix, or a unique suffix of at least six characters, of a session,
//! collection or artifact id is taken wherever an id is (locally and with `--server`); an
//! ambiguous one lists the candidates; tables show each id in its shortest unambiguous form.

use crate::util::{Env, serve};

fn session(env: &Env, args: &[&str]) -> String {
    let v = env.json(args);
    v["session_id"].as_str().unwrap().to_owned()
}

fn tail(id: &str, n: usize) -> &str {
    &id[id.len() - n..]
}

/// Two sessions (made in the same millisecond range: their ids share the leading time bits),
/// a collection and an artifact in the first.
fn setup(env: &Env) -> (String, String, String, String) {
    let s1 = session(
        env,
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u1",
            "--cluster",
            "c",
        ],
    );
    let s2 = session(
        env,
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u2",
            "--cluster",
            "c",
        ],
    );
    let c = env.json(&[
        "artifacts",
        "collection",
        "create",
        tail(&s1, 8),
        "--name",
        "logs",
    ]);
    let c = c["collection_id"].as_str().unwrap().to_owned();
    let file = env.dir.path().join("kubelet.log");
    std::fs::write(&file, "kubelet says hi\n").unwrap();
    let added = env.json(&[
        "artifacts",
        "add",
        tail(&s1, 6),
        tail(&c, 6),
        file.to_str().unwrap(),
    ]);
    let a = added[0]["artifact_id"].as_str().unwrap().to_owned();
    (s1, s2, c, a)
}

#[test]
fn prefixes_and_suffixes_are_taken_everywhere() {
    let env = Env::new();
    let (s1, s2, c, a) = setup(&env);
    assert_ne!(s1, s2);
    // Suffixes of 6+ characters, and prefixes.
    let shown = env.json(&["artifacts", "session", "show", tail(&s1, 6)]);
    assert_eq!(shown["session_id"], s1.as_str(), "{shown}");
    let common = s1
        .chars()
        .zip(s2.chars())
        .take_while(|(x, y)| x == y)
        .count();
    let shown = env.json(&["artifacts", "session", "show", &s2[..common + 1]]);
    assert_eq!(shown["session_id"], s2.as_str());
    let shown = env.json(&["artifacts", "show", tail(&a, 7)]);
    assert_eq!(shown["artifact_id"], a.as_str());
    let out = env.dir.path().join("got.log");
    env.ok(&[
        "artifacts",
        "get",
        tail(&a, 6),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "kubelet says hi\n");
    let found = env.json(&[
        "artifacts",
        "search",
        "--session",
        tail(&s1, 6),
        "--collection",
        tail(&c, 6),
    ]);
    assert_eq!(found.as_array().unwrap().len(), 1);
    let listed = env.json(&["artifacts", "collection", "list", tail(&s1, 6)]);
    assert_eq!(listed[0]["collection_id"], c.as_str());

    // Ambiguous: both candidates listed, nothing done.
    let err = env.fails(1, &["artifacts", "session", "complete", &s1[..common]]);
    assert!(err.contains("is ambiguous: it matches"), "{err}");
    assert!(err.contains(&s1) && err.contains(&s2), "{err}");
    let again = env.json(&["artifacts", "session", "show", &s1]);
    assert!(again["completed_at"].is_null());
    // Too short a suffix, or nothing: not found.
    let err = env.fails(1, &["artifacts", "session", "show", tail(&s1, 5)]);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn tables_show_the_shortest_form_that_resolves_back() {
    let env = Env::new();
    let (s1, s2, c, a) = setup(&env);
    let table = env.ok(&["artifacts", "session", "list"]);
    let shorts: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(shorts.len(), 2, "{table}");
    for (short, full) in shorts.iter().zip([&s1, &s2]) {
        assert!(
            short.len() < full.len(),
            "{short} is not shorter than {full}"
        );
        let v = env.json(&["artifacts", "session", "show", short]);
        assert_eq!(v["session_id"], full.as_str());
    }
    let table = env.ok(&["artifacts", "collection", "list", &s1]);
    let short = table
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        short.len() <= 8 && c.ends_with(short) || c.starts_with(short),
        "{short}"
    );
    let table = env.ok(&["artifacts", "search", "--session", &s1]);
    let short = table
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(short.len() < a.len(), "{table}");
    let v = env.json(&["artifacts", "show", short]);
    assert_eq!(v["artifact_id"], a.as_str());
}

#[test]
fn abbreviations_work_through_a_server() {
    const TOKEN: &str = "ids-test-write-token-000001";
    let server_env = Env::new();
    let (s1, _s2, _c, a) = setup(&server_env);
    let served = serve(&server_env, &[("EUA_TOKENS", &format!("{TOKEN}:write"))]);
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let v = client.json(&[
        "--server",
        &url,
        "--token",
        TOKEN,
        "artifacts",
        "show",
        tail(&a, 6),
    ]);
    assert_eq!(v["artifact_id"], a.as_str());
    let v = client.json(&[
        "--server",
        &url,
        "--token",
        TOKEN,
        "artifacts",
        "session",
        "show",
        tail(&s1, 6),
    ]);
    assert_eq!(v["session_id"], s1.as_str());
    let err = client.fails(
        1,
        &[
            "--server",
            &url,
            "--token",
            TOKEN,
            "artifacts",
            "session",
            "show",
            "0",
        ],
    );
    assert!(err.contains("is ambiguous"), "{err}");
    // Tables through the server show the same shortest forms as on the data dir itself.
    for args in [
        vec!["artifacts", "session", "list"],
        vec!["artifacts", "search", "--session", s1.as_str()],
    ] {
        let local = server_env.ok(&args);
        let mut remote_args = vec!["--server", url.as_str(), "--token", TOKEN];
        remote_args.extend(args.iter().copied());
        let remote = client.ok(&remote_args);
        let ids = |t: &str| -> Vec<String> {
            t.lines()
                .skip(1)
                .map(|l| l.split_whitespace().next().unwrap().to_owned())
                .collect()
        };
        assert_eq!(ids(&remote), ids(&local), "{remote}");
        assert!(
            ids(&remote).iter().all(|i| i.len() < 36),
            "abbreviated: {remote}"
        );
    }
}
