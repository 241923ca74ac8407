//! What a JobCluster owns in Kubernetes, built from the JobCluster alone: its node pods, the
//! headless Service in front of them and its generated Secret. Pure functions, no client, so
//! they are tested from YAML fixtures.

use std::collections::BTreeMap;

use dispy_core::manifest::JobClusterResource;
use dispy_core::protocol::DEFAULT_NODE_PORT;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use serde_json::{json, Value};

/// Label on everything a JobCluster owns, with the cluster's name.
pub const CLUSTER_LABEL: &str = "dispy.io/cluster";
/// Label with the node pod's index.
pub const INDEX_LABEL: &str = "dispy.io/node-index";
/// Key of the shared secret in the cluster's Secret.
pub const SECRET_KEY: &str = "secret";
/// Where node pods keep computations' files.
pub const DEST_PATH: &str = "/var/lib/dispy";
/// Where node pods find `spec.tls`'s certificate and key.
pub const TLS_PATH: &str = "/etc/dispy/tls";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    #[error("JobCluster {0}: has no uid yet (not read from the API server)")]
    NoUid(String),
    #[error("JobCluster {name}: spec.nodes.template cannot be merged into a pod: {detail}")]
    Template { name: String, detail: String },
    #[error(
        "JobCluster {name}: spec.nodes.maxFileSize {value:?} is not a size such as 10Mi or 1G"
    )]
    MaxFileSize { name: String, value: String },
}

pub(crate) fn name_of(jc: &JobClusterResource) -> String {
    format!(
        "{}/{}",
        jc.metadata.namespace.as_deref().unwrap_or("default"),
        jc.metadata.name.as_deref().unwrap_or("")
    )
}

pub(crate) fn owner(jc: &JobClusterResource) -> Result<OwnerReference, BuildError> {
    jc.controller_owner_ref(&())
        .ok_or_else(|| BuildError::NoUid(name_of(jc)))
}

pub fn labels(jc: &JobClusterResource) -> BTreeMap<String, String> {
    let name = jc.metadata.name.clone().unwrap_or_default();
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "dispynode".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), name.clone()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "dispy-operator".to_string(),
        ),
        (CLUSTER_LABEL.to_string(), name),
    ])
}

/// The port node pods listen on: `spec.nodes.port`, else the one the operator assigned
/// (recorded in `status.nodePort`), else dispy's 9701. With host networking two pods on one
/// Kubernetes node cannot share a port, so each JobCluster gets its own (see
/// [`assign_port`]) and the pods declare it as a host port: the scheduler never puts two pods
/// wanting one port on the same node.
pub fn node_port(jc: &JobClusterResource) -> u16 {
    jc.spec
        .nodes
        .port
        .or(jc.status.as_ref().and_then(|s| s.node_port))
        .unwrap_or(DEFAULT_NODE_PORT)
}

/// The lowest port from 9701 up that none of `taken` uses (ports of the other JobClusters).
pub fn assign_port(taken: &std::collections::BTreeSet<u16>) -> u16 {
    (DEFAULT_NODE_PORT..=u16::MAX)
        .find(|p| !taken.contains(p))
        .unwrap_or(DEFAULT_NODE_PORT)
}

pub fn host_network(jc: &JobClusterResource) -> bool {
    jc.spec.nodes.host_network.unwrap_or(true)
}

/// The Secret holding the nodes' shared secret: the user's, or one the operator generates.
pub fn secret_name(jc: &JobClusterResource) -> String {
    match &jc.spec.secret_ref {
        Some(r) => r.name.clone(),
        None => format!("{}-secret", jc.metadata.name.as_deref().unwrap_or("")),
    }
}

/// The generated Secret (only when `spec.secretRef` is not given), with `value` as secret.
pub fn generated_secret(
    jc: &JobClusterResource,
    value: &str,
) -> Result<Option<Secret>, BuildError> {
    if jc.spec.secret_ref.is_some() {
        return Ok(None);
    }
    Ok(Some(Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(jc)),
            namespace: jc.metadata.namespace.clone(),
            labels: Some(labels(jc)),
            owner_references: Some(vec![owner(jc)?]),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            SECRET_KEY.to_string(),
            value.to_string(),
        )])),
        ..Default::default()
    }))
}

/// A headless Service: stable DNS names for the node pods.
pub fn headless_service(jc: &JobClusterResource) -> Result<Service, BuildError> {
    let port = node_port(jc);
    let value = json!({
        "metadata": {
            "name": format!("{}-nodes", jc.metadata.name.as_deref().unwrap_or("")),
            "namespace": jc.metadata.namespace,
            "labels": labels(jc),
            "ownerReferences": [owner(jc)?],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": false,
            "selector": {CLUSTER_LABEL: jc.metadata.name},
            "ports": [
                {"name": "dispy-tcp", "port": port, "protocol": "TCP"},
                {"name": "dispy-udp", "port": port, "protocol": "UDP"},
            ],
        },
    });
    Ok(serde_json::from_value(value).expect("a valid Service"))
}

/// Node pod number `index` of the cluster.
/// Whether node pods serve dispy's own protocol: it is for Python dispy clients, which a
/// JobCluster without a computation is for; the operator itself speaks only the native one.
pub fn serves_dispy_protocol(jc: &JobClusterResource) -> bool {
    jc.spec
        .nodes
        .dispy_protocol
        .unwrap_or(jc.spec.computation.is_none())
}

/// The node image's user and group (`dispy`, node-image/Dockerfile): node pods run as it.
pub const NODE_USER: i64 = 10001;

/// The pod securityContext of the pods the operator runs from the node image (node pods and
/// the scheduler): Kubernetes' restricted profile, as the image's unprivileged user.
pub fn restricted_pod() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": NODE_USER,
        "runAsGroup": NODE_USER,
        "fsGroup": NODE_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// Their container securityContext: no privilege, no capability, and a read-only root (what
/// they write goes to their work volume; TMPDIR points there).
pub fn restricted_container() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}
/// `spec.nodes.maxFileSize` when it is not set.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 10 << 20;
/// The work volume holds this many files of the largest size...
const WORK_FILES: u64 = 32;
/// ...and never less than this, for the jobs' own output and temporary files.
const WORK_FLOOR: u64 = 1 << 30;

/// `spec.nodes.maxFileSize` in bytes: a number with an optional binary (Ki, Mi, Gi, Ti) or
/// decimal (k, M, G, T) suffix, as a Kubernetes quantity.
pub fn max_file_size(jc: &JobClusterResource) -> Result<u64, BuildError> {
    let Some(value) = jc.spec.nodes.max_file_size.as_deref() else {
        return Ok(DEFAULT_MAX_FILE_SIZE);
    };
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, suffix) = value.split_at(digits);
    let unit: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => 0,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| unit > 0)
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| BuildError::MaxFileSize {
            name: name_of(jc),
            value: value.to_string(),
        })
}

/// The size limit of a node pod's work volume (the computations' and jobs' files, and what
/// jobs write) for a largest file of `max_file_size` bytes: room for [`WORK_FILES`] such
/// files, at least [`WORK_FLOOR`], in whole MiB (as the API server writes it back); none when
/// files are not limited (0).
pub fn work_size_limit(max_file_size: u64) -> Option<String> {
    (max_file_size > 0).then(|| {
        let mib = max_file_size
            .saturating_mul(WORK_FILES)
            .max(WORK_FLOOR)
            .div_ceil(1 << 20);
        match mib % 1024 {
            0 => format!("{}Gi", mib / 1024),
            _ => format!("{mib}Mi"),
        }
    })
}

pub fn node_pod(jc: &JobClusterResource, index: u32, image: &str) -> Result<Pod, BuildError> {
    let name = jc.metadata.name.clone().unwrap_or_default();
    let max_file_size = max_file_size(jc)?;
    let mut work = json!({});
    if let Some(limit) = work_size_limit(max_file_size) {
        work["sizeLimit"] = json!(limit);
    }
    let port = node_port(jc);
    let host_network = host_network(jc);
    let cpus = jc.spec.nodes.cpus.unwrap_or(0);
    let mut pod_labels = labels(jc);
    pod_labels.insert(INDEX_LABEL.to_string(), index.to_string());
    let mut container_ports = vec![
        json!({"name": "dispy-tcp", "containerPort": port, "protocol": "TCP"}),
        json!({"name": "dispy-udp", "containerPort": port, "protocol": "UDP"}),
    ];
    if host_network {
        for p in &mut container_ports {
            p["hostPort"] = json!(port);
        }
    }
    let mut resources = json!({});
    if cpus > 0 {
        resources = json!({"requests": {"cpu": cpus.to_string()}});
    }
    let image = jc
        .spec
        .nodes
        .image
        .clone()
        .unwrap_or_else(|| image.to_string());
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("{name}-node-{index}"),
            "namespace": jc.metadata.namespace,
            "labels": pod_labels,
            "ownerReferences": [owner(jc)?],
        },
        "spec": {
            "hostNetwork": host_network,
            "dnsPolicy": if host_network { "ClusterFirstWithHostNet" } else { "ClusterFirst" },
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            // Kubernetes' restricted Pod Security profile (with `hostNetwork: false`, node
            // pods meet it whole). A template's securityContext merges over this.
            "securityContext": restricted_pod(),
            "containers": [{
                "name": "dispynode",
                "image": image,
                "args": [
                    "--port", port.to_string(),
                    "--cpus", cpus.to_string(),
                    "--name", "$(POD_NAME)",
                    "--ext-host", "$(POD_IP)",
                    "--dest-path-prefix", DEST_PATH,
                    "--max-file-size", max_file_size.to_string(),
                    "--shutdown-grace", "20s",
                    "--daemon",
                    // The pod's own address: announcements go to that network only (with host
                    // networking, the node's), never to every interface of the host.
                    "--host", "$(POD_IP)",
                ],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "DISPYNODE_SECRET", "valueFrom": {"secretKeyRef": {"name": secret_name(jc), "key": SECRET_KEY}}},
                    // The root filesystem is read-only: jobs' temporary files go to the work
                    // volume, where dispynode keeps everything it writes.
                    {"name": "TMPDIR", "value": DEST_PATH},
                ],
                "ports": container_ports,
                "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 2},
                "resources": resources,
                "securityContext": restricted_container(),
                "volumeMounts": [{"name": "work", "mountPath": DEST_PATH}],
            }],
            "volumes": [{"name": "work", "emptyDir": work}],
        },
    });
    if !serves_dispy_protocol(jc) {
        pod["spec"]["containers"][0]["args"]
            .as_array_mut()
            .expect("args")
            .push(json!("--no-dispy"));
    }
    if let Some(tls) = &jc.spec.tls {
        // The node serves TLS with the Secret's certificate and key (kubernetes.io/tls keys).
        let container = &mut pod["spec"]["containers"][0];
        let args = container["args"].as_array_mut().expect("args");
        for a in [
            "--certfile",
            &format!("{TLS_PATH}/tls.crt"),
            "--keyfile",
            &format!("{TLS_PATH}/tls.key"),
        ] {
            args.push(json!(a));
        }
        container["volumeMounts"]
            .as_array_mut()
            .expect("mounts")
            .push(json!({"name": "tls", "mountPath": TLS_PATH, "readOnly": true}));
        pod["spec"]["volumes"]
            .as_array_mut()
            .expect("volumes")
            .push(json!({"name": "tls", "secret": {"secretName": tls.secret_ref.name}}));
    }
    if let Some(template) = &jc.spec.nodes.template {
        merge(&mut pod, template);
    }
    serde_json::from_value(pod).map_err(|e| BuildError::Template {
        name: name_of(jc),
        detail: e.to_string(),
    })
}

/// JSON merge patch (RFC 7386): objects merge key by key, `null` removes, anything else
/// replaces. Lists are replaced whole, so a template that sets `containers` sets them all.
pub(crate) fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// What to change so that the JobCluster owns what it asks for, given its pods now.
#[derive(Debug)]
pub struct NodePlan {
    pub service: Service,
    /// Node pods to create: the indexes below `replicas` that have no pod.
    pub create: Vec<Pod>,
    /// Node pods to delete (by name): an index at or over `replicas`, or none, that is not
    /// already going.
    pub delete: Vec<String>,
    /// The pods that stay: the cluster's nodes, ready or not.
    pub live: Vec<Pod>,
}

/// The node pods and Service the JobCluster wants, against the `existing` pods.
pub fn node_plan(
    jc: &JobClusterResource,
    existing: &[Pod],
    image: &str,
) -> Result<NodePlan, BuildError> {
    let desired = jc.spec.nodes.replicas.unwrap_or(1);
    let index_of = |p: &Pod| {
        p.metadata
            .labels
            .as_ref()?
            .get(INDEX_LABEL)?
            .parse::<u32>()
            .ok()
    };
    let going = |p: &Pod| p.metadata.deletion_timestamp.is_some();
    let wanted = |p: &Pod| index_of(p).is_some_and(|i| i < desired);
    let mut create = Vec::new();
    for i in 0..desired {
        if !existing.iter().any(|p| index_of(p) == Some(i)) {
            create.push(node_pod(jc, i, image)?);
        }
    }
    Ok(NodePlan {
        service: headless_service(jc)?,
        create,
        delete: existing
            .iter()
            .filter(|p| !wanted(p) && !going(p))
            .filter_map(|p| p.metadata.name.clone())
            .collect(),
        live: existing
            .iter()
            .filter(|p| wanted(p) && !going(p))
            .cloned()
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_at(jc: &JobClusterResource, index: u32, going: bool) -> Pod {
        let mut pod = node_pod(jc, index, "dispy/node").unwrap();
        if going {
            pod.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
            );
        }
        pod
    }

    #[test]
    fn the_node_plan_creates_missing_indexes_and_deletes_those_over_replicas() {
        let jc = cluster(WORDCOUNT); // replicas: 2
        let existing = vec![
            pod_at(&jc, 1, false),
            pod_at(&jc, 2, false),
            pod_at(&jc, 3, true),
        ];
        let plan = node_plan(&jc, &existing, "dispy/node").unwrap();
        let created: Vec<String> = plan
            .create
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(created, vec!["wordcount-node-0"]);
        assert_eq!(
            plan.delete,
            vec!["wordcount-node-2"],
            "index 3 is already going"
        );
        let live: Vec<String> = plan
            .live
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(live, vec!["wordcount-node-1"]);
        assert_eq!(
            plan.service.metadata.name.as_deref(),
            Some("wordcount-nodes")
        );
    }

    fn cluster(yaml: &str) -> JobClusterResource {
        let mut jc: JobClusterResource = serde_yaml::from_str(yaml).unwrap();
        jc.metadata.uid = Some("0b1c2d3e".into());
        jc
    }

    const WORDCOUNT: &str = "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: wordcount, namespace: team}\nspec:\n  computation:\n    python: {source: 'def f(w): return w', function: f}\n  nodes: {replicas: 2, cpus: 2}\n";

    #[test]
    fn node_pods_serve_the_dispy_protocol_only_for_node_pools_or_when_asked() {
        let args = |yaml: &str| {
            let pod = node_pod(&cluster(yaml), 0, "dispy/node:0.1.0").unwrap();
            pod.spec.unwrap().containers[0].args.clone().unwrap()
        };
        let no_dispy = "--no-dispy".to_string();
        assert!(args(WORDCOUNT).contains(&no_dispy));
        let pool = "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: pool, namespace: team}\nspec:\n  nodes: {replicas: 2}\n";
        assert!(!args(pool).contains(&no_dispy));
        let asked = WORDCOUNT.replace("cpus: 2}", "cpus: 2, dispyProtocol: true}");
        assert!(!args(&asked).contains(&no_dispy));
        let closed_pool = pool.replace("replicas: 2}", "replicas: 2, dispyProtocol: false}");
        assert!(args(&closed_pool).contains(&no_dispy));
    }

    #[test]
    fn node_pods_use_host_network_a_host_port_and_the_secret() {
        let jc = cluster(WORDCOUNT);
        let pod = node_pod(&jc, 1, "dispy/node:0.1.0").unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("wordcount-node-1"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("team"));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[CLUSTER_LABEL], "wordcount");
        assert_eq!(labels[INDEX_LABEL], "1");
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("JobCluster", "wordcount", Some(true))
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("dispy/node:0.1.0"));
        let args = c.args.as_ref().unwrap();
        assert_eq!(&args[..4], ["--port", "9701", "--cpus", "2"]);
        let ports = c.ports.as_ref().unwrap();
        assert!(ports
            .iter()
            .all(|p| p.host_port == Some(9701) && p.container_port == 9701));
        let secret = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "DISPYNODE_SECRET")
            .unwrap();
        let key_ref = secret
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (key_ref.name.as_str(), key_ref.key.as_str()),
            ("wordcount-secret", "secret")
        );
        assert_eq!(
            c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0,
            "2"
        );
    }

    #[test]
    fn without_host_network_no_host_port_and_own_port_and_image() {
        let jc = cluster(&WORDCOUNT.replace(
            "nodes: {replicas: 2, cpus: 2}",
            "nodes: {hostNetwork: false, port: 9811, image: my/node:1}\n  secretRef: {name: mine}",
        ));
        let pod = node_pod(&jc, 0, "dispy/node:0.1.0").unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.host_network, Some(false));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("my/node:1"));
        assert!(c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .all(|p| p.host_port.is_none() && p.container_port == 9811));
        assert!(c.resources.as_ref().unwrap().requests.is_none());
        assert_eq!(secret_name(&jc), "mine");
        assert!(generated_secret(&jc, "x").unwrap().is_none());
    }

    #[test]
    fn the_template_is_merged_into_the_pod() {
        let jc = cluster(&WORDCOUNT.replace(
            "nodes: {replicas: 2, cpus: 2}",
            "nodes:\n    template:\n      metadata: {labels: {team: blue}}\n      spec:\n        nodeSelector: {disk: ssd}\n        dnsPolicy: null",
        ));
        let pod = node_pod(&jc, 0, "img").unwrap();
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["team"], "blue");
        assert_eq!(
            pod.metadata.labels.as_ref().unwrap()[CLUSTER_LABEL],
            "wordcount"
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["disk"], "ssd");
        assert!(spec.dns_policy.is_none());
        let bad = cluster(&WORDCOUNT.replace(
            "nodes: {replicas: 2, cpus: 2}",
            "nodes:\n    template: {spec: {containers: 3}}",
        ));
        let err = node_pod(&bad, 0, "img").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("JobCluster team/wordcount: spec.nodes.template cannot be merged"),
            "{err}"
        );
    }

    #[test]
    fn service_and_secret_are_owned_and_labelled() {
        let jc = cluster(WORDCOUNT);
        let svc = headless_service(&jc).unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.selector.unwrap()[CLUSTER_LABEL], "wordcount");
        assert_eq!(spec.ports.unwrap().len(), 2);
        let secret = generated_secret(&jc, "s3cret").unwrap().unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("wordcount-secret"));
        assert_eq!(secret.string_data.unwrap()[SECRET_KEY], "s3cret");
        let mut no_uid = jc.clone();
        no_uid.metadata.uid = None;
        assert_eq!(
            node_pod(&no_uid, 0, "img").unwrap_err(),
            BuildError::NoUid("team/wordcount".into())
        );
    }

    #[test]
    fn assigned_ports_start_at_9701_and_skip_taken_ones() {
        use std::collections::BTreeSet;
        assert_eq!(assign_port(&BTreeSet::new()), 9701);
        assert_eq!(assign_port(&BTreeSet::from([9701, 9702, 9704])), 9703);
        let mut jc = cluster(WORDCOUNT);
        assert_eq!(node_port(&jc), 9701);
        jc.status = Some(dispy_core::manifest::JobClusterStatus {
            node_port: Some(9705),
            ..Default::default()
        });
        assert_eq!(node_port(&jc), 9705, "the recorded port");
        jc.spec.nodes.port = Some(9800);
        assert_eq!(node_port(&jc), 9800, "the user's port wins");
    }

    #[test]
    fn tls_mounts_the_secret_and_serves_with_it() {
        let jc = cluster(&format!(
            "{WORDCOUNT}  tls: {{secretRef: {{name: node-tls}}}}\n"
        ));
        let pod = node_pod(&jc, 0, "img").unwrap();
        let spec = pod.spec.unwrap();
        let c = &spec.containers[0];
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(
            args.ends_with("--certfile /etc/dispy/tls/tls.crt --keyfile /etc/dispy/tls/tls.key"),
            "{args}"
        );
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "tls")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (TLS_PATH, Some(true))
        );
        let volume = spec
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            volume.secret.unwrap().secret_name.as_deref(),
            Some("node-tls")
        );
    }

    #[test]
    fn node_pods_run_restricted_with_a_read_only_root_and_a_bounded_work_volume() {
        let pod = node_pod(&cluster(WORDCOUNT), 0, "img").unwrap();
        let spec = pod.spec.unwrap();
        let psc = spec.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            (psc.run_as_user, psc.run_as_group, psc.fs_group),
            (Some(NODE_USER), Some(NODE_USER), Some(NODE_USER))
        );
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c = &spec.containers[0];
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        // dispynode writes only under its dest path; jobs' temporary files go there too
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(args.contains("--dest-path-prefix /var/lib/dispy"), "{args}");
        assert!(args.contains("--max-file-size 10485760"), "{args}");
        let tmpdir = c.env.as_ref().unwrap().iter().find(|e| e.name == "TMPDIR");
        assert_eq!(tmpdir.and_then(|e| e.value.as_deref()), Some(DEST_PATH));
        let work = spec.volumes.unwrap().into_iter().find(|v| v.name == "work");
        let limit = work.unwrap().empty_dir.unwrap().size_limit.unwrap();
        assert_eq!(limit.0, "1Gi", "the floor, for the default 10Mi files");
    }

    #[test]
    fn the_work_volume_follows_max_file_size() {
        let with = |size: &str| {
            cluster(&WORDCOUNT.replace("cpus: 2}", &format!("cpus: 2, maxFileSize: '{size}'}}")))
        };
        assert_eq!(max_file_size(&cluster(WORDCOUNT)), Ok(10 << 20));
        assert_eq!(max_file_size(&with("100Mi")), Ok(100 << 20));
        assert_eq!(max_file_size(&with("2G")), Ok(2_000_000_000));
        assert_eq!(max_file_size(&with("512")), Ok(512));
        assert_eq!(max_file_size(&with("1k")), Ok(1000));
        assert_eq!(work_size_limit(100 << 20).as_deref(), Some("3200Mi"));
        assert_eq!(work_size_limit(64 << 20).as_deref(), Some("2Gi"));
        assert_eq!(work_size_limit(1).as_deref(), Some("1Gi"));
        assert_eq!(work_size_limit(0), None, "0: files and volume unlimited");
        let pod = node_pod(&with("0"), 0, "img").unwrap();
        let volumes = pod.spec.unwrap().volumes.unwrap();
        assert!(volumes[0].empty_dir.as_ref().unwrap().size_limit.is_none());
        for bad in ["10MB", "1.5Gi", "99999999999Ti"] {
            let err = node_pod(&with(bad), 0, "img").unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "JobCluster team/wordcount: spec.nodes.maxFileSize {bad:?} is not a size \
                     such as 10Mi or 1G"
                )
            );
        }
    }

    #[test]
    fn the_template_wins_over_the_security_context() {
        let jc = cluster(&WORDCOUNT.replace(
            "nodes: {replicas: 2, cpus: 2}",
            "nodes:\n    template:\n      spec:\n        securityContext: {runAsUser: 2000, seccompProfile: null}\n        volumes: [{name: work, emptyDir: {sizeLimit: 5Gi}}]",
        ));
        let spec = node_pod(&jc, 0, "img").unwrap().spec.unwrap();
        let psc = spec.security_context.unwrap();
        assert_eq!(psc.run_as_user, Some(2000));
        assert_eq!(
            psc.run_as_group,
            Some(NODE_USER),
            "what the template leaves"
        );
        assert!(psc.seccomp_profile.is_none(), "null removes");
        let volumes = spec.volumes.unwrap();
        assert_eq!(
            volumes[0]
                .empty_dir
                .as_ref()
                .unwrap()
                .size_limit
                .as_ref()
                .unwrap()
                .0,
            "5Gi"
        );
    }
}
