//! S3 through the CLI against moto on 127.0.0.1: `--auto-upload` queues, `artifacts upload`
//! sends with the reference keys and metadata, re-running sends nothing, `get` falls back to S3.

use std::process::Command;

use serde_json::Value;

use crate::util::{Env, Moto};

/// The AWS settings that point at a local server (no bucket).
pub(crate) fn aws_env(endpoint: &str) -> [(&'static str, &str); 5] {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
}

pub(crate) fn with_s3(c: &mut Command, endpoint: &str) {
    c.envs(aws_env(endpoint)).env("EUA_S3_BUCKET", "team");
}

/// Runs the CLI with S3 settings and `-o json`; asserts success and parses stdout.
pub(crate) fn json_s3(env: &Env, endpoint: &str, args: &[&str]) -> Value {
    let mut c = env.command();
    with_s3(&mut c, endpoint);
    let out = c.arg("-o").arg("json").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn artifacts_upload_to_s3_with_reference_keys_and_metadata() {
    let moto = Moto::start();
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let env = Env::new();
    let run = |args: &[&str]| json_s3(&env, &moto.url, args);
    let s = run(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u1",
        "--cluster",
        "prod",
    ]);
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let c = run(&["artifacts", "collection", "create", &sid, "--name", "logs"]);
    let cid = c["collection_id"].as_str().unwrap().to_owned();
    let file = env.dir.path().join("kubelet.log");
    std::fs::write(&file, b"kubelet ok\n").unwrap();
    let added = run(&[
        "--auto-upload",
        "artifacts",
        "add",
        &sid,
        &cid,
        file.to_str().unwrap(),
        "--task-id",
        "ng1",
    ]);
    let id = added[0]["artifact_id"].as_str().unwrap().to_owned();
    let hash = added[0]["file_hash"].as_str().unwrap().to_owned();
    let report = run(&["artifacts", "upload"]);
    assert_eq!(report["uploaded"], 1, "{report}");
    let a = run(&["artifacts", "show", &id]);
    let key = format!("eks-upgrade-agent/artifacts/{sid}/{cid}/kubelet.log");
    assert_eq!(a["status"], "uploaded");
    assert_eq!(a["s3_key"], key.as_str());
    assert_eq!(a["s3_url"], format!("s3://team/{key}"));
    let head = moto.python(&format!(
        "s3 = boto3.client('s3', **kw)\nprint(json.dumps(s3.head_object(Bucket='team', Key={key:?})['Metadata']))"
    ));
    assert_eq!(head["artifact-id"], id.as_str());
    assert_eq!(head["artifact-type"], "log_file");
    assert_eq!(head["upgrade-id"], "u1");
    assert_eq!(head["task-id"], "ng1");
    assert_eq!(head["file-hash"], hash.as_str());
    // Nothing left to send.
    let report = run(&["artifacts", "upload", "--all"]);
    assert_eq!(
        (report["queued"].as_u64(), report["uploaded"].as_u64()),
        (Some(0), Some(0))
    );
    // The local blob is gone (a fresh machine): get reads S3, verified.
    std::fs::remove_file(env.data_dir().join("blobs/small.sqlite3")).unwrap();
    let mut c = env.command();
    with_s3(&mut c, &moto.url);
    let out = c.args(["artifacts", "get", &id]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"kubelet ok\n");
    // Another machine (an empty data dir, no --s3-bucket) pulls the session and reads it.
    let other = Env::new();
    let mut c = other.command();
    with_s3(&mut c, &moto.url);
    c.env_remove("EUA_S3_BUCKET");
    let out = c
        .args(["-o", "json", "artifacts", "pull", &sid, "--bucket", "team"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["artifacts"], 1);
    let mut c = other.command();
    with_s3(&mut c, &moto.url);
    c.env_remove("EUA_S3_BUCKET");
    let out = c.args(["artifacts", "get", &id]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"kubelet ok\n");
    // Delete removes the object and keeps the record.
    let d = run(&["artifacts", "delete", &id]);
    assert_eq!(d["status"], "deleted");
    let left = moto.python(&format!(
        "s3 = boto3.client('s3', **kw)\nprint(json.dumps(s3.list_objects_v2(Bucket='team', Prefix={key:?}).get('KeyCount', 0)))"
    ));
    assert_eq!(left, 0);
    // Without a bucket, upload says what to set.
    let err = env.fails(1, &["artifacts", "upload"]);
    assert!(err.contains("no S3 bucket is configured"), "{err}");
}

pub(crate) fn status(env: &Env, endpoint: &str, id: &str) -> Value {
    let mut c = env.command();
    with_s3(&mut c, endpoint);
    let out = c
        .args(["-o", "json", "artifacts", "show", id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits for `child` (stdout and stderr piped), sampling its peak resident set size
/// (`VmHWM`) until it exits; returns its output and the last peak seen, in KiB.
pub(crate) fn wait_with_peak_rss(mut child: std::process::Child) -> (std::process::Output, u64) {
    use std::io::Read;
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let outs = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    let errs = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).unwrap();
        v
    });
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let output = std::process::Output {
        status,
        stdout: outs.join().unwrap(),
        stderr: errs.join().unwrap(),
    };
    (output, peak)
}

/// A large artifact queued for upload, returns its id.
fn big_artifact(env: &Env, endpoint: &str, mib: u64) -> String {
    let run = |args: &[&str]| json_s3(env, endpoint, args);
    let s = run(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u1",
        "--cluster",
        "prod",
    ]);
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let c = run(&[
        "artifacts",
        "collection",
        "create",
        &sid,
        "--name",
        "backups",
    ]);
    let cid = c["collection_id"].as_str().unwrap().to_owned();
    let file = env.dir.path().join("etcd.snapshot");
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(mib << 20).unwrap();
    drop(f);
    let added = run(&[
        "--auto-upload",
        "artifacts",
        "add",
        &sid,
        &cid,
        file.to_str().unwrap(),
        "--type",
        "backup",
    ]);
    added[0]["artifact_id"].as_str().unwrap().to_owned()
}

/// A run killed mid-transfer (a quarter of the object on the wire, through a proxy that counts
/// the bytes) loses nothing: the next run uploads it whole, as multipart (32 parts of 8 MiB)
/// with `x-amz-checksum-sha256` on every part.
#[test]
fn a_killed_upload_is_finished_by_the_next_run() {
    let moto = Moto::start();
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let env = Env::new();
    let id = big_artifact(&env, &moto.url, 256);
    let proxy = RecordingProxy::start(&moto.url);
    let mut c = env.command();
    with_s3(&mut c, &proxy.url);
    let mut child = c
        .args(["artifacts", "upload"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    proxy.wait_for_bytes(64 << 20);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the upload finished before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        status(&env, &moto.url, &id)["status"],
        "created",
        "still queued after the kill"
    );
    // A slow network (at most 8 MB/s per connection), so that parts would pile up if more
    // than four were sent at once.
    let second = RecordingProxy::start_throttled(&moto.url, std::time::Duration::from_millis(8));
    let mut c = env.command();
    with_s3(&mut c, &second.url);
    let child = c
        .args(["-o", "json", "artifacts", "upload"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (out, peak_kib) = wait_with_peak_rss(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Streamed from the blob, four 8 MiB parts at a time: the process never holds the object.
    let max = second.max_in_flight();
    eprintln!("256 MiB upload: peak RSS {peak_kib} KiB, at most {max} requests in flight");
    assert_eq!(max, 4, "parts in flight at once");
    assert!(
        peak_kib < 128 * 1024,
        "peak RSS {peak_kib} KiB while uploading 256 MiB"
    );
    let a = status(&env, &moto.url, &id);
    assert_eq!(a["status"], "uploaded");
    let key = a["s3_key"].as_str().unwrap();
    let meta = moto.python(&format!(
        "s3 = boto3.client('s3', **kw)\nh = s3.head_object(Bucket='team', Key={key:?})\nprint(json.dumps([h['ContentLength'], h['Metadata']['file-hash']]))"
    ));
    assert_eq!(meta[0], 256u64 << 20);
    assert_eq!(meta[1], a["file_hash"]);
    // Multipart really used, and every part carried its SHA-256 checksum.
    let parts: Vec<String> = second
        .request_heads()
        .into_iter()
        .filter(|h| h.starts_with("PUT ") && h.lines().next().unwrap().contains("partNumber="))
        .collect();
    assert_eq!(parts.len(), 32, "8 MiB parts of 256 MiB");
    for h in &parts {
        assert!(
            h.to_ascii_lowercase()
                .contains("\r\nx-amz-checksum-sha256:"),
            "a part without its checksum: {h}"
        );
    }
}

#[test]
fn an_outage_during_a_multipart_upload_fails_clearly_and_retry_failed_finishes() {
    outage_during_upload(256);
}

#[test]
fn an_outage_during_a_single_part_upload_fails_clearly_and_retry_failed_finishes() {
    // Below the 64 MiB multipart threshold: one PUT, cut off by the outage.
    outage_during_upload(60);
}

fn outage_during_upload(mib: u64) {
    let mut moto = Moto::start();
    let url = moto.url.clone();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let env = Env::new();
    let id = big_artifact(&env, &url, mib);
    // Through a proxy that counts the bytes, so the outage strikes mid-transfer.
    let proxy = RecordingProxy::start(&url);
    let mut c = env.command();
    with_s3(&mut c, &proxy.url);
    let mut child = c
        .args(["artifacts", "upload"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    proxy.wait_for_bytes(16 << 20);
    assert!(
        child.try_wait().unwrap().is_none(),
        "finished before the outage"
    );
    moto.stop();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&id) && err.contains("s3://team/"), "{err}");
    // Multipart above the 64 MiB threshold, one PUT at or below it.
    let heads = proxy.request_heads();
    let multipart = heads.iter().any(|h| {
        let line = h.lines().next().unwrap_or_default();
        line.contains("partNumber=") || (line.starts_with("POST ") && line.contains("?uploads"))
    });
    assert_eq!(
        multipart,
        mib > 64,
        "{mib} MiB: multipart {multipart}; requests: {:?}",
        heads
            .iter()
            .map(|h| h.lines().next().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    );
    let a = status(&env, &proxy.url, &id);
    assert_eq!(a["status"], "failed");
    // The local bytes are intact.
    let mut c = env.command();
    c.args(["-o", "json", "artifacts", "verify"]);
    let v: Value = serde_json::from_slice(&c.output().unwrap().stdout).unwrap();
    assert!(
        v["corrupt"].as_array().unwrap().is_empty() && v["missing"].as_array().unwrap().is_empty()
    );
    // Back up (a fresh server on the same port): --retry-failed finishes it.
    let moto = Moto::start_on(port);
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let mut c = env.command();
    with_s3(&mut c, &url);
    let out = c
        .args(["artifacts", "upload", "--retry-failed"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&env, &url, &id)["status"], "uploaded");
}

#[test]
fn serve_uploads_what_the_api_receives() {
    let moto = Moto::start();
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    let env = Env::new();
    let mut vars = aws_env(&moto.url).to_vec();
    vars.extend([("EUA_S3_BUCKET", "team"), ("EUA_AUTO_UPLOAD", "true")]);
    let served = crate::util::serve(&env, &vars);
    let post = |path: &str, body: &str| -> Value {
        let resp = crate::util::http(
            served.port,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
        serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    };
    let s = post(
        "/api/v1/sessions",
        r#"{"upgrade_id":"u1","cluster_name":"prod"}"#,
    );
    let sid = s["session_id"].as_str().unwrap();
    let c = post(
        &format!("/api/v1/sessions/{sid}/collections"),
        r#"{"name":"logs"}"#,
    );
    let cid = c["collection_id"].as_str().unwrap();
    let a = post(
        &format!("/api/v1/sessions/{sid}/collections/{cid}/artifacts?name=kubelet.log"),
        "kubelet ok\n",
    );
    assert_eq!(a["status"], "created");
    let id = a["artifact_id"].as_str().unwrap();
    // The server's uploader sends it; the object lands under the reference key.
    let start = std::time::Instant::now();
    let uploaded = loop {
        let v = json_s3(&env, &moto.url, &["artifacts", "show", id]);
        if v["status"] == "uploaded" {
            break v;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "not uploaded: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let key = uploaded["s3_key"].as_str().unwrap();
    assert_eq!(
        key,
        format!("eks-upgrade-agent/artifacts/{sid}/{cid}/kubelet.log")
    );
    let body = moto.python(&format!(
        "s3 = boto3.client('s3', **kw)\nprint(json.dumps(s3.get_object(Bucket='team', Key='{key}')['Body'].read().decode()))"
    ));
    assert_eq!(body, Value::String("kubelet ok\n".into()));

    // Through the remote CLI: an upload run on the server, then a second server pulls the
    // session from the bucket and serves its bytes.
    let url = format!("http://127.0.0.1:{}", served.port);
    let out = env.ok(&["--server", &url, "artifacts", "upload", "--all"]);
    assert!(out.contains("already in s3://team"), "{out}");
    let other = Env::new();
    let served2 = crate::util::serve(&other, &aws_env(&moto.url));
    let url2 = format!("http://127.0.0.1:{}", served2.port);
    let pulled = env.json(&[
        "--server",
        &url2,
        "artifacts",
        "pull",
        sid,
        "--bucket",
        "team",
        "--eager",
    ]);
    assert_eq!(
        (pulled["artifacts"].as_u64(), pulled["downloaded"].as_u64()),
        (Some(1), Some(1)),
        "{pulled}"
    );
    let got = env.ok(&["--server", &url2, "artifacts", "get", id]);
    assert_eq!(got, "kubelet ok\n");
}

/// Runs the CLI with S3 settings and `-o json`; returns the output, success or not.
pub(crate) fn run_s3(env: &Env, endpoint: &str, args: &[&str]) -> std::process::Output {
    let mut c = env.command();
    with_s3(&mut c, endpoint);
    c.arg("-o").arg("json").args(args).output().unwrap()
}

/// Puts `body` at `bucket`/`key` with boto3.
pub(crate) fn put_object(moto: &Moto, bucket: &str, key: &str, body: &str) {
    let body = serde_json::to_string(body).unwrap();
    moto.python(&format!(
        "s3 = boto3.client('s3', **kw)\n\
         s3.put_object(Bucket={bucket:?}, Key={key:?}, Body=json.loads({body:?}).encode())\n\
         print('null')"
    ));
}

/// Whether `bucket`/`key` exists.
pub(crate) fn object_exists(moto: &Moto, bucket: &str, key: &str) -> bool {
    moto.python(&format!(
        "s3 = boto3.client('s3', **kw)\n\
         print(json.dumps(s3.list_objects_v2(Bucket={bucket:?}, Prefix={key:?}).get('KeyCount', 0) > 0))"
    ))
    .as_bool()
    .unwrap()
}

/// A manifest of session `sid` (completed in 2000, so any cleanup removes it) whose artifacts
/// claim `keys` (key, bucket).
fn forged_manifest(sid: &str, keys: &[(String, &str)]) -> String {
    let artifacts: Vec<Value> = keys
        .iter()
        .enumerate()
        .map(|(i, (key, bucket))| {
            serde_json::json!({
                "artifact_id": format!("a{i}"),
                "session_id": sid,
                "collection_id": "col1",
                "name": format!("results-{i}.xml"),
                "export_name": format!("results-{i}.xml"),
                "description": null,
                "artifact_type": "test_result",
                "file_size": 3,
                "file_hash": "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
                "status": "uploaded",
                "s3_bucket": bucket,
                "s3_key": key,
                "s3_url": format!("s3://{bucket}/{key}"),
                "created_at": "2000-01-01T00:00:00Z",
                "uploaded_at": "2000-01-01T00:00:00Z",
                "task_id": null,
                "step_id": null,
                "upgrade_id": "u-evil",
                "tags": [],
                "metadata": {}
            })
        })
        .collect();
    serde_json::json!({
        "format": 1,
        "session": {
            "session_id": sid,
            "upgrade_id": "u-evil",
            "cluster_name": "c",
            "name": "evil",
            "description": null,
            "started_at": "2000-01-01T00:00:00Z",
            "completed_at": "2000-01-01T00:00:00Z",
            "retention_days": 1
        },
        "collections": [{
            "collection_id": "col1",
            "session_id": sid,
            "name": "logs",
            "description": null,
            "task_id": null,
            "created_at": "2000-01-01T00:00:00Z"
        }],
        "artifacts": artifacts
    })
    .to_string()
}

/// Issue #10, item 1: a forged manifest names other people's objects (another session's, an
/// object outside the layout, an object in another bucket) and a completion in 2000. `pull`
/// refuses it and stores nothing; a manifest whose keys are right but which names another
/// bucket is stored with the bucket pulled from; after `cleanup` every victim still exists.
#[test]
fn a_forged_manifest_cannot_make_pull_or_cleanup_touch_other_objects() {
    let moto = Moto::start();
    moto.python(
        "s3 = boto3.client('s3', **kw)\n\
         s3.create_bucket(Bucket='team')\n\
         s3.create_bucket(Bucket='other')\n\
         print('null')",
    );
    let prefix = "eks-upgrade-agent/artifacts";
    let victims = [
        (format!("{prefix}/VICTIM/col1/results.xml"), "team"),
        ("other-team/secret-backup.tar".to_owned(), "team"),
        ("secret-backup.tar".to_owned(), "other"),
    ];
    for (key, bucket) in &victims {
        put_object(&moto, bucket, key, "precious");
    }
    put_object(
        &moto,
        "team",
        &format!("{prefix}/EVIL/manifest.json"),
        &forged_manifest("EVIL", &victims),
    );
    let env = Env::new();
    let out = run_s3(
        &env,
        &moto.url,
        &["artifacts", "pull", "EVIL", "--bucket", "team"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("refusing manifest s3://team/eks-upgrade-agent/artifacts/EVIL/manifest.json")
            && stderr.contains("claims S3 key"),
        "{stderr}"
    );
    let sessions = json_s3(&env, &moto.url, &["artifacts", "session", "list"]);
    assert_eq!(sessions, serde_json::json!([]), "nothing stored");

    // Each bad key alone is refused too.
    for victim in &victims {
        put_object(
            &moto,
            "team",
            &format!("{prefix}/EVIL/manifest.json"),
            &forged_manifest("EVIL", std::slice::from_ref(victim)),
        );
        let out = run_s3(
            &env,
            &moto.url,
            &["artifacts", "pull", "EVIL", "--bucket", "team"],
        );
        assert_eq!(out.status.code(), Some(1), "{victim:?}");
    }

    // The layout key, but the manifest names the other bucket: stored with this bucket.
    let own = format!("{prefix}/EVIL/col1/results-0.xml");
    put_object(&moto, "other", &own, "precious");
    put_object(&moto, "team", &own, "abc");
    put_object(
        &moto,
        "team",
        &format!("{prefix}/EVIL/manifest.json"),
        &forged_manifest("EVIL", &[(own.clone(), "other")]),
    );
    let pulled = json_s3(
        &env,
        &moto.url,
        &["artifacts", "pull", "EVIL", "--bucket", "team"],
    );
    assert_eq!(pulled["artifacts"], 1, "{pulled}");
    let a = json_s3(&env, &moto.url, &["artifacts", "show", "a0"]);
    assert_eq!(a["s3_bucket"], "team", "{a}");
    assert_eq!(a["s3_url"], format!("s3://team/{own}"), "{a}");
    assert_eq!(
        a["file_hash"], "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "normalised"
    );
    let report = json_s3(&env, &moto.url, &["artifacts", "cleanup"]);
    assert_eq!(report["sessions"].as_array().unwrap().len(), 1, "{report}");
    for (key, bucket) in &victims {
        assert!(
            object_exists(&moto, bucket, key),
            "{bucket}/{key} was deleted"
        );
    }
    assert!(
        object_exists(&moto, "other", &own),
        "the other bucket was touched"
    );
    assert!(!object_exists(&moto, "team", &own), "its own object goes");
}

/// A TCP proxy in front of `upstream` that keeps every request byte its clients send, to
/// count the requests that really reached S3 (moto keeps no request log).
pub(crate) struct RecordingProxy {
    pub(crate) url: String,
    sent: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes forwarded from clients to the server so far.
    forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Requests sent whose response has not started yet (now, and the most ever).
    in_flight: std::sync::Arc<[std::sync::atomic::AtomicI64; 2]>,
}

/// Counts the occurrences of `pattern` followed by `after` more bytes that satisfy `accept`,
/// in a stream that arrives in chunks (a match may straddle two chunks).
struct StreamCounter {
    pattern: &'static [u8],
    after: usize,
    tail: Vec<u8>,
}

impl StreamCounter {
    fn new(pattern: &'static [u8], after: usize) -> StreamCounter {
        StreamCounter {
            pattern,
            after,
            tail: Vec::new(),
        }
    }

    fn feed(&mut self, chunk: &[u8], accept: impl Fn(&[u8]) -> bool) -> i64 {
        self.tail.extend_from_slice(chunk);
        let need = self.pattern.len() + self.after;
        let mut count = 0;
        let mut i = 0;
        while i + need <= self.tail.len() {
            if &self.tail[i..i + self.pattern.len()] == self.pattern {
                if accept(&self.tail[i + self.pattern.len()..i + need]) {
                    count += 1;
                }
                i += self.pattern.len();
            } else {
                i += 1;
            }
        }
        // Keep what could still start a match.
        let keep_from = i.max(self.tail.len().saturating_sub(need - 1));
        self.tail.drain(..keep_from);
        count
    }
}

impl RecordingProxy {
    pub(crate) fn start(upstream: &str) -> RecordingProxy {
        RecordingProxy::start_throttled(upstream, std::time::Duration::ZERO)
    }

    /// A proxy that waits `pause` after forwarding each read of up to 64 KiB from a client: a
    /// slow network, so that requests pile up when a client sends several at once.
    pub(crate) fn start_throttled(upstream: &str, pause: std::time::Duration) -> RecordingProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let forwarded = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let in_flight = std::sync::Arc::new([
            std::sync::atomic::AtomicI64::new(0),
            std::sync::atomic::AtomicI64::new(0),
        ]);
        let (s, o, f, fl) = (
            sent.clone(),
            open.clone(),
            forwarded.clone(),
            in_flight.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let mut server = std::net::TcpStream::connect(&upstream).unwrap();
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let fl2 = fl.clone();
                std::thread::spawn(move || {
                    // Each final status line (not `100 Continue`) ends a request in flight.
                    let mut statuses = StreamCounter::new(b"HTTP/1.1 ", 3);
                    let mut buf = [0u8; 64 * 1024];
                    loop {
                        match s2.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let done = statuses.feed(&buf[..n], |code| code != b"100");
                                fl2[0].fetch_sub(done, Ordering::SeqCst);
                                if c2.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
                let (s, o, f, fl) = (s.clone(), o.clone(), f.clone(), fl.clone());
                o.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut all = Vec::new();
                    let mut buf = [0u8; 64 * 1024];
                    let mut requests = StreamCounter::new(b" HTTP/1.1\r\n", 0);
                    loop {
                        match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let started = requests.feed(&buf[..n], |_| true);
                                if started > 0 {
                                    let now = fl[0].fetch_add(started, Ordering::SeqCst) + started;
                                    fl[1].fetch_max(now, Ordering::SeqCst);
                                }
                                all.extend_from_slice(&buf[..n]);
                                if server.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                f.fetch_add(n as u64, Ordering::SeqCst);
                                if !pause.is_zero() {
                                    std::thread::sleep(pause);
                                }
                            }
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Write);
                    s.lock().unwrap().push(all);
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        RecordingProxy {
            url,
            sent,
            open,
            forwarded,
            in_flight,
        }
    }

    /// The most requests that were ever in flight at once.
    pub(crate) fn max_in_flight(&self) -> i64 {
        self.in_flight[1].load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `n` bytes went through to the server: a transfer is under way.
    pub(crate) fn wait_for_bytes(&self, n: u64) {
        let start = std::time::Instant::now();
        while self.forwarded.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "only {} bytes reached the server",
                self.forwarded.load(std::sync::atomic::Ordering::SeqCst)
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The head (request line and headers) of every request of the finished connections.
    pub(crate) fn request_heads(&self) -> Vec<String> {
        let _ = self.request_lines(); // waits for the connections to close
        let mut heads = Vec::new();
        for conn in self.sent.lock().unwrap().iter() {
            let mut rest: &[u8] = conn;
            // Requests follow each other on a keep-alive connection: head, then its body.
            while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&rest[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                heads.push(head);
                rest = rest.get(end + 4 + len..).unwrap_or(&[]);
            }
        }
        heads
    }

    /// The request lines (`PUT /bucket/key`) of every finished connection.
    pub(crate) fn request_lines(&self) -> Vec<String> {
        let start = std::time::Instant::now();
        while self.open.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "connections stay open"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut lines = Vec::new();
        for conn in self.sent.lock().unwrap().iter() {
            let text = String::from_utf8_lossy(conn);
            for line in text.split("\r\n") {
                for method in ["PUT ", "POST ", "GET ", "HEAD ", "DELETE "] {
                    if let Some(i) = line.find(method)
                        && line.ends_with(" HTTP/1.1")
                    {
                        lines.push(line[i..line.len() - 9].to_owned());
                    }
                }
            }
        }
        lines
    }
}

/// Issue #10, item 16: two `artifacts upload` runs at once send each object exactly once
/// (queue entries are claimed with a lease), counted by a proxy in front of moto.
#[test]
fn two_concurrent_uploads_send_each_object_once() {
    let moto = Moto::start();
    moto.python("s3 = boto3.client('s3', **kw)\ns3.create_bucket(Bucket='team')\nprint('null')");
    // A slow network (5 ms per request), so that both runs are at work at once.
    let proxy = RecordingProxy::start_throttled(&moto.url, std::time::Duration::from_millis(5));
    let env = Env::new();
    let run = |args: &[&str]| json_s3(&env, &moto.url, args);
    let s = run(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u1",
        "--cluster",
        "prod",
    ]);
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let c = run(&["artifacts", "collection", "create", &sid, "--name", "logs"]);
    let cid = c["collection_id"].as_str().unwrap().to_owned();
    let dir = env.dir.path().join("many");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..60 {
        std::fs::write(
            dir.join(format!("f{i:02}.log")),
            format!("object number {i}\n"),
        )
        .unwrap();
    }
    run(&[
        "--auto-upload",
        "artifacts",
        "add",
        &sid,
        &cid,
        dir.to_str().unwrap(),
    ]);
    let children: Vec<_> = (0..2)
        .map(|_| {
            let mut c = env.command();
            with_s3(&mut c, &proxy.url);
            c.args(["-o", "json", "artifacts", "upload"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut uploaded = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        // Both runs worked the queue at the same time (each sent some of it).
        assert!(
            r["uploaded"].as_u64().unwrap() > 0,
            "one run sent nothing: {r}"
        );
        uploaded += r["uploaded"].as_u64().unwrap();
    }
    let object_prefix = format!("PUT /team/eks-upgrade-agent/artifacts/{sid}/{cid}/");
    let puts: Vec<String> = proxy
        .request_lines()
        .into_iter()
        .filter(|l| l.starts_with(&object_prefix))
        .collect();
    let mut unique = puts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 60, "{unique:?}");
    assert_eq!(puts.len(), 60, "each object sent once: {} PUTs", puts.len());
    assert_eq!(uploaded, 60);
    let found = run(&[
        "artifacts",
        "search",
        "--session",
        &sid,
        "--status",
        "uploaded",
        "--limit",
        "1000",
    ]);
    assert_eq!(found.as_array().unwrap().len(), 60);
}
