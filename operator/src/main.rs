//! `dispy-operator`: the Kubernetes operator for JobCluster and DispyJob.
//!
//! `dispy-operator crd` prints the CustomResourceDefinitions generated from the Rust types in
//! `dispy-core`; `crds/dispy.io.yaml` is its output, checked in (CI fails when they differ).

use clap::{Parser, Subcommand};
use dispy_operator::crds_yaml;

#[derive(Parser)]
#[command(
    name = "dispy-operator",
    version,
    about = "Kubernetes operator for dispy JobClusters and DispyJobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CustomResourceDefinitions (JobCluster, DispyJob) as YAML.
    Crd,
    /// Run the controllers (uses the in-cluster config or $KUBECONFIG).
    Run {
        /// Node image for JobClusters that name none.
        #[arg(long, env = "DISPY_NODE_IMAGE", default_value = concat!("dispy/node:", env!("CARGO_PKG_VERSION")))]
        node_image: String,
    },
}

fn main() {
    match Cli::parse().command {
        Cmd::Crd => print!("{}", crds_yaml()),
        Cmd::Run { node_image } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(async {
                let client = match kube::Client::try_default().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("dispy-operator: cannot reach the Kubernetes API: {e}");
                        std::process::exit(2);
                    }
                };
                tracing::info!(%node_image, "dispy-operator running");
                dispy_operator::controller::run(client, node_image).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispy_core::manifest::{DispyJobResource, JobClusterResource};
    use kube::CustomResourceExt;

    #[test]
    fn crds_carry_names_columns_subresources_and_rules() {
        let jc = JobClusterResource::crd();
        assert_eq!(jc.metadata.name.as_deref(), Some("jobclusters.dispy.io"));
        let names = &jc.spec.names;
        assert_eq!(names.short_names.as_deref(), Some(&["jc".to_string()][..]));
        assert_eq!(
            names.categories.as_deref(),
            Some(&["dispy".to_string()][..])
        );
        let v = &jc.spec.versions[0];
        let columns: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Nodes", "Cpus", "Running", "Finished", "Failed", "Phase", "Age"]
        );
        let sub = v.subresources.as_ref().unwrap();
        assert!(sub.status.is_some());
        assert_eq!(
            sub.scale.as_ref().unwrap().spec_replicas_path,
            ".spec.nodes.replicas"
        );
        let yaml = crds_yaml();
        assert!(yaml.contains("has(self.python) != has(self.program)"));
        assert!(yaml.contains("cluster is immutable"));
        assert!(
            yaml.contains("Requeue the jobs of a lost node"),
            "doc comments become descriptions"
        );
        let dj = DispyJobResource::crd();
        let columns: Vec<_> = dj.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Cluster", "Status", "Node", "Result", "Age"]);
    }

    #[test]
    fn checked_in_crds_match_the_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/dispy.io.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == crds_yaml(),
            "crds/dispy.io.yaml is out of date: run `cargo run -q -p dispy-operator -- crd > crds/dispy.io.yaml`"
        );
    }
}
