//! The chart grants the operator exactly what it calls. The API server of the e2e cluster
//! writes an audit log of the requests of `dispy-system`'s service accounts (`e2e/cluster`:
//! level Metadata, with RBAC's decision on each); after the operator's tests this reads what
//! the chart's operator asked for and compares it with the rules of the installed release
//! (`helm get manifest`):
//! - every rule's verb on every resource was allowed at least once (else the rule is wider
//!   than the code), but for the [`NOT_REQUESTS`];
//! - nothing the operator asked for was denied unless the chart grants it somewhere (a denial
//!   of a granted verb is a moment of an upgrade or uninstall, when the rules go before the
//!   pod), and no create was refused for its owner references.
//!
//! RBAC itself sees to it that nothing else is allowed. The rules come from the chart: a new
//! rule there is checked here without a change to this file, once some e2e test exercises it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use dispy_e2e::*;
use serde_json::Value;

/// The release `e2e/test.sh` installs for the operator's tests.
const RELEASE: &str = "dispy";

/// Grants the audit log cannot show, as (group, resource, verb), each with why it is kept.
const NOT_REQUESTS: [(&str, &str, &str, &str); 2] = [
    (
        "dispy.io",
        "jobclusters/finalizers",
        "update",
        "asked by the OwnerReferencesPermissionEnforcement admission plugin (enabled in \
         e2e/cluster) when the operator creates node pods, Services and Secrets whose owner \
         reference blocks the JobCluster's deletion; not a request, so not in the audit log. \
         Without it those creates are refused, which `refused_for_owner_references` catches",
    ),
    (
        "dispy.io",
        "dispyjobs/finalizers",
        "update",
        "the same for the output and files ConfigMaps a DispyJob owns",
    ),
];

/// One request of the audit log, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Request {
    user: String,
    group: String,
    /// `pods`, or with its subresource: `jobclusters/status`.
    resource: String,
    verb: String,
    /// `None`: cluster-wide (a list or watch across namespaces, or a cluster-scoped object).
    namespace: Option<String>,
    name: Option<String>,
    /// RBAC's decision (`authorization.k8s.io/decision`).
    allowed: bool,
    code: u16,
    message: String,
}

impl Request {
    /// The verbs RBAC checked: an apply (`patch`) that created its object was also a create.
    fn verbs(&self) -> Vec<&str> {
        let mut verbs = vec![self.verb.as_str()];
        if self.verb == "patch" && self.code == 201 {
            verbs.push("create");
        }
        verbs
    }
}

/// A line of the audit log (JSON, audit.k8s.io/v1 Event) as a [`Request`]; `None` for one
/// that is no resource request (discovery, `/version`) or that RBAC did not judge.
fn parse_audit_line(line: &str) -> Option<Request> {
    let event: Value = serde_json::from_str(line).ok()?;
    let object = event.get("objectRef")?;
    let decision = event["annotations"]["authorization.k8s.io/decision"].as_str()?;
    let text = |v: &Value| v.as_str().map(str::to_string);
    let mut resource = text(&object["resource"])?;
    if let Some(sub) = object["subresource"].as_str() {
        resource = format!("{resource}/{sub}");
    }
    Some(Request {
        user: text(&event["user"]["username"])?,
        group: text(&object["apiGroup"]).unwrap_or_default(),
        resource,
        verb: text(&event["verb"])?,
        namespace: text(&object["namespace"]),
        name: text(&object["name"]),
        allowed: decision == "allow",
        code: event["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
        message: text(&event["responseStatus"]["message"]).unwrap_or_default(),
    })
}

/// One verb on one resource that a role bound to the operator's account grants.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    group: String,
    resource: String,
    verb: String,
    /// The rule's resourceNames; empty: any.
    names: BTreeSet<String>,
    /// `None`: everywhere (a ClusterRole bound by a ClusterRoleBinding); else that namespace.
    namespace: Option<String>,
    /// `Role ns/name`, for messages.
    role: String,
}

impl Grant {
    fn allows(&self, r: &Request, verb: &str) -> bool {
        self.group == r.group
            && self.resource == r.resource
            && self.verb == verb
            && (self.namespace.is_none() || self.namespace == r.namespace)
            // RBAC never matches a create (nor a collection) to resourceNames
            && (self.names.is_empty()
                || verb != "create" && r.name.as_ref().is_some_and(|n| self.names.contains(n)))
    }

    fn same_verb(&self, group: &str, resource: &str, verb: &str) -> bool {
        self.group == group && self.resource == resource && self.verb == verb
    }
}

/// The service accounts the bindings of `objects` name, as users:
/// `system:serviceaccount:<namespace>:<name>`.
fn service_account_users(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
        .flat_map(|b| b["subjects"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["kind"] == "ServiceAccount")
        .map(|s| {
            format!(
                "system:serviceaccount:{}:{}",
                s["namespace"].as_str().unwrap_or_default(),
                s["name"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// Every verb on every resource that the roles of `objects` grant `user` through the
/// bindings of `objects`, one [`Grant`] each.
fn grants(objects: &[Value], user: &str) -> Vec<Grant> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let names = |o: &Value| {
        (
            o["kind"].as_str().unwrap_or_default().to_string(),
            o["metadata"]["namespace"].as_str().map(str::to_string),
            o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let mut out = Vec::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        let bound = service_account_users(std::slice::from_ref(binding));
        if !bound.contains(user) {
            continue;
        }
        let (kind, binding_ns, _) = names(binding);
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let role_ns = if role_kind == "Role" {
            binding_ns.clone()
        } else {
            None
        };
        let Some(role) = objects.iter().find(|o| {
            let (k, ns, n) = names(o);
            k == role_kind && n == role_name && ns == role_ns
        }) else {
            panic!("{kind} {role_name}: its {role_kind} is not in the release");
        };
        let namespace = if kind == "RoleBinding" {
            binding_ns
        } else {
            None
        };
        let role_label = match &role_ns {
            Some(ns) => format!("{role_kind} {ns}/{role_name}"),
            None => format!("{role_kind} {role_name}"),
        };
        for rule in role["rules"].as_array().cloned().unwrap_or_default() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        assert!(
                            ![&group, &resource, &verb].contains(&&"*".to_string()),
                            "{role_label} has a wildcard: {rule}"
                        );
                        out.push(Grant {
                            group: group.clone(),
                            resource: resource.clone(),
                            verb,
                            names: strings(&rule["resourceNames"]).into_iter().collect(),
                            namespace: namespace.clone(),
                            role: role_label.clone(),
                        });
                    }
                }
            }
        }
    }
    out
}

/// What the audit log says about the grants.
#[derive(Debug, Default, PartialEq)]
struct Report {
    /// Grants no allowed request used (those in [`NOT_REQUESTS`] left out).
    unused: Vec<Grant>,
    /// Denied requests for verbs the chart grants nowhere: the code needs more than the chart.
    denied: Vec<Request>,
    /// Denied requests for verbs the chart grants (elsewhere, or before an upgrade).
    denied_granted: usize,
    /// Creates the admission plugin refused for their owner references.
    refused_for_owner_references: Vec<Request>,
}

fn check(grants: &[Grant], requests: &[Request], not_requests: &[(&str, &str, &str)]) -> Report {
    let mut report = Report::default();
    for g in grants {
        let kept = not_requests
            .iter()
            .any(|(group, resource, verb)| g.same_verb(group, resource, verb));
        let used = requests
            .iter()
            .filter(|r| r.allowed)
            .any(|r| r.verbs().iter().any(|v| g.allows(r, v)));
        if !kept && !used {
            report.unused.push(g.clone());
        }
    }
    for r in requests {
        if !r.allowed {
            let granted = grants
                .iter()
                .any(|g| g.same_verb(&r.group, &r.resource, &r.verb));
            if granted {
                report.denied_granted += 1;
            } else {
                report.denied.push(r.clone());
            }
        } else if r.code == 403 && r.message.contains("blockOwnerDeletion") {
            report.refused_for_owner_references.push(r.clone());
        }
    }
    report
}

/// Each (group, resource, verb) the requests used, cluster-wide or in namespaces, counted.
fn summary(requests: &[Request]) -> BTreeMap<(String, String, String, &'static str), usize> {
    let mut out = BTreeMap::new();
    for r in requests.iter().filter(|r| r.allowed) {
        let scope = if r.namespace.is_some() {
            "namespaced"
        } else {
            "cluster-wide"
        };
        for verb in r.verbs() {
            let key = (r.group.clone(), r.resource.clone(), verb.to_string(), scope);
            *out.entry(key).or_insert(0) += 1;
        }
    }
    out
}

/// `$E2E_AUDIT_LOG`, else the cluster's under `$E2E_STATE_DIR` (as `e2e/test.sh` sets it),
/// with the files rotated out of it.
fn audit_logs() -> Vec<PathBuf> {
    let log = std::env::var_os("E2E_AUDIT_LOG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| env().state_dir.join("logs/audit.log"));
    let dir = log.parent().expect("a directory").to_path_buf();
    let stem = log
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the audit log's directory {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&stem) && name.ends_with(".log")
        })
        .collect();
    files.sort();
    assert!(files.contains(&log), "no audit log {}", log.display());
    files
}

#[tokio::test]
#[ignore = "needs the e2e cluster's audit log and the chart's operator after its tests: run by e2e/test.sh"]
async fn the_chart_grants_the_operator_exactly_what_it_calls() {
    let ns = &env().operator_namespace;
    let objects: Vec<Value> = documents(&helm(&["get", "manifest", RELEASE, "-n", ns]))
        .iter()
        .map(|o| serde_json::to_value(o).expect("JSON"))
        .collect();
    let users = service_account_users(&objects);
    assert_eq!(users.len(), 1, "one service account bound: {users:?}");
    let user = users.first().unwrap();
    let grants = grants(&objects, user);
    let mut requests = Vec::new();
    for file in audit_logs() {
        let text = std::fs::read_to_string(&file).unwrap();
        requests.extend(
            text.lines()
                .filter_map(parse_audit_line)
                .filter(|r| &r.user == user),
        );
    }
    assert!(
        requests.len() > 100,
        "only {} requests of {user} in the audit log: is it the cluster's?",
        requests.len()
    );
    println!("{} requests of {user}:", requests.len());
    for ((group, resource, verb, scope), n) in summary(&requests) {
        println!("  {group:>16} {resource:<24} {verb:<7} {scope:<12} {n}");
    }
    let not_requests: Vec<(&str, &str, &str)> = NOT_REQUESTS
        .iter()
        .map(|(g, r, v, _)| (*g, *r, *v))
        .collect();
    let report = check(&grants, &requests, &not_requests);
    println!(
        "{} denied requests for verbs the chart grants (its rules going before the pod)",
        report.denied_granted
    );
    assert!(
        report.denied.is_empty(),
        "the operator asked for what the chart does not grant: {:#?}",
        report.denied
    );
    assert!(
        report.refused_for_owner_references.is_empty(),
        "creates refused for their owner references (jobclusters/finalizers, \
         dispyjobs/finalizers): {:#?}",
        report.refused_for_owner_references
    );
    assert!(
        report.unused.is_empty(),
        "granted, never used by the e2e run (drop the verb from the chart, or exercise it in \
         a test): {:#?}",
        report.unused
    );
}

#[cfg(test)]
mod pure {
    use super::*;

    const LEASE_GET: &str = r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"88476aad","stage":"ResponseComplete","requestURI":"/apis/coordination.k8s.io/v1/namespaces/dispy-system/leases/dispy-operator","verb":"get","user":{"username":"system:serviceaccount:dispy-system:dispy-operator","groups":["system:serviceaccounts","system:authenticated"]},"sourceIPs":["127.0.0.1"],"objectRef":{"resource":"leases","namespace":"dispy-system","name":"dispy-operator","apiGroup":"coordination.k8s.io","apiVersion":"v1"},"responseStatus":{"metadata":{},"status":"Failure","message":"leases.coordination.k8s.io \"dispy-operator\" not found","reason":"NotFound","code":404},"annotations":{"authorization.k8s.io/decision":"allow","authorization.k8s.io/reason":"RBAC: allowed by RoleBinding"}}"#;

    fn request(group: &str, resource: &str, verb: &str, ns: Option<&str>, code: u16) -> Request {
        Request {
            user: "system:serviceaccount:op:op".into(),
            group: group.into(),
            resource: resource.into(),
            verb: verb.into(),
            namespace: ns.map(str::to_string),
            name: Some("x".into()),
            allowed: true,
            code,
            message: String::new(),
        }
    }

    const RELEASE_YAML: &str = "
kind: ClusterRole
metadata: {name: op}
rules:
  - {apiGroups: [''], resources: [pods], verbs: [list, watch, create]}
  - {apiGroups: [dispy.io], resources: [dispyjobs/status], verbs: [patch]}
---
kind: ClusterRoleBinding
metadata: {name: op}
roleRef: {kind: ClusterRole, name: op}
subjects: [{kind: ServiceAccount, name: op, namespace: op}]
---
kind: Role
metadata: {name: lease, namespace: op}
rules:
  - {apiGroups: [coordination.k8s.io], resources: [leases], resourceNames: [op], verbs: [get]}
  - {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [create]}
---
kind: RoleBinding
metadata: {name: lease, namespace: op}
roleRef: {kind: Role, name: lease}
subjects: [{kind: ServiceAccount, name: op, namespace: op}]
---
kind: ClusterRole
metadata: {name: for-users}
rules:
  - {apiGroups: [dispy.io], resources: [jobclusters], verbs: [create]}
";

    fn release() -> Vec<Value> {
        RELEASE_YAML
            .split("---")
            .map(|d| serde_yaml::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn an_audit_line_is_read_as_rbac_sees_the_request() {
        let r = parse_audit_line(LEASE_GET).unwrap();
        assert_eq!(
            r,
            Request {
                user: "system:serviceaccount:dispy-system:dispy-operator".into(),
                group: "coordination.k8s.io".into(),
                resource: "leases".into(),
                verb: "get".into(),
                namespace: Some("dispy-system".into()),
                name: Some("dispy-operator".into()),
                allowed: true,
                code: 404,
                message: "leases.coordination.k8s.io \"dispy-operator\" not found".into(),
            }
        );
        let status = LEASE_GET
            .replace(
                r#""name":"dispy-operator","apiGroup""#,
                r#""name":"j","subresource":"status","apiGroup""#,
            )
            .replace(r#"/decision":"allow""#, r#"/decision":"forbid""#);
        let r = parse_audit_line(&status).unwrap();
        assert_eq!((r.resource.as_str(), r.allowed), ("leases/status", false));
        // a core resource has no apiGroup
        let core = LEASE_GET.replace(r#","apiGroup":"coordination.k8s.io""#, "");
        assert_eq!(parse_audit_line(&core).unwrap().group, "");
        let discovery = r#"{"verb":"get","requestURI":"/api","user":{"username":"u"},"annotations":{"authorization.k8s.io/decision":"allow"}}"#;
        assert_eq!(parse_audit_line(discovery), None);
        assert_eq!(parse_audit_line("not json"), None);
    }

    #[test]
    fn an_apply_that_creates_counts_as_a_create() {
        assert_eq!(
            request("", "services", "patch", Some("a"), 201).verbs(),
            ["patch", "create"]
        );
        assert_eq!(
            request("", "services", "patch", Some("a"), 200).verbs(),
            ["patch"]
        );
    }

    #[test]
    fn the_rules_become_one_grant_per_verb_for_the_bound_account() {
        let objects = release();
        let users = service_account_users(&objects);
        assert_eq!(
            users.into_iter().collect::<Vec<_>>(),
            ["system:serviceaccount:op:op"]
        );
        let g = grants(&objects, "system:serviceaccount:op:op");
        let short: Vec<String> = g
            .iter()
            .map(|g| {
                format!(
                    "{}|{}|{}|{:?}|{:?}",
                    g.group, g.resource, g.verb, g.names, g.namespace
                )
            })
            .collect();
        assert_eq!(
            short,
            [
                "|pods|list|{}|None",
                "|pods|watch|{}|None",
                "|pods|create|{}|None",
                "dispy.io|dispyjobs/status|patch|{}|None",
                "coordination.k8s.io|leases|get|{\"op\"}|Some(\"op\")",
                "coordination.k8s.io|leases|create|{}|Some(\"op\")",
            ],
            "the unbound ClusterRole for users grants the operator nothing"
        );
        assert!(grants(&objects, "system:serviceaccount:op:other").is_empty());
    }

    #[test]
    fn grants_match_scope_and_names_as_rbac_does() {
        let g = grants(&release(), "system:serviceaccount:op:op");
        let allowed = |r: &Request| g.iter().any(|g| g.allows(r, &r.verb));
        assert!(
            allowed(&request("", "pods", "watch", None, 200)),
            "cluster-wide"
        );
        assert!(allowed(&request("", "pods", "create", Some("team"), 201)));
        assert!(!allowed(&request("", "pods", "delete", Some("team"), 200)));
        let mut lease = request("coordination.k8s.io", "leases", "get", Some("op"), 200);
        lease.name = Some("op".into());
        assert!(allowed(&lease));
        lease.name = Some("other".into());
        assert!(!allowed(&lease), "not one of its resourceNames");
        lease.name = Some("op".into());
        lease.namespace = Some("team".into());
        assert!(!allowed(&lease), "a Role grants in its namespace only");
    }

    #[test]
    fn the_check_names_unused_grants_and_denials_the_chart_cannot_explain() {
        let g = grants(&release(), "system:serviceaccount:op:op");
        let mut lease = request("coordination.k8s.io", "leases", "get", Some("op"), 200);
        lease.name = Some("op".into());
        let mut used = vec![
            request("", "pods", "list", None, 200),
            request("", "pods", "watch", None, 200),
            request("", "pods", "create", Some("t"), 201),
            request("dispy.io", "dispyjobs/status", "patch", Some("t"), 200),
            request("coordination.k8s.io", "leases", "create", Some("op"), 201),
            lease,
        ];
        assert_eq!(check(&g, &used, &[]), Report::default());
        // a grant nobody used
        let without_status: Vec<Request> = used
            .iter()
            .filter(|r| r.resource != "dispyjobs/status")
            .cloned()
            .collect();
        let report = check(&g, &without_status, &[]);
        assert_eq!(report.unused.len(), 1);
        assert_eq!(report.unused[0].resource, "dispyjobs/status");
        assert!(check(
            &g,
            &without_status,
            &[("dispy.io", "dispyjobs/status", "patch")]
        )
        .unused
        .is_empty());
        // denied: granted elsewhere (counted) or granted nowhere (reported)
        let mut denied_pods = request("", "pods", "list", None, 403);
        denied_pods.allowed = false;
        let mut denied_secrets = request("", "secrets", "list", None, 403);
        denied_secrets.allowed = false;
        used.extend([denied_pods, denied_secrets.clone()]);
        let mut refused = request("", "pods", "create", Some("t"), 403);
        refused.message = "pods \"x\" is forbidden: cannot set blockOwnerDeletion if an \
                           ownerReference refers to a resource you can't set finalizers on"
            .into();
        used.push(refused.clone());
        let report = check(&g, &used, &[]);
        assert_eq!(report.denied, [denied_secrets]);
        assert_eq!(report.denied_granted, 1);
        assert_eq!(report.refused_for_owner_references, [refused]);
        assert!(report.unused.is_empty());
    }

    #[test]
    fn the_summary_counts_verbs_by_scope() {
        let s = summary(&[
            request("", "pods", "watch", None, 200),
            request("", "pods", "watch", None, 200),
            request("", "services", "patch", Some("a"), 201),
        ]);
        let key = |r: &str, v: &str, s: &'static str| (String::new(), r.into(), v.into(), s);
        assert_eq!(s[&key("pods", "watch", "cluster-wide")], 2);
        assert_eq!(s[&key("services", "create", "namespaced")], 1);
        assert_eq!(s.len(), 3);
    }
}
