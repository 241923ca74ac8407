//! Jobs run as the node's own user and never learn its secret: no `DISPYNODE_*` variable in
//! their environment, no way into the node's `/proc/<pid>/environ` or `mem`, and a secret
//! given on the command line is hidden from `/proc/<pid>/cmdline`.

mod common;

use std::time::Duration;

use common::*;
use dispy_core::protocol::*;
use dispy_core::NodeClient;
use serde_json::json;

const T: Duration = Duration::from_secs(30);
const SECRET: &str = "env-secret-7f3a";

/// The variables the node starts with: its secret and another setting of its own.
const NODE_ENV: &[(&str, &str)] = &[
    ("DISPYNODE_SECRET", SECRET),
    ("DISPYNODE_OTHER_SETTING", "x"),
];

/// Everything a job can find out about the node's secret from where it runs.
const PROBE: &str = r#"
def read(path):
    try:
        with open(path, 'rb') as f:
            return f.read(1 << 20).decode('latin-1')
    except OSError as e:
        return type(e).__name__

def probe(node_pid):
    host = os.getppid()
    return {
        'uid': os.getuid(),
        'host_parent': int(read('/proc/%d/stat' % host).rsplit(')', 1)[1].split()[1]),
        'secret': os.environ.get('DISPYNODE_SECRET'),
        'dispynode_vars': sorted(k for k in os.environ if k.startswith('DISPYNODE_')),
        'node_environ': read('/proc/%d/environ' % node_pid),
        'node_mem': read('/proc/%d/mem' % node_pid),
        'host_environ': read('/proc/%d/environ' % host),
        'own_environ': read('/proc/self/environ'),
    }
"#;

#[tokio::test]
async fn python_jobs_see_no_dispynode_variable_and_cannot_read_the_node_environ_or_memory() {
    let launch = Launch {
        env: NODE_ENV,
        user: Some(NOBODY),
        ..Default::default()
    };
    let node = NodeProc::launch(&["--cpus", "2", "--python", PYTHON_FOR_ANY_USER], launch).await;
    let (client, mut events) = NodeClient::connect(&node.addr(), &config(SECRET))
        .await
        .expect("the node takes its secret from $DISPYNODE_SECRET");
    for reuse in [false, true] {
        let name = format!("probe-{reuse}");
        let spec = PythonComputation {
            reuse_workers: reuse,
            ..python(PROBE, "probe")
        };
        open(&client, &name, Computation::Python(spec), &[]).await;
        client
            .submit(&name, job(1, json!([node.pid()])))
            .await
            .unwrap();
        let done = collect(&mut events, 1, T).await;
        let v: serde_json::Value = serde_json::from_str(finished(&done[&1])).unwrap();
        // A job of a node that runs as an ordinary user, whose host is the node's child.
        assert_eq!(v["uid"], NOBODY, "reuse {reuse}: {v}");
        assert_eq!(v["host_parent"], node.pid(), "reuse {reuse}: {v}");
        assert_eq!(v["secret"], serde_json::Value::Null, "reuse {reuse}: {v}");
        assert_eq!(v["dispynode_vars"], json!([]), "reuse {reuse}: {v}");
        assert_eq!(v["node_environ"], "PermissionError", "reuse {reuse}: {v}");
        assert_eq!(v["node_mem"], "PermissionError", "reuse {reuse}: {v}");
        // The host's environment is readable by the same user, and holds no secret either.
        let host_environ = v["host_environ"].as_str().unwrap();
        assert!(host_environ.contains("PATH="), "reuse {reuse}: {v}");
        for environ in [host_environ, v["own_environ"].as_str().unwrap()] {
            assert!(!environ.contains(SECRET), "reuse {reuse}: {environ}");
            assert!(!environ.contains("DISPYNODE_"), "reuse {reuse}: {environ}");
        }
        client.close(&name, false).await.unwrap();
    }
}

#[tokio::test]
async fn program_jobs_see_no_dispynode_variable() {
    let launch = Launch {
        env: NODE_ENV,
        ..Default::default()
    };
    let node = NodeProc::launch(&[], launch).await;
    let (client, mut events) = NodeClient::connect(&node.addr(), &config(SECRET))
        .await
        .unwrap();
    let spec = Computation::Program(ProgramComputation {
        command: vec!["/usr/bin/env".into()],
        env: vec![("JOB_SETTING".into(), "y".into())],
    });
    open(&client, "env", spec, &[]).await;
    client.submit("env", job(1, json!([]))).await.unwrap();
    let done = collect(&mut events, 1, T).await;
    assert_eq!(finished(&done[&1]), "0");
    let env = &done[&1].stdout;
    assert!(
        env.contains("PATH=") && env.contains("JOB_SETTING=y"),
        "{env}"
    );
    assert!(!env.contains("DISPYNODE_"), "{env}");
    assert!(!env.contains(SECRET), "{env}");
}

#[tokio::test]
async fn a_secret_given_with_dash_dash_secret_is_hidden_from_proc_cmdline() {
    let secret = "argv-secret-91c2";
    let node = NodeProc::start_with(&["--cpus", "1"], Some(secret)).await;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", node.pid())).unwrap();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "--secret").expect("--secret");
    assert_eq!(args[at + 1], "*".repeat(secret.len()), "{args:?}");
    assert!(!String::from_utf8_lossy(&cmdline).contains(secret));
    // The node still knows it.
    let (client, _) = NodeClient::connect(&node.addr(), &config(secret))
        .await
        .expect("the hidden secret still authenticates");
    assert_eq!(client.info().port, node.port);
}
