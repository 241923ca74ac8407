//! `dispy results dja/NAME`: a DispyJobArray's result rows from a Kubernetes cluster. The
//! operator writes them to ConfigMaps labelled `dispy.io/job-array=NAME` (key
//! `results.jsonl`, one JSON line per index); they are read in chunk order (a later row of an
//! index wins, as `dispy_core::array::read_rows` says) and printed in index order.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use dispy_core::array::{chunk_name, line, read_rows};
use dispy_core::job::JobStatus;
use dispy_core::manifest::{ArrayResult, DispyJobArrayResource, JOB_ARRAY_LABEL, RESULTS_KEY};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

#[derive(clap::Args)]
pub struct ResultsArgs {
    /// The array: `dja/NAME` (also `dispyjobarray/NAME`, `dispyjobarrays.dispy.io/NAME`).
    array: String,
    /// The array's namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long)]
    context: Option<String>,
    /// Only rows with these statuses (repeatable, or comma-separated: `Terminated,Abandoned`).
    #[arg(long, value_delimiter = ',', value_parser = parse_status)]
    status: Vec<JobStatus>,
}

/// The array's name from `dja/NAME` and the other forms kubectl takes.
fn array_name(target: &str) -> Result<&str, String> {
    let (kind, name) = target
        .split_once('/')
        .ok_or_else(|| format!("{target:?}: name the array as dja/NAME (or dispyjobarray/NAME)"))?;
    let kinds = [
        "dja",
        "dispyjobarray",
        "dispyjobarrays",
        "dispyjobarray.dispy.io",
        "dispyjobarrays.dispy.io",
    ];
    if !kinds.contains(&kind.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "{target:?}: results are read for a DispyJobArray (dja/NAME), not {kind:?}"
        ));
    }
    if name.is_empty() || name.contains('/') {
        return Err(format!("{target:?}: no array name after {kind}/"));
    }
    Ok(name)
}

fn parse_status(text: &str) -> Result<JobStatus, String> {
    serde_json::from_value(serde_json::Value::String(text.into())).map_err(|_| {
        format!("{text:?} is not a job status: one of Created, Running, ProvisionalResult, Cancelled, Terminated, Abandoned, Finished")
    })
}

/// The result ConfigMaps' texts in the order they were written: `<array>-results-<n>` by `n`,
/// any others after them by name.
fn in_chunk_order<'a>(array: &str, chunks: &'a [(String, String)]) -> Vec<&'a str> {
    let number = |name: &str| {
        let n: Option<u32> = name
            .strip_prefix(&format!("{array}-results-"))
            .and_then(|n| n.parse().ok());
        n.filter(|n| chunk_name(array, *n) == name)
    };
    let mut ordered: Vec<(Option<u32>, &str, &str)> = chunks
        .iter()
        .map(|(name, text)| (number(name), name.as_str(), text.as_str()))
        .collect();
    ordered.sort_by_key(|(n, name, _)| (n.is_none(), *n, *name));
    ordered.into_iter().map(|(_, _, text)| text).collect()
}

/// The rows to print, in index order.
fn selected<'a>(
    rows: &'a BTreeMap<u32, ArrayResult>,
    statuses: &'a [JobStatus],
) -> impl Iterator<Item = &'a ArrayResult> {
    rows.values()
        .filter(move |r| statuses.is_empty() || statuses.contains(&r.status))
}

async fn client(args: &ResultsArgs) -> Result<Client, String> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match (&args.kubeconfig, &args.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        (None, Some(_)) => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| format!("kubeconfig: {e}"))?,
        (None, None) => Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration: {e}"))?,
    };
    Client::try_from(config).map_err(|e| format!("cannot make a Kubernetes client: {e}"))
}

/// Prints the rows; exit status 0, 1 when the array and its results are not there, 2 when the
/// cluster cannot be asked.
pub async fn results(args: ResultsArgs) -> i32 {
    match print_results(&args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dispy: {e}");
            2
        }
    }
}

async fn print_results(args: &ResultsArgs) -> Result<i32, String> {
    let name = array_name(&args.array)?;
    let client = client(args).await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let what = format!("DispyJobArray {namespace}/{name}");
    let selector = format!("{JOB_ARRAY_LABEL}={name}");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let listed = config_maps
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| format!("{what}: cannot list its result ConfigMaps ({selector}): {e}"))?;
    let array = Api::<DispyJobArrayResource>::namespaced(client, &namespace)
        .get_opt(name)
        .await
        .map_err(|e| format!("{what}: cannot read it: {e}"))?;
    let chunks: Vec<(String, String)> = listed
        .items
        .into_iter()
        .filter_map(|cm| {
            let text = cm.data?.remove(RESULTS_KEY)?;
            Some((cm.metadata.name.unwrap_or_default(), text))
        })
        .collect();
    let total = array
        .as_ref()
        .and_then(|a| a.status.as_ref())
        .map(|s| s.total);
    if chunks.is_empty() {
        match (&array, total) {
            (None, _) => eprintln!(
                "dispy: {what} not found, nor any ConfigMap labelled {selector} with {RESULTS_KEY}"
            ),
            (Some(_), Some(0)) => return Ok(0),
            (Some(_), _) => eprintln!(
                "dispy: {what} has no results yet (no ConfigMap labelled {selector} with {RESULTS_KEY})"
            ),
        }
        return Ok(1);
    }
    let (rows, bad) = read_rows(in_chunk_order(name, &chunks));
    let mut out = std::io::stdout().lock();
    for row in selected(&rows, &args.status) {
        if out.write_all(line(row).as_bytes()).is_err() {
            return Ok(0); // the reader is gone (`| head`)
        }
    }
    let _ = out.flush();
    if bad > 0 {
        eprintln!("dispy: {what}: {bad} lines of its result ConfigMaps are not rows; left out");
    }
    match (array, total) {
        (None, _) => eprintln!(
            "dispy: {what} is gone; these rows are from the ConfigMaps labelled {selector} left behind"
        ),
        (Some(_), Some(total)) if (rows.len() as u32) < total => eprintln!(
            "dispy: {what}: {} of {total} indexes have a row; the others have not ended",
            rows.len()
        ),
        _ => {}
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_array_is_named_as_kubectl_names_it() {
        assert_eq!(array_name("dja/squares"), Ok("squares"));
        assert_eq!(array_name("DispyJobArray/squares"), Ok("squares"));
        assert_eq!(array_name("dispyjobarrays.dispy.io/squares"), Ok("squares"));
        assert!(array_name("squares").unwrap_err().contains("dja/NAME"));
        assert!(array_name("dispyjob/j1")
            .unwrap_err()
            .contains("not \"dispyjob\""));
        assert!(array_name("dja/").unwrap_err().contains("no array name"));
    }

    #[test]
    fn statuses_are_dispy_s_names() {
        assert_eq!(parse_status("Terminated"), Ok(JobStatus::Terminated));
        assert!(parse_status("failed")
            .unwrap_err()
            .contains("one of Created"));
    }

    #[test]
    fn chunks_are_read_by_number_so_a_rerun_s_later_row_wins() {
        let row = |index, status| {
            line(&ArrayResult {
                index,
                status,
                ..Default::default()
            })
        };
        // Listed by name, chunk 10 comes before chunk 2; it was written after it.
        let chunks = vec![
            ("sq-results-10".to_string(), row(4, JobStatus::Finished)),
            (
                "sq-results-2".to_string(),
                row(4, JobStatus::Abandoned) + &row(5, JobStatus::Terminated),
            ),
            ("sq-results-0".to_string(), row(0, JobStatus::Finished)),
            ("sq-other".to_string(), row(9, JobStatus::Finished)),
        ];
        let ordered = in_chunk_order("sq", &chunks);
        assert_eq!(ordered[0], chunks[2].1);
        assert_eq!(ordered[2], chunks[0].1);
        assert_eq!(ordered[3], chunks[3].1);
        let (rows, bad) = read_rows(ordered);
        assert_eq!(bad, 0);
        assert_eq!(rows.keys().copied().collect::<Vec<_>>(), [0, 4, 5, 9]);
        assert_eq!(rows[&4].status, JobStatus::Finished);
        let failed: Vec<u32> = selected(&rows, &[JobStatus::Terminated, JobStatus::Abandoned])
            .map(|r| r.index)
            .collect();
        assert_eq!(failed, [5]);
        assert_eq!(selected(&rows, &[]).count(), 4);
    }
}
