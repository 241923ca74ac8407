//! Handshake, secrets, TLS, bad input, reconnects and the node's own lifecycle.

mod common;

use std::time::Duration;

use common::*;
use dispy_core::auth::{self, Role};
use dispy_core::frame::{frame, read_frame};
use dispy_core::job::JobStatus;
use dispy_core::protocol::*;
use dispy_core::tls::{client_config, Trust};
use dispy_core::{ClientError, ClientEvent, NodeClient};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_right_secret_is_accepted_and_a_wrong_one_rejected() {
    let node = NodeProc::start_with(&[], Some("s3cret")).await;
    let (client, _) = NodeClient::connect(&node.addr(), &config("s3cret"))
        .await
        .unwrap();
    assert_eq!(client.info().port, node.port);
    let err = NodeClient::connect(&node.addr(), &config("wrong"))
        .await
        .err()
        .unwrap();
    // The node's own proof fails first: the client learns the secrets differ without sending its proof.
    assert!(matches!(err, ClientError::NodeAuth { .. }), "{err}");
    assert!(err.to_string().contains("different secrets"), "{err}");
    // A client that skips the node's proof and sends a wrong one is rejected by the node.
    let mut s = raw_handshake_start(&node.addr()).await;
    let (cn, challenge) = s.1.clone();
    let bad = Auth {
        client_proof: auth::proof("wrong", Role::Client, &cn, &challenge.node_nonce),
        pulse_interval_ms: None,
        owner: None,
    };
    s.0.write_all(&frame(&encode(&bad))).await.unwrap();
    let welcome: Welcome = decode(
        "welcome",
        &read_frame(&mut s.0, 1 << 20).await.unwrap().unwrap(),
    )
    .unwrap();
    match welcome {
        Welcome::Rejected(reason) => assert!(reason.contains("secret does not match"), "{reason}"),
        other => panic!("accepted with a wrong secret: {other:?}"),
    }
    // Still serving.
    NodeClient::connect(&node.addr(), &config("s3cret"))
        .await
        .unwrap();
    assert!(
        node.log().contains("authentication failed"),
        "the rejection is logged"
    );
}

type Raw = (TcpStream, (Vec<u8>, Challenge));

async fn raw_handshake_start(addr: &str) -> Raw {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let cn = auth::nonce();
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        client_nonce: cn.clone(),
        client_name: "raw".into(),
    };
    s.write_all(&MAGIC).await.unwrap();
    s.write_all(&frame(&encode(&hello))).await.unwrap();
    let sh: ServerHello = decode(
        "hello",
        &read_frame(&mut s, 1 << 20).await.unwrap().unwrap(),
    )
    .unwrap();
    let ServerHello::Challenge(c) = sh else {
        panic!("rejected: {sh:?}")
    };
    (s, (cn, c))
}

/// A raw, authenticated connection (empty secret) for sending hand-made frames.
async fn raw_session(addr: &str) -> TcpStream {
    let (mut s, (cn, c)) = raw_handshake_start(addr).await;
    let a = Auth {
        client_proof: auth::proof("", Role::Client, &cn, &c.node_nonce),
        pulse_interval_ms: None,
        owner: None,
    };
    s.write_all(&frame(&encode(&a))).await.unwrap();
    let w: Welcome = decode(
        "welcome",
        &read_frame(&mut s, 1 << 20).await.unwrap().unwrap(),
    )
    .unwrap();
    assert!(matches!(w, Welcome::Accepted(_)));
    s
}

async fn next_reply(s: &mut TcpStream) -> (u64, Result<Reply, NodeError>) {
    loop {
        let f = tokio::time::timeout(T, read_frame(s, 1 << 24))
            .await
            .unwrap()
            .unwrap()
            .expect("a reply");
        if let NodeMsg::Reply { id, result } = decode::<NodeMsg>("node", &f).unwrap() {
            return (id, result);
        }
    }
}

#[tokio::test]
async fn malformed_and_oversize_frames_get_errors_and_the_node_keeps_serving() {
    let node = NodeProc::start(&["--max-frame", "64k"]).await;
    let mut s = raw_session(&node.addr()).await;
    // Not MessagePack at all.
    s.write_all(&frame(b"\xc1\xc1 garbage")).await.unwrap();
    let (id, r) = next_reply(&mut s).await;
    assert_eq!(id, 0);
    let e = r.unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("malformed request"), "{e}");
    // An unknown message kind.
    let unknown = rmp_serde::to_vec_named(&json!({"id": 5, "body": {"Explode": null}})).unwrap();
    s.write_all(&frame(&unknown)).await.unwrap();
    let (_, r) = next_reply(&mut s).await;
    assert!(r.unwrap_err().message.contains("malformed request"));
    // The same connection still works.
    let ok = Request {
        id: 6,
        body: ClientMsg::NodeInfo,
    };
    s.write_all(&frame(&encode(&ok))).await.unwrap();
    let (id, r) = next_reply(&mut s).await;
    assert_eq!(id, 6);
    assert!(matches!(r.unwrap(), Reply::NodeInfo(_)));
    // A frame over --max-frame: an error naming the sizes, then the connection closes.
    s.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    let (_, r) = next_reply(&mut s).await;
    let e = r.unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge);
    assert!(
        e.message
            .contains("1048576 bytes exceeds the limit of 65536"),
        "{e}"
    );
    assert!(read_frame(&mut s, 1 << 20).await.unwrap().is_none());
    // A truncated frame, then a bare close.
    let mut s = raw_session(&node.addr()).await;
    s.write_all(&[0, 0, 0, 50, 1, 2, 3]).await.unwrap();
    drop(s);
    // Garbage instead of the protocol prefix.
    let mut g = TcpStream::connect(node.addr()).await.unwrap();
    g.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    drop(g);
    let (client, _) = connect(&node).await;
    assert_eq!(client.node_info().await.unwrap().cpus, client.info().cpus);
}

#[tokio::test]
async fn bad_requests_are_refused_by_name() {
    let node = NodeProc::start(&["--max-file-size", "1k"]).await;
    let (client, _) = connect(&node).await;
    let err = client.setup("nope").await.unwrap_err();
    assert_eq!(err.node_code(), Some(ErrorCode::UnknownComputation));
    assert!(
        err.to_string().contains("unknown computation \"nope\""),
        "{err}"
    );
    let err = client.submit("nope", job(1, json!([]))).await.unwrap_err();
    assert_eq!(err.node_code(), Some(ErrorCode::UnknownComputation));

    // A Python source that does not compile.
    let c = ComputeRequest {
        computation: "syntax".into(),
        spec: Computation::Python(python("def f(:\n  pass\n", "f")),
        keep_files: false,
    };
    client.compute(c.clone()).await.unwrap();
    let err = client.setup("syntax").await.unwrap_err();
    assert_eq!(err.node_code(), Some(ErrorCode::SetupFailed));
    assert!(err.to_string().contains("does not compile"), "{err}");
    assert!(err.to_string().contains("line 1"), "{err}");
    // The same name cannot be registered twice.
    let err = client.compute(c).await.unwrap_err();
    assert_eq!(err.node_code(), Some(ErrorCode::AlreadyExists));

    // A function the source does not define; a setup that fails.
    client
        .compute(ComputeRequest {
            computation: "nofn".into(),
            spec: Computation::Python(python("x = 1\n", "f")),
            keep_files: false,
        })
        .await
        .unwrap();
    let err = client.setup("nofn").await.unwrap_err();
    assert!(err.to_string().contains("defines no function 'f'"), "{err}");
    let src = "def setup():\n    raise RuntimeError('no data')\ndef f():\n    pass\n";
    let spec = Computation::Python(PythonComputation {
        setup: Some("setup".into()),
        ..python(src, "f")
    });
    client
        .compute(ComputeRequest {
            computation: "badsetup".into(),
            spec,
            keep_files: false,
        })
        .await
        .unwrap();
    let err = client.setup("badsetup").await.unwrap_err();
    assert!(err.to_string().contains("RuntimeError: no data"), "{err}");

    // A program that does not exist.
    let spec = Computation::Program(ProgramComputation {
        command: vec!["/no/such/program".into()],
        env: vec![],
    });
    client
        .compute(ComputeRequest {
            computation: "noprog".into(),
            spec,
            keep_files: false,
        })
        .await
        .unwrap();
    let err = client.setup("noprog").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("\"/no/such/program\" does not exist"),
        "{err}"
    );
    let spec = Computation::Program(ProgramComputation {
        command: vec!["no-such-program-anywhere".into()],
        env: vec![],
    });
    client
        .compute(ComputeRequest {
            computation: "noprog2".into(),
            spec,
            keep_files: false,
        })
        .await
        .unwrap();
    let err = client.setup("noprog2").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("not found among the computation's files or on PATH"),
        "{err}"
    );

    // Files: over the size limit, escaping the directory.
    let err = client
        .send_file("noprog", "big.bin", &[0u8; 2048], 0o644, None)
        .await
        .unwrap_err();
    assert_eq!(err.node_code(), Some(ErrorCode::TooLarge));
    assert!(
        err.to_string()
            .contains("over this node's --max-file-size of 1024 bytes"),
        "{err}"
    );
    let err = client
        .send_file("noprog", "../escape", b"x", 0o644, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must be a relative path"), "{err}");

    // Bad job arguments.
    open(
        &client,
        "ok",
        Computation::Python(python("def f(*a, **k):\n    return [a, k]\n", "f")),
        &[],
    )
    .await;
    let mut j = job(1, json!([]));
    j.args = "{\"not\": \"a list\"}".into();
    let err = client.submit("ok", j).await.unwrap_err();
    assert!(
        err.to_string().contains("args must be a JSON list"),
        "{err}"
    );
    let mut j = job(2, json!([1]));
    j.kwargs = "[1,".into();
    let err = client.submit("ok", j).await.unwrap_err();
    assert!(
        err.to_string().contains("kwargs are not valid JSON"),
        "{err}"
    );
    // And the node still runs good work.
    let (client2, mut events) = connect(&node).await;
    open(
        &client2,
        "ok2",
        Computation::Python(python("def f(*a, **k):\n    return [a, k]\n", "f")),
        &[],
    )
    .await;
    let mut j = job(3, json!([1, "two"]));
    j.kwargs = json!({"k": 3}).to_string();
    client2.submit("ok2", j).await.unwrap();
    let done = collect(&mut events, 1, T).await;
    assert_eq!(finished(&done[&3]), "[[1, \"two\"], {\"k\": 3}]");
}

fn cert_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (dir.join("node.crt"), dir.join("node.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test]
async fn tls_with_a_ca_or_a_pinned_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = cert_files(certs.path());
    let node = NodeProc::start(&[
        "--certfile",
        cert.to_str().unwrap(),
        "--keyfile",
        key.to_str().unwrap(),
    ])
    .await;
    for trust in [Trust::CaFile(cert.clone()), Trust::PinnedCert(cert.clone())] {
        let mut cfg = config("");
        cfg.tls = Some(client_config(&trust).unwrap());
        let (client, mut events) = NodeClient::connect(&node.addr(), &cfg).await.unwrap();
        let name = format!("tls{}", matches!(trust, Trust::PinnedCert(_)) as u8);
        open(
            &client,
            &name,
            Computation::Python(python("def f(x):\n    return x * 2\n", "f")),
            &[],
        )
        .await;
        client.submit(&name, job(1, json!([21]))).await.unwrap();
        assert_eq!(finished(&collect(&mut events, 1, T).await[&1]), "42");
    }
    // A plain-text client is told the node wants TLS.
    let err = NodeClient::connect(&node.addr(), &config(""))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("requires TLS"), "{err}");
    // A different certificate is not trusted.
    let other = tempfile::tempdir().unwrap();
    let (other_cert, _) = cert_files(other.path());
    let mut cfg = config("");
    cfg.tls = Some(client_config(&Trust::PinnedCert(other_cert)).unwrap());
    let err = NodeClient::connect(&node.addr(), &cfg).await.err().unwrap();
    assert!(
        err.to_string().contains("not the pinned certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn a_dispy_request_with_a_wrong_auth_gets_a_clear_nak() {
    // dispy's protocol is served on the same port (tests/compat has the real client); a
    // request whose auth prefix is not sha1(secret + node sign) is refused by name.
    let node = NodeProc::start(&[]).await;
    let mut s = TcpStream::connect(node.addr()).await.unwrap();
    s.write_all(&[b'x'; 40]).await.unwrap();
    s.write_all(&dispy_core::frame::frame(b"COMPUTE:not a pickle"))
        .await
        .unwrap();
    let f = read_frame(&mut s, 1 << 20).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&f);
    assert!(text.starts_with("NAK (authentication failed"), "{text}");
}

#[tokio::test]
async fn a_reconnecting_client_collects_what_finished_while_it_was_away() {
    let node = NodeProc::start(&["--cpus", "2"]).await;
    let (client, mut events) = connect(&node).await;
    let src = "import time\ndef f(t):\n    time.sleep(t)\n    return t\n";
    open(&client, "away", Computation::Python(python(src, "f")), &[]).await;
    client.submit("away", job(1, json!([0]))).await.unwrap();
    let first = collect(&mut events, 1, T).await;
    assert_eq!(finished(&first[&1]), "0");
    client.ack("away", vec![1]).await.unwrap();
    client.submit("away", job(2, json!([0.3]))).await.unwrap();
    client.submit("away", job(3, json!([0.5]))).await.unwrap();
    drop(client);
    drop(events);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (client, mut events) = connect(&node).await;
    let states = client.attach("away").await.unwrap();
    let ids: Vec<_> = states.iter().map(|s| (s.id, s.status)).collect();
    assert_eq!(
        ids,
        vec![(2, JobStatus::Finished), (3, JobStatus::Finished)],
        "job 1 was acknowledged"
    );
    let done = collect(&mut events, 2, T).await;
    assert_eq!(finished(&done[&2]), "0.3");
    assert_eq!(finished(&done[&3]), "0.5");
    client.ack("away", vec![2, 3]).await.unwrap();
    // Acknowledged results are not sent again.
    let (client, _events) = connect(&node).await;
    assert!(client.attach("away").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_computation_whose_client_vanished_is_closed_after_the_zombie_interval() {
    let node = NodeProc::start(&["--zombie-interval", "1s"]).await;
    let (client, _events) = connect(&node).await;
    open(
        &client,
        "ghost",
        Computation::Python(python("def f():\n    return 1\n", "f")),
        &[],
    )
    .await;
    assert!(node.prefix().join("ghost").exists());
    drop(client);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (client, _events) = connect(&node).await;
    let err = client.attach("ghost").await.unwrap_err();
    assert_eq!(err.node_code(), Some(ErrorCode::UnknownComputation));
    assert!(!node.prefix().join("ghost").exists(), "its files are gone");
}

#[tokio::test]
async fn a_node_killed_mid_run_is_seen_for_every_job_in_flight() {
    let node = NodeProc::start(&["--cpus", "2"]).await;
    let (client, mut events) = connect(&node).await;
    let src = "import time\ndef f(t):\n    time.sleep(t)\n    return t\n";
    open(
        &client,
        "doomed",
        Computation::Python(python(src, "f")),
        &[],
    )
    .await;
    for i in 0..5 {
        client.submit("doomed", job(i, json!([30]))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.signal(libc::SIGKILL);
    let lost = loop {
        match tokio::time::timeout(T, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ClientEvent::Disconnected { in_flight, reason } => {
                assert!(
                    reason.contains("closed") || reason.contains("reset"),
                    "{reason}"
                );
                break in_flight;
            }
            _ => continue,
        }
    };
    let ids: Vec<_> = lost.iter().map(|(c, j)| (c.as_str(), *j)).collect();
    assert_eq!(
        ids,
        vec![
            ("doomed", 0),
            ("doomed", 1),
            ("doomed", 2),
            ("doomed", 3),
            ("doomed", 4)
        ]
    );
    let err = client.node_info().await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected { .. }), "{err}");
}

#[tokio::test]
async fn sigterm_lets_running_jobs_finish_runs_cleanup_and_exits_0() {
    let mut node = NodeProc::start(&["--cpus", "1", "--shutdown-grace", "5s"]).await;
    let (client, mut events) = connect(&node).await;
    let marker = node.prefix().join("cleanup-ran");
    let src = format!(
        "import time\ndef f(t):\n    time.sleep(t)\n    return 'done'\ndef cleanup():\n    open({:?}, 'w').write('yes')\n",
        marker.to_str().unwrap()
    );
    let spec = Computation::Python(PythonComputation {
        cleanup: Some("cleanup".into()),
        ..python(&src, "f")
    });
    open(&client, "graceful", spec, &[]).await;
    client
        .submit("graceful", job(1, json!([0.5])))
        .await
        .unwrap();
    client
        .submit("graceful", job(2, json!([0.5])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.signal(libc::SIGTERM);
    let done = collect(&mut events, 2, T).await;
    assert_eq!(finished(&done[&1]), "\"done\"", "the running job finished");
    assert_eq!(
        done[&2].status,
        JobStatus::Cancelled,
        "the queued one was cancelled"
    );
    assert_eq!(
        node.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        node.log()
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "yes");
}

#[tokio::test]
async fn serve_n_exits_after_n_computations() {
    let mut node = NodeProc::start(&["--serve", "1"]).await;
    let (client, _e) = connect(&node).await;
    open(
        &client,
        "once",
        Computation::Python(python("def f():\n    return 1\n", "f")),
        &[],
    )
    .await;
    let err = client
        .compute(ComputeRequest {
            computation: "twice".into(),
            spec: Computation::Python(python("def f():\n    return 1\n", "f")),
            keep_files: false,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--serve"), "{err}");
    client.close("once", false).await.unwrap();
    assert_eq!(node.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn metrics_count_jobs_cpus_and_bytes() {
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let node = NodeProc::start(&["--cpus", "2", "--metrics-addr", &maddr]).await;
    let (client, mut events) = connect(&node).await;
    open(
        &client,
        "m",
        Computation::Python(python(
            "def f(x):\n    if x: raise ValueError()\n    return 1\n",
            "f",
        )),
        &[],
    )
    .await;
    for i in 0..3 {
        client.submit("m", job(i, json!([i == 2]))).await.unwrap();
    }
    collect(&mut events, 3, T).await;
    let body = http_get(&maddr, "/metrics").await;
    assert!(
        body.contains("dispynode_jobs_total{status=\"Finished\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("dispynode_jobs_total{status=\"Terminated\"} 1"),
        "{body}"
    );
    assert!(body.contains("dispynode_cpus 2"), "{body}");
    assert!(body.contains("dispynode_busy_cpus 0"), "{body}");
    let received: u64 = body
        .lines()
        .find(|l| l.starts_with("dispynode_received_bytes_total "))
        .and_then(|l| l.split(' ').nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(received > 100, "{body}");
    assert_eq!(http_get(&maddr, "/healthz").await, "ok");
}

#[tokio::test]
async fn close_with_terminate_pending_stops_jobs_runs_cleanup_and_removes_files() {
    let node = NodeProc::start(&["--cpus", "1", "--terminate-grace", "1s"]).await;
    let (client, mut events) = connect(&node).await;
    let marker = node.prefix().join("cleaned");
    let src = format!(
        "import time\ndef setup(n):\n    return 0\ndef f(t):\n    time.sleep(t)\ndef cleanup(n):\n    open({:?}, 'w').write(str(n))\n",
        marker.to_str().unwrap()
    );
    let spec = Computation::Python(PythonComputation {
        setup: Some("setup".into()),
        setup_args: Some("[7]".into()),
        cleanup: Some("cleanup".into()),
        ..python(&src, "f")
    });
    open(&client, "stop", spec, &[("data.txt", b"x")]).await;
    client.submit("stop", job(1, json!([30]))).await.unwrap();
    client.submit("stop", job(2, json!([30]))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(10), client.close("stop", true))
        .await
        .unwrap()
        .unwrap();
    let done = collect(&mut events, 2, T).await;
    assert_eq!(done[&1].status, JobStatus::Terminated);
    assert_eq!(done[&2].status, JobStatus::Cancelled);
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "7",
        "cleanup ran with setup's args"
    );
    assert!(!node.prefix().join("stop").exists());
}

#[tokio::test]
async fn clean_stops_the_previous_node_and_json_logs_parse() {
    let mut first = NodeProc::start(&[]).await;
    let port = first.port.to_string();
    let prefix = first.prefix();
    std::fs::write(prefix.join("leftover.txt"), "old").unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("second.log");
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_dispynode"))
        .args([
            "-i",
            "127.0.0.1",
            "--port",
            &port,
            "--daemon",
            "--clean",
            "--log-format",
            "json",
        ])
        .arg("--dest-path-prefix")
        .arg(&prefix)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    assert_eq!(
        first.wait_exit(Duration::from_secs(15)),
        Some(0),
        "--clean stopped the first node"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let client = loop {
        if let Ok((c, _)) = NodeClient::connect(&format!("127.0.0.1:{port}"), &config("")).await {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second node did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(client.info().computations.is_empty());
    assert!(
        !prefix.join("leftover.txt").exists(),
        "--clean cleared the prefix"
    );
    let _ = second.kill();
    let _ = second.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let first_line = text.lines().next().expect("a log line");
    let v: serde_json::Value = serde_json::from_str(first_line).expect("JSON log line");
    assert!(v["fields"]["message"].as_str().is_some(), "{first_line}");
}

/// Polls `f` every 50 ms for up to 10 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 10 s: {what}");
}

#[tokio::test]
async fn dropping_the_last_client_handle_closes_its_connection_on_both_sides() {
    let node = NodeProc::start(&[]).await;
    // (the start-up probe's connection goes first)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = node.open_fds();
    let (client, mut events) = connect(&node).await;
    eventually("the node holds the connection", || node.open_fds() > idle).await;
    let clone = client.clone();
    drop(client);
    // A clone keeps it: nothing ends for a second (pulses may come).
    let kept = tokio::time::timeout(Duration::from_secs(1), async {
        while events.recv().await.is_some() {}
    })
    .await;
    assert!(kept.is_err(), "the connection ended while a clone was held");
    drop(clone);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(ev) = events.recv().await {
            assert!(
                !matches!(ev, ClientEvent::Disconnected { .. }),
                "closed by us, not lost: {ev:?}"
            );
        }
    })
    .await;
    assert!(ended.is_ok(), "the client's connection task still runs");
    eventually("the node let the connection go", || node.open_fds() <= idle).await;
}
