//! `completion SHELL` prints a completion script for bash, zsh, fish, powershell and elvish,
//! covering the subcommands, without a store.

use crate::util::Env;

#[test]
fn completion_scripts_for_every_shell() {
    let env = Env::new();
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let text = env.ok(&["completion", shell]);
        for word in ["progress", "artifacts", "wait", "exit-status", "completion"] {
            assert!(text.contains(word), "{shell}: no {word}");
        }
    }
    // Nothing created: no store in the data dir.
    assert!(std::fs::read_dir(env.data_dir()).unwrap().next().is_none());
    // The bash script completes subcommands and their options at every level (clap_complete
    // alone leaves a hyphenated binary's script completing nothing past the first word).
    let script = env.dir.path().join("c.bash");
    std::fs::write(&script, env.ok(&["completion", "bash"])).unwrap();
    let complete = |line: &[&str]| -> String {
        let words = line.join(" ");
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {} && COMP_WORDS=({words}) && COMP_CWORD={} && _eks__upgrade__agent eks-upgrade-agent {:?} {:?} && echo \"${{COMPREPLY[@]}}\"",
                script.display(),
                line.len() - 1,
                line[line.len() - 1],
                line[line.len() - 2],
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let words = complete(&["eks-upgrade-agent", "prog"]);
    assert_eq!(words.trim(), "progress");
    let words = complete(&["eks-upgrade-agent", "progress", "w"]);
    assert!(words.contains("wait") && words.contains("watch"), "{words}");
    let words = complete(&["eks-upgrade-agent", "progress", "wait", "--"]);
    assert!(
        words.contains("--for") && words.contains("--timeout"),
        "{words}"
    );
    let err = env.fails(2, &["completion", "tcsh"]);
    assert!(err.contains("bash"), "{err}");
}
