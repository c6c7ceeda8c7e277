//! The one-way architecture, checked: a module imports only from itself and from lower
//! layers. This test reads every `.rs` file under `src/`; it needs nothing else.
//!
//! A reference is any `crate::x` path in code (in `use` items, `use crate::{a, b}` groups,
//! or fully qualified in code) and any `super::` chain that climbs to the crate root.
//! Comments and string literals are not code.

use std::fs;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import from itself and from the modules of
/// lower layers only; the modules of one layer do not import each other.
const LAYERS: &[&[&str]] = &[
    // Test helpers, used by the tests of every layer, and the parsers of command-line values,
    // used by the option structs of every layer; they import nothing from the crate.
    &["testing", "flags"],
    // The formats: SQLite's, then LTX, which uses SQLite's page-size and lock-page rules.
    &["sqlite"],
    &["ltx"],
    // The FUSE layer, and the staging area where captured transactions wait.
    &["fs", "staging"],
    // Capture implements `fs`'s observer and writes into staging; the replica uploads
    // what staging holds. Neither imports the other.
    &["capture", "replica"],
    // Restore reads replicas.
    &["restore"],
];

/// The wiring: it may import anything, and no layer imports it.
const WIRING: &[&str] = &[
    "lib",
    "main",
    "bin",
    "replicate",
    "mount",
    "ready",
    "run",
    "follow",
    "config",
    "observe",
    "layering",
];

/// The layer of a top-level module, `None` for the wiring; an error for a module that is
/// in neither list.
fn layer_of(module: &str) -> Result<Option<usize>, String> {
    if WIRING.contains(&module) {
        return Ok(None);
    }
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .map(Some)
        .ok_or_else(|| {
            format!(
                "module `{module}` is in no layer: add it to LAYERS or WIRING in src/layering.rs"
            )
        })
}

/// The top-level module that a file under `src/` belongs to, and how deep the file's own
/// module is below the crate root (`src/a.rs` and `src/a/mod.rs`: 1, `src/a/b.rs`: 2).
fn module_of(rel: &Path) -> (String, usize) {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let first = parts[0].trim_end_matches(".rs").to_owned();
    let last = parts.last().map(String::as_str);
    let depth = match last {
        Some("mod.rs") => parts.len() - 1,
        _ if parts.len() == 1 && (first == "lib" || first == "main") => 0,
        _ => parts.len(),
    };
    (first, depth)
}

/// `text` with comments and the contents of string and character literals replaced by
/// spaces (newlines kept), so that offsets and line numbers stay the same.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if (b[i] == b'r' || b[i..].starts_with(b"br")) && (i == 0 || !ident(b[i - 1])) && {
            let k = i + if b[i] == b'b' { 2 } else { 1 };
            let hashes = b[k..].iter().take_while(|&&c| c == b'#').count();
            b.get(k + hashes) == Some(&b'"')
        } {
            // A raw string: r"..." or r#"..."# (any number of #), maybe b-prefixed.
            let k = i + if b[i] == b'b' { 2 } else { 1 };
            let hashes = b[k..].iter().take_while(|&&c| c == b'#').count();
            let start = k + hashes + 1;
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let end = b[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| start + p);
            blank(&mut out, start, end);
            i = (end + close.len()).min(b.len());
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i + 1, j.min(b.len()));
            i = j + 1;
        } else if b[i] == b'\'' {
            // A character literal ('x', '\n', '\u{..}', '"'), or else a lifetime.
            let len = if b.get(i + 1) == Some(&b'\\') {
                b.get(i + 3..)
                    .and_then(|r| r.iter().position(|&c| c == b'\''))
                    .map(|p| p + 4)
            } else {
                let ch = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch) == Some(&b'\'')).then_some(ch + 2)
            };
            match len {
                Some(n) => {
                    blank(&mut out, i + 1, i + n - 1);
                    i += n;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One reference to a top-level module: where it is and which module.
#[derive(Debug, PartialEq, Eq)]
struct Reference {
    /// 1-based line.
    line: usize,
    module: String,
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The identifier at the start of `s` (after whitespace).
fn leading_ident(s: &str) -> &str {
    let s = s.trim_start();
    let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a `{ ... }` group names, `s` starting just after its `{`.
fn group_modules(s: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut item_start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.push(item_start);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(item_start);
                item_start = i + 1;
            }
            _ => {}
        }
    }
    out.into_iter()
        .map(|start| {
            let skip = s[start..].len() - s[start..].trim_start().len();
            (start + skip, leading_ident(&s[start..]).to_owned())
        })
        .filter(|(_, m)| !m.is_empty() && m != "self")
        .collect()
}

/// Every reference to a top-level module in `code` (already through [`code_only`]) of a
/// file whose module is `depth` deep.
fn references(code: &str, depth: usize) -> Vec<Reference> {
    let line_at = |offset: usize| code[..offset].matches('\n').count() + 1;
    let mut out = Vec::new();
    // Braces that open an inline `mod name { ... }`, to know how far `super::` climbs.
    let mut braces: Vec<bool> = Vec::new();
    let mut pending_mod = false;
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let c = rest.chars().next().unwrap();
        let at_word = is_ident(c) && !code[..i].ends_with(|p: char| is_ident(p) || p == '$');
        if c == '{' {
            braces.push(std::mem::take(&mut pending_mod));
        } else if c == '}' {
            braces.pop();
        } else if c == ';' {
            pending_mod = false;
        } else if at_word && leading_ident(rest) == "mod" {
            pending_mod = true;
        } else if at_word && leading_ident(rest) == "crate" {
            let after = rest["crate".len()..].trim_start();
            if let Some(path) = after.strip_prefix("::") {
                let path_at = code.len() - path.len();
                let path = path.trim_start();
                if let Some(group) = path.strip_prefix('{') {
                    let group_at = code.len() - group.len();
                    for (off, module) in group_modules(group) {
                        out.push(Reference {
                            line: line_at(group_at + off),
                            module,
                        });
                    }
                } else {
                    let module = leading_ident(path).to_owned();
                    if !module.is_empty() {
                        out.push(Reference {
                            line: line_at(path_at),
                            module,
                        });
                    }
                }
            }
        } else if at_word && leading_ident(rest) == "super" {
            // A `super::super::...::x` chain: `x` is a top-level module when the chain
            // climbs exactly to the crate root.
            let mut supers = 0;
            let mut tail = rest;
            while leading_ident(tail) == "super" {
                let after = tail.trim_start()["super".len()..].trim_start();
                match after.strip_prefix("::") {
                    Some(t) => {
                        supers += 1;
                        tail = t;
                    }
                    None => break,
                }
            }
            let here = depth + braces.iter().filter(|&&m| m).count();
            if supers > 0 && supers == here {
                let module = leading_ident(tail).to_owned();
                if !module.is_empty() {
                    out.push(Reference {
                        line: line_at(code.len() - tail.len()),
                        module,
                    });
                }
            }
            if supers > 0 {
                i = code.len() - tail.len();
                continue;
            }
        }
        i += c.len_utf8();
    }
    out
}

/// What is wrong with `module` (of layer `layer`) referring to `target`, if anything.
fn violation(module: &str, target: &str) -> Result<Option<String>, String> {
    let Some(layer) = layer_of(module)? else {
        return Ok(None);
    };
    if target == module {
        return Ok(None);
    }
    Ok(match layer_of(target)? {
        None => Some(format!(
            "`{module}` (layer {layer}) imports `{target}`, which is wiring"
        )),
        Some(t) if t == layer => Some(format!(
            "`{module}` imports `{target}`, another module of its own layer {layer}"
        )),
        Some(t) if t > layer => Some(format!(
            "`{module}` (layer {layer}) imports `{target}` (layer {t}), a higher layer"
        )),
        Some(_) => None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Every violation in `text`, the source of `rel` (a path under `src/`).
fn check_file(rel: &Path, text: &str) -> Vec<String> {
    let (module, depth) = module_of(rel);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    if let Err(e) = layer_of(&module) {
        return vec![format!("src/{}: {e}", rel.display())];
    }
    for r in references(&code_only(text), depth) {
        let problem = match violation(&module, &r.module) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => e,
        };
        out.push(format!(
            "src/{}:{}: `{}`: {problem}",
            rel.display(),
            r.line,
            lines.get(r.line - 1).map_or("", |l| l.trim()),
        ));
    }
    out
}

#[test]
fn every_module_imports_only_from_its_own_layer_or_lower() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let mut problems = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        problems.extend(check_file(f.strip_prefix(&src).unwrap(), &text));
    }
    let order: Vec<String> = LAYERS.iter().map(|l| l.join(", ")).collect();
    assert!(
        problems.is_empty(),
        "imports against the layer order ({}; wiring: {}):\n{}",
        order.join(" -> "),
        WIRING.join(", "),
        problems.join("\n")
    );
}

#[test]
fn the_checker_finds_references_in_every_form() {
    let text = r#"
use crate::ltx::LtxHeader;
use crate::{
    sqlite::{self, PENDING_BYTE},
    fs as f, self,
};
// use crate::restore; in a comment
/// [`crate::restore`] in a doc comment
const S: &str = "crate::restore in a string";
const R: &str = r"crate::restore in a raw string";
const C: char = '"';
fn f<'a>(x: &'a u8) -> u32 { crate::staging::f(); super::super::capture::g() }
mod tests {
    use super::super::super::replica::X;
    use super::super::capture::Y;
}
"#;
    let found: Vec<(usize, String)> = references(&code_only(text), 2)
        .into_iter()
        .map(|r| (r.line, r.module))
        .collect();
    let expected = [
        (2, "ltx"),
        (4, "sqlite"),
        (5, "fs"),
        (12, "staging"),
        (12, "capture"),
        (14, "replica"),
    ];
    let expected: Vec<(usize, String)> = expected.iter().map(|&(l, m)| (l, m.to_owned())).collect();
    assert_eq!(found, expected);

    let bad = check_file(
        Path::new("staging/mod.rs"),
        "fn f() {\n    let _ = crate::replica::kept::KEPT_DIR;\n}\n",
    );
    assert_eq!(
        bad,
        [
            "src/staging/mod.rs:2: `let _ = crate::replica::kept::KEPT_DIR;`: `staging` (layer 3) \
          imports `replica` (layer 4), a higher layer"
        ]
    );
    assert_eq!(
        check_file(Path::new("replica/kept.rs"), "use crate::staging::Staging;"),
        Vec::<String>::new()
    );
    assert!(
        check_file(Path::new("fs/mod.rs"), "use crate::staging::X;")[0]
            .contains("another module of its own layer")
    );
    assert!(check_file(Path::new("sqlite/mod.rs"), "use crate::mount::X;")[0].contains("wiring"));
    assert!(check_file(Path::new("newthing.rs"), "")[0].contains("in no layer"));
}
