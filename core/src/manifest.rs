//! `JobCluster` and `DispyJob` (`dispy.io/v1alpha1`) as Rust types, and the multi-document
//! YAML reader the `dispy` CLI uses. The operator puts Kubernetes' CustomResource derive on
//! these same types, so `kubectl apply` and `dispy run` read the same manifests.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::job::JobStatus;

pub const API_VERSION: &str = "dispy.io/v1alpha1";

/// Object metadata: the part of Kubernetes' ObjectMeta that manifests use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A dispy computation (a Python function or a program), its files and the nodes that run
/// its jobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource))]
// Each printcolumn repeats `type_`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "dispy.io",
        version = "v1alpha1",
        kind = "JobCluster",
        root = "JobClusterResource",
        namespaced,
        shortname = "jc",
        category = "dispy",
        status = "JobClusterStatus",
        derive = "PartialEq",
        doc = "A dispy computation and the node pods that run its jobs (DispyJobs)",
        selectable = ".status.phase",
        scale(
            spec_replicas_path = ".spec.nodes.replicas",
            status_replicas_path = ".status.readyNodes"
        ),
        printcolumn(
            name = "Nodes",
            type_ = "string",
            json_path = ".status.nodes",
            description = "ready/desired nodes"
        ),
        printcolumn(name = "Cpus", type_ = "integer", json_path = ".status.cpus"),
        printcolumn(
            name = "Running",
            type_ = "integer",
            json_path = ".status.jobs.running"
        ),
        printcolumn(
            name = "Finished",
            type_ = "integer",
            json_path = ".status.jobs.finished"
        ),
        printcolumn(name = "Failed", type_ = "integer", json_path = ".status.jobs.failed"),
        printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        ),
        printcolumn(
            name = "Scheduler",
            type_ = "string",
            json_path = ".status.scheduler.address",
            description = "address of the shared dispyscheduler for SharedJobCluster clients",
            priority = 1
        )
    )
)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.scheduler) || !self.scheduler.enabled || (!has(self.computation) && (!has(self.nodes) || !has(self.nodes.dispyProtocol) || self.nodes.dispyProtocol))",
        "message": "spec.scheduler is for a node pool shared by SharedJobCluster clients: a JobCluster with an enabled scheduler has no computation, and its nodes serve dispy's protocol (nodes.dispyProtocol not false)"
    },
    {
        "rule": "has(self.computation) == has(oldSelf.computation) && (!has(self.computation) || self.computation == oldSelf.computation) && has(self.depends) == has(oldSelf.depends) && (!has(self.depends) || self.depends == oldSelf.depends)",
        "message": "computation and depends cannot change on an existing JobCluster (its nodes run what they were sent at the start): delete the JobCluster and apply it again"
    }
]))]
pub struct JobClusterSpec {
    /// What jobs run: a Python function or a program. Omitted: a plain pool of nodes for
    /// external dispy clients. Fixed once the JobCluster exists (as a Job's pod template is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computation: Option<ComputationSpec>,
    /// Files every node gets in the computation's working directory before setup runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends: Vec<DependsSource>,
    /// Where jobs run.
    #[serde(default)]
    pub nodes: NodesSpec,
    /// Requeue the jobs of a lost node on other nodes (dispy's `reentrant`); otherwise they
    /// are Abandoned.
    #[serde(default)]
    pub reentrant: bool,
    /// How many times a job is requeued after losing its node before it is Abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<u32>,
    /// Seconds between pulses with the nodes; a node silent for five pulses is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulse_interval: Option<u32>,
    /// Secret holding the nodes' shared secret (key `secret`). Kubernetes generates one
    /// when omitted; `dispy run` then uses an empty secret on its local nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectRef>,
    /// TLS between clients and nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Dispatch no new jobs while true; running jobs go on.
    #[serde(default)]
    pub suspend: bool,
    /// A dispyscheduler in front of the node pods, so that many `dispy.SharedJobCluster`
    /// programs share them, each with its own computation (Kubernetes only; for a JobCluster
    /// without a computation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerSpec>,
}

/// The shared scheduler of a node pool: a Deployment of one `dispyscheduler` and a Service
/// `<jobcluster>-scheduler` for its clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SchedulerSpec {
    /// Run the scheduler.
    #[serde(default)]
    pub enabled: bool,
    /// dispy's base port (`dispyscheduler -p`, default 9700): nodes reach the scheduler on
    /// it, clients on it + 2 (9702, the Service's port and `SharedJobCluster`'s default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65533))]
    pub port: Option<u16>,
    /// Which computation's job gets a free cpu: the job submitted first (dispy's default),
    /// the computation served longest ago (`--fair_cluster_scheduler`), or the computation
    /// created first (`--early_cluster_scheduler`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SchedulerPolicy>,
    /// Minutes a client may be silent before its computation is closed (dispy's
    /// `--zombie_interval`, default 60; 0: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zombie_interval: Option<u32>,
    /// The scheduler's image (default: the nodes' image, which has `dispyscheduler`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The scheduler container's resources (requests and limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub resources: Option<serde_json::Value>,
    /// Overrides merged into the scheduler's pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub template: Option<serde_json::Value>,
}

impl SchedulerSpec {
    /// dispy's default base port for a scheduler.
    pub const DEFAULT_PORT: u16 = 9700;

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(Self::DEFAULT_PORT)
    }

    /// The port clients connect to (dispy's `SharedSchedulerPort`: base + 2).
    pub fn client_port(&self) -> u16 {
        self.port() + 2
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub enum SchedulerPolicy {
    #[default]
    EarliestJob,
    FairCluster,
    EarliestCluster,
}

/// Exactly one of `python` or `program`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.python) != has(self.program)", "message": "set exactly one of python or program"}
]))]
pub struct ComputationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<ProgramSpec>,
}

impl ComputationSpec {
    /// The computation as the node protocol carries it. `source_of` reads a
    /// `python.configMapRef` (from the manifests, or from the API server).
    pub fn to_protocol(
        &self,
        source_of: impl FnOnce(&ConfigMapKeyRef) -> Result<String, String>,
    ) -> Result<crate::protocol::Computation, String> {
        use crate::protocol::{Computation, ProgramComputation, PythonComputation};
        match (&self.python, &self.program) {
            (Some(py), None) => {
                let source = match (&py.source, &py.config_map_ref) {
                    (Some(s), None) => s.clone(),
                    (None, Some(r)) => source_of(r)?,
                    _ => return Err("python: set exactly one of source or configMapRef".into()),
                };
                Ok(Computation::Python(PythonComputation {
                    source,
                    function: py.function.clone(),
                    setup: py.setup.as_ref().map(|s| s.function.clone()),
                    setup_args: py
                        .setup
                        .as_ref()
                        .map(|s| serde_json::Value::Array(s.args.clone()).to_string()),
                    cleanup: py.cleanup.clone(),
                    reuse_workers: py.reuse_workers,
                }))
            }
            (None, Some(p)) => Ok(Computation::Program(ProgramComputation {
                command: p.command.clone(),
                env: vec![],
            })),
            _ => Err("set exactly one of python or program".into()),
        }
    }
}

/// A Python function: the module source (inline or from a ConfigMap) and the function each
/// job calls, with optional setup and cleanup functions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.source) != has(self.configMapRef)", "message": "set exactly one of source or configMapRef"}
]))]
pub struct PythonSpec {
    /// Module source, run as `__main__` on each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Or: the source from a key of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,
    /// The function each job calls with its args and kwargs.
    pub function: String,
    /// Run once per node before any job; jobs see the globals it sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<SetupSpec>,
    /// Function run when the computation closes on a node, with setup's args.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<String>,
    /// Run jobs in long-lived workers forked once after setup: much faster, but a job's
    /// changes to globals are seen by later jobs of the same worker.
    #[serde(default)]
    pub reuse_workers: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetupSpec {
    pub function: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "json_list")]
    pub args: Vec<serde_json::Value>,
}

/// A program run without a shell; each job's args are appended to the command.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProgramSpec {
    pub command: Vec<String>,
}

/// Files from a ConfigMap: every key becomes a file of that name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DependsSource {
    pub config_map_ref: LocalObjectRef,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalObjectRef {
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapKeyRef {
    pub name: String,
    pub key: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSpec {
    /// Secret of type kubernetes.io/tls with the nodes' certificate and key.
    pub secret_ref: LocalObjectRef,
}

/// Node pods, bare-metal nodes, or both.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodesSpec {
    /// Node pods to run (Kubernetes). `kubectl scale jc/NAME --replicas=N` sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub replicas: Option<u32>,
    /// Cpus each node offers (`dispynode --cpus`); 0 = all of the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 4096))]
    pub cpus: Option<u32>,
    /// Node image (Kubernetes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Node pods use the host's network, so dispy's UDP discovery works (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    /// The node port (default 9701).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Largest file a client may send a node pod (`dispynode --max-file-size`), in bytes or
    /// with a suffix: `10Mi`, `1Gi` (binary) or `10M`, `1G` (decimal). Default `10Mi`. Node
    /// pods' work volume is limited to 32 times this, and at least 1Gi (Kubernetes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub max_file_size: Option<String>,
    /// Overrides merged into the node pods' template (Kubernetes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub template: Option<serde_json::Value>,
    /// Bare-metal nodes, as `host` or `host:port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external: Vec<String>,
    /// Also find bare-metal nodes by UDP broadcast.
    #[serde(default)]
    pub discover: bool,
    /// Node pods also serve dispy 4.15's own protocol, for unmodified Python dispy clients.
    /// Default: only when the JobCluster has no computation (a node pool for such clients);
    /// otherwise the nodes serve only the operator (`dispynode --no-dispy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispy_protocol: Option<bool>,
}

/// One job: a call of the cluster's computation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource))]
#[allow(clippy::duplicated_attributes)]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "dispy.io",
        version = "v1alpha1",
        kind = "DispyJob",
        root = "DispyJobResource",
        namespaced,
        shortname = "dj",
        category = "dispy",
        status = "DispyJobStatus",
        derive = "PartialEq",
        doc = "One dispy job: a call of its JobCluster's computation, and its outcome",
        // `kubectl get dj --field-selector spec.cluster=sq,status.status=Terminated`
        selectable = ".spec.cluster",
        selectable = ".status.status",
        selectable = ".status.node",
        printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.cluster"),
        printcolumn(name = "Status", type_ = "string", json_path = ".status.status"),
        printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
        printcolumn(name = "Result", type_ = "string", json_path = ".status.resultSummary"),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
pub struct DispyJobSpec {
    /// The JobCluster (same namespace) whose computation runs this job. Cannot be changed.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "cluster is immutable"}
    ]))]
    pub cluster: String,
    /// Positional arguments (a program gets each as one argument string).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "json_list")]
    pub args: Vec<serde_json::Value>,
    /// Keyword arguments (Python computations).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schemars(schema_with = "any_object")]
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    /// Files only this job gets; removed after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends: Vec<DependsSource>,
    /// Run only on this node (dispy's `submit_node`): a node name or `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Terminate the job when it runs longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<u64>,
    /// Delete the job this many seconds after it ended (Finished, Terminated, Cancelled or
    /// Abandoned), as a Job's ttlSecondsAfterFinished. Unset: the operator's default
    /// (`--job-ttl-seconds-after-finished`, chart value `jobs.ttlSecondsAfterFinished`), by
    /// default none: the job is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u64>,
}

/// Many jobs of one JobCluster's computation, indexed from 0: one object for thousands of
/// jobs, whose results go to ConfigMaps it owns (`dispy.io/job-array=<name>`), as JSON lines.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource))]
#[allow(clippy::duplicated_attributes)]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "dispy.io",
        version = "v1alpha1",
        kind = "DispyJobArray",
        root = "DispyJobArrayResource",
        namespaced,
        shortname = "dja",
        category = "dispy",
        status = "DispyJobArrayStatus",
        derive = "PartialEq",
        doc = "Many dispy jobs of one JobCluster's computation, indexed from 0, with their results in ConfigMaps",
        selectable = ".spec.cluster",
        printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.cluster"),
        printcolumn(name = "Total", type_ = "integer", json_path = ".status.total"),
        printcolumn(name = "Running", type_ = "integer", json_path = ".status.running"),
        printcolumn(name = "Finished", type_ = "integer", json_path = ".status.finished"),
        printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
// CEL cannot see `args` (lists of any JSON have no CEL type), so "exactly one of args and
// argsFrom" is checked by the operator (the array fails with that message) and by `dispy run`.
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.argsFrom) == has(oldSelf.argsFrom) && (!has(self.argsFrom) || self.argsFrom == oldSelf.argsFrom)", "message": "argsFrom cannot change on an existing DispyJobArray: delete it and apply it again"}
]))]
pub struct DispyJobArraySpec {
    /// The JobCluster (same namespace) whose computation runs the jobs. Cannot be changed.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "cluster is immutable"}
    ]))]
    pub cluster: String,
    /// The jobs' positional arguments, one list per job: job i gets `args[i]`. Read once, when
    /// the array starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "json_lists")]
    pub args: Option<Vec<Vec<serde_json::Value>>>,
    /// The jobs' arguments from a ConfigMap key holding JSON lines, one positional-args list
    /// per line (`[1, "a"]`) or an object with `args` and `kwargs`
    /// (`{"args": [1], "kwargs": {"k": 2}}`). Read once, when the array starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_from: Option<ArgsFrom>,
    /// Requeue a job whose node is lost (default: the JobCluster's `reentrant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reentrant: Option<bool>,
    /// Requeues of a job after losing its node before it is Abandoned (default: the
    /// JobCluster's `backoffLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<u32>,
    /// Start no more of its jobs while true; running ones go on.
    #[serde(default)]
    pub suspend: bool,
    /// Delete the array (and its result ConfigMaps) this long after every job ended. Unset:
    /// the operator's default (`--job-ttl-seconds-after-finished`, chart value
    /// `jobs.ttlSecondsAfterFinished`), by default none: the array is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArgsFrom {
    pub config_map_ref: ConfigMapKeyRef,
}

/// One job of an array as a results ConfigMap holds it (one JSON line).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ArrayResult {
    pub index: u32,
    pub status: JobStatus,
    /// The function's return value; `null` (Python's None) stays `Some(Null)`, an absent
    /// field is `None`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_value"
    )]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// Why it ended as it did, when not Finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn present_value<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// The label on an array's result ConfigMaps, with the array's name.
pub const JOB_ARRAY_LABEL: &str = "dispy.io/job-array";
/// The key of the JSON lines in a result ConfigMap.
pub const RESULTS_KEY: &str = "results.jsonl";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DispyJobArrayStatus {
    /// Jobs in the array.
    #[serde(default)]
    pub total: u32,
    /// Ended Finished.
    #[serde(default)]
    pub finished: u32,
    /// Ended Terminated, Cancelled or Abandoned.
    #[serde(default)]
    pub failed: u32,
    #[serde(default)]
    pub running: u32,
    /// RFC 3339: when the first job was sent to a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// RFC 3339: when the last job ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Result ConfigMaps written (`<name>-results-<n>`, from 0).
    #[serde(default)]
    pub result_config_maps: u32,
    /// Why the array is where it is, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Complete` (every job Finished) or `Failed` (every job ended, some not Finished).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The arguments of one job of an array, from a JSON line of `argsFrom`.
pub fn array_line_args(
    line: &str,
) -> Result<
    (
        Vec<serde_json::Value>,
        serde_json::Map<String, serde_json::Value>,
    ),
    String,
> {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Array(args)) => Ok((args, Default::default())),
        Ok(serde_json::Value::Object(mut o)) => {
            if let Some(k) = o.keys().find(|k| *k != "args" && *k != "kwargs") {
                return Err(format!("unknown key {k:?} (an object has args and kwargs)"));
            }
            let args = match o.remove("args") {
                None => vec![],
                Some(serde_json::Value::Array(a)) => a,
                Some(_) => return Err("args is not a list".into()),
            };
            let kwargs = match o.remove("kwargs") {
                None => Default::default(),
                Some(serde_json::Value::Object(k)) => k,
                Some(_) => return Err("kwargs is not an object".into()),
            };
            Ok((args, kwargs))
        }
        Ok(_) => Err("not a list of arguments or an object with args and kwargs".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// Every job's arguments from an `argsFrom` value: one JSON line each, blank lines skipped.
/// Errors name the line.
#[allow(clippy::type_complexity)]
pub fn array_args_from_lines(
    text: &str,
) -> Result<
    Vec<(
        Vec<serde_json::Value>,
        serde_json::Map<String, serde_json::Value>,
    )>,
    String,
> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| array_line_args(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// A job's outcome, in dispy's terms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DispyJobStatus {
    pub status: JobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default)]
    pub attempts: u32,
    /// The function's return value (JSON) or the program's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub result: Option<serde_json::Value>,
    /// The result on one short line, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// Why the job is where it is, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The ConfigMap (owned by the job) holding its whole output when the status shows only
    /// part of it: keys `result`, `stdout`, `stderr`, `exception`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_config_map: Option<String>,
    /// The latest value the job passed to `dispy_provisional_result` (the status reads
    /// `ProvisionalResult` while it runs on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub provisional_result: Option<serde_json::Value>,
    /// Files the job sent with `dispy_send_file`, in the order it sent them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent_files: Vec<SentFileStatus>,
    /// The ConfigMap (owned by the job) holding the files it sent, under `sentFiles[].savedAs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_config_map: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A file a job sent, and where it was kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SentFileStatus {
    /// Its path relative to the job's working directory (or its base name).
    pub name: String,
    pub size: u64,
    /// Where it is: with `dispy run` the path written; on Kubernetes its key in
    /// `filesConfigMap`. None when it was not kept (`message` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_as: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl DispyJobStatus {
    /// When the job ended (RFC 3339): `endTime`, else the time its Complete or Failed
    /// condition became True; None while it has not ended.
    pub fn ended_at(&self) -> Option<&str> {
        if !self.status.is_terminal() {
            return None;
        }
        self.end_time.as_deref().or_else(|| {
            self.conditions
                .iter()
                .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?
                .last_transition_time
                .as_deref()
        })
    }

    /// Of an ended job, what is still read once its status is stored: its status, node, pod,
    /// attempts and times (`endTime` as [`Self::ended_at`]). Its result, output, message,
    /// files and conditions stay in the API server only. Never written back: a status write
    /// of this would erase them.
    pub fn ended_summary(&self) -> DispyJobStatus {
        DispyJobStatus {
            status: self.status,
            node: self.node.clone(),
            pod: self.pod.clone(),
            attempts: self.attempts,
            start_time: self.start_time.clone(),
            end_time: self.ended_at().map(str::to_string),
            ..DispyJobStatus::default()
        }
    }

    /// Takes a running job's provisional result (JSON text) into the status.
    pub fn record_provisional(&mut self, text: &str) {
        if self.status.is_terminal() {
            return;
        }
        self.status = JobStatus::ProvisionalResult;
        self.provisional_result = Some(
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.into())),
        );
    }

    /// Records a sent file, replacing an earlier one of the same name.
    pub fn record_sent_file(&mut self, file: SentFileStatus) {
        match self.sent_files.iter_mut().find(|f| f.name == file.name) {
            Some(earlier) => *earlier = file,
            None => self.sent_files.push(file),
        }
    }

    /// Takes a node's terminal result into the status (whole: bounding is the caller's).
    pub fn record_result(&mut self, r: &crate::job::JobResult) {
        self.status = r.status;
        self.result = r.result.as_deref().map(|text| {
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.into()))
        });
        self.result_summary = self.result.as_ref().map(summary);
        self.stdout = (!r.stdout.is_empty()).then(|| r.stdout.clone());
        self.stderr = (!r.stderr.is_empty()).then(|| r.stderr.clone());
        self.exception = r.exception.clone();
        self.start_time = r.start_time.map(rfc3339).or(self.start_time.take());
        self.end_time = r.end_time.map(rfc3339);
    }
}

/// A result on one short line (strings without their quotes).
pub fn summary(v: &serde_json::Value) -> String {
    let text = match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() > 40 {
        one_line.chars().take(37).collect::<String>() + "..."
    } else {
        one_line
    }
}

/// Unix seconds of an RFC 3339 timestamp (as Kubernetes writes times).
pub fn parse_rfc3339(text: &str) -> Option<f64> {
    text.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_nanosecond() as f64 / 1e9)
}

/// Unix seconds as an RFC 3339 UTC timestamp, as Kubernetes writes times.
pub fn rfc3339(secs: f64) -> String {
    let nanos = (secs * 1e9) as i128;
    jiff::Timestamp::from_nanosecond(nanos)
        .map(|t| {
            t.round(jiff::Unit::Second)
                .map(|t| t.to_string())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// What the operator observes of a JobCluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobClusterStatus {
    /// Pending, Ready, Degraded, Suspended or Closing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// The port the node pods listen on (TCP and UDP): `spec.nodes.port`, or one the operator
    /// assigned so that no two JobClusters' host-network pods want the same port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    #[serde(default)]
    pub ready_nodes: u32,
    #[serde(default)]
    pub desired_nodes: u32,
    /// "ready/desired", for `kubectl get`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nodes: String,
    /// Cpus of the ready nodes.
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub busy_cpus: u32,
    /// Each node, up to a bounded number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_summary: Vec<NodeSummary>,
    #[serde(default)]
    pub jobs: JobCounts,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The shared scheduler, when `spec.scheduler` runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulerStatus {
    /// `host:port` for `SharedJobCluster(scheduler_host=...)`: the Service's DNS name and the
    /// clients' port.
    pub address: String,
    /// Its pod is ready.
    #[serde(default)]
    pub ready: bool,
    /// Nodes it is given (ready node pods and external nodes).
    #[serde(default)]
    pub nodes: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    pub name: String,
    /// `host:port` that clients (and Python dispy clients) use.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub cpus: u32,
    pub busy: u32,
    pub ready: bool,
}

/// Jobs of a cluster by status; `failed` counts Terminated, Cancelled and Abandoned.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobCounts {
    pub created: u32,
    pub running: u32,
    pub finished: u32,
    pub terminated: u32,
    pub cancelled: u32,
    pub abandoned: u32,
    pub failed: u32,
}

/// A Kubernetes-style condition.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn json_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"x-kubernetes-preserve-unknown-fields": true}
    })
}

fn json_lists(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "array", "items": {"x-kubernetes-preserve-unknown-fields": true}}
    })
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn any_value(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"x-kubernetes-preserve-unknown-fields": true})
}

/// A whole JobCluster document.
#[derive(Debug, Clone, PartialEq)]
pub struct JobCluster {
    pub metadata: Meta,
    pub spec: JobClusterSpec,
}

/// A whole DispyJob document.
#[derive(Debug, Clone, PartialEq)]
pub struct DispyJob {
    pub metadata: Meta,
    pub spec: DispyJobSpec,
}

/// A whole DispyJobArray document.
#[derive(Debug, Clone, PartialEq)]
pub struct DispyJobArray {
    pub metadata: Meta,
    pub spec: DispyJobArraySpec,
}

/// A ConfigMap: the source of `depends` files and of Python source.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigMap {
    pub metadata: Meta,
    pub data: BTreeMap<String, String>,
    pub binary_data: BTreeMap<String, Vec<u8>>,
}

// A run reads a handful of clusters beside many jobs; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    JobCluster(JobCluster),
    DispyJob(DispyJob),
    DispyJobArray(DispyJobArray),
    ConfigMap(ConfigMap),
}

/// What was wrong with a manifest: where (file, document, field) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestError {
    pub source: String,
    /// 1-based index of the document in its file.
    pub document: usize,
    /// `Kind/name` when known.
    pub object: Option<String>,
    /// Dotted path of the field, when the error is about one.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.source, self.document)?;
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Object<S> {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: Meta,
    spec: S,
    #[serde(default, rename = "status")]
    _status: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigMapDoc {
    metadata: Meta,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    binary_data: BTreeMap<String, String>,
}

/// Reads every document of a multi-document YAML text. `source` names the text in errors.
pub fn parse_documents(text: &str, source: &str) -> Result<Vec<Document>, ManifestError> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |object: Option<String>, field: Option<String>, message: String| ManifestError {
            source: source.to_string(),
            document: i + 1,
            object,
            field,
            message,
        };
        let value =
            serde_yaml::Value::deserialize(de).map_err(|e| err(None, None, e.to_string()))?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let header: Header = serde_yaml::from_value(value.clone())
            .map_err(|e| err(None, None, format!("not a Kubernetes object: {e}")))?;
        let kind = header
            .kind
            .ok_or_else(|| err(None, Some("kind".into()), "missing".into()))?;
        let api = header
            .api_version
            .ok_or_else(|| err(None, Some("apiVersion".into()), "missing".into()))?;
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(|n| format!("{kind}/{n}"));
        let doc = match (api.as_str(), kind.as_str()) {
            (API_VERSION, "JobCluster") => {
                let o: Object<JobClusterSpec> = from_value(value).map_err(|(f, m)| err(name.clone(), f, m))?;
                Document::JobCluster(JobCluster {
                    metadata: o.metadata,
                    spec: o.spec,
                })
            }
            (API_VERSION, "DispyJob") => {
                let o: Object<DispyJobSpec> = from_value(value).map_err(|(f, m)| err(name.clone(), f, m))?;
                Document::DispyJob(DispyJob {
                    metadata: o.metadata,
                    spec: o.spec,
                })
            }
            (API_VERSION, "DispyJobArray") => {
                let o: Object<DispyJobArraySpec> = from_value(value).map_err(|(f, m)| err(name.clone(), f, m))?;
                Document::DispyJobArray(DispyJobArray {
                    metadata: o.metadata,
                    spec: o.spec,
                })
            }
            ("v1", "ConfigMap") => {
                let o: ConfigMapDoc = from_value(value).map_err(|(f, m)| err(name.clone(), f, m))?;
                let mut binary_data = BTreeMap::new();
                for (k, v) in o.binary_data {
                    let bytes = base64_decode(&v).ok_or_else(|| {
                        err(name.clone(), Some(format!("binaryData.{k}")), "is not valid base64".into())
                    })?;
                    binary_data.insert(k, bytes);
                }
                Document::ConfigMap(ConfigMap {
                    metadata: o.metadata,
                    data: o.data,
                    binary_data,
                })
            }
            (_, "JobCluster" | "DispyJob" | "DispyJobArray") => {
                return Err(err(
                    name,
                    Some("apiVersion".into()),
                    format!("{api:?} is not supported; use {API_VERSION}"),
                ))
            }
            _ => {
                return Err(err(
                    name,
                    Some("kind".into()),
                    format!("{kind} ({api}) is not one of JobCluster, DispyJob, DispyJobArray ({API_VERSION}) or ConfigMap (v1)"),
                ))
            }
        };
        let object = name.clone();
        validate(&doc).map_err(|(f, m)| err(object, Some(f), m))?;
        docs.push(doc);
    }
    Ok(docs)
}

fn from_value<T: serde::de::DeserializeOwned>(
    v: serde_yaml::Value,
) -> Result<T, (Option<String>, String)> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        (field, e.into_inner().to_string())
    })
}

/// Rules the types alone do not say. Returns (field, message).
pub fn validate(doc: &Document) -> Result<(), (String, String)> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 253
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && n.starts_with(|c: char| c.is_ascii_alphanumeric())
            && n.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let meta = match doc {
        Document::JobCluster(c) => &c.metadata,
        Document::DispyJob(j) => &j.metadata,
        Document::DispyJobArray(a) => &a.metadata,
        Document::ConfigMap(m) => &m.metadata,
    };
    if !name_ok(&meta.name) {
        return Err((
            "metadata.name".into(),
            format!("{:?} is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit", meta.name),
        ));
    }
    match doc {
        Document::JobCluster(c) => {
            if let Some(comp) = &c.spec.computation {
                match (&comp.python, &comp.program) {
                    (Some(_), Some(_)) | (None, None) => {
                        return Err((
                            "spec.computation".into(),
                            "set exactly one of python or program".into(),
                        ))
                    }
                    (Some(py), None) => {
                        if py.source.is_some() == py.config_map_ref.is_some() {
                            return Err((
                                "spec.computation.python".into(),
                                "set exactly one of source or configMapRef".into(),
                            ));
                        }
                        if py.function.trim().is_empty() {
                            return Err((
                                "spec.computation.python.function".into(),
                                "must name a function".into(),
                            ));
                        }
                        if py
                            .setup
                            .as_ref()
                            .is_some_and(|s| s.function.trim().is_empty())
                        {
                            return Err((
                                "spec.computation.python.setup.function".into(),
                                "must name a function".into(),
                            ));
                        }
                    }
                    (None, Some(p)) => {
                        if p.command.is_empty() || p.command[0].is_empty() {
                            return Err((
                                "spec.computation.program.command".into(),
                                "must name a program, e.g. [\"/usr/bin/sha1sum\"]".into(),
                            ));
                        }
                    }
                }
            }
            if c.spec.nodes.replicas.is_some_and(|r| r > 1000) {
                return Err(("spec.nodes.replicas".into(), "must be at most 1000".into()));
            }
            if c.spec.nodes.cpus.is_some_and(|r| r > 4096) {
                return Err(("spec.nodes.cpus".into(), "must be at most 4096".into()));
            }
            if c.spec.pulse_interval == Some(0) {
                return Err((
                    "spec.pulseInterval".into(),
                    "must be at least 1 (seconds)".into(),
                ));
            }
        }
        Document::DispyJob(j) => {
            if j.spec.cluster.trim().is_empty() {
                return Err(("spec.cluster".into(), "must name a JobCluster".into()));
            }
            if j.spec.active_deadline_seconds == Some(0) {
                return Err((
                    "spec.activeDeadlineSeconds".into(),
                    "must be at least 1".into(),
                ));
            }
        }
        Document::DispyJobArray(a) => {
            if a.spec.cluster.trim().is_empty() {
                return Err(("spec.cluster".into(), "must name a JobCluster".into()));
            }
            if a.spec.args.is_some() == a.spec.args_from.is_some() {
                return Err(("spec".into(), "set exactly one of args or argsFrom".into()));
            }
            if a.spec.ttl_seconds_after_finished.is_some_and(|t| t < 0) {
                return Err((
                    "spec.ttlSecondsAfterFinished".into(),
                    "must be at least 0".into(),
                ));
            }
        }
        Document::ConfigMap(_) => {}
    }
    Ok(())
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: words}
data: {words.txt: "alpha beta gamma\n"}
binaryData: {blob.bin: "AAEC/w=="}
---
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: wordcount}
spec:
  computation:
    python:
      source: |
        def compute(word):
            return word
      function: compute
      setup: {function: setup, args: ["words.txt"]}
  depends:
    - configMapRef: {name: words}
  nodes: {replicas: 2, cpus: 2}
  reentrant: true
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: wordcount-beta}
spec: {cluster: wordcount, args: ["beta"], kwargs: {k: 1}}
---
"#;

    #[test]
    fn the_design_example_parses() {
        let docs = parse_documents(EXAMPLE, "example.yaml").unwrap();
        assert_eq!(docs.len(), 3);
        let Document::ConfigMap(cm) = &docs[0] else {
            panic!()
        };
        assert_eq!(cm.data["words.txt"], "alpha beta gamma\n");
        assert_eq!(cm.binary_data["blob.bin"], vec![0, 1, 2, 255]);
        let Document::JobCluster(c) = &docs[1] else {
            panic!()
        };
        let py = c
            .spec
            .computation
            .as_ref()
            .unwrap()
            .python
            .as_ref()
            .unwrap();
        assert_eq!(
            py.setup.as_ref().unwrap().args,
            vec![serde_json::json!("words.txt")]
        );
        assert_eq!(c.spec.nodes.replicas, Some(2));
        assert!(c.spec.reentrant);
        let Document::DispyJob(j) = &docs[2] else {
            panic!()
        };
        assert_eq!(j.spec.args, vec![serde_json::json!("beta")]);
        assert_eq!(j.spec.kwargs["k"], 1);
    }

    fn err(doc: &str) -> String {
        parse_documents(doc, "bad.yaml").unwrap_err().to_string()
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_document_and_field() {
        let e = err("apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: x}\nspec: {nodes: {cpu: 2}}\n");
        assert!(e.starts_with("bad.yaml: document 1 (JobCluster/x): field spec.nodes.cpu: unknown field `cpu`, expected one of"), "{e}");
        assert!(e.contains("`cpus`"), "{e}");
        let e = err("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: j}\nspec: {cluster: c, activeDeadlineSeconds: soon}\n");
        assert!(
            e.starts_with(
                "bad.yaml: document 2 (DispyJob/j): field spec.activeDeadlineSeconds: invalid type"
            ),
            "{e}"
        );
        let e = err("apiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: j}\nspec: {args: [1]}\n");
        assert!(e.contains("missing field `cluster`"), "{e}");
        let e = err("apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: x}\nspec: {computation: {python: {source: 'x', function: f}, program: {command: [ls]}}}\n");
        assert_eq!(e, "bad.yaml: document 1 (JobCluster/x): field spec.computation: set exactly one of python or program");
        let e =
            err("apiVersion: dispy.io/v1beta9\nkind: JobCluster\nmetadata: {name: x}\nspec: {}\n");
        assert!(
            e.contains("field apiVersion: \"dispy.io/v1beta9\" is not supported"),
            "{e}"
        );
        let e = err("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n");
        assert!(
            e.contains("field kind: Deployment (apps/v1) is not one of"),
            "{e}"
        );
        let e = err("apiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: Bad_Name}\nspec: {cluster: c}\n");
        assert!(
            e.contains("field metadata.name: \"Bad_Name\" is not a valid name"),
            "{e}"
        );
        let e = err("apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: x}\nspec: {computation: {program: {command: []}}}\n");
        assert!(
            e.contains("field spec.computation.program.command: must name a program"),
            "{e}"
        );
        let e = err("apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: x}\nspec: {nodes: {replicas: -1}}\n");
        assert!(
            e.contains("field spec.nodes.replicas: invalid value: integer `-1`"),
            "{e}"
        );
        let e = err("kind: JobCluster\n");
        assert!(e.contains("field apiVersion: missing"), "{e}");
        let e = err("apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: x}\nspec: [unclosed\n");
        assert!(e.starts_with("bad.yaml: document 1"), "{e}");
    }

    #[test]
    fn summaries_are_one_short_line() {
        assert_eq!(summary(&serde_json::json!("abc")), "abc");
        assert_eq!(summary(&serde_json::json!([1, "x"])), "[1,\"x\"]");
        assert_eq!(summary(&serde_json::json!("a\nb")), "a b");
        assert_eq!(
            summary(&serde_json::json!("x".repeat(50))),
            format!("{}...", "x".repeat(37))
        );
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000.4), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("!!").is_none());
    }
}
