//! What `dispy run` prints at the end, and `dispy nodes`.

use std::time::Duration;

use dispy_core::manifest::API_VERSION;
use dispy_core::{ClientConfig, NodeClient};

use crate::run::JobReport;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

pub fn render(outcomes: &[JobReport], format: Format) -> String {
    match format {
        Format::Table => table(outcomes),
        Format::Yaml => serde_yaml::to_string(&list(outcomes)).expect("serializable"),
        Format::Json => serde_json::to_string_pretty(&list(outcomes)).expect("serializable") + "\n",
    }
}

/// The jobs as a Kubernetes List of DispyJob objects, as `kubectl get -o yaml` prints.
fn list(outcomes: &[JobReport]) -> serde_json::Value {
    let items: Vec<_> = outcomes
        .iter()
        .map(|o| {
            serde_json::json!({
                "apiVersion": API_VERSION,
                "kind": "DispyJob",
                "metadata": {"name": o.name, "namespace": o.namespace},
                "spec": {"cluster": o.cluster},
                "status": o.status,
            })
        })
        .collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
}

fn table(outcomes: &[JobReport]) -> String {
    let rows: Vec<[String; 6]> = outcomes
        .iter()
        .map(|o| {
            let result = o.status.result_summary.clone().unwrap_or_default();
            [
                o.name.clone(),
                o.cluster.clone(),
                o.status.status.to_string(),
                o.status.node.clone().unwrap_or_else(|| "<none>".into()),
                result,
                age(o.submitted.elapsed()),
            ]
        })
        .collect();
    let header = ["NAME", "CLUSTER", "STATUS", "NODE", "RESULT", "AGE"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// `dispy nodes`: what each node says about itself.
pub async fn nodes(mut addrs: Vec<String>, discover: bool, secret: String) -> i32 {
    if discover {
        match crate::run::discover_nodes().await {
            Ok(found) => addrs.extend(found),
            Err(e) => {
                eprintln!("dispy: {e}");
                return 2;
            }
        }
    }
    if addrs.is_empty() {
        eprintln!("dispy: no nodes: give --node host[:port] or --discover");
        return 2;
    }
    let config = ClientConfig {
        secret,
        name: "dispy nodes".into(),
        ..Default::default()
    };
    println!(
        "{:<24} {:<20} {:>5} {:>5} {:>7}  VERSION",
        "ADDRESS", "NAME", "CPUS", "BUSY", "QUEUED"
    );
    let mut code = 0;
    for addr in addrs {
        let addr = crate::run::with_port(&addr);
        match NodeClient::connect(&addr, &config).await {
            Ok((c, _)) => {
                let i = c.node_info().await.unwrap_or_else(|_| c.info().clone());
                println!(
                    "{addr:<24} {:<20} {:>5} {:>5} {:>7}  {}",
                    i.name, i.cpus, i.busy, i.queued, i.version
                );
            }
            Err(e) => {
                eprintln!("dispy: {e}");
                code = 1;
            }
        }
    }
    code
}
