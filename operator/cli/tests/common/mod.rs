//! Shared by the CLI's integration tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The dispynode binary beside `dispy` (built here when `cargo test -p dispy-cli` ran alone).
pub fn dispynode() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = Path::new(env!("CARGO_BIN_EXE_dispy")).with_file_name("dispynode");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "dispynode"])
            .current_dir(repo())
            .status()
            .unwrap();
        assert!(
            status.success() && bin.exists(),
            "building dispynode failed"
        );
        bin
    })
}
