//! The `dispy` CLI, for tests that drive a node the way a user does.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `dispy` binary beside dispynode. `cargo test --workspace` builds it with everything
/// else; when this crate's tests run alone and it is missing, it is built here. (Building it
/// from inside a test run always recompiles part of the workspace, so a present binary is used
/// as it is.)
pub fn dispy_cli() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = Path::new(env!("CARGO_BIN_EXE_dispynode")).with_file_name("dispy");
        if !bin.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-q", "-p", "dispy-cli"])
                .current_dir(repo())
                .status()
                .unwrap();
            assert!(
                status.success() && bin.exists(),
                "building the dispy CLI failed"
            );
        }
        bin
    })
}
