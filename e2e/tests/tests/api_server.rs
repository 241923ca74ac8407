//! The API server behaves as the operator relies on: a CRD with printer columns, schema
//! validation and a status subresource; server-side apply conflicts, finalizers and owner
//! references on a custom resource; Leases with optimistic concurrency. Checked on a
//! throwaway CRD (`widgets.e2e.dispy.io`), so that a failure here points at the cluster, not
//! at dispy.

use dispy_e2e::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.e2e.dispy.io}
spec:
  group: e2e.dispy.io
  names: {kind: Widget, plural: widgets, singular: widget, shortNames: [wdg]}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties: {size: {type: integer, minimum: 1}}
          status:
            type: object
            properties: {phase: {type: string}}
"#;

/// Applies the Widget CRD and waits until it is Established; the Widget API in `ns`.
async fn widgets(ns: &TestNamespace) -> Api<DynamicObject> {
    apply(&ns.client, None, WIDGET_CRD).await;
    wait_crds_established(&ns.client, &["widgets.e2e.dispy.io"]).await;
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("e2e.dispy.io", "v1", "Widget"));
    let api = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    wait_for("widgets served", 30, async || {
        api.list(&Default::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    api
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn control_plane_is_ready_and_its_controllers_act() {
    let client = client().await;
    assert_eq!(kubectl(&["get", "--raw", "/readyz"]), "ok");
    assert_eq!(kubectl(&["get", "--raw", "/livez"]), "ok");
    kubectl(&[
        "get",
        "namespace",
        "default",
        "kube-system",
        "kube-node-lease",
    ]);
    if env().local {
        let version = client.apiserver_version().await.expect("server version");
        assert!(
            version.git_version.starts_with("v1.37"),
            "server is {}, not v1.37",
            version.git_version
        );
    }
    // the controller-manager gives every namespace its root CA ConfigMap
    let ns = TestNamespace::create(&client, "probe").await;
    let cms: Api<ConfigMap> = ns.api();
    wait_for("kube-root-ca.crt in a new namespace", 60, async || {
        cms.get_opt("kube-root-ca.crt")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn a_crd_serves_printer_columns_schema_validation_and_status_subresource() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "widgets").await;
    let widgets = widgets(&ns).await;
    ns.apply("apiVersion: e2e.dispy.io/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 7}\n")
        .await;
    let message = refusal(
        try_apply(
            &client,
            Some(&ns.name),
            "apiVersion: e2e.dispy.io/v1\nkind: Widget\nmetadata: {name: w0}\nspec: {size: 0}\n",
        )
        .await,
        "a Widget of size 0 (minimum: 1)",
    );
    assert!(
        message.contains("spec.size"),
        "the refusal names the field: {message}"
    );
    widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"phase": "Spinning"}})),
        )
        .await
        .expect("patch the status subresource");
    let (header, rows) = table(&ns.kubectl(&["get", "wdg"]));
    assert_eq!(header, ["NAME", "SIZE", "PHASE", "AGE"], "printer columns");
    assert_eq!(
        rows[0][..3],
        ["w1", "7", "Spinning"],
        "printer column values"
    );
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn server_side_apply_conflicts_finalizers_hold_deletion_and_owned_children_are_collected() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "ssa").await;
    let widgets = widgets(&ns).await;
    let w2 = |size: u32, finalizers: bool| {
        let mut v = serde_json::json!({
            "apiVersion": "e2e.dispy.io/v1", "kind": "Widget",
            "metadata": {"name": "w2"}, "spec": {"size": size}
        });
        if finalizers {
            v["metadata"]["finalizers"] = serde_json::json!(["e2e.dispy.io/cleanup"]);
        }
        v
    };
    widgets
        .patch(
            "w2",
            &PatchParams::apply("op-a"),
            &Patch::Apply(w2(2, true)),
        )
        .await
        .expect("apply as op-a");
    let conflict = widgets
        .patch(
            "w2",
            &PatchParams::apply("op-b"),
            &Patch::Apply(w2(3, false)),
        )
        .await;
    match conflict {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 409, "a conflict: {e:?}"),
        other => panic!("a second field manager changed spec.size without a conflict: {other:?}"),
    }
    let w = widgets.get("w2").await.unwrap();
    assert_eq!(w.data["spec"]["size"], 2, "spec.size changed");
    // a child owned by the custom resource
    let uid = w.metadata.uid.clone().unwrap();
    ns.apply(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: w2-child\n  ownerReferences: \
         [{{apiVersion: e2e.dispy.io/v1, kind: Widget, name: w2, uid: \"{uid}\"}}]\ndata: {{a: b}}\n"
    ))
    .await;
    // the finalizer holds the deletion until it is removed
    widgets
        .delete("w2", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let w = widgets
        .get("w2")
        .await
        .expect("w2 is held by its finalizer");
    assert!(
        w.metadata.deletion_timestamp.is_some(),
        "no deletionTimestamp"
    );
    let cms: Api<ConfigMap> = ns.api();
    cms.get("w2-child")
        .await
        .expect("child removed before its owner");
    widgets
        .patch(
            "w2",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(
                    serde_json::json!([{"op": "remove", "path": "/metadata/finalizers"}]),
                )
                .unwrap(),
            ),
        )
        .await
        .expect("remove the finalizer");
    wait_for("widget w2 gone", 30, async || {
        match widgets.get_opt("w2").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    wait_for("child garbage-collected", 60, async || {
        match cms.get_opt("w2-child").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn a_lease_is_renewed_and_a_stale_update_is_refused() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "lease").await;
    let leases: Api<Lease> = ns.api();
    let now = || k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(jiff_now());
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "e2e-leader"},
        "spec": {"holderIdentity": "candidate-a", "leaseDurationSeconds": 15, "leaseTransitions": 0}
    }))
    .unwrap();
    let mut lease = lease;
    lease.spec.as_mut().unwrap().renew_time = Some(now());
    let first = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create the Lease");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut renewed = first.clone();
    let t2 = now();
    renewed.spec.as_mut().unwrap().renew_time = Some(t2.clone());
    let second = leases
        .replace("e2e-leader", &PostParams::default(), &renewed)
        .await
        .expect("renew the Lease");
    assert_eq!(
        second
            .spec
            .as_ref()
            .unwrap()
            .renew_time
            .as_ref()
            .map(|t| t.0),
        Some(t2.0),
        "renewTime not updated"
    );
    assert_ne!(
        first.metadata.resource_version, second.metadata.resource_version,
        "resourceVersion unchanged by renewal"
    );
    // optimistic concurrency, which leader election relies on
    let mut stale = second.clone();
    stale.metadata.resource_version = first.metadata.resource_version.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("candidate-b".into());
    match leases
        .replace("e2e-leader", &PostParams::default(), &stale)
        .await
    {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 409, "a conflict: {e:?}"),
        other => panic!("an update with a stale resourceVersion was accepted: {other:?}"),
    }
    ns.delete().await;
}

/// Now, to the microsecond (MicroTime is serialized with microseconds).
fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_microsecond(now.as_microsecond()).unwrap()
}
