//! Output helpers every command module uses: JSON on stdout, terminal checks, text made safe
//! for a terminal, and the pieces of tables (widths, `…` cuts, sizes, durations, bars). It
//! imports no command module, so the CLI reads top-down: `main` -> command modules -> `render`
//! (progress views) -> `output`.

use std::io::{self, IsTerminal, Write};

use chrono::{DateTime, Utc};
use eks_upgrade_agent::model::TestArtifact;

/// Writes `v` as pretty JSON on stdout.
pub(crate) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// True when stdout is a terminal (progress bars and colours only then).
pub(crate) fn stdout_is_terminal() -> bool {
    io::stdout().is_terminal()
}

/// `text` made safe for a terminal: control characters (C0, DEL, C1: escape sequences, bells,
/// carriage returns, newlines) and the bidirectional overrides that can reorder what is shown
/// are written as Rust-style escapes (`\u{1b}`, `\n`). Everything stored may come from
/// elsewhere (imports, other processes, servers), so every string a table prints goes through
/// this.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The width tables fit: `COLUMNS` when set, else the terminal's; none (no truncation) when
/// stdout is not a terminal and `COLUMNS` is unset.
pub(crate) fn width() -> Option<usize> {
    if let Some(n) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|n| *n >= 20)
    {
        return Some(n);
    }
    console::Term::stdout()
        .size_checked()
        .map(|(_, cols)| usize::from(cols))
        .filter(|n| *n >= 20)
}

/// `line` cut to `width` characters, its end replaced by `…` when cut.
pub(crate) fn fit(line: &str, width: Option<usize>) -> String {
    let line = line.trim_end();
    match width {
        Some(w) if line.chars().count() > w => {
            let mut t: String = line.chars().take(w - 1).collect();
            t.push('…');
            t
        }
        _ => line.to_owned(),
    }
}

/// `812 B`, `2.9 MiB`, `1.2 GiB`.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// An estimate as a duration from now: `in 12m`, `in 1h 05m`, `in 3d 4h`, `now`; `-` for none.
pub(crate) fn eta(t: Option<DateTime<Utc>>) -> String {
    let Some(t) = t else { return "-".into() };
    let secs = (t - Utc::now()).num_seconds();
    if secs <= 0 {
        return "now".into();
    }
    let (d, h, m) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    if d > 0 {
        format!("in {d}d {h}h")
    } else if h > 0 {
        format!("in {h}h {m:02}m")
    } else if m > 0 {
        format!("in {m}m")
    } else {
        format!("in {secs}s")
    }
}

/// `[#########-----------]` for a percentage.
pub(crate) fn bar(pct: f64, width: usize) -> String {
    let filled = ((pct / 100.0) * width as f64)
        .round()
        .clamp(0.0, width as f64) as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

pub(crate) fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".into(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// `1h 02m 03s`, `4m 05s`, `6.2s`.
pub(crate) fn duration(secs: Option<f64>) -> String {
    let Some(s) = secs else { return "-".into() };
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let s = s.round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else {
        format!("{m}m {s:02}s")
    }
}

/// `s` cut to `n` characters, the last one `…` when cut.
pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// A table with a header row: each column as wide as its widest cell, the last one free, each
/// line cut to the terminal's width.
pub(crate) fn print_table<const N: usize>(
    header: [&str; N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let w = width();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 < N {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            } else {
                out.push_str(cell);
            }
        }
        fit(&out, w)
    };
    let mut out = io::stdout().lock();
    writeln!(out, "{}", line(&mut header.iter().copied()))?;
    for row in rows {
        writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
    }
    Ok(())
}

/// The header row of [`artifact_line`]s.
pub(crate) fn artifact_header(out: &mut impl Write) -> io::Result<()> {
    let line = format!(
        "{:<12}  {:<13}  {:>10}  {:<19}  NAME",
        "ID", "TYPE", "SIZE", "CREATED (UTC)"
    );
    writeln!(out, "{}", fit(&line, width()))
}

/// One artifact in a table, its id in its shortest unambiguous form, its size for people.
pub(crate) fn artifact_line(out: &mut impl Write, short: &str, a: &TestArtifact) -> io::Result<()> {
    let line = format!(
        "{:<12}  {:<13}  {:>10}  {}  {}{}",
        printable(short),
        a.artifact_type.as_str(),
        size(a.file_size),
        a.created_at.format("%Y-%m-%d %H:%M:%S"),
        printable(&a.name),
        if a.tags.is_empty() {
            String::new()
        } else {
            format!("  [{}]", printable(&a.tags.join(", ")))
        }
    );
    writeln!(out, "{}", fit(&line, width()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_and_durations() {
        assert_eq!(bar(0.0, 4), "[----]");
        assert_eq!(bar(50.0, 4), "[##--]");
        assert_eq!(bar(100.0, 4), "[####]");
        assert_eq!(duration(Some(6.25)), "6.2s");
        assert_eq!(duration(Some(245.0)), "4m 05s");
        assert_eq!(duration(Some(3723.0)), "1h 02m 03s");
        assert_eq!(duration(None), "-");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }

    #[test]
    fn sizes_etas_and_fitting() {
        assert_eq!(size(812), "812 B");
        assert_eq!(size(3_040_870), "2.9 MiB");
        assert_eq!(size(1 << 30), "1.0 GiB");
        let now = Utc::now();
        assert_eq!(eta(None), "-");
        assert_eq!(eta(Some(now - chrono::Duration::seconds(5))), "now");
        assert_eq!(
            eta(Some(now + chrono::Duration::seconds(12 * 60 + 30))),
            "in 12m"
        );
        assert_eq!(
            eta(Some(now + chrono::Duration::seconds(3900 + 30))),
            "in 1h 05m"
        );
        assert_eq!(
            eta(Some(
                now + chrono::Duration::seconds(3 * 86_400 + 4 * 3600 + 30)
            )),
            "in 3d 4h"
        );
        assert_eq!(fit("abcdef", Some(4)), "abc…");
        assert_eq!(fit("abc  ", Some(4)), "abc");
        assert_eq!(fit("abcdef", None), "abcdef");
    }

    #[test]
    fn unprintable_characters_are_escaped() {
        assert_eq!(printable("plain ünïcode ✔"), "plain ünïcode ✔");
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("bell\u{7}\u{9b}31m"), "bell\\u{7}\\u{9b}31m");
        assert_eq!(printable("l1\nl2\tx\ry"), r"l1\nl2\tx\ry");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(printable("\u{7f}"), "\\u{7f}");
    }
}
