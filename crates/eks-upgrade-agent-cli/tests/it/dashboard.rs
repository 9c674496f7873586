//! The dashboard in a real headless Chromium: `tests/browser/dashboard.mjs` (playwright-core
//! driving Debian's /usr/bin/chromium) serves with tokens, reports through the API, checks the
//! page live (every `data-testid` part: list badges and filters, timeline, durations, retry
//! history, groups, jump to failure, artifact links and viewer, events, keyboard, 1024 and
//! 2560 px), kills the server, writes with the CLI, restarts it and checks the page caught up
//! without a reload, and that the upgrade page shows the pre → post test comparison
//! (`data-testid="tests-compare"`, new failures first with their messages).
//! `tests/browser/dashboard-scale.mjs` measures the 1,000-task render and
//! checks that 10,000 tasks stay usable. `.ci/run` (through `scripts/test`) installs chromium
//! and playwright-core; when they are missing these tests fail and say how to install them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::BIN;

/// Runs `tests/browser/{script}`; answers its stdout and the screenshots dir.
fn run_browser_script(script: &str, shots_dir: &str) -> (String, PathBuf) {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: apt-get install chromium (scripts/test does)"
    );
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: npm ci --prefix {} (scripts/test does)",
        browser_dir.display()
    );
    let data = tempfile::tempdir().unwrap();
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join(shots_dir);
    let _ = std::fs::remove_dir_all(&shots);
    let out = Command::new("node")
        .arg(browser_dir.join(script))
        .env("EUA_BIN", BIN)
        .env("EUA_TEST_DATA_DIR", data.path())
        .env("EUA_SCREENSHOTS", &shots)
        .env_remove("EUA_TOKENS")
        .env_remove("EUA_CONFIG")
        .env("XDG_CONFIG_HOME", data.path().join("config-home"))
        .output()
        .expect("node runs (install Node.js)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed (screenshots in {}):\n{stdout}\n{stderr}",
        shots.display()
    );
    (stdout, shots)
}

fn assert_screenshots(shots: &Path, names: &[&str]) {
    for shot in names {
        let len = std::fs::metadata(shots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "screenshot {shot} missing or empty");
    }
}

#[test]
fn dashboard_in_headless_chromium() {
    let (_, shots) = run_browser_script("dashboard.mjs", "dashboard-screenshots");
    assert_screenshots(
        &shots,
        &[
            "1-live.png",
            "2-server-down.png",
            "3-caught-up.png",
            "4-timeline.png",
            "5-viewer-text.png",
            "6-viewer-image.png",
            "7-width-1024.png",
            "7-width-2560.png",
            "8-tests-compare.png",
        ],
    );
}

/// 1,000 tasks are on the page within a second of the click (measured in the page, printed);
/// 10,000 keep fewer than 200 rows in the DOM and jump to failure, End and the filter work.
#[test]
fn dashboard_renders_1000_tasks_within_a_second() {
    let (stdout, shots) = run_browser_script("dashboard-scale.mjs", "dashboard-scale-screenshots");
    println!("{stdout}");
    assert!(stdout.contains("1,000 tasks: shown "), "{stdout}");
    assert_screenshots(&shots, &["scale-1000.png", "scale-10000.png"]);
}
