//! The CLI reads top-down: no module imports another that imports it back (directly or round a
//! loop); the output helpers import no command module. Read from the sources: `crate::NAME`
//! references (a lowercase NAME is a module; the crate root `main` is the top and not counted).

use std::collections::{BTreeMap, BTreeSet};

fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if name == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut deps = BTreeSet::new();
        // `crate::x`, and `crate::{x, y}` groups.
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + 7..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                group[..group.find('}').unwrap()]
                    .split(',')
                    .map(|s| s.trim().split("::").next().unwrap())
                    .collect()
            } else {
                vec![
                    rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap(),
                ]
            };
            for n in names {
                if n.starts_with(|c: char| c.is_ascii_lowercase()) && n != name {
                    deps.insert(n.to_owned());
                }
            }
        }
        graph.insert(name, deps);
    }
    graph
}

#[test]
fn modules_import_each_other_without_loops() {
    let graph = imports();
    assert!(
        graph.contains_key("output") && graph.contains_key("requests"),
        "{graph:?}"
    );
    assert!(
        graph["output"].is_empty(),
        "output imports {:?}",
        graph["output"]
    );
    // Depth-first search for a cycle, reporting it.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == n) {
            panic!("import loop: {} -> {n}", path[i..].join(" -> "));
        }
        if done.contains(n) {
            return;
        }
        path.push(n.to_owned());
        for d in graph.get(n).into_iter().flatten() {
            visit(d, graph, path, done);
        }
        path.pop();
        done.insert(n.to_owned());
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, &graph, &mut Vec::new(), &mut done);
    }
}
