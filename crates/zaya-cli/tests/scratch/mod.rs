//! Scratch directories for the CLI tests, each removed with everything in it when its guard
//! drops: a run of the suite leaves nothing in the temp dir, pass or fail.

use std::path::PathBuf;

/// A fresh directory `zaya-{tag}-…` under the temp dir, and the guard that removes it: keep
/// the guard bound (`let (_guard, dir) = scratch("x")`) for as long as the test uses the path.
pub fn scratch(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let guard = tempfile::Builder::new()
        .prefix(&format!("zaya-{tag}-"))
        .tempdir()
        .unwrap();
    let path = guard.path().to_path_buf();
    (guard, path)
}
