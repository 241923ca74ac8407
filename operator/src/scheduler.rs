//! What a JobCluster's `spec.scheduler` owns, built from the JobCluster and its node list
//! alone: a Deployment of one `dispyscheduler`, the Service `<jobcluster>-scheduler` its
//! `SharedJobCluster` clients connect to, and the ConfigMap that lists its nodes. Pure, so
//! tested from YAML fixtures; cluster.rs applies it.
//!
//! What must stay true:
//! - the scheduler's pods never carry the cluster label: the JobCluster's node pods are the
//!   pods with that label, and any other pod with it would be taken for a node and deleted;
//! - the node list reaches the scheduler through a mounted ConfigMap, which it reads again
//!   every 2 s (`--nodes_file`): a changed list must not change the pod template, or every
//!   scale of the node pods would restart the scheduler and lose every client's jobs.

use std::collections::BTreeMap;

use dispy_core::manifest::{JobClusterResource, SchedulerPolicy, SchedulerSpec, SchedulerStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use serde_json::json;

use crate::build::{self, BuildError, DEST_PATH, SECRET_KEY, TLS_PATH};

/// Label on the scheduler's pods, with the JobCluster's name (not the cluster label: see the
/// module's rules).
pub const SCHEDULER_LABEL: &str = "dispy.io/scheduler";
/// The key of the node list in the scheduler's ConfigMap, and the file the scheduler reads.
pub const NODES_KEY: &str = "nodes";
/// Where the scheduler's pod finds its node list.
pub const NODES_PATH: &str = "/etc/dispy/scheduler";

/// The scheduler the JobCluster asks for, if any.
pub fn wanted(jc: &JobClusterResource) -> Option<&SchedulerSpec> {
    jc.spec.scheduler.as_ref().filter(|s| s.enabled)
}

/// The name of the Deployment, the Service and the ConfigMap.
pub fn name(jc: &JobClusterResource) -> String {
    format!("{}-scheduler", jc.metadata.name.as_deref().unwrap_or(""))
}

/// What `SharedJobCluster(scheduler_host=...)` is given: the Service's DNS name, and the
/// clients' port.
pub fn address(jc: &JobClusterResource, spec: &SchedulerSpec) -> String {
    let ns = jc.metadata.namespace.as_deref().unwrap_or("default");
    format!("{}.{ns}.svc:{}", name(jc), spec.client_port())
}

/// The status for a scheduler given `nodes` nodes, ready or not.
pub fn status(
    jc: &JobClusterResource,
    spec: &SchedulerSpec,
    ready: bool,
    nodes: usize,
) -> SchedulerStatus {
    SchedulerStatus {
        address: address(jc, spec),
        ready,
        nodes: nodes as u32,
    }
}

/// Whether the Deployment's pod is ready.
pub fn is_ready(d: &Deployment) -> bool {
    d.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .is_some_and(|n| n >= 1)
}

/// The scheduler's objects.
#[derive(Debug)]
pub struct SchedulerPlan {
    pub deployment: Deployment,
    pub service: Service,
    pub nodes: ConfigMap,
}

fn labels(jc: &JobClusterResource) -> BTreeMap<String, String> {
    let name = jc.metadata.name.clone().unwrap_or_default();
    let mut labels = build::labels(jc);
    labels.remove(build::CLUSTER_LABEL);
    labels.insert(
        "app.kubernetes.io/name".to_string(),
        "dispyscheduler".to_string(),
    );
    labels.insert(SCHEDULER_LABEL.to_string(), name);
    labels
}

/// The node list file: one `host:port` per line, in order.
pub fn node_list(nodes: &[String]) -> String {
    nodes.iter().map(|n| format!("{n}\n")).collect()
}

/// The scheduler's Deployment, Service and node ConfigMap for `nodes` (`host:port` each).
pub fn plan(
    jc: &JobClusterResource,
    spec: &SchedulerSpec,
    image: &str,
    nodes: &[String],
) -> Result<SchedulerPlan, BuildError> {
    let owner = build::owner(jc)?;
    let name = name(jc);
    let labels = labels(jc);
    let selector = BTreeMap::from([(
        SCHEDULER_LABEL.to_string(),
        jc.metadata.name.clone().unwrap_or_default(),
    )]);
    let (port, client_port) = (spec.port(), spec.client_port());
    let image = (spec.image.as_deref())
        .or(jc.spec.nodes.image.as_deref())
        .unwrap_or(image);
    let mut args: Vec<String> = [
        "-i",
        "$(POD_IP)",
        "-p",
        &port.to_string(),
        "--nodes_file",
        &format!("{NODES_PATH}/{NODES_KEY}"),
        "--dest_path_prefix",
        DEST_PATH,
        "--pulse_interval",
        &jc.spec.pulse_interval.unwrap_or(10).max(1).to_string(),
        "--zombie_interval",
        &spec.zombie_interval.unwrap_or(60).to_string(),
        "--log_format",
        "json",
        "--daemon",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match spec.policy.unwrap_or_default() {
        SchedulerPolicy::EarliestJob => {}
        SchedulerPolicy::FairCluster => args.push("--fair_cluster_scheduler".into()),
        SchedulerPolicy::EarliestCluster => args.push("--early_cluster_scheduler".into()),
    }
    let secret_env = |var: &str| json!({"name": var, "valueFrom": {"secretKeyRef": {"name": build::secret_name(jc), "key": SECRET_KEY}}});
    let mut mounts = vec![
        json!({"name": "work", "mountPath": DEST_PATH}),
        json!({"name": "nodes", "mountPath": NODES_PATH, "readOnly": true}),
    ];
    let mut volumes = vec![
        json!({"name": "work", "emptyDir": {}}),
        json!({"name": "nodes", "configMap": {"name": name}}),
    ];
    if let Some(tls) = &jc.spec.tls {
        // The nodes serve TLS with this certificate (the scheduler requires it of them), and
        // the scheduler serves its clients with it too.
        let (crt, key) = (format!("{TLS_PATH}/tls.crt"), format!("{TLS_PATH}/tls.key"));
        for (flag, file) in [
            ("--node_certfile", &crt),
            ("--node_keyfile", &key),
            ("--cluster_certfile", &crt),
            ("--cluster_keyfile", &key),
        ] {
            args.push(flag.into());
            args.push(file.clone());
        }
        mounts.push(json!({"name": "tls", "mountPath": TLS_PATH, "readOnly": true}));
        volumes.push(json!({"name": "tls", "secret": {"secretName": tls.secret_ref.name}}));
    }
    let mut pod = json!({
        "metadata": {"labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 20,
            "securityContext": build::restricted_pod(),
            "containers": [{
                "name": "dispyscheduler",
                "image": image,
                "command": ["dispyscheduler"],
                "args": args,
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    secret_env("DISPYSCHEDULER_NODE_SECRET"),
                    secret_env("DISPYSCHEDULER_CLUSTER_SECRET"),
                    {"name": "TMPDIR", "value": DEST_PATH},
                ],
                "ports": [
                    {"name": "clients", "containerPort": client_port, "protocol": "TCP"},
                    {"name": "nodes", "containerPort": port, "protocol": "TCP"},
                ],
                "readinessProbe": {"tcpSocket": {"port": client_port}, "periodSeconds": 2},
                "resources": spec.resources.clone().unwrap_or_else(|| json!({})),
                "securityContext": build::restricted_container(),
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    });
    if let Some(template) = &spec.template {
        build::merge(&mut pod, template);
    }
    let meta = json!({
        "name": name,
        "namespace": jc.metadata.namespace,
        "labels": labels,
        "ownerReferences": [owner],
    });
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            // Never two schedulers at once: each would take the nodes for itself.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": pod,
        },
    });
    let deployment: Deployment =
        serde_json::from_value(deployment).map_err(|e| BuildError::Template {
            name: build::name_of(jc),
            detail: format!("spec.scheduler.template: {e}"),
        })?;
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": selector,
            "ports": [{"name": "clients", "port": client_port, "targetPort": client_port, "protocol": "TCP"}],
        },
    });
    let nodes = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {NODES_KEY: node_list(nodes)},
    });
    Ok(SchedulerPlan {
        deployment,
        service: serde_json::from_value(service).expect("a valid Service"),
        nodes: serde_json::from_value(nodes).expect("a valid ConfigMap"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: pool, namespace: team}\nspec:\n  nodes: {replicas: 2}\n  scheduler: {enabled: true}\n";

    fn cluster(yaml: &str) -> JobClusterResource {
        let mut jc: JobClusterResource = serde_yaml::from_str(yaml).unwrap();
        jc.metadata.uid = Some("0b1c2d3e".into());
        jc
    }

    fn plan_of(yaml: &str, nodes: &[&str]) -> SchedulerPlan {
        let jc = cluster(yaml);
        let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        plan(&jc, wanted(&jc).unwrap(), "dispy/node:0.1.0", &nodes).unwrap()
    }

    fn container(p: &SchedulerPlan) -> k8s_openapi::api::core::v1::Container {
        let spec = &p.deployment.spec;
        spec.template.spec.as_ref().unwrap().containers[0].clone()
    }

    #[test]
    fn the_scheduler_runs_the_node_image_on_its_pod_ip_with_the_node_list_file_and_the_secret() {
        let p = plan_of(POOL, &["127.0.0.11:9701", "127.0.0.12:9701"]);
        assert_eq!(
            p.deployment.metadata.name.as_deref(),
            Some("pool-scheduler")
        );
        let owner = &p.deployment.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("JobCluster", "pool")
        );
        let spec = &p.deployment.spec;
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(
            spec.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
        let c = container(&p);
        assert_eq!(c.image.as_deref(), Some("dispy/node:0.1.0"));
        assert_eq!(
            c.command.as_deref(),
            Some(&["dispyscheduler".to_string()][..])
        );
        let args = c.args.unwrap().join(" ");
        assert!(
            args.starts_with("-i $(POD_IP) -p 9700 --nodes_file /etc/dispy/scheduler/nodes"),
            "{args}"
        );
        assert!(
            args.contains("--pulse_interval 10 --zombie_interval 60"),
            "{args}"
        );
        for var in [
            "DISPYSCHEDULER_NODE_SECRET",
            "DISPYSCHEDULER_CLUSTER_SECRET",
        ] {
            let e = c
                .env
                .as_ref()
                .unwrap()
                .iter()
                .find(|e| e.name == var)
                .unwrap();
            let r = e
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!((r.name.as_str(), r.key.as_str()), ("pool-secret", "secret"));
        }
        assert_eq!(
            p.nodes.data.as_ref().unwrap()[NODES_KEY],
            "127.0.0.11:9701\n127.0.0.12:9701\n"
        );
        let svc = p.service.spec.as_ref().unwrap();
        assert_eq!(svc.ports.as_ref().unwrap()[0].port, 9702);
        assert_eq!(svc.selector.as_ref().unwrap()[SCHEDULER_LABEL], "pool");
    }

    #[test]
    fn the_scheduler_pod_runs_restricted_as_the_node_pods_do() {
        let p = plan_of(POOL, &[]);
        let pod = p.deployment.spec.template.spec.clone().unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(build::NODE_USER));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c = container(&p);
        let csc = c.security_context.unwrap();
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        assert_eq!(
            csc.capabilities.unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        let tmp = c
            .env
            .unwrap()
            .into_iter()
            .find(|e| e.name == "TMPDIR")
            .unwrap();
        assert_eq!(tmp.value.as_deref(), Some(DEST_PATH), "on the work volume");
    }

    #[test]
    fn the_scheduler_pods_are_never_taken_for_node_pods() {
        let p = plan_of(POOL, &[]);
        let template = &p.deployment.spec.template;
        let labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert!(!labels.contains_key(build::CLUSTER_LABEL), "{labels:?}");
        assert_eq!(labels[SCHEDULER_LABEL], "pool");
        let selector = p.deployment.spec.selector.match_labels.clone().unwrap();
        assert!(!selector.contains_key(build::CLUSTER_LABEL));
    }

    #[test]
    fn a_changed_node_list_changes_only_the_configmap() {
        let a = plan_of(POOL, &["127.0.0.11:9701"]);
        let b = plan_of(POOL, &["127.0.0.11:9701", "127.0.0.13:9701"]);
        assert_eq!(a.deployment, b.deployment, "no restart of the scheduler");
        assert_ne!(a.nodes, b.nodes);
    }

    #[test]
    fn port_policy_image_resources_tls_and_template_are_applied() {
        let yaml = POOL.replace(
            "scheduler: {enabled: true}",
            "scheduler:\n    enabled: true\n    port: 9800\n    policy: FairCluster\n    zombieInterval: 5\n    image: my/sched:1\n    resources: {limits: {memory: 256Mi}}\n    template: {spec: {nodeSelector: {disk: ssd}}}\n  tls: {secretRef: {name: pool-tls}}\n  pulseInterval: 3",
        );
        let p = plan_of(&yaml, &[]);
        let c = container(&p);
        assert_eq!(c.image.as_deref(), Some("my/sched:1"));
        let args = c.args.clone().unwrap().join(" ");
        assert!(args.contains("-p 9800 "), "{args}");
        assert!(
            args.contains("--pulse_interval 3 --zombie_interval 5"),
            "{args}"
        );
        assert!(args.contains("--fair_cluster_scheduler"), "{args}");
        assert!(args.contains("--node_certfile /etc/dispy/tls/tls.crt --node_keyfile /etc/dispy/tls/tls.key --cluster_certfile"), "{args}");
        assert_eq!(
            c.readiness_probe.unwrap().tcp_socket.unwrap().port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9802)
        );
        assert_eq!(c.resources.unwrap().limits.unwrap()["memory"].0, "256Mi");
        let pod = p.deployment.spec.template.spec.clone().unwrap();
        assert_eq!(pod.node_selector.unwrap()["disk"], "ssd");
        assert_eq!(p.service.spec.unwrap().ports.unwrap()[0].port, 9802);
        let jc = cluster(&yaml);
        assert_eq!(
            address(&jc, wanted(&jc).unwrap()),
            "pool-scheduler.team.svc:9802"
        );
    }

    #[test]
    fn a_disabled_scheduler_is_not_wanted() {
        let off = cluster(&POOL.replace("enabled: true", "enabled: false"));
        assert!(wanted(&off).is_none());
        let absent = cluster(&POOL.replace("  scheduler: {enabled: true}\n", ""));
        assert!(wanted(&absent).is_none());
    }
}
