//! `spec.scheduler`: a dispyscheduler in front of a node pool, and unmodified dispy 4.15.2
//! `SharedJobCluster` programs (from PyPI) in a pod of the namespace sharing its node pods
//! through it, while the pool scales from 2 to 3 node pods.
//!
//! The local control plane has no cluster DNS, no kube-proxy and no endpoints (the API server
//! refuses loopback addresses in EndpointSlices, and every pod here has one), so the client pod
//! cannot resolve `pool-scheduler` or reach the Service's cluster IP: it is given the address of
//! the one pod the Service's selector picks. On a cluster with DNS the clients say
//! `scheduler_host='pool-scheduler'`.

use std::collections::BTreeMap;

use dispy_e2e::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ListParams};
use kube::ResourceExt;

/// Two SharedJobCluster clients, one process each, JOBS jobs of a second each; one JSON line
/// per result.
const CLIENTS: &str = r#"
import json, os, subprocess, sys
import dispy

JOBS = 30

def compute(n):
    import time
    time.sleep(1)
    return n * n

def client(name, port):
    # Pods here share one network namespace, so connections leave from 127.0.0.1: ext_host
    # tells the scheduler the pod's own address (on a real cluster it sees that anyway), and
    # ip_addr makes dispy pick that address's family (it finds no interface of its own).
    ip = os.environ["POD_IP"]
    cluster = dispy.SharedJobCluster(
        compute, scheduler_host=os.environ["SCHEDULER_HOST"], host=ip, ip_addr=ip, ext_host=ip,
        client_port=port, secret=os.environ["SECRET"], reentrant=True,
        recover_file="recover-%s" % name, loglevel=dispy.logger.WARNING)
    jobs = [(i, cluster.submit(i)) for i in range(JOBS)]
    for i, job in jobs:
        result = job()
        print(json.dumps({"client": name, "n": i, "result": result, "status": job.status,
                          "node": job.ip_addr, "exception": job.exception}), flush=True)
    cluster.close()

if len(sys.argv) > 1:
    client(sys.argv[1], int(sys.argv[2]))
else:
    procs = [subprocess.Popen([sys.executable, sys.argv[0], name, str(port)])
             for name, port in (("a", 9700), ("b", 9710))]
    sys.exit(max(p.wait() for p in procs))
"#;

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn two_shared_job_clusters_share_the_node_pods_through_the_scheduler_and_use_a_third_added_mid_run(
) {
    let client = client().await;
    let ns = TestNamespace::create(&client, "sched").await;
    with_operator_log(&client, async {
        ns.apply(
            "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: pool}\n\
             spec:\n  nodes: {replicas: 2, cpus: 1, hostNetwork: false}\n  pulseInterval: 2\n\
             \x20 scheduler: {enabled: true}\n",
        )
        .await;
        wait_cluster(&ns.clusters(), "pool", "2/2", "Ready", 90).await;
        let jc = wait_for("the scheduler ready with 2 nodes", 90, async || {
            let jc = get_or_seen(&ns.clusters(), "pool").await?;
            match jc.status.as_ref().and_then(|s| s.scheduler.clone()) {
                Some(s) if s.ready && s.nodes == 2 => Ok(jc),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let status = jc.status.unwrap().scheduler.unwrap();
        assert_eq!(
            status.address,
            format!("pool-scheduler.{}.svc:9702", ns.name)
        );
        let wide = ns.kubectl(&["get", "jc", "pool", "-o", "wide"]);
        let (head, rows) = table(&wide);
        let col = head.iter().position(|h| h == "SCHEDULER").expect(&wide);
        assert_eq!(rows[0][col], status.address, "{wide}");

        // The Service selects the scheduler's pod, and only it (never a node pod).
        let svc: Service = ns.api::<Service>().get("pool-scheduler").await.unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.ports.unwrap()[0].port, 9702);
        let selector: Vec<String> = (spec.selector.unwrap().iter())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let pods = ns.api::<Pod>();
        let selected = pods
            .list(&ListParams::default().labels(&selector.join(",")))
            .await
            .unwrap()
            .items;
        assert_eq!(selected.len(), 1, "{selector:?}");
        assert!(selected[0].name_any().starts_with("pool-scheduler-"));
        let scheduler_ip = selected[0].status.as_ref().unwrap().pod_ip.clone().unwrap();

        // Two clients at once, the secret from the JobCluster's Secret.
        let script = serde_json::to_string(CLIENTS).unwrap();
        ns.apply(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: clients}}\ndata:\n  clients.py: {script}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: clients}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: clients\n    image: e2e/dispy-python\n    args: [/scripts/clients.py]\n    env:\n    - {{name: SCHEDULER_HOST, value: '{scheduler_ip}'}}\n    - name: POD_IP\n      valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}\n    - name: SECRET\n      valueFrom: {{secretKeyRef: {{name: pool-secret, key: secret}}}}\n    volumeMounts: [{{name: scripts, mountPath: /scripts}}]\n  volumes: [{{name: scripts, configMap: {{name: clients}}}}]\n"
        ))
        .await;
        let log = |pods: Api<Pod>| async move {
            pods.logs("clients", &Default::default())
                .await
                .unwrap_or_default()
        };
        wait_for("the first results", 90, async || {
            let l = log(pods.clone()).await;
            if l.lines().any(|l| l.starts_with('{')) {
                Ok(())
            } else {
                Err(l)
            }
        })
        .await;
        // Mid-run: a third node pod; the scheduler is given it and sends it jobs.
        ns.kubectl(&["scale", "jc/pool", "--replicas=3"]);
        let jc = wait_cluster(&ns.clusters(), "pool", "3/3", "Ready", 90).await;
        let third = jc
            .status
            .as_ref()
            .unwrap()
            .node_summary
            .iter()
            .find(|n| n.name == "pool-node-2")
            .map(|n| n.address.rsplit_once(':').unwrap().0.to_string())
            .expect("pool-node-2 in the status");
        wait_for("the scheduler given 3 nodes", 60, async || {
            let cm = get_or_seen(&ns.api::<ConfigMap>(), "pool-scheduler").await?;
            let nodes = cm.data.unwrap_or_default().remove("nodes").unwrap_or_default();
            if nodes.lines().count() == 3 {
                Ok(())
            } else {
                Err(nodes)
            }
        })
        .await;
        let done = wait_for("the client pod Succeeded", 180, async || {
            let p = get_or_seen(&pods, "clients").await?;
            match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some("Succeeded") => Ok(()),
                Some("Failed") => Err(format!("Failed: {}", log(pods.clone()).await)),
                other => Err(format!("{other:?}")),
            }
        });
        done.await;
        let out = log(pods.clone()).await;
        let mut results: BTreeMap<(String, i64), serde_json::Value> = BTreeMap::new();
        for line in out.lines().filter(|l| l.starts_with('{')) {
            let v: serde_json::Value = serde_json::from_str(line).expect(line);
            let key = (v["client"].as_str().unwrap().to_string(), v["n"].as_i64().unwrap());
            results.insert(key, v);
        }
        assert_eq!(results.len(), 60, "every job of both clients: {out}");
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for ((c, n), v) in &results {
            assert_eq!(v["result"], serde_json::json!(n * n), "{c}/{n}: {v}");
            *per_node.entry(v["node"].as_str().unwrap().to_string()).or_default() += 1;
        }
        assert_eq!(per_node.len(), 3, "jobs ran on: {per_node:?}");
        assert!(per_node.contains_key(&third), "{third} in {per_node:?}");

        // Disabled: the scheduler's Deployment, Service and node list go.
        ns.kubectl(&[
            "patch",
            "jc/pool",
            "--type=merge",
            "-p",
            r#"{"spec":{"scheduler":{"enabled":false}}}"#,
        ]);
        wait_for("the scheduler removed", 60, async || {
            let d = ns.api::<Deployment>().get_opt("pool-scheduler").await;
            let s = ns.api::<Service>().get_opt("pool-scheduler").await;
            let c = ns.api::<ConfigMap>().get_opt("pool-scheduler").await;
            match (d, s, c) {
                (Ok(None), Ok(None), Ok(None)) => Ok(()),
                (d, s, c) => Err(format!(
                    "Deployment {:?}, Service {:?}, ConfigMap {:?}",
                    d.map(|d| d.is_some()),
                    s.map(|s| s.is_some()),
                    c.map(|c| c.is_some())
                )),
            }
        })
        .await;
        let jc = get_or_seen(&ns.clusters(), "pool").await.unwrap();
        assert!(jc.status.unwrap().scheduler.is_none());
    })
    .await;
    ns.delete().await;
}
