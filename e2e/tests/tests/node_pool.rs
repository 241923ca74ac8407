//! A JobCluster without a computation is a pool of nodes for Python dispy clients: its status
//! lists each node's address, and a node listens there; scaled down, the operator deletes the
//! pods over the new count and the status lists the nodes left.

use dispy_e2e::*;

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn a_cluster_without_computation_is_a_node_pool_with_its_addresses_in_status() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "pool").await;
    with_operator_log(&client, async {
        ns.apply(
            "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: pool}\n\
             spec:\n  nodes: {replicas: 2, cpus: 1, port: 9811}\n",
        )
        .await;
        let jc = wait_cluster(&ns.clusters(), "pool", "2/2", "Ready", 90).await;
        let nodes = jc.status.unwrap().node_summary;
        assert_eq!(nodes.len(), 2, "{nodes:?}");
        for n in &nodes {
            assert!(n.ready, "{n:?}");
            let (host, port) = n.address.rsplit_once(':').expect("host:port");
            assert!(
                host.starts_with("127.0.0."),
                "a node's address: {}",
                n.address
            );
            assert_eq!(port, "9811");
            // a node is there
            tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::net::TcpStream::connect(&n.address),
            )
            .await
            .unwrap_or_else(|_| panic!("connect {}: timeout", n.address))
            .unwrap_or_else(|e| panic!("nothing listens on {}: {e}", n.address));
        }
        ns.kubectl(&["scale", "jc/pool", "--replicas=1"]);
        let jc = wait_cluster(&ns.clusters(), "pool", "1/1", "Ready", 60).await;
        let nodes = jc.status.unwrap().node_summary;
        assert_eq!(
            nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["pool-node-0"]
        );
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = ns.api();
        wait_for("pool-node-1 deleted", 60, async || {
            match pods
                .get_opt("pool-node-1")
                .await
                .map_err(|e| e.to_string())?
            {
                None => Ok(()),
                Some(p) => Err(format!("{:?}", p.metadata.deletion_timestamp)),
            }
        })
        .await;
    })
    .await;
    ns.delete().await;
}
