//! What every client of the scheduler does around it, the `dispy` CLI and the operator alike:
//! a cluster's policy from its spec, the computation's id on the nodes, finding a pinned
//! job's node, setting a computation up on a node, sending a batch of jobs, and reading a
//! node's events as news about jobs.
//!
//! The pure parts take data and return data; the two async functions are the only IO, each
//! a fixed sequence of requests on one [`NodeClient`].

use crate::job::{JobResult, JobStatus};
use crate::manifest::{DispyJobArraySpec, JobClusterSpec};
use crate::protocol::{
    Computation, ComputeRequest, ErrorCode, JobEventKind, JobRequest, JobState, SentFile,
};
use crate::scheduler::{ClusterPolicy, JobKey};
use crate::{ClientEvent, NodeClient};

/// A file as (name, contents).
pub type File = (String, Vec<u8>);

/// What a JobCluster allows when an attempt fails: its `reentrant` and `backoffLimit`.
pub fn policy(spec: &JobClusterSpec) -> ClusterPolicy {
    ClusterPolicy {
        reentrant: spec.reentrant,
        backoff_limit: spec
            .backoff_limit
            .unwrap_or(ClusterPolicy::default().backoff_limit),
    }
}

/// A DispyJobArray's policy: its own `reentrant` and `backoffLimit` where it sets them, else
/// its JobCluster's.
pub fn array_policy(cluster: &JobClusterSpec, array: &DispyJobArraySpec) -> ClusterPolicy {
    let base = policy(cluster);
    ClusterPolicy {
        reentrant: array.reentrant.unwrap_or(base.reentrant),
        backoff_limit: array.backoff_limit.unwrap_or(base.backoff_limit),
    }
}

/// A computation's name on the nodes: `namespace/name/instance`. `instance` tells apart two
/// computations of the same name: the JobCluster's uid (so a re-created JobCluster is a new
/// computation, and every operator instance names it alike), or the CLI's pid.
pub fn computation_id(namespace: &str, name: &str, instance: &str) -> String {
    format!("{namespace}/{name}/{instance}")
}

/// A node as a pinned job may name it: its address and the other names it goes by (the name
/// it reports, its pod).
pub struct NodeNames<'a> {
    pub addr: &'a str,
    pub names: Vec<&'a str>,
}

/// The address of the node `want` names (an address, with or without the port, or one of its
/// names), if it is among `nodes`.
pub fn resolve_node<'a>(want: &str, nodes: &[NodeNames<'a>]) -> Option<&'a str> {
    let with_port = crate::discovery::with_port(want);
    nodes
        .iter()
        .find(|n| n.addr == want || n.addr == with_port || n.names.contains(&want))
        .map(|n| n.addr)
}

/// The nodes, for a message: "name at addr, ...", sorted; `none` when there are none.
pub fn node_list(nodes: &[NodeNames<'_>]) -> String {
    let mut list: Vec<String> = nodes
        .iter()
        .map(|n| match n.names.first() {
            Some(name) if *name != n.addr => format!("{name} at {}", n.addr),
            _ => n.addr.to_string(),
        })
        .collect();
    list.sort();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// What a node's event means for the jobs.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeNews {
    Started {
        key: JobKey,
        start_time: f64,
    },
    Done {
        key: JobKey,
        result: JobResult,
    },
    Provisional {
        key: JobKey,
        result: String,
    },
    File {
        key: JobKey,
        file: SentFile,
    },
    /// The connection is gone (closed, or five pulses missed).
    Lost {
        reason: String,
    },
    /// The node's load, which the scheduler does not need (it counts its own dispatches).
    Pulse,
}

impl NodeNews {
    pub fn of(event: ClientEvent) -> NodeNews {
        match event {
            ClientEvent::Job(ev) => {
                let key = JobKey::new(ev.computation, ev.job);
                match ev.kind {
                    JobEventKind::Running { start_time } => NodeNews::Started { key, start_time },
                    JobEventKind::Done(result) => NodeNews::Done { key, result },
                    JobEventKind::Provisional { result } => NodeNews::Provisional { key, result },
                    JobEventKind::File(file) => NodeNews::File { key, file },
                }
            }
            ClientEvent::Disconnected { reason, .. } => NodeNews::Lost { reason },
            ClientEvent::Pulse { .. } => NodeNews::Pulse,
        }
    }
}

/// Registers the computation on the node (or, when the node has it already, from an earlier
/// client instance with the same owner, attaches to it), sends its files and runs its setup.
/// Returns the jobs the node holds of it (only when attached).
pub async fn set_up(
    client: &NodeClient,
    id: &str,
    spec: &Computation,
    files: &[File],
) -> Result<Vec<JobState>, String> {
    let request = ComputeRequest {
        computation: id.to_string(),
        spec: spec.clone(),
        keep_files: false,
    };
    let held = match client.compute(request).await {
        Ok(()) => Vec::new(),
        Err(e) if e.node_code() == Some(ErrorCode::AlreadyExists) => {
            client.attach(id).await.map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    for (name, data) in files {
        client
            .send_file(id, name, data, 0o644, None)
            .await
            .map_err(|e| format!("sending {name}: {e}"))?;
    }
    client.setup(id).await.map_err(|e| e.to_string())?;
    Ok(held)
}

/// One job to submit: its key, request and own files.
pub struct Outgoing {
    pub key: JobKey,
    pub request: JobRequest,
    pub files: Vec<File>,
}

/// Sends each job's own files, then the jobs in one request. Returns the jobs the node did not
/// take, each with why (the node is gone: all of them).
pub async fn submit_batch(
    client: Option<&NodeClient>,
    cluster: &str,
    jobs: Vec<Outgoing>,
) -> Vec<(JobKey, String)> {
    let Some(client) = client else {
        return jobs
            .into_iter()
            .map(|j| (j.key, "the node is not connected".to_string()))
            .collect();
    };
    let mut refused = Vec::new();
    let mut requests = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    'jobs: for job in jobs {
        for (name, data) in &job.files {
            if let Err(e) = client
                .send_file(cluster, name, data, 0o644, Some(job.key.job))
                .await
            {
                refused.push((job.key, format!("sending {name}: {e}")));
                continue 'jobs;
            }
        }
        requests.push(job.request);
        keys.push(job.key);
    }
    match client.submit_many(cluster, requests).await {
        Ok(rejected) => refused.extend(
            rejected
                .into_iter()
                .map(|r| (JobKey::new(cluster, r.job), r.error.to_string())),
        ),
        Err(e) => refused.extend(keys.into_iter().map(|k| (k, e.to_string()))),
    }
    refused
}

/// Whether a node's report of a job it holds means the job had started there.
pub fn had_started(held: JobStatus) -> bool {
    held != JobStatus::Created
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<NodeNames<'static>> {
        vec![
            NodeNames {
                addr: "10.0.0.1:9701",
                names: vec!["node-a", "pod-a"],
            },
            NodeNames {
                addr: "10.0.0.2:9711",
                names: vec!["node-b"],
            },
        ]
    }

    #[test]
    fn a_pinned_job_finds_its_node_by_address_name_or_pod() {
        let n = nodes();
        assert_eq!(resolve_node("10.0.0.1", &n), Some("10.0.0.1:9701"));
        assert_eq!(resolve_node("10.0.0.2:9711", &n), Some("10.0.0.2:9711"));
        assert_eq!(resolve_node("pod-a", &n), Some("10.0.0.1:9701"));
        assert_eq!(resolve_node("node-b", &n), Some("10.0.0.2:9711"));
        assert_eq!(resolve_node("10.0.0.2", &n), None, "another port");
        assert_eq!(resolve_node("node-c", &n), None);
        assert_eq!(
            node_list(&n),
            "node-a at 10.0.0.1:9701, node-b at 10.0.0.2:9711"
        );
        assert_eq!(node_list(&[]), "none");
    }

    #[test]
    fn the_policy_comes_from_reentrant_and_backoff_limit() {
        let mut spec: JobClusterSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(policy(&spec), ClusterPolicy::default());
        spec.reentrant = true;
        spec.backoff_limit = Some(2);
        assert_eq!(
            policy(&spec),
            ClusterPolicy {
                reentrant: true,
                backoff_limit: 2
            }
        );
        assert_eq!(computation_id("ns", "jc", "1a2b"), "ns/jc/1a2b");
    }

    #[test]
    fn an_array_s_policy_overrides_its_cluster_s_where_it_is_set() {
        let mut cluster: JobClusterSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        cluster.reentrant = true;
        cluster.backoff_limit = Some(2);
        let mut array = DispyJobArraySpec::default();
        assert_eq!(array_policy(&cluster, &array), policy(&cluster));
        array.reentrant = Some(false);
        assert_eq!(
            array_policy(&cluster, &array),
            ClusterPolicy {
                reentrant: false,
                backoff_limit: 2
            }
        );
        array.backoff_limit = Some(0);
        assert_eq!(array_policy(&cluster, &array).backoff_limit, 0);
    }

    #[test]
    fn node_events_become_news_about_jobs() {
        use crate::protocol::JobEvent;
        let ev = |kind| {
            ClientEvent::Job(JobEvent {
                computation: "c".into(),
                job: 7,
                kind,
            })
        };
        let key = JobKey::new("c", 7);
        assert_eq!(
            NodeNews::of(ev(JobEventKind::Running { start_time: 1.5 })),
            NodeNews::Started {
                key: key.clone(),
                start_time: 1.5
            }
        );
        assert_eq!(
            NodeNews::of(ev(JobEventKind::Provisional { result: "1".into() })),
            NodeNews::Provisional {
                key,
                result: "1".into()
            }
        );
        assert_eq!(
            NodeNews::of(ClientEvent::Disconnected {
                reason: "gone".into(),
                in_flight: vec![]
            }),
            NodeNews::Lost {
                reason: "gone".into()
            }
        );
    }
}
