//! The Helm chart ships its own copy of the CRDs (a symlink does not survive `helm package`)
//! and names the operator's version: both must follow the Rust side.

use std::path::Path;

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// `crds/dispy.io.yaml` follows the types (the drift test in `main.rs`); the chart's copy
/// follows that file.
#[test]
fn chart_crds_are_the_checked_in_crds() {
    assert!(
        repo_file("charts/dispy-operator/crds/dispy.io.yaml") == repo_file("crds/dispy.io.yaml"),
        "charts/dispy-operator/crds/dispy.io.yaml differs from crds/dispy.io.yaml: run \
         `cp crds/dispy.io.yaml charts/dispy-operator/crds/`"
    );
}

#[test]
fn chart_app_version_is_the_workspace_version() {
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("charts/dispy-operator/Chart.yaml")).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "charts/dispy-operator/Chart.yaml appVersion differs from the workspace version"
    );
}
