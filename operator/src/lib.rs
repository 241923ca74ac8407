//! The dispy operator: what JobClusters own in Kubernetes (`build`), and the CRDs.

pub mod build;
pub mod controller;

use dispy_core::manifest::{DispyJobResource, JobClusterResource};
use kube::CustomResourceExt;

/// Both CRDs as one multi-document YAML text (`dispy-operator crd`).
pub fn crds_yaml() -> String {
    let docs = [JobClusterResource::crd(), DispyJobResource::crd()];
    docs.iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}
