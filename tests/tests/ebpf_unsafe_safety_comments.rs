//! Every `unsafe` in the eBPF programs carries its invariant where a reader meets it: a `// SAFETY:`
//! comment on the line(s) just above (or at the end of the same line), and for an `unsafe fn` or
//! `unsafe trait` a `# Safety` section in its doc comment. The kernel's verifier checks memory safety
//! of the loaded program, not the Rust-level contracts these blocks rely on (bounds checked against
//! `data_end` before a read, pointers from successful lookups, per-CPU slots), so a block without its
//! reason is a review hazard. Plain text scan, no root needed.

use std::path::{Path, PathBuf};

/// One `unsafe` without its comment: `file:line` and the line.
#[derive(Debug, PartialEq, Eq)]
struct Gap {
    at: String,
    line: String,
}

/// A line split into its code, with string literals blanked, and its comment (whole-line or trailing).
fn split(line: &str) -> (String, &str) {
    let mut code = String::with_capacity(line.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut prev = '\0';
    for (i, ch) in line.char_indices() {
        if in_str {
            match ch {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_str = false,
                _ => {}
            }
            code.push(if in_str { ' ' } else { ch });
        } else if ch == '/' && prev == '/' {
            code.pop();
            return (code, &line[i - 1..]);
        } else {
            in_str = ch == '"';
            code.push(ch);
        }
        prev = ch;
    }
    (code, "")
}

/// What the `unsafe` on this code fragment introduces, if any: `"block"`, `"fn"`, `"impl"`, `"trait"`
/// or `"extern"`. Attributes such as `#[unsafe(no_mangle)]` are not blocks and carry no invariant of
/// their own.
fn unsafe_kinds(code: &str) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(pos) = code[from..].find("unsafe") {
        let start = from + pos;
        let end = start + "unsafe".len();
        from = end;
        let word_start = start == 0 || !is_ident(bytes[start - 1]);
        let word_end = end == bytes.len() || !is_ident(bytes[end]);
        if !word_start || !word_end {
            continue;
        }
        let rest = code[end..].trim_start();
        let kind = if rest.starts_with('{') || rest.is_empty() {
            // A block whose brace is on the next line counts too.
            "block"
        } else if rest.starts_with("fn ") || rest.starts_with("extern \"C\" fn") {
            "fn"
        } else if rest.starts_with("impl") {
            "impl"
        } else if rest.starts_with("trait ") {
            "trait"
        } else if rest.starts_with("extern") {
            "extern"
        } else {
            // `#[unsafe(...)]` and the like.
            continue;
        };
        kinds.push(kind);
    }
    kinds
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The comment block and attributes directly above line `i` (nearest first).
fn block_above(lines: &[&str], i: usize) -> Vec<String> {
    let mut out = Vec::new();
    for line in lines[..i].iter().rev() {
        let t = line.trim_start();
        if t.starts_with("//") || t.starts_with("#[") || t.starts_with("#![") {
            out.push(t.to_owned());
        } else {
            break;
        }
    }
    out
}

/// Every `unsafe` in `source` (named `file` in the result) that lacks its comment.
fn gaps(file: &str, source: &str) -> Vec<Gap> {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let (code, trailing) = split(line);
        let kinds = unsafe_kinds(&code);
        if kinds.is_empty() {
            continue;
        }
        let above = block_above(&lines, i);
        let safety_comment =
            trailing.contains("SAFETY:") || above.iter().any(|l| l.contains("SAFETY:"));
        let safety_doc = above
            .iter()
            .any(|l| l.starts_with("///") && l.contains("# Safety"));
        let ok = kinds.iter().all(|kind| match *kind {
            "fn" | "trait" => safety_doc,
            _ => safety_comment,
        });
        if !ok {
            out.push(Gap {
                at: format!("{file}:{}", i + 1),
                line: line.trim().to_owned(),
            });
        }
    }
    out
}

fn ebpf_sources() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf-programs/src");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_unsafe_in_the_ebpf_programs_states_its_invariant() {
    let files = ebpf_sources();
    assert!(!files.is_empty(), "no eBPF sources found");
    let mut all = Vec::new();
    let mut seen = 0;
    for path in &files {
        let source = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        seen += source
            .lines()
            .map(|l| unsafe_kinds(&split(l).0).len())
            .sum::<usize>();
        let name = format!(
            "ebpf-programs/src/{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("?")
        );
        all.extend(gaps(&name, &source));
    }
    // The scan must be finding the blocks it judges, or it proves nothing.
    assert!(
        seen >= 20,
        "only {seen} unsafe blocks found: is the scan broken?"
    );
    assert!(
        all.is_empty(),
        "{} of {seen} unsafe blocks/fns lack a `// SAFETY:` comment just above (or a `# Safety` doc):\n{}",
        all.len(),
        all.iter()
            .map(|g| format!("  {}: {}", g.at, g.line))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_scan_flags_what_it_should_and_nothing_else() {
    let src = r#"
// SAFETY: commented.
let a = unsafe { x() };
let b = unsafe { y() }; // SAFETY: trailing.
let c = unsafe { z() };
// Some context first.
// SAFETY: second line of the block.
#[inline(always)]
let d = unsafe {
    w()
};
/// Reads.
///
/// # Safety
/// The caller checks bounds.
#[inline(always)]
unsafe fn read() {}
/// No safety section.
unsafe fn bad() {}
// SAFETY: a plain comment does not document an unsafe fn's contract.
unsafe fn also_bad() {}
#[unsafe(no_mangle)]
static S: u8 = 0;
let s = "unsafe { in a string";
// unsafe { in a comment }
let unsafe_name = 1;
// SAFETY: one comment, one line, two blocks.
let e = unsafe { p() } + unsafe { q() };
let f =
    unsafe { r() };
"#;
    let found: Vec<usize> = gaps("t.rs", src)
        .iter()
        .map(|g| g.at.trim_start_matches("t.rs:").parse().expect("line"))
        .collect();
    assert_eq!(found, vec![5, 19, 21, 30]);
}
