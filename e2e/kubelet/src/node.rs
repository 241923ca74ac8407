//! Node registration, node status and the Lease heartbeat.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

use crate::{Context, NodeInfo};

const LEASE_NAMESPACE: &str = "kube-node-lease";

pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn node_status(ctx: &Context, node: &NodeInfo) -> NodeStatus {
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", ctx.args.cpu.clone()),
        ("memory", ctx.args.memory.clone()),
        ("pods", ctx.args.max_pods.to_string()),
        ("ephemeral-storage", "100Gi".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v)))
    .collect();
    let t = now();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(t.clone()),
        last_transition_time: Some(t.clone()),
    };
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: node.ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: node.name.clone(),
            },
        ]),
        conditions: Some(vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "process kubelet: not measured",
            ),
            cond(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "process kubelet: not measured",
            ),
            cond(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "process kubelet: not measured",
            ),
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "process kubelet is posting ready status",
            ),
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
            operating_system: "linux".into(),
            os_image: "process kubelet (no containers)".into(),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            container_runtime_version: "process://".into(),
            kubelet_version: concat!("v1.37.0-process-kubelet.", env!("CARGO_PKG_VERSION")).into(),
            kube_proxy_version: String::new(),
            machine_id: node.name.clone(),
            system_uuid: node.name.clone(),
            boot_id: std::process::id().to_string(),
            ..Default::default()
        }),
        daemon_endpoints: ctx
            .args
            .tls_cert_file
            .as_ref()
            .map(|_| NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint {
                    port: ctx.args.port as i32,
                }),
            }),
        ..Default::default()
    }
}

/// Creates the Node (or takes over an existing one of that name) and posts its status.
pub async fn register(ctx: &Context, node: &NodeInfo) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", node.name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("dispy.io/process-node", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let obj = Node {
        metadata: ObjectMeta {
            name: Some(node.name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(node.pod_cidr()),
            pod_cidrs: Some(vec![node.pod_cidr()]),
            ..Default::default()
        }),
        status: None,
    };
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::info!(node = %node.name, "node exists; taking it over");
        }
        Err(e) => return Err(anyhow::anyhow!("creating Node {}: {e}", node.name)),
    }
    post_status(ctx, node).await?;
    // The API server taints new nodes not-ready; the node lifecycle controller
    // lifts the taint once it sees Ready. Lifting it here too saves waiting a
    // monitor period when the controller runs, and makes the node usable when
    // it does not.
    let current = api.get(&node.name).await?;
    if let Some(taints) = current.spec.as_ref().and_then(|s| s.taints.clone()) {
        let kept: Vec<_> = taints
            .into_iter()
            .filter(|t| {
                t.key != "node.kubernetes.io/not-ready" && t.key != "node.kubernetes.io/unreachable"
            })
            .collect();
        api.patch(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": kept}})),
        )
        .await?;
    }
    Ok(())
}

async fn post_status(ctx: &Context, node: &NodeInfo) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    api.patch_status(
        &node.name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": node_status(ctx, node) })),
    )
    .await
    .map_err(|e| anyhow::anyhow!("posting status of Node {}: {e}", node.name))?;
    Ok(())
}

/// Renews the node's Lease every --lease-interval seconds and reposts the
/// node status every minute (the Lease is the heartbeat the node lifecycle
/// controller reads; the status keeps conditions fresh).
pub async fn heartbeat(ctx: Arc<Context>, node: Arc<NodeInfo>) {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
    let mut tick = tokio::time::interval(Duration::from_secs(ctx.args.lease_interval.max(1)));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        if let Err(e) = renew_lease(&ctx, &leases, &node).await {
            tracing::warn!(node = %node.name, "renewing Lease: {e}");
        }
        n += 1;
        if n.is_multiple_of(60 / ctx.args.lease_interval.clamp(1, 60)) {
            if let Err(e) = post_status(&ctx, &node).await {
                tracing::warn!(node = %node.name, "{e}");
            }
        }
    }
}

async fn renew_lease(ctx: &Context, leases: &Api<Lease>, node: &NodeInfo) -> anyhow::Result<()> {
    let renew = MicroTime(k8s_openapi::jiff::Timestamp::now());
    match leases.get_opt(&node.name).await? {
        Some(_) => {
            leases
                .patch(
                    &node.name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {
                        "holderIdentity": node.name,
                        "leaseDurationSeconds": ctx.args.lease_duration,
                        "renewTime": renew,
                    }})),
                )
                .await?;
        }
        None => {
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            let uid = nodes
                .get(&node.name)
                .await?
                .metadata
                .uid
                .unwrap_or_default();
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node.name.clone()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: node.name.clone(),
                        uid,
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(node.name.clone()),
                    lease_duration_seconds: Some(ctx.args.lease_duration),
                    renew_time: Some(renew),
                    ..Default::default()
                }),
            };
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}
