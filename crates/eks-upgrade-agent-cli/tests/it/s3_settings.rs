//! S3 as the README promises it, against moto on 127.0.0.1: where the bucket, prefix and
//! endpoint come from, the key of a renamed export, the checksum of a single PUT, the manifest
//! written when a session completes, and deletes that only ever touch the layout's own keys.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::s3::{RecordingProxy, object_exists, put_object};
use crate::util::{Env, Moto};

/// AWS settings for a local server, without `AWS_ENDPOINT_URL` and without a bucket.
fn credentials(c: &mut Command) {
    c.env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .env_remove("EUA_S3_BUCKET")
        .env_remove("EUA_S3_PREFIX");
}

fn json(mut c: Command, args: &[&str]) -> Value {
    let out = c.arg("-o").arg("json").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A session and collection; returns their ids.
fn session(c: impl Fn() -> Command) -> (String, String) {
    let s = json(
        c(),
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u1",
            "--cluster",
            "prod",
        ],
    );
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let col = json(
        c(),
        &["artifacts", "collection", "create", &sid, "--name", "junit"],
    );
    (sid, col["collection_id"].as_str().unwrap().to_owned())
}

fn add(c: Command, sid: &str, cid: &str, file: &Path, name: &str) -> Value {
    json(
        c,
        &[
            "artifacts",
            "add",
            sid,
            cid,
            file.to_str().unwrap(),
            "--name",
            name,
        ],
    )[0]
    .clone()
}

/// Standard base64 of the bytes a hex string spells.
fn hex_to_base64(hex: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn hex_to_base64_is_standard_base64() {
    // sha256("abc"), as S3 writes it.
    assert_eq!(
        hex_to_base64("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
    );
    assert_eq!(hex_to_base64("6162"), "YWI=");
}

/// The bucket from `--s3-bucket` or the configuration file, the prefix from `--s3-prefix` or
/// the file, the endpoint from `AWS_ENDPOINT_URL_S3` (winning over `AWS_ENDPOINT_URL`, which
/// points nowhere here). Two artifacts named alike get `report.xml` and `report~2.xml` keys;
/// each single PUT carries the object's SHA-256 in `x-amz-checksum-sha256`.
#[test]
fn bucket_prefix_and_endpoint_come_from_flags_and_the_file() {
    let moto = Moto::start();
    moto.python(
        "s3 = boto3.client('s3', **kw)\n\
         s3.create_bucket(Bucket='team')\n\
         s3.create_bucket(Bucket='cfg')\n\
         print('null')",
    );
    let proxy = RecordingProxy::start(&moto.url);
    let env = Env::new();
    let flagged = || {
        let mut c = env.command();
        credentials(&mut c);
        c.env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .env("AWS_ENDPOINT_URL_S3", &proxy.url)
            .args(["--s3-bucket", "team", "--s3-prefix", "team/x"]);
        c
    };
    let (sid, cid) = session(flagged);
    let one = env.dir.path().join("one.xml");
    let two = env.dir.path().join("two.xml");
    std::fs::write(&one, b"<testsuite tests=\"1\"/>").unwrap();
    std::fs::write(&two, b"<testsuite tests=\"2\"/>").unwrap();
    let first = add(flagged(), &sid, &cid, &one, "report.xml");
    let second = add(flagged(), &sid, &cid, &two, "report.xml");
    let report = json(flagged(), &["artifacts", "upload", "--all"]);
    assert_eq!(report["uploaded"], 2, "{report}");
    for (a, name) in [(&first, "report.xml"), (&second, "report~2.xml")] {
        let id = a["artifact_id"].as_str().unwrap();
        let shown = json(flagged(), &["artifacts", "show", id]);
        let key = format!("team/x/{sid}/{cid}/{name}");
        assert_eq!(shown["s3_key"], key.as_str(), "{shown}");
        assert_eq!(shown["s3_bucket"], "team");
        assert!(
            object_exists(&moto, "team", &key),
            "{key} not in {} (requests: {:?})",
            moto.python("s3 = boto3.client('s3', **kw)\nprint(json.dumps([o['Key'] for o in s3.list_objects_v2(Bucket='team')['Contents']]))"),
            proxy.request_lines()
        );
        // The PUT of this key carried the object's checksum.
        let put = proxy
            .request_heads()
            .into_iter()
            .find(|h| h.starts_with(&format!("PUT /team/{key}")))
            .unwrap_or_else(|| panic!("no PUT of {key}"));
        let want = hex_to_base64(a["file_hash"].as_str().unwrap());
        let got = put
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-amz-checksum-sha256")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no x-amz-checksum-sha256 on {put}"));
        assert_eq!(got, want, "{put}");
    }

    // Bucket and prefix from the configuration file, the endpoint from AWS_ENDPOINT_URL.
    let config = env.dir.path().join("config.toml");
    std::fs::write(&config, "s3_bucket = \"cfg\"\ns3_prefix = \"from/file\"\n").unwrap();
    let filed = || {
        let mut c = env.command();
        credentials(&mut c);
        c.env("AWS_ENDPOINT_URL", &moto.url)
            .env("EUA_CONFIG", &config);
        c
    };
    let third = env.dir.path().join("three.log");
    std::fs::write(&third, b"three").unwrap();
    // Characters that an encoding layer could mangle stay as written in the key.
    let a = add(filed(), &sid, &cid, &third, "three [1] #a%b~.log");
    let report = json(filed(), &["artifacts", "upload", "--all"]);
    assert_eq!(report["uploaded"], 1, "{report}");
    let key = format!("from/file/{sid}/{cid}/three [1] #a%b~.log");
    let shown = json(
        filed(),
        &["artifacts", "show", a["artifact_id"].as_str().unwrap()],
    );
    assert_eq!(shown["s3_url"], format!("s3://cfg/{key}"), "{shown}");
    assert!(object_exists(&moto, "cfg", &key));
}

fn s3_command(env: &Env, endpoint: &str) -> Command {
    let mut c = env.command();
    crate::s3::with_s3(&mut c, endpoint);
    c
}

fn manifest(moto: &Moto, sid: &str) -> Value {
    moto.python(&format!(
        "s3 = boto3.client('s3', **kw)\n\
         print(s3.get_object(Bucket='team', Key='eks-upgrade-agent/artifacts/{sid}/manifest.json')['Body'].read().decode())"
    ))
}

/// Completing a session writes its manifest (with `completed_at`), even when nothing new is
/// uploaded then.
#[test]
fn completing_a_session_writes_its_manifest() {
    let moto = Moto::start();
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let env = Env::new();
    let (sid, cid) = session(|| s3_command(&env, &moto.url));
    let file = env.dir.path().join("a.log");
    std::fs::write(&file, b"a").unwrap();
    add(s3_command(&env, &moto.url), &sid, &cid, &file, "a.log");
    json(
        s3_command(&env, &moto.url),
        &["artifacts", "upload", "--all"],
    );
    let before = manifest(&moto, &sid);
    assert!(before["session"]["completed_at"].is_null(), "{before}");
    json(
        s3_command(&env, &moto.url),
        &["artifacts", "session", "complete", &sid],
    );
    let after = manifest(&moto, &sid);
    assert!(
        after["session"]["completed_at"].is_string(),
        "the manifest was not rewritten on completion: {after}"
    );
}

/// The artifact row of `id` in the data dir's index, rewritten to say it lives at
/// `bucket`/`key` (as an old version, a bug or a hand edit could have left it).
fn record_location(env: &Env, id: &str, bucket: &str, key: &str) {
    let db = rusqlite::Connection::open(env.data_dir().join("eks-upgrade-agent.sqlite3")).unwrap();
    let n = db
        .execute(
            "UPDATE artifacts SET s3_bucket = ?1, s3_key = ?2, s3_url = ?3 WHERE artifact_id = ?4",
            rusqlite::params![bucket, key, format!("s3://{bucket}/{key}"), id],
        )
        .unwrap();
    assert_eq!(n, 1);
}

/// `artifacts delete` deletes only the layout key in the configured bucket: a record that
/// names another key, or another bucket, leaves that object alone.
#[test]
fn delete_never_touches_an_object_recorded_outside_the_layout() {
    let moto = Moto::start();
    moto.python(
        "s3 = boto3.client('s3', **kw)\n\
         s3.create_bucket(Bucket='team')\n\
         s3.create_bucket(Bucket='other')\n\
         print('null')",
    );
    let env = Env::new();
    let (sid, cid) = session(|| s3_command(&env, &moto.url));
    let mut ids = Vec::new();
    for name in ["a.log", "b.log"] {
        let file = env.dir.path().join(name);
        std::fs::write(&file, name).unwrap();
        let a = add(s3_command(&env, &moto.url), &sid, &cid, &file, name);
        ids.push(a["artifact_id"].as_str().unwrap().to_owned());
    }
    json(
        s3_command(&env, &moto.url),
        &["artifacts", "upload", "--all"],
    );
    let layout = |name: &str| format!("eks-upgrade-agent/artifacts/{sid}/{cid}/{name}");
    // a.log's record now names a foreign key in the same bucket; b.log's the other bucket.
    put_object(&moto, "team", "other-team/backup.tar", "precious");
    record_location(&env, &ids[0], "team", "other-team/backup.tar");
    put_object(&moto, "other", &layout("b.log"), "precious");
    record_location(&env, &ids[1], "other", &layout("b.log"));
    for (id, at) in ids.iter().zip([
        "s3://team/other-team/backup.tar".to_owned(),
        format!("s3://other/{}", layout("b.log")),
    ]) {
        let out = s3_command(&env, &moto.url)
            .args(["artifacts", "delete", id])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("is in {at}; configure that bucket")),
            "{err}"
        );
        let shown = json(s3_command(&env, &moto.url), &["artifacts", "show", id]);
        assert_eq!(shown["status"], "uploaded", "unchanged: {shown}");
    }
    assert!(object_exists(&moto, "team", "other-team/backup.tar"));
    assert!(object_exists(&moto, "other", &layout("b.log")));
    // The control: a record at its layout key has its object deleted.
    let file = env.dir.path().join("c.log");
    std::fs::write(&file, "c").unwrap();
    let c = add(s3_command(&env, &moto.url), &sid, &cid, &file, "c.log");
    json(
        s3_command(&env, &moto.url),
        &["artifacts", "upload", "--all"],
    );
    assert!(object_exists(&moto, "team", &layout("c.log")));
    json(
        s3_command(&env, &moto.url),
        &["artifacts", "delete", c["artifact_id"].as_str().unwrap()],
    );
    assert!(!object_exists(&moto, "team", &layout("c.log")));
}

/// Retention deletes a session's objects before its rows: with S3 unreachable, `cleanup`
/// fails and the session stays whole (rows, local bytes); the next run removes it all.
#[test]
fn cleanup_with_s3_down_keeps_the_session_whole() {
    let moto = Moto::start();
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let env = Env::new();
    let (sid, cid) = session(|| s3_command(&env, &moto.url));
    let file = env.dir.path().join("a.log");
    std::fs::write(&file, b"keep me").unwrap();
    let a = add(s3_command(&env, &moto.url), &sid, &cid, &file, "a.log");
    let id = a["artifact_id"].as_str().unwrap().to_owned();
    json(
        s3_command(&env, &moto.url),
        &["artifacts", "upload", "--all"],
    );
    json(
        s3_command(&env, &moto.url),
        &["artifacts", "session", "complete", &sid],
    );
    let key = format!("eks-upgrade-agent/artifacts/{sid}/{cid}/a.log");
    let later = (chrono::Utc::now() + chrono::Duration::days(400)).to_rfc3339();

    let down = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let out = s3_command(&env, &down)
        .args(["artifacts", "cleanup", "--as-of", &later])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let shown = json(s3_command(&env, &moto.url), &["artifacts", "show", &id]);
    assert_eq!(shown["status"], "uploaded", "{shown}");
    let summary = json(
        s3_command(&env, &moto.url),
        &["artifacts", "session", "show", &sid],
    );
    assert_eq!(summary["total_artifacts"], 1, "{summary}");
    let got = s3_command(&env, &moto.url)
        .args(["artifacts", "get", &id])
        .output()
        .unwrap();
    assert_eq!(got.stdout, b"keep me", "the local copy is intact");
    assert!(object_exists(&moto, "team", &key));

    let report = json(
        s3_command(&env, &moto.url),
        &["artifacts", "cleanup", "--as-of", &later],
    );
    assert_eq!(report["sessions"].as_array().unwrap().len(), 1, "{report}");
    assert!(!object_exists(&moto, "team", &key));
    assert!(!object_exists(
        &moto,
        "team",
        &format!("eks-upgrade-agent/artifacts/{sid}/manifest.json")
    ));
    let out = s3_command(&env, &moto.url)
        .args(["artifacts", "session", "show", &sid])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{out:?}"
    );
}

/// `serve` uploads queued artifacts every 2 s, whoever queued them: here another CLI process
/// adds with `--auto-upload` and never runs `upload`.
#[test]
fn serve_uploads_what_another_process_queued() {
    let moto = Moto::start();
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let env = Env::new();
    let (sid, cid) = session(|| s3_command(&env, &moto.url));
    let vars = [
        ("AWS_ENDPOINT_URL", moto.url.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("EUA_S3_BUCKET", "team"),
    ];
    let _served = crate::util::serve(&env, &vars);
    let file = env.dir.path().join("kubelet.log");
    std::fs::write(&file, b"from another process").unwrap();
    let mut c = s3_command(&env, &moto.url);
    c.arg("--auto-upload");
    let a = add(c, &sid, &cid, &file, "kubelet.log");
    let id = a["artifact_id"].as_str().unwrap().to_owned();
    let key = format!("eks-upgrade-agent/artifacts/{sid}/{cid}/kubelet.log");
    let start = std::time::Instant::now();
    loop {
        let shown = json(s3_command(&env, &moto.url), &["artifacts", "show", &id]);
        if shown["status"] == "uploaded" {
            assert_eq!(shown["s3_key"], key.as_str());
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "serve did not upload it: {shown}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(object_exists(&moto, "team", &key));
}

/// Retention deletes only layout keys in the configured bucket: a session whose records name
/// a foreign key in the same bucket and a layout key in another bucket is cleaned up, and
/// both foreign objects remain, while the session's own layout object is deleted.
#[test]
fn cleanup_never_touches_an_object_recorded_outside_the_layout() {
    let moto = Moto::start();
    moto.python(
        "s3 = boto3.client('s3', **kw)\n\
         s3.create_bucket(Bucket='team')\n\
         s3.create_bucket(Bucket='other')\n\
         print('null')",
    );
    let env = Env::new();
    let (sid, cid) = session(|| s3_command(&env, &moto.url));
    let mut ids = Vec::new();
    for name in ["a.log", "b.log", "c.log"] {
        let file = env.dir.path().join(name);
        std::fs::write(&file, name).unwrap();
        let a = add(s3_command(&env, &moto.url), &sid, &cid, &file, name);
        ids.push(a["artifact_id"].as_str().unwrap().to_owned());
    }
    json(
        s3_command(&env, &moto.url),
        &["artifacts", "upload", "--all"],
    );
    let layout = |name: &str| format!("eks-upgrade-agent/artifacts/{sid}/{cid}/{name}");
    put_object(&moto, "team", "other-team/backup.tar", "precious");
    record_location(&env, &ids[0], "team", "other-team/backup.tar");
    put_object(&moto, "other", &layout("b.log"), "precious");
    record_location(&env, &ids[1], "other", &layout("b.log"));
    assert!(object_exists(&moto, "team", &layout("c.log")));
    json(
        s3_command(&env, &moto.url),
        &["artifacts", "session", "complete", &sid],
    );
    let later = (chrono::Utc::now() + chrono::Duration::days(400)).to_rfc3339();
    let out = s3_command(&env, &moto.url)
        .args(["-o", "json", "artifacts", "cleanup", "--as-of", &later])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        object_exists(&moto, "team", "other-team/backup.tar"),
        "a foreign key in the bucket was deleted: {stdout} {stderr}"
    );
    assert!(
        object_exists(&moto, "other", &layout("b.log")),
        "an object in another bucket was deleted: {stdout} {stderr}"
    );
    assert!(
        !object_exists(&moto, "team", &layout("c.log")),
        "the session's own layout object stays: {stdout} {stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sessions"].as_array().unwrap().len(), 1, "{report}");
}
