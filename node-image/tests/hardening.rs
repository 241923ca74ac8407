//! What a peer without the secret, or another client with it, can do to a node: the attacks of
//! issue 14 run against a real `dispynode` on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dispy_core::frame::{frame, read_frame};
use dispy_core::job::JobStatus;
use dispy_core::pickle::{self, Value};
use dispy_core::protocol::*;
use dispy_core::{ClientConfig, ClientError, NodeClient};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

const T: Duration = Duration::from_secs(30);
const SECRET: &str = "s3cret";

fn sha1_hex(text: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn dict(items: Vec<(&str, Value)>) -> Value {
    Value::Dict(items.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// A dispy client's discovery ping: answer to `ip`:`port`, signed `sign`.
fn dispy_ping(sign: &str, ip: &str, port: u16) -> Vec<u8> {
    let info = dict(vec![
        ("version", "4.15.2".into()),
        ("sign", sign.into()),
        ("port", Value::Int(port as i64)),
        ("ip_addrs", Value::List(vec![ip.into()])),
    ]);
    [&b"PING:"[..], &pickle::encode(&info).unwrap()].concat()
}

/// The next message the node sends to our "client port", if one comes within `within`.
async fn next_message(listener: &TcpListener, within: Duration) -> Option<Vec<u8>> {
    let (mut s, _) = tokio::time::timeout(within, listener.accept())
        .await
        .ok()?
        .ok()?;
    read_frame(&mut s, 1 << 20).await.ok().flatten()
}

/// A stand-in dispy client on 127.0.0.1: it pings by UDP, and the node answers on its port.
struct Pinger {
    port: TcpListener,
    udp: UdpSocket,
}

impl Pinger {
    async fn new() -> Pinger {
        Pinger {
            port: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            udp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    /// A ping signed `sign`, asking for the answer at this client's port.
    fn ping(&self, sign: &str) -> Vec<u8> {
        dispy_ping(sign, "127.0.0.1", self.port.local_addr().unwrap().port())
    }

    async fn send(&self, node: &NodeProc, sign: &str) {
        self.udp
            .send_to(&self.ping(sign), node.addr())
            .await
            .unwrap();
    }

    /// The next message the node sends here, if one comes within `within`.
    async fn answer(&self, within: Duration) -> Option<Vec<u8>> {
        next_message(&self.port, within).await
    }

    async fn pong(&self) -> Value {
        pong_fields(&self.answer(T).await.expect("a pong"))
    }
}

/// The node's sign, from its answer to a ping.
async fn node_sign(node: &NodeProc) -> String {
    let pinger = Pinger::new().await;
    pinger.send(node, &"e".repeat(40)).await;
    let pong = pinger.pong().await;
    pong.attr("sign")
        .and_then(Value::as_str)
        .unwrap()
        .to_string()
}

fn pong_fields(msg: &[u8]) -> Value {
    let body = msg.strip_prefix(b"PONG:").expect("a PONG");
    pickle::decode(body).unwrap()
}

/// One dispy request with `auth` as its 40-byte prefix; the node's answer, if any.
async fn dispy_request(node: &NodeProc, auth: &[u8], msg: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(node.addr()).await.unwrap();
    // A node that refuses the request may close before all of it is written.
    let _ = s.write_all(auth).await;
    let _ = s.write_all(&frame(msg)).await;
    tokio::time::timeout(T, read_frame(&mut s, 1 << 20))
        .await
        .ok()?
        .ok()
        .flatten()
}

#[tokio::test]
async fn the_pong_token_leak_gets_nothing_usable_and_replayed_tokens_are_refused() {
    let node = NodeProc::start_with(&[], Some(SECRET)).await;
    let client = Pinger::new().await;

    // A made-up sign gets a PONG: dispy clients check its auth, so the node still signs it.
    let made_up = "f".repeat(40);
    client.send(&node, &made_up).await;
    let pong = client.pong().await;
    let node_sign = pong
        .attr("sign")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let pong_auth = pong
        .attr("auth")
        .and_then(Value::as_bytes)
        .unwrap()
        .to_vec();
    assert_eq!(
        pong_auth,
        sha1_hex(&format!("{SECRET}{made_up}")).as_bytes()
    );

    // The same ping carrying the node's own sign, by UDP and by TCP: no answer at all.
    client.send(&node, &node_sign).await;
    dispy_request(&node, &[b'x'; 40], &client.ping(&node_sign)).await;
    assert!(
        client.answer(Duration::from_secs(3)).await.is_none(),
        "the node answered a ping carrying its own sign"
    );

    // Neither the pong's auth nor a guess opens a request.
    for token in [pong_auth.clone(), sha1_hex("guess").into_bytes()] {
        let status = dispy_request(&node, &token, b"NODE_STATUS:").await.unwrap();
        assert_eq!(pickle::decode(&status).unwrap(), Value::Int(-1));
        let compute = dispy_request(&node, &token, b"COMPUTE:\x80\x04N.")
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&compute);
        assert!(text.starts_with("NAK (authentication failed"), "{text}");
    }
    // The control: the node's real token (which the test computes from the secret) works, so
    // the checks above would have seen a leaked one.
    let token = sha1_hex(&format!("{SECRET}{node_sign}"));
    let status = dispy_request(&node, token.as_bytes(), b"NODE_STATUS:")
        .await
        .unwrap();
    let status = pickle::decode(&status).unwrap();
    assert!(status.attr("busy").is_some(), "{status:?}");
    assert!(
        node.log().contains("this node's own sign"),
        "{}",
        node.log()
    );
}

/// `prefix` + an 8 MB string memoized once and referenced a million times (10 MB on the
/// wire, 8 TB once every reference is a copy).
fn memo_bomb(prefix: &[u8]) -> Vec<u8> {
    [prefix, &pickle::memo_bomb(8 << 20, 1_000_001)].concat()
}

#[tokio::test]
async fn the_memo_bomb_is_refused_before_and_after_auth_and_the_node_then_serves_a_job() {
    let node = NodeProc::start_within(&["--cpus", "1"], Some(SECRET), Some(2 << 30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = node.rss_bytes();

    // Before auth: refused at the frame header, after 44 bytes.
    let mut s = TcpStream::connect(node.addr()).await.unwrap();
    s.write_all(&[b'x'; 40]).await.unwrap();
    let bomb = memo_bomb(b"PING:");
    let _ = s.write_all(&frame(&bomb)).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "the node answered the bomb");

    // After auth: the whole frame is read, and the decoder's budget refuses it.
    let token = sha1_hex(&format!("{SECRET}{}", node_sign(&node).await));
    let answer = dispy_request(&node, token.as_bytes(), &memo_bomb(b"COMPUTE:"))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("too large"), "{text}");

    // A native hello over the pre-auth bound is refused too.
    let mut s = TcpStream::connect(node.addr()).await.unwrap();
    s.write_all(&MAGIC).await.unwrap();
    let _ = s.write_all(&frame(&vec![0u8; 64 << 10])).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());

    let grown = node.rss_bytes().saturating_sub(idle);
    assert!(
        grown < 100 << 20,
        "the node grew by {grown} bytes (idle {idle})"
    );
    assert!(
        node.log().contains("before a client has proven the secret"),
        "{}",
        node.log()
    );

    let config = ClientConfig {
        secret: SECRET.into(),
        ..config(SECRET)
    };
    let (client, mut events) = NodeClient::connect(&node.addr(), &config).await.unwrap();
    open(
        &client,
        "after",
        Computation::Python(python("def f(x):\n    return x + 1\n", "f")),
        &[],
    )
    .await;
    client.submit("after", job(1, json!([41]))).await.unwrap();
    let done = collect(&mut events, 1, T).await;
    assert_eq!(finished(&done[&1]), "42");
}

/// A listening socket that never accepts, with a backlog of one: connections to it beyond the
/// first hang, as to an unreachable host.
fn black_hole() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a fresh descriptor, owned by the returned OwnedFd.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        assert_eq!(
            libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len),
            0
        );
        assert_eq!(libc::listen(fd, 0), 0);
        let mut bound: libc::sockaddr_in = std::mem::zeroed();
        let mut blen = len;
        libc::getsockname(fd, &mut bound as *mut _ as *mut libc::sockaddr, &mut blen);
        (
            std::os::fd::OwnedFd::from_raw_fd(fd),
            u16::from_be(bound.sin_port),
        )
    }
}

#[tokio::test]
async fn ten_thousand_pings_naming_unreachable_addresses_leave_few_sockets_and_the_node_answering()
{
    let node = NodeProc::start_with(&[], Some(SECRET)).await;
    let (_hole, port) = black_hole();
    let before = node.open_fds();
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let native = encode_datagram(&Discovery::Ping {
        protocol: PROTOCOL_VERSION,
    });
    let mut most = 0;
    for i in 0..10_000 {
        let sign = format!("{i:040}");
        udp.send_to(&dispy_ping(&sign, "127.0.0.1", port), node.addr())
            .await
            .unwrap();
        if i % 10 == 0 {
            udp.send_to(&native, node.addr()).await.unwrap();
        }
        if i % 500 == 0 {
            most = most.max(node.open_fds());
            tokio::task::yield_now().await;
        }
    }
    for _ in 0..20 {
        most = most.max(node.open_fds());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        most <= before + 20,
        "the node held {most} descriptors ({before} before the pings)"
    );
    let (client, _events) = NodeClient::connect(&node.addr(), &config(SECRET))
        .await
        .unwrap();
    assert!(client.info().cpus >= 1);
    assert!(
        node.log().contains("over the pong rate limit"),
        "{}",
        node.log()
    );
}

#[tokio::test]
async fn idle_connections_from_one_address_are_capped_and_do_not_lock_out_others() {
    let node = NodeProc::start_with(&[], Some(SECRET)).await;
    let mut idle = Vec::new();
    for _ in 0..40 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(socket.connect(node.addr().parse().unwrap()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The node closes those over the per-source cap at once: their reads see EOF.
    let mut open = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if tokio::time::timeout(Duration::from_millis(50), s.read(&mut b))
            .await
            .is_err()
        {
            open += 1;
        }
    }
    assert!(
        open <= 8,
        "{open} idle connections from one address kept open"
    );
    // A client from another address is served meanwhile.
    let (client, _events) = NodeClient::connect(&node.addr(), &config(SECRET))
        .await
        .unwrap();
    assert!(client.info().cpus >= 1);
}

fn owner_config(owner: &str) -> ClientConfig {
    ClientConfig {
        owner: owner.into(),
        ..config("")
    }
}

#[tokio::test]
async fn a_second_client_is_refused_on_the_first_clients_computation() {
    let node = NodeProc::start(&["--cpus", "1"]).await;
    let (first, _first_events) = NodeClient::connect(&node.addr(), &owner_config("alice"))
        .await
        .unwrap();
    let src = "import time\ndef f(t):\n    time.sleep(t)\n    return t\n";
    open(&first, "mine", Computation::Python(python(src, "f")), &[]).await;
    first.submit("mine", job(1, json!([0.5]))).await.unwrap();

    let (other, _events) = NodeClient::connect(&node.addr(), &owner_config("mallory"))
        .await
        .unwrap();
    assert!(other.info().computations.is_empty(), "{:?}", other.info());
    let refused = |r: Result<(), ClientError>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("belongs to another client"), "{what}: {e}");
    };
    refused(other.attach("mine").await.map(|_| ()), "attach");
    refused(other.cancel("mine", 1).await, "cancel");
    refused(other.ack("mine", vec![1]).await, "ack");
    refused(other.submit("mine", job(2, json!([0]))).await, "submit");
    refused(other.setup("mine").await.map(|_| ()), "setup");
    refused(other.close("mine", true).await, "close");

    // The owner, on a new connection with the same credential, re-attaches and collects.
    drop(first);
    let (again, mut events) = NodeClient::connect(&node.addr(), &owner_config("alice"))
        .await
        .unwrap();
    assert_eq!(again.info().computations, vec!["mine".to_string()]);
    again.attach("mine").await.unwrap();
    let done = collect(&mut events, 1, T).await;
    assert_eq!(finished(&done[&1]), "0.5");
    again.close("mine", false).await.unwrap();
}

#[tokio::test]
async fn a_20_mb_result_is_terminated_and_the_next_job_on_the_same_connection_finishes() {
    let node = NodeProc::start(&["--cpus", "1"]).await;
    let (client, mut events) = connect(&node).await;
    let src = "def f(n):\n    return 'x' * n\n";
    open(&client, "big", Computation::Python(python(src, "f")), &[]).await;
    client
        .submit("big", job(1, json!([20 << 20])))
        .await
        .unwrap();
    let done = collect(&mut events, 1, T).await;
    let big = &done[&1];
    assert_eq!(big.status, JobStatus::Terminated);
    let why = big.exception.as_deref().unwrap_or("");
    assert!(why.contains("--max-frame"), "{why}");
    client.submit("big", job(2, json!([3]))).await.unwrap();
    let done = collect(&mut events, 1, T).await;
    assert_eq!(finished(&done[&2]), "\"xxx\"");
    assert!(client.is_connected());
}

#[tokio::test]
async fn no_dispy_serves_only_the_native_protocol() {
    let node = NodeProc::start(&["--no-dispy"]).await;
    let answer = dispy_request(&node, &[b'x'; 40], b"NODE_STATUS:").await;
    assert_eq!(answer, None, "a dispy request was answered");
    let client = Pinger::new().await;
    client.send(&node, &"a".repeat(40)).await;
    assert!(client.answer(Duration::from_secs(2)).await.is_none());
    assert!(node.log().contains("--no-dispy"), "{}", node.log());
    let (client, _events) = connect(&node).await;
    let started = Instant::now();
    open(
        &client,
        "n",
        Computation::Python(python("def f():\n    return 1\n", "f")),
        &[],
    )
    .await;
    assert!(started.elapsed() < T);
}

#[tokio::test]
async fn the_admin_secret_opens_node_status_and_nothing_else() {
    let node = NodeProc::start_with(&["--admin_secret", "adm"], Some(SECRET)).await;
    let admin = sha1_hex(&format!("adm{}", node_sign(&node).await));
    let status = dispy_request(&node, admin.as_bytes(), b"NODE_STATUS:")
        .await
        .unwrap();
    let status = pickle::decode(&status).unwrap();
    assert!(status.attr("busy").is_some(), "{status:?}");
    let compute = dispy_request(&node, admin.as_bytes(), b"COMPUTE:\x80\x04N.")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&compute);
    assert!(text.starts_with("NAK (authentication failed"), "{text}");
}
