//! What `dispy run` prints at the end, and `dispy nodes`.

use std::time::Duration;

use dispy_core::manifest::API_VERSION;
use dispy_core::{ClientConfig, NodeClient};

use crate::run::{ArrayReport, JobReport, Report};

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
    /// Arrays' result rows as JSON lines (each array's in index order, one array after
    /// another); the table goes to stderr.
    Jsonl,
}

pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Table | Format::Jsonl => {
            let mut parts = Vec::new();
            if !report.jobs.is_empty() {
                parts.push(job_table(&report.jobs));
            }
            if !report.arrays.is_empty() {
                parts.push(array_table(&report.arrays));
            }
            parts.join("\n")
        }
        Format::Yaml => serde_yaml::to_string(&list(report)).expect("serializable"),
        Format::Json => serde_json::to_string_pretty(&list(report)).expect("serializable") + "\n",
    }
}

/// The jobs and arrays as a Kubernetes List of DispyJob and DispyJobArray objects, as
/// `kubectl get -o yaml` prints.
fn list(report: &Report) -> serde_json::Value {
    let object = |kind: &str, name: &str, namespace: &str, cluster: &str, status| {
        serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"cluster": cluster},
            "status": status,
        })
    };
    let jobs = report.jobs.iter().map(|o| {
        let status = serde_json::to_value(&o.status).expect("serializable");
        object("DispyJob", &o.name, &o.namespace, &o.cluster, status)
    });
    let arrays = report.arrays.iter().map(|a| {
        let status = serde_json::to_value(&a.status).expect("serializable");
        object("DispyJobArray", &a.name, &a.namespace, &a.cluster, status)
    });
    let items: Vec<_> = jobs.chain(arrays).collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// Rows under a header, in columns three spaces apart.
fn columns<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let header = header.map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(rows) {
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

/// As `kubectl get dja`.
fn array_table(arrays: &[ArrayReport]) -> String {
    let rows: Vec<[String; 7]> = arrays
        .iter()
        .map(|a| {
            let s = &a.status;
            [
                a.name.clone(),
                a.cluster.clone(),
                s.total.to_string(),
                s.running.to_string(),
                s.finished.to_string(),
                s.failed.to_string(),
                age(a.submitted.elapsed()),
            ]
        })
        .collect();
    columns(
        [
            "NAME", "CLUSTER", "TOTAL", "RUNNING", "FINISHED", "FAILED", "AGE",
        ],
        &rows,
    )
}

/// As `kubectl get dispyjobs`.
fn job_table(outcomes: &[JobReport]) -> String {
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
    columns(
        ["NAME", "CLUSTER", "STATUS", "NODE", "RESULT", "AGE"],
        &rows,
    )
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
