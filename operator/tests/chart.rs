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

// --- render checks with helm --------------------------------------------------------------
// These run helm (`lint`, `template`, `package`) on the chart; helm comes from the e2e build
// (`e2e/controlplane/build.sh`), so `e2e/test.sh` runs them with `--ignored` and `HELM` set.

use serde_json::{json, Value};
use std::process::Command;

fn helm_binary() -> std::path::PathBuf {
    if let Some(h) = std::env::var_os("HELM").filter(|h| !h.is_empty()) {
        return h.into();
    }
    let build = std::env::var_os("E2E_BUILD_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/.build"));
    let built = build.join("bin/helm");
    if built.exists() {
        built
    } else {
        "helm".into()
    }
}

fn chart_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/dispy-operator")
        .to_string_lossy()
        .into_owned()
}

/// `helm ARGS`: its exit status, stdout and stderr.
fn helm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm_binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e} (set HELM)", helm_binary().display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn helm_ok(args: &[&str]) -> String {
    let (ok, out, err) = helm(args);
    assert!(ok, "helm {} failed: {out}{err}", args.join(" "));
    out
}

/// `helm template` of the chart (release dispy-operator in dispy-system) as JSON objects.
fn render(set: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let mut args = vec!["template", "dispy-operator", &chart, "-n", "dispy-system"];
    args.extend_from_slice(set);
    documents(&helm_ok(&args))
}

/// The documents of helm's output (separated by `---` lines), as JSON.
fn documents(yaml: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().unwrap();
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("JSON"))
        .collect()
}

fn kinds(objects: &[Value]) -> Vec<&str> {
    let mut k: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    k.sort();
    k
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str, namespace: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && o["metadata"]["namespace"].as_str().unwrap_or("") == namespace
        })
        .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} rendered"))
}

/// An RBAC object's rules as `groups|resources|names|verbs` lines.
fn rules(role: &Value) -> Vec<String> {
    let join = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            format!(
                "{}|{}|{}|{}",
                join(&r["apiGroups"]),
                join(&r["resources"]),
                join(&r["resourceNames"]),
                join(&r["verbs"])
            )
        })
        .collect()
}

/// What the operator needs where it watches, and not one verb more (the e2e test
/// `e2e/tests/tests/rbac.rs` checks each against the API server's audit log).
const LEAST_PRIVILEGE: [&str; 12] = [
    "dispy.io|jobclusters,dispyjobs||list,watch,patch",
    "dispy.io|dispyjobs||delete",
    "dispy.io|jobclusters/status,dispyjobs/status||patch",
    "dispy.io|jobclusters/finalizers,dispyjobs/finalizers||update",
    "dispy.io|dispyjobarrays||list,watch,patch,delete",
    "dispy.io|dispyjobarrays/status||patch",
    "|pods||list,watch,create,delete",
    "|services||create,patch,delete",
    "apps|deployments||create,patch,delete",
    "|secrets||get,create",
    "|configmaps||get,list,create,patch,delete",
    "events.k8s.io|events||create,patch",
];
const LEADER_ELECTION: [&str; 2] = [
    "coordination.k8s.io|leases||create",
    "coordination.k8s.io|leases|dispy-operator|get,patch",
];

fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no env {name} in {container}"))
}

fn args_line(deployment: &Value) -> String {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
#[ignore = "needs helm"]
fn chart_passes_helm_lint_strict_and_packages_its_crds() {
    let chart = chart_dir();
    helm_ok(&["lint", "--strict", &chart]);
    helm_ok(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "watchNamespaces={team-a,team-b}",
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "serviceMonitor.enabled=true",
    ]);
    let with_crds = helm_ok(&["template", "x", &chart, "--include-crds"]);
    let crds = documents(&with_crds)
        .into_iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .count();
    assert_eq!(crds, 3, "--include-crds renders the 3 CRDs");
    // the packaged chart carries the CRDs themselves
    let dir = std::env::temp_dir().join(format!("dispy-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    helm_ok(&["package", &chart, "-d", &dir.to_string_lossy()]);
    let tgz = dir.join(format!("dispy-operator-{}.tgz", env!("CARGO_PKG_VERSION")));
    let out = Command::new("tar")
        .arg("-xzOf")
        .arg(&tgz)
        .arg("dispy-operator/crds/dispy.io.yaml")
        .output()
        .expect("tar");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == repo_file("crds/dispy.io.yaml").as_bytes(),
        "the packaged chart's CRDs differ from crds/"
    );
}

#[test]
#[ignore = "needs helm"]
fn chart_defaults_render_least_privilege_rbac_and_a_hardened_deployment() {
    let app = env!("CARGO_PKG_VERSION");
    let out = render(&[]);
    assert_eq!(
        kinds(&out),
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    assert_eq!(
        rules(find(&out, "ClusterRole", "dispy-operator", "")),
        LEAST_PRIVILEGE
    );
    assert_eq!(
        rules(find(
            &out,
            "Role",
            "dispy-operator-leader-election",
            "dispy-system"
        )),
        LEADER_ELECTION
    );
    let binding = find(&out, "ClusterRoleBinding", "dispy-operator", "");
    assert_eq!(binding["roleRef"]["name"], "dispy-operator");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "dispy-operator", "namespace": "dispy-system"}])
    );
    let dep = find(&out, "Deployment", "dispy-operator", "dispy-system");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(pod["serviceAccountName"], "dispy-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(c["image"], format!("dispy/operator:{app}"));
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{sc}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{sc}");
    for r in ["/requests/cpu", "/requests/memory", "/limits/memory"] {
        assert!(
            c["resources"].pointer(r).is_some(),
            "resources{r} missing: {}",
            c["resources"]
        );
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(
        env_value(c, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(env_value(c, "RUST_LOG")["value"], "info");
    assert_eq!(
        args_line(dep),
        format!(
            "run --node-image=dispy/node:{app} --metrics-addr=0.0.0.0:8080 --log-format=json \
             --leader-elect --lease-name=dispy-operator"
        )
    );
    let svc = find(&out, "Service", "dispy-operator-metrics", "dispy-system");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app.kubernetes.io/name": "dispy-operator", "app.kubernetes.io/instance": "dispy-operator"})
    );
}

#[test]
#[ignore = "needs helm"]
fn chart_with_watch_namespaces_renders_a_role_per_namespace_and_nothing_cluster_wide() {
    let app = env!("CARGO_PKG_VERSION");
    let out = render(&[
        "--set",
        "watchNamespaces={team-a,team-b}",
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "logFormat=text",
        "--set",
        "logLevel=dispy_operator=debug",
    ]);
    // the only cluster-wide objects are the users' aggregated roles; the operator's account
    // is bound to nothing cluster-wide
    assert_eq!(
        kinds(&out),
        [
            "ClusterRole",
            "ClusterRole",
            "Deployment",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    for ns in ["team-a", "team-b"] {
        assert_eq!(
            rules(find(&out, "Role", "dispy-operator", ns)),
            LEAST_PRIVILEGE,
            "Role in {ns}"
        );
        let binding = find(&out, "RoleBinding", "dispy-operator", ns);
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dispy-operator"})
        );
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "dispy-operator", "namespace": "dispy-system"}])
        );
    }
    let dep = find(&out, "Deployment", "dispy-operator", "dispy-system");
    assert_eq!(
        args_line(dep),
        format!(
            "run --node-image=dispy/node:{app} --metrics-addr=0.0.0.0:8080 --log-format=text \
             --namespaces=team-a,team-b"
        )
    );
    // without leader election two pods must never overlap
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(
        env_value(
            &dep["spec"]["template"]["spec"]["containers"][0],
            "RUST_LOG"
        )["value"],
        "dispy_operator=debug"
    );
}

#[test]
#[ignore = "needs helm"]
fn chart_names_follow_the_release() {
    let chart = chart_dir();
    for (release, name) in [("dispy", "dispy-operator"), ("x", "x-dispy-operator")] {
        let out = documents(&helm_ok(&[
            "template",
            release,
            &chart,
            "--show-only",
            "templates/deployment.yaml",
        ]));
        assert_eq!(out[0]["metadata"]["name"], name, "release {release}");
    }
}

#[test]
#[ignore = "needs helm"]
fn chart_renders_the_job_finalizer_policy_where_the_cluster_serves_it() {
    let map = [
        "--api-versions",
        "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy",
    ];
    let mut set = map.to_vec();
    set.extend(["--set", "watchNamespaces={team-a,team-b}"]);
    let out = render(&set);
    let policies: Vec<&Value> = out
        .iter()
        .filter(|o| o["kind"] == "MutatingAdmissionPolicy")
        .collect();
    assert_eq!(policies.len(), 1);
    let spec = &policies[0]["spec"];
    assert_eq!(
        spec["matchConstraints"]["resourceRules"][0]["resources"],
        json!(["dispyjobs"])
    );
    assert_eq!(spec["failurePolicy"], "Ignore");
    assert!(spec["mutations"][0]["applyConfiguration"]["expression"]
        .as_str()
        .is_some_and(|e| e.contains("dispy.io/terminate")));
    let binding = out
        .iter()
        .find(|o| o["kind"] == "MutatingAdmissionPolicyBinding")
        .expect("a MutatingAdmissionPolicyBinding");
    assert_eq!(
        binding["spec"]["policyName"],
        "dispy-operator-job-finalizer"
    );
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"],
        json!([{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]),
        "the binding selects the watched namespaces"
    );
    let out = render(&map);
    let binding = out
        .iter()
        .find(|o| o["kind"] == "MutatingAdmissionPolicyBinding")
        .expect("a MutatingAdmissionPolicyBinding");
    assert!(
        binding["spec"]["matchResources"].is_null(),
        "all namespaces: {binding}"
    );
    let mut off = map.to_vec();
    off.extend(["--set", "jobFinalizerPolicy=false"]);
    assert!(
        !render(&off)
            .iter()
            .any(|o| o["kind"] == "MutatingAdmissionPolicy"),
        "jobFinalizerPolicy=false still renders the policy"
    );
}

#[test]
#[ignore = "needs helm"]
fn chart_toggles_service_monitor_metrics_service_and_images() {
    let out = render(&["--set", "serviceMonitor.enabled=true"]);
    assert!(kinds(&out).contains(&"ServiceMonitor"));
    let out = render(&["--set", "metrics.enabled=false"]);
    assert!(
        !kinds(&out).contains(&"Service"),
        "metrics.enabled=false still renders a Service"
    );
    let out = render(&[
        "--set",
        "image.tag=dev",
        "--set",
        "nodeImage.repository=reg.example/node",
        "--set",
        "nodeImage.tag=v7",
    ]);
    let dep = find(&out, "Deployment", "dispy-operator", "dispy-system");
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["image"],
        "dispy/operator:dev"
    );
    assert!(
        args_line(dep).contains("--node-image=reg.example/node:v7"),
        "{}",
        args_line(dep)
    );
}

#[test]
#[ignore = "needs helm"]
fn chart_values_schema_refuses_wrong_types_unknown_keys_and_bad_values() {
    let chart = chart_dir();
    let template = |set: &[&str]| {
        let mut args = vec!["template", "dispy-operator", &chart];
        for s in set {
            args.extend(["--set", s]);
        }
        helm(&args)
    };
    let (ok, _, err) = template(&["leaderElection.enabled=notabool"]);
    assert!(!ok, "leaderElection.enabled=notabool accepted");
    assert!(
        err.contains("/leaderElection/enabled"),
        "the schema error names the field: {err}"
    );
    for (set, what) in [
        (&["logFormat=xml"][..], "logFormat=xml"),
        (&["leaderElect=true"], "unknown key leaderElect"),
        (&["metrics.port=70000"], "metrics.port 70000"),
        (&["watchNamespaces={Bad_Name}"], "namespace Bad_Name"),
        (&["jobs.ttlSecondsAfterFinished=-1"], "a negative ttl"),
        (
            &["jobs.ttlSecondsAfterFinished=soon"],
            "a ttl that is no number",
        ),
        // two replicas without a Lease would both reconcile
        (
            &["replicaCount=2", "leaderElection.enabled=false"],
            "replicaCount=2 without leader election",
        ),
    ] {
        let (ok, out, _) = template(set);
        assert!(!ok, "{what} accepted: {out}");
    }
}

#[test]
#[ignore = "needs helm"]
fn chart_offers_edit_and_view_roles_aggregated_into_the_default_ones() {
    let out = render(&[]);
    let edit = find(&out, "ClusterRole", "dispy-operator-edit", "");
    let labels = &edit["metadata"]["labels"];
    assert_eq!(
        labels["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    assert_eq!(
        labels["rbac.authorization.k8s.io/aggregate-to-admin"],
        "true"
    );
    assert!(labels["rbac.authorization.k8s.io/aggregate-to-view"].is_null());
    assert_eq!(
        rules(edit),
        [
            "dispy.io|jobclusters,dispyjobs,dispyjobarrays||create,delete,deletecollection,get,list,patch,update,watch",
            "dispy.io|jobclusters/scale||get,patch,update",
        ]
    );
    let view = find(&out, "ClusterRole", "dispy-operator-view", "");
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    assert!(view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"].is_null());
    assert_eq!(
        rules(view),
        ["dispy.io|jobclusters,dispyjobs,dispyjobarrays,jobclusters/status,dispyjobs/status,dispyjobarrays/status,jobclusters/scale||get,list,watch"]
    );
    // nobody is bound to them: the default roles take their rules
    assert!(!out.iter().any(|o| o["roleRef"]["name"]
        .as_str()
        .is_some_and(|n| n.ends_with("-edit") || n.ends_with("-view"))));
    let off = render(&["--set", "rbac.aggregateToDefaultRoles=false"]);
    assert_eq!(
        off.iter().filter(|o| o["kind"] == "ClusterRole").count(),
        1,
        "only the operator's ClusterRole"
    );
    let chart = chart_dir();
    let named = documents(&helm_ok(&[
        "template",
        "x",
        &chart,
        "--show-only",
        "templates/user-roles.yaml",
    ]));
    let names: Vec<&str> = named
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["x-dispy-operator-edit", "x-dispy-operator-view"]);
}

#[test]
#[ignore = "needs helm"]
fn chart_passes_the_jobs_ttl_to_the_operator() {
    let arg = |set: &[&str]| {
        let out = render(set);
        let line = args_line(find(&out, "Deployment", "dispy-operator", "dispy-system"));
        line.split(' ')
            .find(|a| a.starts_with("--job-ttl-seconds-after-finished"))
            .map(str::to_string)
    };
    assert_eq!(arg(&[]), None, "unset: DispyJobs are kept");
    assert_eq!(
        arg(&["--set", "jobs.ttlSecondsAfterFinished=0"]).as_deref(),
        Some("--job-ttl-seconds-after-finished=0")
    );
    assert_eq!(
        arg(&["--set", "jobs.ttlSecondsAfterFinished=86400"]).as_deref(),
        Some("--job-ttl-seconds-after-finished=86400")
    );
}
