//! `scripts/demo/datcmp.py`, the comparer of CalculiX `.dat` results, on a reference
//! from Debian's calculix-ccx-test and on copies of it with known deviations.
//!
//! Invariant: a number within 0.1 % of its block's largest value passes, a larger
//! deviation, a changed word or integer, a NaN or a missing line fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use datanet_e2e::{run, scripts_dir};

const REFERENCE: &str = "/usr/share/doc/calculix-ccx-test/examples/test/achtel2.dat.ref.gz";

fn reference_text() -> String {
    assert!(
        Path::new(REFERENCE).is_file(),
        "{REFERENCE} is missing: install calculix-ccx-test (scripts/setup.sh does)"
    );
    let output = run(Command::new("zcat").arg(REFERENCE));
    assert!(output.status.success(), "zcat {REFERENCE} failed");
    String::from_utf8(output.stdout).expect("the reference is ASCII")
}

/// Writes TEXT as a result file and returns datcmp's exit code and output.
fn compare(dir: &Path, text: &str) -> (Option<i32>, String) {
    let result: PathBuf = dir.join("achtel2.dat");
    std::fs::write(&result, text).expect("write the result file");
    let output = run(Command::new("python3")
        .arg(scripts_dir().join("demo/datcmp.py"))
        .arg(&result)
        .arg(REFERENCE));
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Replaces the first occurrence of FROM, which must exist.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the reference has no {from:?}");
    text.replacen(from, to, 1)
}

#[test]
fn identical_result_matches() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout) = compare(dir.path(), &reference_text());
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("0 deviations"), "{stdout}");
}

#[test]
fn deviation_within_tolerance_matches() {
    let dir = tempfile::tempdir().unwrap();
    // The block's largest value is about 1.1e-3, so 0.1 % of it is about 1.1e-6.
    let text = replace_once(&reference_text(), "-1.723861E-04", "-1.723961E-04");
    let (code, stdout) = compare(dir.path(), &text);
    assert_eq!(code, Some(0), "{stdout}");
}

#[test]
fn deviation_beyond_tolerance_fails() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_once(&reference_text(), "-1.723861E-04", "-1.823861E-04");
    let (code, stdout) = compare(dir.path(), &text);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("differs from reference -1.723861E-04"), "{stdout}");
}

#[test]
fn changed_word_fails() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_once(&reference_text(), "SET1", "SET2");
    let (code, stdout) = compare(dir.path(), &text);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("text 'SET2' differs from reference 'SET1'"), "{stdout}");
}

#[test]
fn changed_node_number_fails() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_once(&reference_text(), "         2 -1.723861E-04", "         7 -1.723861E-04");
    let (code, stdout) = compare(dir.path(), &text);
    assert_eq!(code, Some(1), "{stdout}");
}

#[test]
fn nan_fails() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_once(&reference_text(), "-1.723861E-04", "NaN");
    let (code, stdout) = compare(dir.path(), &text);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("NaN"), "{stdout}");
}

#[test]
fn missing_line_fails() {
    let dir = tempfile::tempdir().unwrap();
    let reference = reference_text();
    let mut lines: Vec<&str> = reference.lines().collect();
    lines.remove(5);
    let (code, stdout) = compare(dir.path(), &(lines.join("\n") + "\n"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("lines, the reference"), "{stdout}");
}

#[test]
fn missing_result_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(Command::new("python3")
        .arg(scripts_dir().join("demo/datcmp.py"))
        .arg(dir.path().join("absent.dat"))
        .arg(REFERENCE));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read"));
}
