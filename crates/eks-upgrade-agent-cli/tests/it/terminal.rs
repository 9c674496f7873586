//! On a terminal, long work shows a progress bar (bytes done and total, rate, ETA, files); the
//! binary runs under a pseudo-terminal made by `script` (util-linux), as a person would run it.

use std::process::Command;

use crate::s3::with_s3;
use crate::util::{BIN, Env, Moto};

/// Runs the binary with `args` under a pty; returns everything it drew.
fn on_a_terminal(env: &Env, endpoint: Option<&str>, args: &[&str]) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut line = format!(
        "{} --data-dir {}",
        quote(BIN),
        quote(env.data_dir().to_str().unwrap())
    );
    for a in args {
        line.push(' ');
        line.push_str(&quote(a));
    }
    let mut c = Command::new("script");
    // -q: no banner; -e: the command's exit code; -c: the command; the typescript is dropped.
    c.args(["-qec", &line, "/dev/null"])
        .env_remove("EUA_OUTPUT")
        .env("TERM", "xterm")
        .env("COLUMNS", "160");
    if let Some(e) = endpoint {
        with_s3(&mut c, e);
    }
    let out = c.output().unwrap_or_else(|e| {
        panic!("cannot run script ({e}): it comes with util-linux (bsdutils on Debian)")
    });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

fn assert_bar(text: &str, what: &str) {
    for part in ["MiB/", "MiB/s", "eta ", "files"] {
        assert!(
            text.contains(part),
            "{what}: no {part:?} in the bar: {text:?}"
        );
    }
}

#[test]
fn add_and_upload_show_a_progress_bar_on_a_terminal() {
    let moto = Moto::start();
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let env = Env::new();
    let json = |args: &[&str]| crate::s3::json_s3(&env, &moto.url, args);
    let s = json(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u1",
        "--cluster",
        "c",
    ]);
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let c = json(&[
        "artifacts",
        "collection",
        "create",
        &sid,
        "--name",
        "backups",
    ]);
    let cid = c["collection_id"].as_str().unwrap().to_owned();
    let dir = env.dir.path().join("dumps");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..2 {
        let data: Vec<u8> = (0..48u32 << 20)
            .map(|x| (x.wrapping_mul(2_654_435_761) >> 13) as u8 ^ i)
            .collect();
        std::fs::write(dir.join(format!("dump-{i}.bin")), data).unwrap();
    }
    let added = on_a_terminal(
        &env,
        Some(&moto.url),
        &[
            "--auto-upload",
            "artifacts",
            "add",
            &sid,
            &cid,
            dir.to_str().unwrap(),
        ],
    );
    assert_bar(&added, "add");
    let uploaded = on_a_terminal(&env, Some(&moto.url), &["artifacts", "upload"]);
    assert_bar(&uploaded, "upload");
    // Not a terminal (the usual test run): no bar at all, for an add and an upload with work.
    let more = env.dir.path().join("more");
    std::fs::create_dir(&more).unwrap();
    std::fs::write(more.join("dump-2.bin"), vec![7u8; 24 << 20]).unwrap();
    let out = env
        .command()
        .envs(crate::s3::aws_env(&moto.url))
        .env("EUA_S3_BUCKET", "team")
        .args([
            "--auto-upload",
            "artifacts",
            "add",
            &sid,
            &cid,
            more.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("eta "),
        "{out:?}"
    );
    let out = env
        .command()
        .envs(crate::s3::aws_env(&moto.url))
        .env("EUA_S3_BUCKET", "team")
        .args(["artifacts", "upload", "--all"])
        .output()
        .unwrap();
    let plain = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{plain}");
    assert!(!plain.contains("eta "), "{plain}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("uploaded 1 ("),
        "there was work to show a bar for: {said}"
    );
}
