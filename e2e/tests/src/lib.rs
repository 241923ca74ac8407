//! Fixtures of the end-to-end product tests: a client from `$KUBECONFIG`, a fresh namespace
//! per test, manifests applied from YAML, waits with a deadline that say what they last saw,
//! and the processes behind the process kubelet's pods.
//!
//! The tests run against a cluster that `e2e/test.sh` has brought up (and, for the operator's
//! tests, with the operator the chart installs). Every test is `#[ignore]`d so that
//! `cargo test --workspace` passes them over; `e2e/test.sh` runs them with `--ignored` and
//! these variables:
//! - `KUBECONFIG`: the cluster;
//! - `KUBECTL`, `HELM`: the binaries (default: from PATH);
//! - `E2E_STATE_DIR`: a directory the tests may write to (files jobs leave behind);
//! - `E2E_OPERATOR_NAMESPACE`: where the chart's operator runs (default `dispy-system`);
//! - `E2E_LOCAL`: `1` when pods are local processes of the process kubelet (the default);
//!   `0` against a real cluster, where tests that read processes are skipped.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use dispy_core::job::JobStatus;
use dispy_core::manifest::{Condition, DispyJobResource, JobClusterResource};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{pinned_kind, Scope};
use kube::{Client, Resource, ResourceExt};

pub use dispy_core;
pub use k8s_openapi;
pub use kube;

/// The field manager of everything the tests apply.
pub const MANAGER: &str = "dispy-e2e";

/// Where the tests run, from the environment `e2e/test.sh` sets.
pub struct Env {
    pub repo: PathBuf,
    pub state_dir: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    pub operator_namespace: String,
    /// Pods are processes on this machine (the process kubelet).
    pub local: bool,
}

pub fn env() -> &'static Env {
    static ENV: std::sync::OnceLock<Env> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let repo = repo.canonicalize().unwrap_or(repo);
        let state_dir = var("E2E_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("dispy-e2e"));
        std::fs::create_dir_all(&state_dir).expect("create E2E_STATE_DIR");
        Env {
            repo,
            state_dir,
            kubectl: var("KUBECTL").unwrap_or_else(|| "kubectl".into()).into(),
            helm: var("HELM").unwrap_or_else(|| "helm".into()).into(),
            operator_namespace: var("E2E_OPERATOR_NAMESPACE")
                .unwrap_or_else(|| "dispy-system".into()),
            local: var("E2E_LOCAL").is_none_or(|v| v == "1"),
        }
    })
}

/// A file of the repository, e.g. `docs/examples/checksums.yaml`.
pub fn repo_path(path: &str) -> PathBuf {
    env().repo.join(path)
}

/// A fresh directory under the state dir for files a test's jobs write.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = env().state_dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

pub async fn client() -> Client {
    Client::try_default()
        .await
        .expect("a client from $KUBECONFIG (run the e2e tests through e2e/test.sh)")
}

/// Polls `check` every half second until it gives `Ok`; on the deadline panics with what it
/// last saw (`check`'s `Err`).
pub async fn wait_for<T>(
    what: &str,
    timeout_secs: u64,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("timed out after {timeout_secs}s waiting for {what}; last saw: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// An object's state in a sentence for `wait_for`, or why it could not be read.
pub async fn get_or_seen<K>(api: &Api<K>, name: &str) -> Result<K, String>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get(name).await.map_err(|e| format!("get {name}: {e}"))
}

/// A namespace of its own for one test, labelled `dispy.io/e2e=true` so that the harness can
/// remove every one left behind. Call `delete` at the end; a failed test's namespace is
/// deleted without waiting when the value drops.
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
    deleted: bool,
}

impl TestNamespace {
    /// `e2e-<prefix>`: the test's name, short, unique in one run.
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let name = format!("e2e-{prefix}");
        let api: Api<Namespace> = Api::all(client.clone());
        // a namespace of an earlier, interrupted run goes first
        if api.get_opt(&name).await.expect("read namespace").is_some() {
            let _ = api.delete(&name, &DeleteParams::default()).await;
            wait_for(
                &format!("namespace {name} of an earlier run gone"),
                120,
                async || match api.get_opt(&name).await {
                    Ok(None) => Ok(()),
                    other => Err(format!("{other:?}")),
                },
            )
            .await;
        }
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"dispy.io/e2e": "true"}}
        }))
        .unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        // pods need the namespace's default service account
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &name);
        wait_for("service account default", 60, async || {
            accounts
                .get_opt("default")
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "not yet".to_string())
        })
        .await;
        TestNamespace {
            client: client.clone(),
            name,
            deleted: false,
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub fn jobs(&self) -> Api<DispyJobResource> {
        self.api()
    }

    pub fn clusters(&self) -> Api<JobClusterResource> {
        self.api()
    }

    /// Server-side applies every document of `yaml` in this namespace.
    pub async fn apply(&self, yaml: &str) {
        apply(&self.client, Some(&self.name), yaml).await
    }

    pub async fn apply_file(&self, path: &str) {
        let yaml =
            std::fs::read_to_string(repo_path(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        self.apply(&yaml).await
    }

    /// Deletes every document of the file and waits until each is gone.
    pub async fn delete_file(&self, path: &str) {
        let yaml =
            std::fs::read_to_string(repo_path(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        for obj in documents(&yaml) {
            let (api, _) = dynamic_api(&self.client, Some(&self.name), &obj).await;
            delete_and_wait(&api, &obj.name_any(), 60).await;
        }
    }

    /// `kubectl -n <ns> ARGS`, which must succeed; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        kubectl(&all)
    }

    /// Deletes the namespace and waits until it is gone (DispyJobs' finalizers need the
    /// operator: delete before it goes).
    pub async fn delete(mut self) {
        self.deleted = true;
        let api: Api<Namespace> = Api::all(self.client.clone());
        delete_and_wait(&api, &self.name, 120).await;
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = kubectl_output(&["delete", "namespace", &self.name, "--wait=false"]);
        }
    }
}

/// Applies dispy's CRDs (`crds/dispy.io.yaml`) and waits until they are Established.
pub async fn install_crds(client: &Client) {
    let yaml = std::fs::read_to_string(repo_path("crds/dispy.io.yaml")).unwrap();
    apply(client, None, &yaml).await;
    let names = [
        "jobclusters.dispy.io",
        "dispyjobs.dispy.io",
        "dispyjobarrays.dispy.io",
    ];
    wait_crds_established(client, &names).await;
}

/// Waits until each CRD (`dispyjobs.dispy.io`, ...) is Established.
pub async fn wait_crds_established(client: &Client, names: &[&str]) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in names {
        wait_for(&format!("CRD {name} Established"), 60, async || {
            let crd = get_or_seen(&crds, name).await?;
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
                .ok_or_else(|| format!("{conditions:?}"))
        })
        .await;
    }
}

/// Deletes an object (gone already is fine) and waits until the API server no longer has it.
pub async fn delete_and_wait<K>(api: &Api<K>, name: &str, timeout_secs: u64)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return,
        Err(e) => panic!("delete {name}: {e}"),
    }
    wait_for(
        &format!("{name} deleted"),
        timeout_secs,
        async || match api.get_opt(name).await {
            Ok(None) => Ok(()),
            Ok(Some(o)) => Err(format!("still there: {o:?}")),
            Err(e) => Err(e.to_string()),
        },
    )
    .await
}

/// The documents of a multi-document YAML string.
pub fn documents(yaml: &str) -> Vec<DynamicObject> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|doc| {
            let v = serde_yaml::Value::deserialize(doc).expect("YAML document");
            (!v.is_null()).then(|| serde_yaml::from_value(v).expect("a Kubernetes object"))
        })
        .collect()
}

async fn dynamic_api(
    client: &Client,
    namespace: Option<&str>,
    obj: &DynamicObject,
) -> (Api<DynamicObject>, kube::core::ApiResource) {
    let types = obj.types.as_ref().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(types).expect("apiVersion");
    let (resource, caps) = pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("the API server does not serve {gvk:?}: {e}"));
    let api = match (caps.scope, obj.namespace().as_deref().or(namespace)) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    (api, resource)
}

/// Server-side applies every document of `yaml` (namespaced ones in `namespace` unless they
/// name their own).
pub async fn apply(client: &Client, namespace: Option<&str>, yaml: &str) {
    for obj in documents(yaml) {
        try_apply_object(client, namespace, &obj)
            .await
            .unwrap_or_else(|e| panic!("apply {}: {e}", obj.name_any()));
    }
}

/// Server-side applies one object; the API server's answer when it refuses it.
pub async fn try_apply(
    client: &Client,
    namespace: Option<&str>,
    yaml: &str,
) -> Result<DynamicObject, kube::Error> {
    let mut docs = documents(yaml);
    assert_eq!(docs.len(), 1, "try_apply takes one document");
    try_apply_object(client, namespace, &docs.remove(0)).await
}

async fn try_apply_object(
    client: &Client,
    namespace: Option<&str>,
    obj: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    let (api, _) = dynamic_api(client, namespace, obj).await;
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

/// The API server's message when it refused a request (panics when it did not refuse).
pub fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) -> String {
    match result {
        Ok(v) => panic!("{what} was accepted: {v:?}"),
        Err(kube::Error::Api(e)) => e.message,
        Err(e) => panic!("{what}: not an API error: {e}"),
    }
}

pub fn kubectl_output(args: &[&str]) -> Output {
    Command::new(&env().kubectl)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", env().kubectl.display()))
}

/// `kubectl ARGS`, which must succeed; its stdout.
pub fn kubectl(args: &[&str]) -> String {
    run_ok(&env().kubectl, args)
}

/// `helm ARGS`, which must succeed; its stdout.
pub fn helm(args: &[&str]) -> String {
    run_ok(&env().helm, args)
}

fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {} failed ({}): {}{}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The columns of one row of `kubectl get` output (split on runs of spaces).
pub fn columns(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// `kubectl get` output as header and rows, each split into columns.
pub fn table(output: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = output
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>());
    let header = lines.next().unwrap_or_default();
    (header, lines.collect())
}

// --- DispyJobs and JobClusters --------------------------------------------------------------

pub fn job_status(job: &DispyJobResource) -> JobStatus {
    job.status.as_ref().map(|s| s.status).unwrap_or_default()
}

pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// A job's status in a sentence, for what a wait last saw.
pub fn describe_job(job: &DispyJobResource) -> String {
    match &job.status {
        None => format!("{}: no status", job.name_any()),
        Some(s) => format!(
            "{}: {:?} (node {:?}, attempts {}, message {:?}, conditions {:?})",
            job.name_any(),
            s.status,
            s.node,
            s.attempts,
            s.message,
            s.conditions
        ),
    }
}

/// Waits until the job's status is `want`; the job as it then was.
pub async fn wait_job(
    jobs: &Api<DispyJobResource>,
    name: &str,
    want: JobStatus,
    timeout_secs: u64,
) -> DispyJobResource {
    wait_for(
        &format!("DispyJob {name} {want:?}"),
        timeout_secs,
        async || {
            let job = get_or_seen(jobs, name).await?;
            if job_status(&job) == want {
                Ok(job)
            } else {
                Err(describe_job(&job))
            }
        },
    )
    .await
}

/// Waits until the job has a `Waiting` condition with this reason; the job as it then was.
pub async fn wait_waiting(
    jobs: &Api<DispyJobResource>,
    name: &str,
    reason: &str,
    timeout_secs: u64,
) -> DispyJobResource {
    wait_for(
        &format!("DispyJob {name} Waiting: {reason}"),
        timeout_secs,
        async || {
            let job = get_or_seen(jobs, name).await?;
            let conditions = job
                .status
                .as_ref()
                .map(|s| &s.conditions[..])
                .unwrap_or(&[]);
            match condition(conditions, "Waiting") {
                Some(c) if c.reason == reason => Ok(job),
                _ => Err(describe_job(&job)),
            }
        },
    )
    .await
}

/// Waits until every job with the label selector is terminal; those jobs.
pub async fn wait_jobs_terminal(
    jobs: &Api<DispyJobResource>,
    selector: &str,
    timeout_secs: u64,
) -> Vec<DispyJobResource> {
    wait_for(
        &format!("every job {selector} terminal"),
        timeout_secs,
        async || {
            let list = jobs
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| e.to_string())?;
            let open: Vec<String> = list
                .items
                .iter()
                .filter(|j| !job_status(j).is_terminal())
                .map(describe_job)
                .collect();
            if !list.items.is_empty() && open.is_empty() {
                Ok(list.items)
            } else {
                Err(format!("{} jobs, not terminal: {open:?}", list.items.len()))
            }
        },
    )
    .await
}

/// Waits until the JobCluster's status shows `nodes` (ready/desired) and `phase`.
pub async fn wait_cluster(
    clusters: &Api<JobClusterResource>,
    name: &str,
    nodes: &str,
    phase: &str,
    timeout_secs: u64,
) -> JobClusterResource {
    wait_for(
        &format!("JobCluster {name} {nodes} {phase}"),
        timeout_secs,
        async || {
            let jc = get_or_seen(clusters, name).await?;
            match &jc.status {
                Some(s) if s.nodes == nodes && s.phase == phase => Ok(jc),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// The Events recorded on an object with the given reason.
pub async fn events(client: &Client, namespace: &str, object: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    api.list(
        &ListParams::default().fields(&format!("involvedObject.name={object},reason={reason}")),
    )
    .await
    .expect("list events")
    .items
}

/// Waits until an Event with that reason is recorded on the object.
pub async fn wait_event(client: &Client, namespace: &str, object: &str, reason: &str) {
    wait_for(&format!("a {reason} Event on {object}"), 30, async || {
        let found = events(client, namespace, object, reason).await;
        if found.is_empty() {
            Err("none".into())
        } else {
            Ok(())
        }
    })
    .await
}

// --- pods as processes ---------------------------------------------------------------------

/// The PID behind a pod's first container (the process kubelet's `process://<pid>`).
pub fn pod_pid(pod: &Pod) -> Option<u32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .container_id
        .as_deref()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

pub fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A process's command line, arguments joined by spaces.
pub fn process_cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

pub async fn wait_process_gone(pid: u32, timeout_secs: u64) {
    wait_for(&format!("process {pid} gone"), timeout_secs, async || {
        if process_alive(pid) {
            Err(process_cmdline(pid))
        } else {
            Ok(())
        }
    })
    .await
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

// --- the chart's operator ------------------------------------------------------------------

pub fn operator_pods(client: &Client) -> Api<Pod> {
    Api::namespaced(client.clone(), &env().operator_namespace)
}

/// The chart's operator pods.
pub async fn list_operator_pods(client: &Client) -> Vec<Pod> {
    operator_pods(client)
        .list(&ListParams::default().labels("app.kubernetes.io/name=dispy-operator"))
        .await
        .expect("list operator pods")
        .items
}

/// The Ready operator pod (with one replica, the operator).
pub async fn operator_pod(client: &Client) -> Pod {
    wait_for("an operator pod Ready", 60, async || {
        let pods = list_operator_pods(client).await;
        pods.iter()
            .find(|p| pod_ready(p))
            .cloned()
            .ok_or_else(|| format!("{:?}", pods.iter().map(|p| &p.status).collect::<Vec<_>>()))
    })
    .await
}

/// The holder of the operator's Lease.
pub async fn lease_holder(client: &Client) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &env().operator_namespace);
    leases
        .get_opt("dispy-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// The last lines of the operator's log, for a failure's context.
pub async fn operator_log_tail(client: &Client, lines: i64) -> String {
    let pod = match list_operator_pods(client).await.into_iter().next() {
        Some(p) => p,
        None => return "no operator pod".into(),
    };
    operator_pods(client)
        .logs(
            &pod.name_any(),
            &kube::api::LogParams {
                tail_lines: Some(lines),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| format!("logs: {e}"))
}

/// Runs `fut`; when it panics, prints the operator's log tail before passing the panic on.
pub async fn with_operator_log<T>(client: &Client, fut: impl Future<Output = T>) -> T {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        Ok(v) => v,
        Err(panic) => {
            eprintln!("--- operator log\n{}", operator_log_tail(client, 40).await);
            std::panic::resume_unwind(panic)
        }
    }
}

/// An HTTP GET on plain HTTP/1.0 (loopback only): status line and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect {addr}: timeout"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "read: timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {head}"))?;
    Ok((code, body.to_string()))
}
