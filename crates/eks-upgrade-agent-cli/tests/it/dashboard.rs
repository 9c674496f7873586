//! The dashboard in a real headless Chromium: `tests/browser/dashboard.mjs` (playwright-core
//! driving Debian's /usr/bin/chromium) serves with tokens, reports through the API, checks the
//! page live, kills the server, writes with the CLI, restarts it and checks the page caught up
//! without a reload, and that the upgrade page shows the pre → post test comparison
//! (`data-testid="tests-compare"`, new failures first with their messages). `.ci/run` (through `scripts/test`) installs chromium and playwright-core;
//! when they are missing this test fails and says how to install them.

use std::path::Path;
use std::process::Command;

use crate::util::BIN;

#[test]
fn dashboard_in_headless_chromium() {
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
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let out = Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .env("EUA_BIN", BIN)
        .env("EUA_TEST_DATA_DIR", data.path())
        .env("EUA_SCREENSHOTS", &shots)
        .env_remove("EUA_TOKENS")
        .env_remove("EUA_CONFIG")
        .env("XDG_CONFIG_HOME", data.path().join("config-home"))
        .output()
        .expect("node runs (install Node.js)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dashboard test failed (screenshots in {}):\n{stdout}\n{stderr}",
        shots.display()
    );
    for shot in [
        "1-live.png",
        "2-server-down.png",
        "3-caught-up.png",
        "4-tests-compare.png",
    ] {
        let len = std::fs::metadata(shots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "screenshot {shot} missing or empty");
    }
}
