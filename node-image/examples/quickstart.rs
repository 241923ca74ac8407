//! Starts a local `dispynode` on 127.0.0.1, sends it a Python computation with setup and a
//! data file, runs one job per word and prints each job's outcome like `kubectl get dispyjobs`.
//!
//!     cargo build -p dispynode && cargo run -p dispynode --example quickstart

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dispy_core::job::now_secs;
use dispy_core::protocol::*;
use dispy_core::{ClientConfig, ClientEvent, NodeClient};

const SOURCE: &str = r#"
def setup(path):
    global text
    text = open(path).read()
    return 0

def compute(word):
    n = text.count(word)
    print("counted", word)
    return n
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("dispynode"))
        .filter(|p| p.exists())
        .ok_or("dispynode is not built: run `cargo build -p dispynode` first")?;
    let prefix = std::env::temp_dir().join(format!("dispy-quickstart-{}", std::process::id()));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut node = Command::new(&bin)
        .args([
            "-i",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--daemon",
            "--name",
            "local",
        ])
        .arg("--dest-path-prefix")
        .arg(&prefix)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (client, mut events) = loop {
        match NodeClient::connect(&addr, &ClientConfig::default()).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    println!(
        "node {} at {addr}: {} cpus",
        client.info().name,
        client.info().cpus
    );

    client
        .compute(ComputeRequest {
            computation: "wordcount".into(),
            spec: Computation::Python(PythonComputation {
                source: SOURCE.into(),
                function: "compute".into(),
                setup: Some("setup".into()),
                setup_args: Some(r#"["words.txt"]"#.into()),
                ..Default::default()
            }),
            keep_files: false,
        })
        .await?;
    client
        .send_file(
            "wordcount",
            "words.txt",
            b"alpha beta beta gamma gamma gamma\n",
            0o644,
            None,
        )
        .await?;
    client.setup("wordcount").await?;
    let words = ["alpha", "beta", "gamma", "delta"];
    let jobs = words
        .iter()
        .enumerate()
        .map(|(i, w)| JobRequest {
            id: i as u64,
            args: format!("[\"{w}\"]"),
            kwargs: "{}".into(),
            depends: vec![],
        })
        .collect();
    client.submit_many("wordcount", jobs).await?;

    let mut results = vec![None; words.len()];
    while results.iter().any(Option::is_none) {
        match events.recv().await.ok_or("node connection closed")? {
            ClientEvent::Job(JobEvent {
                job,
                kind: JobEventKind::Done(r),
                ..
            }) => results[job as usize] = Some(r),
            ClientEvent::Disconnected { reason, .. } => return Err(reason.into()),
            _ => {}
        }
    }
    println!(
        "{:<16} {:<11} {:<7} {:<7} {:>6}",
        "NAME", "STATUS", "NODE", "RESULT", "AGE"
    );
    for (w, r) in words.iter().zip(&results) {
        let r = r.as_ref().expect("all done");
        let age = now_secs() - r.start_time.unwrap_or_else(now_secs);
        let result = r.result.clone().unwrap_or_default();
        println!(
            "{:<16} {:<11} {:<7} {:<7} {:>5.1}s",
            format!("wordcount-{w}"),
            r.status.as_str(),
            "local",
            result,
            age
        );
    }
    client
        .ack("wordcount", (0..words.len() as u64).collect())
        .await?;
    client.close("wordcount", false).await?;
    node.kill()?;
    node.wait()?;
    let _ = std::fs::remove_dir_all(&prefix);
    Ok(())
}
