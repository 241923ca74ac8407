//! The operator killed (SIGKILL) while a cluster's jobs run: the restarted operator adopts what
//! the nodes ran meanwhile, so every job ends Finished and none ran twice.

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use kube::api::ListParams;

const JOBS: usize = 40;

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn operator_killed_mid_run_every_job_finishes_once() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "restart").await;
    let jobs = ns.jobs();
    let dir = scratch_dir("op-count");
    let mut yaml = r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: counted}
spec:
  computation:
    python:
      source: |
        import time
        def run(i, where):
            with open('%s/%d' % (where, i), 'a') as f:
                f.write('ran\n')
            time.sleep(0.5)
            return i * i
      function: run
  nodes: {replicas: 2, cpus: 2}
"#
    .to_string();
    for i in 0..JOBS {
        yaml += &format!(
            "---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {{name: counted-{i}, \
             labels: {{test: counted}}}}\nspec: {{cluster: counted, args: [{i}, \"{}\"]}}\n",
            dir.display()
        );
    }
    with_operator_log(&client, async {
        ns.apply(&yaml).await;
        let finished = async || {
            jobs.list(&ListParams::default().labels("test=counted"))
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .filter(|j| job_status(j) == JobStatus::Finished)
                        .count()
                })
                .map_err(|e| e.to_string())
        };
        wait_for("4 jobs Finished", 90, async || match finished().await? {
            n if n >= 4 => Ok(()),
            n => Err(format!("{n} Finished")),
        })
        .await;
        let operator = operator_pod(&client).await;
        let pid = pod_pid(&operator).expect("the operator's pid");
        eprintln!(
            "killing the operator (pid {pid}) with {} of {JOBS} jobs Finished",
            finished().await.unwrap()
        );
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {pid}");
        wait_for("the operator restarted and Ready", 60, async || {
            let pods = list_operator_pods(&client).await;
            match pods.iter().find(|p| pod_ready(p)) {
                Some(p) if pod_pid(p).is_some_and(|new| new != pid) => Ok(()),
                _ => Err(format!(
                    "{:?}",
                    pods.iter()
                        .map(|p| (pod_pid(p), pod_ready(p)))
                        .collect::<Vec<_>>()
                )),
            }
        })
        .await;
        let all = wait_jobs_terminal(&jobs, "test=counted", 120).await;
        let not_finished: Vec<String> = all
            .iter()
            .filter(|j| job_status(j) != JobStatus::Finished)
            .map(describe_job)
            .collect();
        assert!(
            not_finished.is_empty(),
            "not all Finished: {not_finished:?}"
        );
        assert_eq!(all.len(), JOBS);
        let ran_twice: Vec<String> = (0..JOBS)
            .filter_map(|i| {
                let runs = std::fs::read_to_string(dir.join(i.to_string()))
                    .unwrap_or_default()
                    .lines()
                    .count();
                (runs != 1).then(|| format!("job {i} ran {runs} times"))
            })
            .collect();
        assert!(ran_twice.is_empty(), "{ran_twice:?}");
        for i in (0..JOBS).step_by(13) {
            let job = jobs.get(&format!("counted-{i}")).await.unwrap();
            assert_eq!(
                job.status.unwrap().result,
                Some(serde_json::json!(i * i)),
                "counted-{i} result"
            );
        }
    })
    .await;
    ns.delete().await;
}
