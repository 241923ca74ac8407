//! What the chart installs beside the operator: the admission policy that puts the operator's
//! finalizer on every DispyJob as it is created, so that no job is deleted unseen.

use dispy_core::manifest::DispyJobResource;
use dispy_e2e::*;
use k8s_openapi::api::admissionregistration::v1::MutatingAdmissionPolicy;
use kube::api::{Api, PostParams};

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn the_admission_policy_puts_the_operators_finalizer_on_a_new_dispyjob() {
    let client = client().await;
    let policies: Api<MutatingAdmissionPolicy> = Api::all(client.clone());
    policies
        .get("dispy-operator-job-finalizer")
        .await
        .expect("the chart's MutatingAdmissionPolicy");
    let ns = TestNamespace::create(&client, "admission").await;
    let jobs = ns.jobs();
    let job: DispyJobResource = serde_json::from_value(serde_json::json!({
        "apiVersion": "dispy.io/v1alpha1", "kind": "DispyJob",
        "metadata": {"name": "finalized"}, "spec": {"cluster": "none"}
    }))
    .unwrap();
    let created = jobs.create(&PostParams::default(), &job).await.unwrap();
    assert_eq!(
        created.metadata.finalizers,
        Some(vec!["dispy.io/terminate".to_string()]),
        "finalizers in the create response"
    );
    // a job that never ran is deleted (the operator removes its finalizer)
    delete_and_wait(&jobs, "finalized", 30).await;
    ns.delete().await;
}
