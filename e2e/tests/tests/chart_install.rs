//! The dispy-operator chart installed, upgraded and uninstalled:
//! the operator runs as a pod under its service account with the chart's least-privilege
//! RBAC (as the API server's authorizer sees it), serves probes and metrics, holds and renews
//! its Lease, runs a JobCluster and the example the NOTES give; an upgrade to
//! `watchNamespaces` swaps the ClusterRole for a Role and leaves other namespaces alone;
//! uninstall removes all but the CRDs. The chart's render checks are in
//! operator/tests/chart.rs.
//!
//! Runs before the operator for the other tests is installed (two operators must not share a
//! JobCluster), with the dispy CRDs deleted first: the chart installs them.

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};

const RELEASE: &str = "dispy-operator";
const OP_NS: &str = "dispy-system";
const ACCOUNT: &str = "system:serviceaccount:dispy-system:dispy-operator";

/// What the API server's authorizer answers for the operator's service account. `resource`
/// is `plural[.group][/status | /name]`, as `kubectl auth can-i` takes it.
async fn can_i(client: &Client, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
    let groups = [
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{OP_NS}"),
        "system:authenticated".into(),
    ];
    user_can(client, ACCOUNT, &groups, verb, resource, namespace).await
}

/// The same for any user in `groups`.
async fn user_can(
    client: &Client,
    user: &str,
    groups: &[String],
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let (resource, after) = resource.split_once('/').unwrap_or((resource, ""));
    let (subresource, name) = match after {
        "" => (None, None),
        "status" => (Some("status".to_string()), None),
        name => (None, Some(name.to_string())),
    };
    let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
    let (resource, group) = (resource.to_string(), group.to_string());
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(groups.to_vec()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some(resource),
                group: Some(group),
                subresource,
                name,
                namespace: namespace.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    reviews
        .create(&PostParams::default(), &review)
        .await
        .expect("a SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

async fn assert_can(client: &Client, want: bool, verb: &str, resource: &str, ns: Option<&str>) {
    assert_eq!(
        can_i(client, verb, resource, ns).await,
        want,
        "can the operator {verb} {resource} in {ns:?}?"
    );
}

async fn wait_lease_held_by(client: &Client, pod: &str) {
    wait_for(
        &format!("the Lease held by {pod}"),
        60,
        async || match lease_holder(client).await {
            Some(h) if h.contains(pod) => Ok(()),
            other => Err(format!("holder {other:?}")),
        },
    )
    .await
}

/// The release, uninstalled (and its namespace deleted) when a failed test drops it.
struct Release {
    installed: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.installed {
            let _ = std::process::Command::new(&env().helm)
                .args([
                    "uninstall",
                    RELEASE,
                    "-n",
                    OP_NS,
                    "--wait",
                    "--timeout",
                    "60s",
                ])
                .status();
            let _ = kubectl_output(&["delete", "namespace", OP_NS, "--wait=false"]);
        }
    }
}

fn chart() -> String {
    repo_path("charts/dispy-operator")
        .to_string_lossy()
        .into_owned()
}

fn app_version() -> String {
    let chart: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_path("charts/dispy-operator/Chart.yaml")).unwrap(),
    )
    .unwrap();
    chart["appVersion"].as_str().unwrap().to_string()
}

#[tokio::test]
#[ignore = "needs the e2e cluster, without the chart's operator: run by e2e/test.sh"]
async fn the_chart_installs_a_least_privilege_operator_upgrades_to_watched_namespaces_and_uninstalls(
) {
    let client = client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    wait_for(
        &format!("namespace {OP_NS} of an earlier run gone"),
        90,
        async || match namespaces.get_opt(OP_NS).await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|n| n.map(|n| n.status)))),
        },
    )
    .await;
    // the chart installs the CRDs itself: start without them
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in ["jobclusters.dispy.io", "dispyjobs.dispy.io"] {
        delete_and_wait(&crds, crd, 60).await;
    }
    let ns = TestNamespace::create(&client, "chart").await;
    let unwatched = TestNamespace::create(&client, "chart-unwatched").await;
    let mut release = Release { installed: true };
    // the operator binds its pod IP: under the process kubelet pods share the host's network
    helm(&[
        "install",
        RELEASE,
        &chart(),
        "-n",
        OP_NS,
        "--create-namespace",
        "--set-string",
        "metrics.bindAddress=$(POD_IP)",
        "--set",
        "logLevel=info\\,dispy_operator=debug",
        "--set",
        "logFormat=text",
        "--wait",
        "--timeout",
        "120s",
    ]);
    let mut pids = Vec::new();
    with_operator_log(&client, async {
        installed_operator_checks(&client, &ns, &mut pids).await;
        watch_namespaces_checks(&client, &ns, &unwatched, &mut pids).await;
    })
    .await;

    helm(&[
        "uninstall",
        RELEASE,
        "-n",
        OP_NS,
        "--wait",
        "--timeout",
        "60s",
    ]);
    release.installed = false;
    for pid in pids {
        wait_process_gone(pid, 60).await;
    }
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    assert!(
        cluster_roles
            .get_opt("dispy-operator")
            .await
            .unwrap()
            .is_none(),
        "ClusterRole left"
    );
    for users in ["dispy-operator-edit", "dispy-operator-view"] {
        assert!(
            cluster_roles.get_opt(users).await.unwrap().is_none(),
            "ClusterRole {users} left"
        );
    }
    let op_roles: Api<Role> = Api::namespaced(client.clone(), OP_NS);
    assert!(
        op_roles
            .get_opt("dispy-operator-leader-election")
            .await
            .unwrap()
            .is_none(),
        "leader-election Role left"
    );
    let roles: Api<Role> = ns.api();
    assert!(
        roles.get_opt("dispy-operator").await.unwrap().is_none(),
        "Role in {} left",
        ns.name
    );
    // Helm keeps CRDs (and so every JobCluster and DispyJob) on uninstall
    for crd in ["jobclusters.dispy.io", "dispyjobs.dispy.io"] {
        crds.get(crd).await.expect("the CRDs stay after uninstall");
    }
    // the operator for the later tests goes into the same namespace: leave it fully gone
    delete_and_wait(&namespaces, OP_NS, 90).await;
    ns.delete().await;
    unwatched.delete().await;
}

async fn installed_operator_checks(client: &Client, ns: &TestNamespace, pids: &mut Vec<u32>) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), OP_NS);
    wait_for("the operator Deployment Available", 60, async || {
        let d = get_or_seen(&deployments, RELEASE).await?;
        let status = d.status.unwrap_or_default();
        let available = status.conditions.as_ref().is_some_and(|c| {
            c.iter().any(|c| {
                c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some("True")
            })
        });
        available.then_some(()).ok_or_else(|| format!("{status:?}"))
    })
    .await;
    wait_crds_established(client, &["jobclusters.dispy.io", "dispyjobs.dispy.io"]).await;
    let status = helm(&["status", RELEASE, "-n", OP_NS]);
    assert!(
        status.contains("kubectl apply -f docs/examples/checksums.yaml"),
        "the NOTES say what to apply next: {status}"
    );
    let pod = operator_pod(client).await;
    let pid = pod_pid(&pod).expect("the operator's pid");
    pids.push(pid);
    let cmdline = process_cmdline(pid);
    assert!(
        cmdline.contains("dispy-operator run ") && cmdline.contains("--leader-elect"),
        "the process is not the operator: {cmdline}"
    );
    assert_eq!(
        pod.spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref()),
        Some("dispy-operator"),
        "the pod's service account"
    );
    // its HTTP server: probes and Prometheus metrics on the pod's address
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    let addr = format!("{ip}:8080");
    for path in ["/healthz", "/readyz"] {
        let (code, _) = http_get(&addr, path).await.unwrap();
        assert_eq!(code, 200, "{path} on {addr}");
    }
    let (code, metrics) = http_get(&addr, "/metrics").await.unwrap();
    assert!(
        code == 200 && metrics.lines().any(|l| l.starts_with("# TYPE ")),
        "/metrics: {metrics}"
    );
    let services: Api<Service> = Api::namespaced(client.clone(), OP_NS);
    let svc = services
        .get("dispy-operator-metrics")
        .await
        .expect("the metrics Service");
    assert_eq!(
        svc.spec.and_then(|s| s.ports).unwrap_or_default()[0].port,
        8080
    );

    // leader election: the pod holds the operator's Lease in its own namespace, and renews it
    wait_lease_held_by(client, &pod.name_any()).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), OP_NS);
    let renew_time = async || {
        leases
            .get("dispy-operator")
            .await
            .map_err(|e| e.to_string())
            .map(|l| l.spec.and_then(|s| s.renew_time).map(|t| t.0))
    };
    let first = renew_time().await.unwrap();
    wait_for(
        "the operator's Lease renewed",
        40,
        async || match renew_time().await? {
            t if t.is_some() && t != first => Ok(()),
            t => Err(format!("renewTime {t:?}")),
        },
    )
    .await;

    // least privilege, as the API server's authorizer sees the operator's account
    let n = Some(ns.name.as_str());
    assert_can(client, true, "create", "pods", n).await;
    assert_can(client, true, "patch", "jobclusters.dispy.io/status", n).await;
    assert_can(
        client,
        true,
        "patch",
        "leases.coordination.k8s.io/dispy-operator",
        Some(OP_NS),
    )
    .await;
    assert_can(
        client,
        false,
        "patch",
        "leases.coordination.k8s.io/other",
        Some(OP_NS),
    )
    .await;
    assert_can(
        client,
        false,
        "update",
        "leases.coordination.k8s.io/dispy-operator",
        Some(OP_NS),
    )
    .await;
    assert_can(client, false, "create", "leases.coordination.k8s.io", n).await;
    assert_can(client, false, "list", "nodes", None).await;
    assert_can(client, false, "delete", "secrets", n).await;
    assert_can(client, false, "update", "pods", n).await;
    // spec.scheduler's Deployment is applied (create, patch) and removed, never read
    assert_can(client, true, "create", "deployments.apps", n).await;
    assert_can(client, false, "list", "deployments.apps", n).await;
    assert_can(client, false, "create", "jobclusters.dispy.io", n).await;
    // Secrets are read by name only
    assert_can(client, true, "get", "secrets", n).await;
    assert_can(client, false, "list", "secrets", n).await;
    assert_can(client, false, "watch", "secrets", n).await;
    assert_can(client, true, "delete", "dispyjobs.dispy.io", n).await;
    assert_can(client, false, "delete", "jobclusters.dispy.io", n).await;
    users_checks(client, ns).await;

    // and it is enough to run a JobCluster: node pods from the chart's node image
    ns.apply(
        "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: helm-pool}\n\
         spec:\n  nodes: {replicas: 1, cpus: 1, port: 9831}\n",
    )
    .await;
    wait_cluster(&ns.clusters(), "helm-pool", "1/1", "Ready", 90).await;
    let pods: Api<Pod> = ns.api();
    let by_cluster = ListParams::default().labels("dispy.io/cluster=helm-pool");
    let images: Vec<String> = pods
        .list(&by_cluster)
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.spec.as_ref()?.containers[0].image.clone())
        .collect();
    assert_eq!(
        images,
        [format!("dispy/node:{}", app_version())],
        "node pod image"
    );
    delete_and_wait(&ns.clusters(), "helm-pool", 60).await;
    wait_no_pods(&pods, &by_cluster).await;

    // the example the install's NOTES give runs as written
    let notes = helm(&["get", "notes", RELEASE, "-n", OP_NS]);
    let example = notes_example(&notes);
    assert!(
        example.contains("kind: DispyJob"),
        "no example in the NOTES: {notes}"
    );
    ns.apply(&example).await;
    let job = wait_job(&ns.jobs(), "squares-7", JobStatus::Finished, 90).await;
    let status = job.status.unwrap();
    assert_eq!(status.result, Some(serde_json::json!(49)));
    assert_eq!(
        condition(&status.conditions, "Complete").map(|c| c.status.as_str()),
        Some("True")
    );
    for obj in documents(&example) {
        match obj.types.as_ref().map(|t| t.kind.as_str()) {
            Some("JobCluster") => delete_and_wait(&ns.clusters(), &obj.name_any(), 60).await,
            _ => delete_and_wait(&ns.jobs(), &obj.name_any(), 60).await,
        }
    }
}

/// The chart's aggregated roles: a namespace's `admin` and `edit` users may create and delete
/// JobClusters and DispyJobs there, its `view` users may only read them; none may elsewhere.
async fn users_checks(client: &Client, ns: &TestNamespace) {
    for (user, role) in [
        ("e2e-admin", "admin"),
        ("e2e-editor", "edit"),
        ("e2e-viewer", "view"),
    ] {
        ns.apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n\
             metadata: {{name: {user}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n"
        ))
        .await;
    }
    let groups = ["system:authenticated".to_string()];
    let n = Some(ns.name.as_str());
    let can = async |user: &str, verb: &str, resource: &str, namespace: Option<&str>| {
        user_can(client, user, &groups, verb, resource, namespace).await
    };
    // the aggregation controller adds the chart's rules to the default roles shortly
    wait_for(
        "dispy's rules aggregated into admin, edit and view",
        60,
        async || {
            let now = [
                can("e2e-admin", "create", "jobclusters.dispy.io", n).await,
                can("e2e-editor", "create", "jobclusters.dispy.io", n).await,
                can("e2e-viewer", "list", "jobclusters.dispy.io", n).await,
            ];
            (now == [true; 3])
                .then_some(())
                .ok_or(format!("admin, edit, view: {now:?}"))
        },
    )
    .await;
    // "user verb resource", where (None: all namespaces at once), allowed
    for (asked, namespace, want) in [
        ("e2e-editor delete dispyjobs.dispy.io", n, true),
        ("e2e-editor patch jobclusters.dispy.io/scale", n, true),
        ("e2e-admin deletecollection dispyjobs.dispy.io", n, true),
        ("e2e-viewer get dispyjobs.dispy.io/status", n, true),
        ("e2e-viewer watch dispyjobs.dispy.io", n, true),
        ("e2e-viewer create jobclusters.dispy.io", n, false),
        ("e2e-viewer create dispyjobs.dispy.io", n, false),
        ("e2e-viewer patch jobclusters.dispy.io/scale", n, false),
        ("e2e-editor create jobclusters.dispy.io", None, false),
        ("e2e-editor patch dispyjobs.dispy.io/status", n, false),
    ] {
        let [user, verb, resource] = asked.split(' ').collect::<Vec<_>>()[..] else {
            unreachable!("{asked}")
        };
        assert_eq!(
            can(user, verb, resource, namespace).await,
            want,
            "can {user} {verb} {resource} in {namespace:?}?"
        );
    }
    // kubectl's own answer, as a user would ask it
    for (user, answer) in [("e2e-viewer", "no"), ("e2e-editor", "yes")] {
        let asked = [
            "auth",
            "can-i",
            "create",
            "jobclusters.dispy.io",
            "--as",
            user,
        ];
        let out = kubectl_output(&[&asked[..], &["-n", &ns.name]].concat());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            answer,
            "kubectl auth can-i create jobclusters --as {user}"
        );
    }
}

/// The YAML between `kubectl apply -f - <<'YAML'` and `YAML` in the NOTES, dedented.
fn notes_example(notes: &str) -> String {
    notes
        .lines()
        .skip_while(|l| !l.contains("kubectl apply -f - <<'YAML'"))
        .skip(1)
        .take_while(|l| l.trim() != "YAML")
        .map(|l| l.strip_prefix("  ").unwrap_or(l).to_string() + "\n")
        .collect()
}

async fn wait_no_pods(pods: &Api<Pod>, selector: &ListParams) {
    wait_for("the cluster's pods garbage-collected", 60, async || {
        let left = pods.list(selector).await.map_err(|e| e.to_string())?.items;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{:?}",
                left.iter().map(|p| p.name_any()).collect::<Vec<_>>()
            ))
        }
    })
    .await
}

/// watchNamespaces: an upgrade swaps the ClusterRole for a Role in the watched namespace; the
/// restarted operator still runs JobClusters there and leaves other namespaces alone.
async fn watch_namespaces_checks(
    client: &Client,
    ns: &TestNamespace,
    unwatched: &TestNamespace,
    pids: &mut Vec<u32>,
) {
    let old_pod = operator_pod(client).await.name_any();
    helm(&[
        "upgrade",
        RELEASE,
        &chart(),
        "-n",
        OP_NS,
        "--reuse-values",
        "--set",
        &format!("watchNamespaces={{{}}}", ns.name),
        "--wait",
        "--timeout",
        "120s",
    ]);
    kubectl(&[
        "-n",
        OP_NS,
        "rollout",
        "status",
        "deployment/dispy-operator",
        "--timeout=90s",
    ]);
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    assert!(
        cluster_roles
            .get_opt("dispy-operator")
            .await
            .unwrap()
            .is_none(),
        "ClusterRole still there with watchNamespaces"
    );
    let roles: Api<Role> = ns.api();
    roles
        .get("dispy-operator")
        .await
        .expect("a Role in the watched namespace");
    assert_can(client, true, "create", "pods", Some(&ns.name)).await;
    assert_can(client, false, "create", "pods", Some(&unwatched.name)).await;
    assert_can(client, false, "list", "jobclusters.dispy.io", None).await;
    let pod = wait_for("the upgraded operator's pod Ready", 90, async || {
        let pods = list_operator_pods(client).await;
        pods.iter()
            .find(|p| {
                pod_ready(p) && p.name_any() != old_pod && p.metadata.deletion_timestamp.is_none()
            })
            .cloned()
            .ok_or_else(|| {
                format!(
                    "{:?}",
                    pods.iter().map(|p| p.name_any()).collect::<Vec<_>>()
                )
            })
    })
    .await;
    let pid = pod_pid(&pod).expect("the new operator's pid");
    pids.push(pid);
    let cmdline = process_cmdline(pid);
    assert!(
        cmdline.contains(&format!("--namespaces={}", ns.name)),
        "the operator does not run with --namespaces={}: {cmdline}",
        ns.name
    );
    wait_lease_held_by(client, &pod.name_any()).await;
    unwatched
        .apply(
            "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: helm-unwatched}\n\
             spec:\n  nodes: {replicas: 1, cpus: 1, port: 9832}\n",
        )
        .await;
    ns.apply(
        "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: helm-pool}\n\
         spec:\n  nodes: {replicas: 1, cpus: 1, port: 9833}\n",
    )
    .await;
    wait_cluster(&ns.clusters(), "helm-pool", "1/1", "Ready", 90).await;
    let outside = unwatched.clusters().get("helm-unwatched").await.unwrap();
    assert!(
        outside.status.is_none(),
        "a JobCluster outside watchNamespaces got a status"
    );
    let unwatched_pods: Api<Pod> = unwatched.api();
    let outside_pods = unwatched_pods
        .list(&ListParams::default().labels("dispy.io/cluster=helm-unwatched"))
        .await
        .unwrap();
    assert!(
        outside_pods.items.is_empty(),
        "a JobCluster outside watchNamespaces got pods"
    );
    delete_and_wait(&unwatched.clusters(), "helm-unwatched", 30).await;
    delete_and_wait(&ns.clusters(), "helm-pool", 60).await;
    let pods: Api<Pod> = ns.api();
    wait_no_pods(
        &pods,
        &ListParams::default().labels("dispy.io/cluster=helm-pool"),
    )
    .await;
}
