//! The `flotilla bundle` commands as a user runs them: the real binary, real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/bundles")
        .join(name)
}

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .output()
        .expect("run flotilla")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn inspect_orders_a_flyway_folder_and_prints_the_id() {
    let dir = fixture("good");
    let out = flotilla(&["bundle", "inspect", dir.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let order: Vec<&str> = stdout
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().nth(3).expect("name column"))
        .collect();
    assert_eq!(
        order,
        [
            "V1__create_users.sql",
            "V1_1__add_email.sql",
            "V1.2__seed_admin.sql",
            "V2__users_email_index.sql",
            "V10__orders.sql",
            "R__user_view.sql"
        ]
    );
    assert!(stdout.contains("no-transaction"), "{stdout}");
}

#[test]
fn inspect_json() {
    let dir = fixture("good");
    let out = flotilla(&[
        "bundle",
        "inspect",
        dir.to_str().expect("utf-8 path"),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = v["bundle_id"].as_str().expect("bundle_id");
    assert_eq!(id.len(), 64);
    let scripts = v["scripts"].as_array().expect("scripts");
    assert_eq!(scripts.len(), 6);
    assert_eq!(scripts[2]["version"], "1.2");
    assert_eq!(scripts[3]["transaction"], "no-transaction");
    assert_eq!(scripts[3]["lock_timeout_ms"], 2000);
    assert_eq!(
        scripts[4]["statements"], 2,
        "function body semicolons stay inside"
    );
    assert_eq!(scripts[5]["kind"], "repeatable");
    assert!(scripts[5]["version"].is_null());
    let recomputed = flotilla::bundle::Bundle::load_dir(&dir)
        .expect("load")
        .id()
        .to_string();
    assert_eq!(id, recomputed);
}

#[test]
fn lint_good_bundle() {
    let dir = fixture("good");
    let out = flotilla(&["bundle", "lint", dir.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("ok: 6 scripts"));
}

fn assert_invalid(args: &[&str], expected: &[&str]) {
    let out = flotilla(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{args:?}: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "{args:?}: expected {e:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_fixture_bundles_get_clear_errors() {
    let path = |n: &str| fixture(n).to_string_lossy().into_owned();
    assert_invalid(
        &["bundle", "lint", &path("dup_version")],
        &["V1__a.sql: version 1 is also used by V1_0__b.sql"],
    );
    assert_invalid(
        &["bundle", "lint", &path("bad_directive")],
        &["V1__vacuum.sql:1: unknown directive flotilla:no-transactoin"],
    );
    assert_invalid(
        &["bundle", "inspect", &path("needs_no_transaction")],
        &["V1__index.sql:3: CREATE INDEX CONCURRENTLY cannot run inside a transaction block"],
    );
    assert_invalid(
        &["bundle", "lint", &path("bad_name")],
        &["create_users.sql: the name matches neither"],
    );
    assert_invalid(&["bundle", "lint", &path("empty")], &["has no scripts"]);
    assert_invalid(
        &["bundle", "lint", "/nonexistent/bundle"],
        &["cannot read bundle directory /nonexistent/bundle"],
    );
}

#[test]
fn lint_errors_as_json() {
    let out = flotilla(&[
        "bundle",
        "lint",
        &fixture("needs_no_transaction").to_string_lossy(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(6));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"][0]["file"], "V1__index.sql");
    assert_eq!(v["errors"][0]["line"], 3);
}

#[test]
fn bad_files_made_on_the_spot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("V1__latin1.sql"), b"select 'caf\xe9';\n").expect("write");
    std::fs::write(outside.path().join("secret.sql"), "select 1;").expect("write");
    std::os::unix::fs::symlink(outside.path().join("secret.sql"), d.join("V2__link.sql"))
        .expect("symlink");
    let big = vec![b'-'; 16 * 1024 * 1024 + 1];
    std::fs::write(d.join("V3__huge.sql"), big).expect("write");
    std::fs::write(d.join("V4.x__bad_version.sql"), "select 1;").expect("write");
    assert_invalid(
        &["bundle", "lint", &d.to_string_lossy()],
        &[
            "V1__latin1.sql:1: not valid UTF-8",
            "V2__link.sql: symlink points outside the bundle",
            "V3__huge.sql: script is 16777217 bytes, over the limit",
            "V4.x__bad_version.sql: malformed version \"4.x\"",
        ],
    );
}

#[test]
fn nonsense_flags_are_usage_errors() {
    let out = flotilla(&["bundle", "lint", "--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = flotilla(&["--output", "yaml", "bundle", "lint", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("yaml"));
}
