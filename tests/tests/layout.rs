//! The source layout's one rule that a compiler does not check: inside each crate, file-level
//! dependencies run one way.
//!
//! A file depends on another when it names it in a path (`crate::…`, `super::…`, `self::…`, or
//! a child module by its bare name), directly or through a `pub use` re-export of the module it
//! names. A child module using its ancestors' own items is not counted (that is what nesting
//! means); a sibling, a cousin or a re-exported child is. Every cycle of two or more files is a
//! failure unless `docs/contributing.md` lists it under "Import cycles kept on purpose", with
//! the reason. Code inside an inline `#[cfg(test)]` module is not counted: tests may reach
//! anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path inside one crate: `[]` is the crate root, `["hbone", "pool"]` is `hbone/pool.rs`.
type ModPath = Vec<String>;

struct SourceFile {
    /// Relative to the workspace root, e.g. `ztunnel/src/hbone/pool.rs`.
    name: String,
    module: ModPath,
    /// Comments, strings and inline test modules removed.
    code: String,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The workspace members, read from the root manifest's `members = [...]` line.
fn members(root: &Path) -> Vec<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
    let start = manifest.find("members").expect("a members list");
    let open = start + manifest[start..].find('[').expect("members = [");
    let close = open + manifest[open..].find(']').expect("members list closed");
    manifest[open + 1..close]
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/lib.rs` and `src/main.rs` → `[]`, `src/a.rs` and `src/a/mod.rs` → `[a]`.
fn module_of(relative_to_src: &Path) -> ModPath {
    let mut parts: Vec<String> = relative_to_src
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Removes comments, string and char literals (keeping line structure irrelevant).
fn strip_comments_and_literals(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &src[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            let mut depth = 0usize;
            while i < b.len() {
                if src[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if src[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_start(rest) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = i + 2 + hashes + usize::from(rest.starts_with("br"));
            i = src[body..]
                .find(&close)
                .map_or(b.len(), |p| body + p + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if b.get(i + 1) == Some(&b'\\') {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            } else if let Some(len) = rest[1..].chars().next().map(char::len_utf8)
                && b.get(i + 1 + len) == Some(&b'\'')
            {
                i += 2 + len;
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `r"`, `r#"`, `br"`…: the number of `#`.
fn raw_string_start(rest: &str) -> Option<usize> {
    let r = rest.strip_prefix('b').unwrap_or(rest).strip_prefix('r')?;
    let hashes = r.len() - r.trim_start_matches('#').len();
    r[hashes..].starts_with('"').then_some(hashes)
}

/// Removes `#[cfg(test)] mod name { … }` blocks.
fn strip_test_modules(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(at) = out.find("#[cfg(test)]") {
        let after = &out[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let is_inline_mod = (trimmed.starts_with("mod ") || trimmed.starts_with("pub mod "))
            && trimmed
                .find('{')
                .is_some_and(|b| trimmed.find(';').is_none_or(|s| b < s));
        let end = if is_inline_mod {
            let open = at
                + "#[cfg(test)]".len()
                + (after.len() - trimmed.len())
                + trimmed.find('{').expect("checked");
            let mut depth = 0usize;
            let mut end = out.len();
            for (k, ch) in out[open..].char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = open + k + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            end
        } else {
            at + "#[cfg(test)]".len()
        };
        out.replace_range(at..end, " ");
    }
    out
}

/// Expands a use tree (`a::{b, c::d as e, f::*}`) into its paths, each with the name it
/// brings into scope.
fn expand_use_tree(tree: &str) -> Vec<(Vec<String>, String)> {
    fn split_top(s: &str) -> Vec<&str> {
        let (mut depth, mut start, mut parts) = (0usize, 0, Vec::new());
        for (i, c) in s.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        parts
    }
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let prefix: Vec<String> = path_segments(&tree[..open]);
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut out = Vec::new();
        for part in split_top(inner) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            for (suffix, name) in expand_use_tree(part) {
                let mut p = prefix.clone();
                p.extend(suffix);
                out.push((p, name));
            }
        }
        out
    } else {
        let mut parts = tree.split(" as ");
        let path = path_segments(parts.next().unwrap_or(tree));
        let name = parts.next().map(str::trim).map(str::to_string);
        let name = name.or_else(|| path.last().cloned()).unwrap_or_default();
        vec![(path, name)]
    }
}

fn path_segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s != "*")
        .collect()
}

struct Crate {
    files: Vec<SourceFile>,
    by_module: BTreeMap<ModPath, usize>,
}

impl Crate {
    /// Resolves a path named in `from` to the file it reaches, following `pub use` re-exports.
    fn resolve(&self, from: &ModPath, path: &[String], depth: usize) -> Option<usize> {
        let first = path.first()?.as_str();
        let (mut module, rest): (ModPath, &[String]) = match first {
            "crate" => (Vec::new(), &path[1..]),
            "self" => (from.clone(), &path[1..]),
            "super" => {
                let mut m = from.clone();
                let mut k = 0;
                while path.get(k).is_some_and(|s| s == "super") {
                    m.pop();
                    k += 1;
                }
                (m, &path[k..])
            }
            _ => {
                let mut child = from.clone();
                child.push(first.to_string());
                if !self.by_module.contains_key(&child) {
                    return None;
                }
                (from.clone(), path)
            }
        };
        for seg in rest {
            let mut next = module.clone();
            next.push(seg.clone());
            if self.by_module.contains_key(&next) {
                module = next;
                continue;
            }
            // `seg` is an item of `module`: follow it if `module` re-exports it from elsewhere.
            if depth < 8
                && let Some(&file) = self.by_module.get(&module)
                && let Some(target) = self.reexport(file, seg, depth)
            {
                return Some(target);
            }
            break;
        }
        self.by_module.get(&module).copied()
    }

    /// The file a `pub use` in `file` takes `name` from, if it re-exports it.
    fn reexport(&self, file: usize, name: &str, depth: usize) -> Option<usize> {
        let f = &self.files[file];
        for tree in use_statements(&f.code)
            .into_iter()
            .filter(|(public, _)| *public)
        {
            for (path, visible) in expand_use_tree(&tree.1) {
                if visible == name {
                    return self.resolve(&f.module, &path, depth + 1);
                }
            }
        }
        None
    }

    fn edges(&self) -> BTreeMap<usize, BTreeSet<usize>> {
        let mut edges: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        for (i, f) in self.files.iter().enumerate() {
            let mut paths: Vec<Vec<String>> = use_statements(&f.code)
                .into_iter()
                .flat_map(|(_, tree)| expand_use_tree(&tree))
                .map(|(path, _)| path)
                .collect();
            paths.extend(inline_paths(&f.code));
            for path in paths {
                let Some(target) = self.resolve(&f.module, &path, 0) else {
                    continue;
                };
                let target_module = &self.files[target].module;
                let is_ancestor = f.module.starts_with(target_module);
                if target != i && !is_ancestor {
                    edges.entry(i).or_default().insert(target);
                }
            }
        }
        edges
    }
}

/// `(is pub, tree)` for every `use` statement.
fn use_statements(code: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut search = 0;
    while let Some(pos) = code[search..].find("use ") {
        let at = search + pos;
        search = at + 4;
        let before = code[..at].trim_end();
        let boundary = before.is_empty() || before.ends_with([';', '{', '}', ']', ')']);
        let public = before.ends_with("pub")
            || before.ends_with("pub(crate)")
            || before.ends_with("pub(super)");
        let starts_word = at == 0
            || !code.as_bytes()[at - 1].is_ascii_alphanumeric() && code.as_bytes()[at - 1] != b'_';
        if !starts_word || !(boundary || public) {
            continue;
        }
        if let Some(end) = code[at..].find(';') {
            out.push((public, code[at + 4..at + end].to_string()));
            search = at + end;
        }
    }
    out
}

/// Paths written inline in code: `crate::a::b`, `super::x`, `self::y`.
fn inline_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for anchor in ["crate::", "super::", "self::"] {
        let mut search = 0;
        while let Some(pos) = code[search..].find(anchor) {
            let at = search + pos;
            search = at + anchor.len();
            let prev = at.checked_sub(1).map(|p| code.as_bytes()[p]);
            if prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':') {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| at + e);
            out.push(path_segments(&code[at..end]));
        }
    }
    out
}

fn load_crate(root: &Path, member: &str) -> Crate {
    let src = root.join(member).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths.sort();
    let mut files = Vec::new();
    let mut by_module = BTreeMap::new();
    for path in paths {
        let relative = path.strip_prefix(&src).expect("under src");
        // A crate with both: the binary's `main.rs` is its own crate root; it only uses the library.
        if relative == Path::new("main.rs") && src.join("lib.rs").exists() {
            continue;
        }
        if relative.starts_with("bin") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable source");
        let module = module_of(relative);
        by_module.insert(module.clone(), files.len());
        files.push(SourceFile {
            name: format!("{member}/src/{}", relative.display()),
            module,
            code: strip_test_modules(&strip_comments_and_literals(&text)),
        });
    }
    Crate { files, by_module }
}

/// Strongly connected components with more than one file (Tarjan).
fn cycles(n: usize, edges: &BTreeMap<usize, BTreeSet<usize>>) -> Vec<Vec<usize>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<usize, BTreeSet<usize>>,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(w: &mut Walk<'_>, v: usize) {
        w.index[v] = Some(w.next);
        w.low[v] = w.next;
        w.next += 1;
        w.stack.push(v);
        w.on_stack[v] = true;
        for &t in w.edges.get(&v).into_iter().flatten() {
            match w.index[t] {
                None => {
                    visit(w, t);
                    w.low[v] = w.low[v].min(w.low[t]);
                }
                Some(ti) if w.on_stack[t] => w.low[v] = w.low[v].min(ti),
                Some(_) => {}
            }
        }
        if Some(w.low[v]) == w.index[v] {
            let mut scc = Vec::new();
            while let Some(t) = w.stack.pop() {
                w.on_stack[t] = false;
                scc.push(t);
                if t == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort_unstable();
                w.out.push(scc);
            }
        }
    }
    let mut w = Walk {
        edges,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if w.index[v].is_none() {
            visit(&mut w, v);
        }
    }
    w.out
}

/// Cycles `docs/contributing.md` keeps on purpose: each list item under the heading names the
/// files of one cycle in backticks.
fn allowed_cycles(root: &Path) -> Vec<BTreeSet<String>> {
    let doc = std::fs::read_to_string(root.join("docs/contributing.md")).unwrap_or_default();
    let Some(start) = doc.find("Import cycles kept on purpose") else {
        return Vec::new();
    };
    let section = &doc[start..];
    let section = &section[section.find('\n').unwrap_or(section.len())..];
    let section = section.split("\n#").next().unwrap_or(section);
    section
        .lines()
        .filter(|l| l.trim_start().starts_with("- "))
        .map(|l| {
            l.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        })
        .collect()
}

#[test]
fn file_dependencies_inside_each_crate_run_one_way() {
    let root = workspace_root();
    let allowed = allowed_cycles(&root);
    let mut failures = Vec::new();
    let mut checked = 0;
    for member in members(&root) {
        let krate = load_crate(&root, &member);
        checked += krate.files.len();
        for scc in cycles(krate.files.len(), &krate.edges()) {
            let names: BTreeSet<String> =
                scc.iter().map(|&i| krate.files[i].name.clone()).collect();
            if !allowed.iter().any(|a| names.is_subset(a)) {
                failures.push(names.into_iter().collect::<Vec<_>>().join(" ↔ "));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} source files found: is the workspace layout readable?"
    );
    assert!(
        failures.is_empty(),
        "import cycles between files (break them, or list them with the reason under \
         \"Import cycles kept on purpose\" in docs/contributing.md):\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_checker_finds_a_sibling_cycle_and_ignores_a_child_using_its_parent() {
    let file = |name: &str, module: &[&str], code: &str| SourceFile {
        name: name.to_string(),
        module: module.iter().map(|s| s.to_string()).collect(),
        code: strip_test_modules(&strip_comments_and_literals(code)),
    };
    let files = vec![
        file(
            "lib.rs",
            &[],
            "pub mod a; pub mod b; pub mod c; pub const X: u8 = 1;",
        ),
        file("a.rs", &["a"], "use crate::b::Thing; fn f() { crate::X; }"),
        // b's child reaches a through c's re-export, not by name: that is a dependency on a.
        file(
            "b/mod.rs",
            &["b"],
            "mod inner; pub use inner::Thing; // crate::a::ignored\n",
        ),
        file(
            "b/inner.rs",
            &["b", "inner"],
            "use super::super::c::Again; pub struct Thing;",
        ),
        file(
            "c.rs",
            &["c"],
            "pub use crate::a::f as Again; #[cfg(test)] mod tests { use crate::b::Thing; }",
        ),
    ];
    let by_module = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.module.clone(), i))
        .collect();
    let krate = Crate { files, by_module };
    let edges = krate.edges();
    assert!(
        !edges.get(&1).is_some_and(|e| e.contains(&0)),
        "a child using the root is not counted"
    );
    assert_eq!(
        edges.get(&4),
        Some(&BTreeSet::from([1])),
        "test modules are not counted: {edges:?}"
    );
    let found = cycles(krate.files.len(), &edges);
    assert_eq!(
        edges.get(&3),
        Some(&BTreeSet::from([1])),
        "re-exports are followed: {edges:?}"
    );
    assert_eq!(found, vec![vec![1, 3]], "edges: {edges:?}");
}
