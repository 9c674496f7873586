//! Tables for people: they fit the terminal width (`COLUMNS`, cut with `…`), have header rows
//! (events and search too), sizes for people (`2.9 KiB`), dates with the day, the ETA as a
//! duration; not on a terminal, `watch` and `demo` print one timestamped line per event.

use crate::util::Env;

fn at_80(env: &Env, args: &[&str]) -> String {
    let out = env
        .command()
        .args(args)
        .env("COLUMNS", "80")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn assert_fits(text: &str, what: &str) {
    for line in text.lines() {
        assert!(
            line.chars().count() <= 80,
            "{what}: {} chars: {line}",
            line.chars().count()
        );
    }
}

/// An upgrade with long names, running, half done.
fn long_names() -> Env {
    let env = Env::new();
    let id = "upgrade-of-the-production-cluster-in-eu-west-1-2026";
    env.ok(&[
        "progress",
        "upgrade",
        "create",
        id,
        "--plan",
        "p",
        "--cluster",
        "production-eu-west-1-with-a-very-long-cluster-name",
    ]);
    env.ok(&[
        "progress",
        "upgrade",
        "start",
        id,
        "--phase",
        "control-plane-upgrade-and-addons",
    ]);
    env.ok(&[
        "progress",
        "task",
        "add",
        id,
        "t",
        "--name",
        "Upgrade the managed node group ng-general-purpose-1 to 1.30",
        "--type",
        "upgrade_step",
    ]);
    env.ok(&["progress", "task", "start", id, "t"]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.ok(&[
        "progress",
        "task",
        "update",
        id,
        "t",
        "--percent",
        "50",
        "-m",
        "draining ip-10-0-1-23.eu-west-1.compute.internal: 12 pods left, PDB ok, waiting",
    ]);
    env
}

#[test]
fn upgrade_tables_fit_80_columns_with_headers_and_an_eta_duration() {
    let env = long_names();
    let id = "upgrade-of-the-production-cluster-in-eu-west-1-2026";
    let list = at_80(&env, &["progress", "upgrade", "list"]);
    assert_fits(&list, "list");
    assert!(list.starts_with("UPGRADE"), "{list}");
    assert!(list.contains('…'), "long names are cut: {list}");
    let row = list.lines().nth(1).unwrap();
    assert!(
        row.contains(" in ") || row.ends_with("now"),
        "ETA as a duration: {row}"
    );
    assert!(!row.contains("UTC"), "{row}");

    let show = at_80(&env, &["progress", "upgrade", "show", id]);
    assert!(show.contains("TASK"), "{show}");
    let tree: String = show
        .lines()
        .skip_while(|l| !l.starts_with("TASK"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_fits(&tree, "task tree");
    let eta = show.lines().find(|l| l.starts_with("started")).unwrap();
    assert!(eta.contains("eta in ") || eta.contains("eta now"), "{eta}");
    assert!(eta.contains("started 20"), "dates with the day: {eta}");

    let events = at_80(&env, &["progress", "events", id]);
    assert_fits(&events, "events");
    let mut lines = events.lines();
    assert!(
        lines.next().unwrap().trim_start().starts_with("SEQ"),
        "{events}"
    );
    let first = lines.next().unwrap();
    let today = chrono::Utc::now().format("%Y-%m-%dT").to_string();
    assert!(first.contains(&today), "dates with the day: {first}");
    assert!(
        events.lines().any(|l| l.ends_with('…')),
        "the long message is cut: {events}"
    );
}

#[test]
fn search_has_a_header_and_sizes_for_people() {
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
    let file = env.dir.path().join("k.log");
    std::fs::write(&file, vec![b'x'; 3000]).unwrap();
    let added = env.ok(&["artifacts", "add", &s, &c, file.to_str().unwrap()]);
    assert!(added.contains("added 1 artifact (2.9 KiB)"), "{added}");
    let found = at_80(&env, &["artifacts", "search", "--session", &s]);
    assert_fits(&found, "search");
    let mut lines = found.lines();
    assert!(lines.next().unwrap().starts_with("ID "), "{found}");
    assert!(lines.next().unwrap().contains("2.9 KiB"), "{found}");
}

#[test]
fn not_on_a_terminal_watch_and_demo_print_timestamped_event_lines() {
    let env = Env::with_task();
    env.ok(&["progress", "upgrade", "start", "u"]);
    env.ok(&["progress", "upgrade", "complete", "u"]);
    let out = env.ok(&["progress", "watch", "u"]);
    let today = chrono::Utc::now().format("%Y-%m-%dT").to_string();
    let started = out
        .lines()
        .find(|l| l.contains("upgrade.started"))
        .expect(&out);
    assert!(started.contains(&today), "{started}");
    assert!(!out.contains('\u{1b}'), "no bars or colours: {out:?}");

    let demo = env.ok(&["demo", "--speed", "200"]);
    let lines: Vec<&str> = demo.lines().filter(|l| l.contains(&today)).collect();
    assert!(lines.iter().any(|l| l.contains("task.failed")), "{demo}");
    assert!(
        lines.iter().any(|l| l.contains("upgrade.completed")),
        "{demo}"
    );
    assert!(lines.len() > 50, "one line per event: {demo}");
    assert!(!demo.contains('\u{1b}'), "no bars: {demo:?}");
}

#[test]
fn session_and_collection_lists_fit_with_headers() {
    let env = Env::new();
    let s = env.json(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "upgrade-of-the-production-cluster-in-eu-west-1-2026",
        "--cluster",
        "production-eu-west-1-with-a-very-long-cluster-name",
    ]);
    let s = s["session_id"].as_str().unwrap().to_owned();
    env.ok(&[
        "artifacts",
        "collection",
        "create",
        &s,
        "--name",
        "node group ng-general-purpose-1 drain logs, kubelet journals and pod events",
        "--task-id",
        "upgrade-node-group-ng-general-purpose-1",
    ]);
    let sessions = at_80(&env, &["artifacts", "session", "list"]);
    assert_fits(&sessions, "session list");
    let mut lines = sessions.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("ID ") && header.contains("CLUSTER"),
        "{sessions}"
    );
    let row = lines.next().unwrap();
    assert!(row.contains(" open "), "{sessions}");
    assert!(row.contains("upgrade-of-the-producti…"), "{row}");
    let today = chrono::Utc::now().format("%Y-%m-%d ").to_string();
    assert!(row.contains(&today), "dates with the day: {row}");
    let collections = at_80(&env, &["artifacts", "collection", "list", &s]);
    assert_fits(&collections, "collection list");
    let mut lines = collections.lines();
    assert!(lines.next().unwrap().starts_with("ID "), "{collections}");
    let row = lines.next().unwrap();
    assert!(row.ends_with('…'), "the long name is cut: {row}");
    assert!(row.contains("upgrade-node-group"), "{row}");
    let shown = at_80(&env, &["artifacts", "session", "show", &s]);
    assert!(shown.contains("0 B"), "sizes for people: {shown}");
}
