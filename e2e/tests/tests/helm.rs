//! Helm works against this cluster: a chart installs its objects and uninstall removes them.

use dispy_e2e::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn helm_installs_and_uninstalls_a_chart() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "helm").await;
    let chart = scratch_dir("hello-chart");
    std::fs::create_dir_all(chart.join("templates")).unwrap();
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: e2e-hello\nversion: 0.1.0\n",
    )
    .unwrap();
    std::fs::write(chart.join("values.yaml"), "message: hi\n").unwrap();
    std::fs::write(
        chart.join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: {{ .Release.Name }}-cm}\n\
         data: {message: {{ .Values.message | quote }}}\n",
    )
    .unwrap();
    helm(&[
        "install",
        "hello",
        &chart.to_string_lossy(),
        "-n",
        &ns.name,
        "--set",
        "message=from-helm",
        "--wait",
        "--timeout",
        "60s",
    ]);
    let cms: Api<ConfigMap> = ns.api();
    let cm = cms.get("hello-cm").await.expect("the chart's ConfigMap");
    assert_eq!(
        cm.data
            .unwrap_or_default()
            .get("message")
            .map(String::as_str),
        Some("from-helm")
    );
    helm(&["uninstall", "hello", "-n", &ns.name]);
    assert!(
        cms.get_opt("hello-cm").await.unwrap().is_none(),
        "uninstall left the ConfigMap"
    );
    ns.delete().await;
}
