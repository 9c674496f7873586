//! AWS failures are said once, in words people can act on ("0/2 uploaded: no AWS credentials
//! found (...)", "bucket nope does not exist"), not once per artifact; the SDK's and libraries'
//! log lines appear only with `-v` or `RUST_LOG`.

use std::process::Output;

use crate::util::{Env, Moto};

/// A data dir with a session of two artifacts; returns it.
fn two_artifacts() -> Env {
    let env = Env::new();
    let s = env.json(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u",
        "--cluster",
        "c",
    ]);
    let s = s["session_id"].as_str().unwrap().to_owned();
    let c = env.json(&["artifacts", "collection", "create", &s, "--name", "logs"]);
    let c = c["collection_id"].as_str().unwrap().to_owned();
    for f in ["a.log", "b.log"] {
        let p = env.dir.path().join(f);
        std::fs::write(&p, f).unwrap();
        env.ok(&["artifacts", "add", &s, &c, p.to_str().unwrap()]);
    }
    env
}

/// `artifacts upload --all` with `vars` and no other AWS settings.
fn upload(env: &Env, vars: &[(&str, &str)], extra: &[&str]) -> Output {
    let mut c = env.command();
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "RUST_LOG",
        "EUA_LOG",
    ] {
        c.env_remove(k);
    }
    c.env("HOME", env.dir.path()).envs(vars.iter().copied());
    c.args(extra)
        .args(["artifacts", "upload", "--all", "--retry-failed"])
        .output()
        .unwrap()
}

#[test]
fn no_credentials_is_said_once_and_the_sdk_stays_quiet() {
    let env = two_artifacts();
    let moto = Moto::start();
    // No credentials anywhere: the instance metadata service (here, a closed port) is the last
    // place looked.
    let vars = [
        ("AWS_ENDPOINT_URL", moto.url.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_METADATA_ENDPOINT", "http://127.0.0.1:1"),
        ("EUA_S3_BUCKET", "team"),
    ];
    let out = upload(&env, &vars, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        "0/2 uploaded: no AWS credentials found (environment, profile, instance metadata)",
        "{stderr}"
    );
    assert!(
        stderr.trim().is_empty(),
        "nothing per artifact, no log lines: {stderr}"
    );
    // With RUST_LOG, the libraries' own lines show.
    let mut loud = vars.to_vec();
    loud.push(("RUST_LOG", "debug"));
    let out = upload(&env, &loud, &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("DEBUG"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = upload(&env, &vars, &["-vvv"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("DEBUG"));
}

#[test]
fn a_missing_bucket_is_named_once() {
    let env = two_artifacts();
    let moto = Moto::start();
    // Answering S3 requests (not only accepting connections), with no bucket "nope".
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let vars = [
        ("AWS_ENDPOINT_URL", moto.url.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("EUA_S3_BUCKET", "nope"),
    ];
    let out = upload(&env, &vars, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        "0/2 uploaded: bucket nope does not exist",
        "{stderr}"
    );
    assert!(stderr.trim().is_empty(), "{stderr}");
}

/// An S3 endpoint that answers every request as S3 answers one signed for the wrong region: 400,
/// with `AuthorizationHeaderMalformed` in the body (none for `HEAD`). Answers its URL; the
/// thread ends with the test process.
fn wrong_region_s3() -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let _ = reader
                    .by_ref()
                    .take(len as u64)
                    .read_to_end(&mut Vec::new());
                let body = if first.starts_with("HEAD") {
                    String::new()
                } else {
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AuthorizationHeaderMalformed</Code>\
                     <Message>The authorization header is malformed; the region 'us-east-1' is wrong; \
                     expecting 'eu-west-1'</Message><Region>eu-west-1</Region></Error>"
                        .to_owned()
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                     x-amz-bucket-region: eu-west-1\r\nConnection: close\r\n\r\n{body}",
                    if first.starts_with("HEAD") {
                        0
                    } else {
                        body.len()
                    }
                );
            });
        }
    });
    url
}

#[test]
fn no_region_is_said_once() {
    let env = two_artifacts();
    let url = wrong_region_s3();
    let vars = [
        ("AWS_ENDPOINT_URL", url.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("EUA_S3_BUCKET", "team"),
    ];
    let out = upload(&env, &vars, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        "0/2 uploaded: no AWS region configured (set AWS_REGION to the bucket's region)",
        "{stderr}"
    );
    assert!(stderr.trim().is_empty(), "{stderr}");
    // With a region configured, the same answers are not blamed on a missing region.
    let mut with_region = vars.to_vec();
    with_region.push(("AWS_REGION", "us-east-1"));
    let out = upload(&env, &with_region, &[]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(!all.contains("no AWS region configured"), "{all}");
}
