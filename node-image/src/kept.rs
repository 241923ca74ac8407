//! Idle connections kept for the next request, for the peers that keep them: our dispynode
//! keeps a JOB's connection for the next JOB, our dispyscheduler a JOB_REPLY's for the next
//! reply. Shared by dispynode and dispyscheduler.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a kept connection may wait for its next request here: well within the peer's
/// own wait ([`PEER_WAITS`]), so that a request never meets the peer's close of an idle
/// connection on the way.
pub const KEPT_IDLE: Duration = Duration::from_secs(10);
/// How long the side that keeps a connection waits for the next request on it.
pub const PEER_WAITS: Duration = Duration::from_secs(30);
/// Kept connections per peer: more than the requests in flight to one peer at once.
const KEPT_PER_PEER: usize = 32;

/// Idle connections to peers that keep them, by peer: each taken for one request at a time,
/// given back after its answer, dropped once idle for [`KEPT_IDLE`].
pub struct Kept<T> {
    inner: Mutex<KeptInner<T>>,
}

struct KeptInner<T> {
    idle: HashMap<(String, u16), Vec<(T, Instant)>>,
    swept: Instant,
}

impl<T> Kept<T> {
    pub fn new(now: Instant) -> Kept<T> {
        Kept {
            inner: Mutex::new(KeptInner {
                idle: HashMap::new(),
                swept: now,
            }),
        }
    }

    /// The most recently used idle connection to `peer` that has not expired.
    pub fn take(&self, peer: &(String, u16), now: Instant) -> Option<T> {
        let mut inner = self.inner.lock().unwrap();
        let list = inner.idle.get_mut(peer)?;
        while let Some((conn, since)) = list.pop() {
            if now.duration_since(since) < KEPT_IDLE {
                return Some(conn);
            }
        }
        None
    }

    /// Gives a connection back once its answer is read. Expired connections (those of peers
    /// no longer used too) are dropped, at most every [`KEPT_IDLE`].
    pub fn put(&self, peer: (String, u16), conn: T, now: Instant) {
        let mut inner = self.inner.lock().unwrap();
        if now.duration_since(inner.swept) >= KEPT_IDLE {
            inner.swept = now;
            inner.idle.retain(|_, list| {
                list.retain(|(_, since)| now.duration_since(*since) < KEPT_IDLE);
                !list.is_empty()
            });
        }
        let list = inner.idle.entry(peer).or_default();
        if list.len() < KEPT_PER_PEER {
            list.push((conn, now));
        }
    }

    /// One request to a peer that keeps the connection after answering `ACK`: `exchange`
    /// sends the message on a connection and reads the answer. It goes on one of the kept
    /// connections to `peer` when there is one. A kept connection that fails or is closed
    /// before the answer (empty) was closed by the peer meanwhile without reading the message
    /// (it answers what it read, and a reply read twice is taken once): the message then goes
    /// once more, on a new connection from `connect`, whose failure is the answer. A
    /// connection that brought an `ACK` is kept. Returns the answer and whether it came on a
    /// kept connection. The caller bounds the whole in time.
    pub async fn request<E, C, X, CF, XF>(
        &self,
        peer: (String, u16),
        connect: C,
        mut exchange: X,
    ) -> Result<(Vec<u8>, bool), E>
    where
        C: FnOnce() -> CF,
        CF: Future<Output = Result<T, E>>,
        X: FnMut(T) -> XF,
        XF: Future<Output = Result<(T, Vec<u8>), E>>,
    {
        if let Some(conn) = self.take(&peer, Instant::now()) {
            if let Ok((conn, answer)) = exchange(conn).await {
                if !answer.is_empty() {
                    self.keep_after(peer, conn, &answer);
                    return Ok((answer, true));
                }
            }
        }
        let (conn, answer) = exchange(connect().await?).await?;
        self.keep_after(peer, conn, &answer);
        Ok((answer, false))
    }

    fn keep_after(&self, peer: (String, u16), conn: T, answer: &[u8]) {
        if answer == b"ACK" {
            self.put(peer, conn, Instant::now());
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.inner.lock().unwrap().idle.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> (String, u16) {
        (ip.to_owned(), 9701)
    }

    #[test]
    fn a_kept_connection_is_reused_until_it_has_been_idle_too_long() {
        let t0 = Instant::now();
        let kept = Kept::new(t0);
        kept.put(peer("10.0.0.1"), 1, t0);
        kept.put(peer("10.0.0.1"), 2, t0 + Duration::from_secs(1));
        assert_eq!(kept.take(&peer("10.0.0.2"), t0), None, "another node's");
        // The freshest first; one taken is not given to anyone else.
        assert_eq!(
            kept.take(&peer("10.0.0.1"), t0 + Duration::from_secs(2)),
            Some(2)
        );
        // Idle for KEPT_IDLE: the node may be about to close it.
        assert_eq!(kept.take(&peer("10.0.0.1"), t0 + KEPT_IDLE), None);
        assert_eq!(kept.idle(), 0, "the expired one was dropped on the way");
    }

    #[test]
    fn kept_connections_are_bounded_per_node_and_those_of_nodes_gone_quiet_are_swept() {
        let t0 = Instant::now();
        let kept = Kept::new(t0);
        for i in 0..100 {
            kept.put(peer("10.0.0.1"), i, t0);
        }
        assert_eq!(kept.idle(), KEPT_PER_PEER);
        // Nothing asks for 10.0.0.1's again; a later put elsewhere drops them.
        kept.put(peer("10.0.0.2"), 0, t0 + KEPT_IDLE);
        assert_eq!(kept.idle(), 1);
    }

    /// A connection in the tests: its number, and whether the peer has closed it.
    #[derive(Debug, PartialEq)]
    struct Conn(u32, bool);

    async fn exchange(c: Conn, answer: &'static [u8]) -> Result<(Conn, Vec<u8>), String> {
        if c.1 {
            Err(format!("connection {} closed by the peer", c.0))
        } else {
            Ok((c, answer.to_vec()))
        }
    }

    #[tokio::test]
    async fn a_request_goes_on_a_kept_connection_and_an_acked_one_is_kept_for_the_next() {
        let kept = Kept::new(Instant::now());
        let first = kept
            .request(
                peer("10.0.0.1"),
                || async { Ok(Conn(1, false)) },
                |c| exchange(c, b"ACK"),
            )
            .await;
        assert_eq!(
            first,
            Ok((b"ACK".to_vec(), false)),
            "no kept one yet: a new one"
        );
        let second = kept
            .request(
                peer("10.0.0.1"),
                || async { Err("connected again".to_string()) },
                |c| exchange(c, b"ACK"),
            )
            .await;
        assert_eq!(second, Ok((b"ACK".to_vec(), true)));
        assert_eq!(kept.idle(), 1, "back for the next");
        // A refusal is answered, and that connection is not kept (the peer closes it).
        let refused = kept
            .request(
                peer("10.0.0.1"),
                || async { Ok(Conn(2, false)) },
                |c| exchange(c, b"NAK"),
            )
            .await;
        assert_eq!(refused, Ok((b"NAK".to_vec(), true)));
        assert_eq!(kept.idle(), 0);
    }

    #[tokio::test]
    async fn a_kept_connection_the_peer_closed_sends_the_message_once_more_on_a_new_one() {
        let kept = Kept::new(Instant::now());
        kept.put(peer("10.0.0.1"), Conn(1, true), Instant::now());
        let mut tries = Vec::new();
        let answer = kept
            .request(
                peer("10.0.0.1"),
                || async { Ok(Conn(2, false)) },
                |c| {
                    tries.push(c.0);
                    exchange(c, b"ACK")
                },
            )
            .await;
        assert_eq!(answer, Ok((b"ACK".to_vec(), false)));
        assert_eq!(tries, [1, 2], "the kept one, then one new one");
        // The new connection fails too: that is the answer, with no third try.
        kept.take(&peer("10.0.0.1"), Instant::now());
        kept.put(peer("10.0.0.1"), Conn(3, true), Instant::now());
        let gone = kept
            .request(
                peer("10.0.0.1"),
                || async { Ok(Conn(4, true)) },
                |c| exchange(c, b"ACK"),
            )
            .await;
        assert_eq!(gone, Err("connection 4 closed by the peer".to_string()));
    }
}
