//! Benchmark client for one dispynode (used by `node-image/bench/run.sh`): trivial jobs per
//! second with many in flight, and per-job latency one job at a time.
//!
//! usage: bench_client ADDR MODE JOBS LATENCY_JOBS     MODE = fork | reuse | program

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispy_core::job::JobStatus;
use dispy_core::protocol::*;
use dispy_core::{ClientConfig, ClientEvent, NodeClient};
use tokio::sync::Semaphore;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: bench_client ADDR fork|reuse|program JOBS LATENCY_JOBS");
        std::process::exit(2);
    }
    let (addr, mode) = (&args[1], args[2].as_str());
    let jobs: u64 = args[3].parse().unwrap();
    let latency_jobs: u64 = args[4].parse().unwrap();
    let config = ClientConfig {
        name: "bench".into(),
        ..Default::default()
    };
    let (client, mut events) = NodeClient::connect(addr, &config).await.expect("connect");
    let spec = match mode {
        "program" => Computation::Program(ProgramComputation {
            command: vec!["true".into()],
            env: vec![],
        }),
        _ => Computation::Python(PythonComputation {
            source: "def compute(n):\n    return n * n\n".into(),
            function: "compute".into(),
            reuse_workers: mode == "reuse",
            ..Default::default()
        }),
    };
    let name = format!("bench-{mode}");
    client
        .compute(ComputeRequest {
            computation: name.clone(),
            spec,
            keep_files: false,
        })
        .await
        .unwrap();
    client.setup(&name).await.unwrap();

    // Warm up, then throughput with up to 1024 jobs in flight.
    run_batch(&client, &mut events, &name, 0, 200.min(jobs)).await;
    let start = Instant::now();
    run_batch(&client, &mut events, &name, 1_000_000, jobs).await;
    let elapsed = start.elapsed();

    // Latency: one job at a time, submit to result.
    let mut lat = Vec::new();
    for i in 0..latency_jobs {
        let t = Instant::now();
        run_batch(&client, &mut events, &name, 2_000_000 + i, 1).await;
        lat.push(t.elapsed());
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{mode:8} {jobs:6} jobs  {:8.0} jobs/s   latency p50 {:7.3} ms  p99 {:7.3} ms",
        jobs as f64 / elapsed.as_secs_f64(),
        ms(pct(0.50)),
        ms(pct(0.99)),
    );
    client.close(&name, false).await.unwrap();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run_batch(
    client: &NodeClient,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<ClientEvent>,
    name: &str,
    first: u64,
    n: u64,
) {
    // Up to 1024 jobs in flight, submitted in batches of up to 128.
    let window = Arc::new(Semaphore::new(1024));
    let submitter = {
        let (client, name, window) = (client.clone(), name.to_string(), window.clone());
        tokio::spawn(async move {
            let mut next = first;
            while next < first + n {
                let batch = (first + n - next).min(128) as u32;
                window.acquire_many(batch).await.unwrap().forget();
                let jobs = (next..next + batch as u64)
                    .map(|id| JobRequest {
                        id,
                        args: format!("[{id}]"),
                        kwargs: "{}".into(),
                        depends: vec![],
                    })
                    .collect();
                let rejected = client.submit_many(&name, jobs).await.expect("submit");
                assert!(rejected.is_empty(), "{rejected:?}");
                next += batch as u64;
            }
        })
    };
    let mut done = HashMap::new();
    let mut acks = Vec::new();
    while (done.len() as u64) < n {
        match events.recv().await.expect("events") {
            ClientEvent::Job(JobEvent {
                job,
                kind: JobEventKind::Done(r),
                ..
            }) => {
                assert_eq!(r.status, JobStatus::Finished, "job {job}: {r:?}");
                done.insert(job, r);
                acks.push(job);
                window.add_permits(1);
            }
            ClientEvent::Disconnected { reason, .. } => panic!("disconnected: {reason}"),
            _ => {}
        }
    }
    submitter.await.unwrap();
    client.ack(name, acks).await.unwrap();
}
