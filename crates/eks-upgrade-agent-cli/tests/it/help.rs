//! Help: `eks-upgrade-agent --help` lists the global, S3 and notification flags once, each under
//! its heading; a command's help shows its own options and examples, plus the S3 or
//! notification flags only when it uses them. The hidden flags still work anywhere on the line.

use crate::util::Env;

fn help(env: &Env, args: &[&str]) -> String {
    let mut a = args.to_vec();
    a.push("--help");
    env.ok(&a)
}

#[test]
fn the_top_level_help_lists_each_flag_group_once_under_its_heading() {
    let env = Env::new();
    let text = help(&env, &[]);
    for heading in [
        "Global options:",
        "S3 (off unless a bucket is set):",
        "Notifications (all off unless set):",
    ] {
        assert_eq!(text.matches(heading).count(), 1, "{heading}: {text}");
    }
    for flag in [
        "--data-dir",
        "--server",
        "--s3-bucket",
        "--webhook-url",
        "--eventbridge-bus-name",
    ] {
        assert_eq!(
            text.matches(&format!("{flag} <")).count(),
            1,
            "{flag}: {text}"
        );
    }
}

#[test]
fn a_commands_help_shows_its_own_options_and_examples() {
    let env = Env::new();
    let text = help(&env, &["progress", "task", "update"]);
    assert!(text.contains("--percent"), "{text}");
    assert!(
        text.contains("Examples:\n  eks-upgrade-agent progress task update u1"),
        "{text}"
    );
    for flag in [
        "--s3-bucket",
        "--webhook-url",
        "--eventbridge-bus-name",
        "--data-dir <",
    ] {
        assert!(!text.contains(flag), "{flag} in {text}");
    }
    assert!(
        text.lines().count() <= 40,
        "{} lines: {text}",
        text.lines().count()
    );

    // S3 flags where they are used, notification flags where they are used.
    let upload = help(&env, &["artifacts", "upload"]);
    assert!(upload.contains("S3 (off unless a bucket is set):") && upload.contains("--s3-bucket"));
    assert!(!upload.contains("--webhook-url"), "{upload}");
    let flush = help(&env, &["notify", "flush"]);
    assert!(
        flush.contains("Notifications (all off unless set):") && flush.contains("--webhook-url")
    );
    assert!(!flush.contains("--s3-bucket"), "{flush}");
    let serve = help(&env, &["serve"]);
    assert!(
        serve.contains("--s3-bucket") && serve.contains("--webhook-url"),
        "{serve}"
    );
}

#[test]
fn hidden_flags_still_work_after_the_subcommand() {
    let env = Env::with_task();
    let other = Env::new();
    // --data-dir and -o after the subcommand, though its help does not list them.
    let out = other.ok(&[
        "progress",
        "upgrade",
        "list",
        "-o",
        "json",
        "--data-dir",
        env.data_dir().to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["upgrade_id"], "u");
    let err = env.fails(1, &["artifacts", "upload", "--all", "--s3-bucket", ""]);
    assert!(err.contains("no S3 bucket"), "{err}");
}
