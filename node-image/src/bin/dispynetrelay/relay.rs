//! What the relay decides, without sockets: which datagram is what, where a client's ping is
//! fanned out, and who gets each answer. `main.rs` does the I/O.
//!
//! A relay host sits on several subnets. A client's discovery ping reaches the relay on the
//! client's subnet (broadcast, or unicast to the relay); the relay sends a ping of its own on
//! each of its other subnets and forwards every answer to the client. Node start-up
//! announcements heard on the client port go to the `--scheduler-node`s.
//!
//! Loops: pings from the relay's own addresses are ignored, and while a fan-out on a subnet is
//! open (its answer window), further pings for that subnet only join its list of recipients
//! (and get the answers that came so far). So two relays that share two subnets bounce a ping
//! once, not forever.
//!
//! dispy's own discovery (module [`dispy`]) goes differently, as dispy's `dispynetrelay.py`
//! does: the relay first sends the client `RELAY_INFO:` and relays only when the client
//! answers; nodes answer the client directly over TCP, so nothing comes back to the relay.
//! Relayed dispy pings carry `'relay': 'y'` and are never relayed again.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use dispy_core::discovery::Interface;
use dispy_core::protocol::{decode_datagram, encode_datagram, Discovery, PROTOCOL_VERSION};

/// How long answers to a fanned-out ping are forwarded (clients wait 2 s for answers).
pub const ANSWER_WINDOW: Duration = Duration::from_secs(3);
/// At most this many dispy clients within one window: pings name their own addresses, so a
/// flood of forged ones is not relayed (nor answered with `RELAY_INFO`) beyond it.
pub const MAX_DISPY_CLIENTS: usize = 256;

/// A discovery datagram, in whichever wire format it came.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A client's discovery ping.
    Ping,
    /// A node's answer to a ping, or its start-up announcement; `node` names it for logs.
    Answer { node: String },
}

/// A discovery wire format whose answers come back to the relay, which forwards them: the
/// native one, [`Native`]. dispy's format is not one of these (its nodes answer the client
/// directly, after the relay has checked with the client); see [`dispy`].
pub trait Format: Send + Sync {
    fn name(&self) -> &'static str;
    /// What `datagram` is, or `None` when it is not of this format (or not understood).
    fn recognise(&self, datagram: &[u8]) -> Option<Seen>;
    /// The ping the relay sends on its other subnets for the client's `ping`.
    fn relayed_ping(&self, ping: &[u8]) -> Vec<u8>;
    /// A ping the relay sends on its own account (for `--scheduler-node`).
    fn own_ping(&self) -> Vec<u8>;
}

/// The native discovery format of `dispy-core` (`NDSP` + MessagePack).
pub struct Native;

impl Format for Native {
    fn name(&self) -> &'static str {
        "native"
    }
    fn recognise(&self, datagram: &[u8]) -> Option<Seen> {
        match decode_datagram(datagram)? {
            Ok(Discovery::Ping { .. }) => Some(Seen::Ping),
            Ok(Discovery::Pong(n)) => Some(Seen::Answer {
                node: format!("{} ({}:{})", n.name, n.addr, n.port),
            }),
            Err(_) => None,
        }
    }
    fn relayed_ping(&self, _ping: &[u8]) -> Vec<u8> {
        // The node answers whoever sent the ping: the relay, which forwards the answer.
        self.own_ping()
    }
    fn own_ping(&self) -> Vec<u8> {
        encode_datagram(&Discovery::Ping {
            protocol: PROTOCOL_VERSION,
        })
    }
}

/// The formats the relay serves, tried in order.
pub fn formats() -> Vec<Box<dyn Format>> {
    vec![Box::new(Native)]
}

/// What the I/O side does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Broadcast `datagram` on the subnet of the interface with address `iface`, at the node
    /// port, from that interface's relay socket (answers come back to it).
    FanOut { iface: Ipv4Addr, datagram: Vec<u8> },
    /// Send `datagram` to `to`.
    Forward { to: SocketAddr, datagram: Vec<u8> },
}

fn same_subnet(i: &Interface, ip: Ipv4Addr) -> bool {
    let m = u32::from(i.netmask);
    u32::from(i.ip) & m == u32::from(ip) & m
}

struct FanOut {
    until: Instant,
    recipients: Vec<SocketAddr>,
    /// Answers so far, for recipients that join later.
    answers: Vec<Vec<u8>>,
}

pub struct Relay {
    interfaces: Vec<Interface>,
    schedulers: Vec<SocketAddrV4>,
    open: HashMap<Ipv4Addr, FanOut>,
    /// dispy clients (address, port) whose pings were relayed lately, and until when a ping of
    /// theirs is not relayed again.
    dispy_recent: HashMap<(String, u16), Instant>,
    /// The dispy client that last confirmed a relayed ping (`RELAY_INFO`): it hears of nodes
    /// that start later, as with dispy's relay (which keeps only the latest one too).
    dispy_client: Option<SocketAddrV4>,
}

impl Relay {
    /// Relays between `interfaces` (those with a broadcast address); node announcements go to
    /// `schedulers`.
    pub fn new(interfaces: Vec<Interface>, schedulers: Vec<SocketAddrV4>) -> Relay {
        Relay {
            interfaces: interfaces
                .into_iter()
                .filter(|i| i.broadcast.is_some())
                .collect(),
            schedulers,
            open: HashMap::new(),
            dispy_recent: HashMap::new(),
            dispy_client: None,
        }
    }

    fn is_own(&self, ip: Ipv4Addr) -> bool {
        self.interfaces.iter().any(|i| i.ip == ip)
    }

    /// A ping from `from`: fan it out on every subnet but the sender's, and remember `reply_to`
    /// as a recipient of the answers.
    pub fn on_ping(
        &mut self,
        now: Instant,
        from: SocketAddrV4,
        reply_to: SocketAddr,
        fan_out: &[u8],
    ) -> Vec<Action> {
        if self.is_own(*from.ip()) {
            return vec![];
        }
        self.open.retain(|_, f| f.until > now);
        let mut actions = vec![];
        for i in &self.interfaces {
            if same_subnet(i, *from.ip()) {
                continue;
            }
            match self.open.get_mut(&i.ip) {
                Some(f) => {
                    if !f.recipients.contains(&reply_to) {
                        f.recipients.push(reply_to);
                        actions.extend(f.answers.iter().map(|a| Action::Forward {
                            to: reply_to,
                            datagram: a.clone(),
                        }));
                    }
                }
                None => {
                    self.open.insert(
                        i.ip,
                        FanOut {
                            until: now + ANSWER_WINDOW,
                            recipients: vec![reply_to],
                            answers: vec![],
                        },
                    );
                    actions.push(Action::FanOut {
                        iface: i.ip,
                        datagram: fan_out.to_vec(),
                    });
                }
            }
        }
        actions
    }

    /// Pings on every subnet for each scheduler node not on it (at start), so the schedulers
    /// hear of the nodes that are already up.
    pub fn ping_for_schedulers(&mut self, now: Instant, ping: &[u8]) -> Vec<Action> {
        let mut actions = vec![];
        for s in self.schedulers.clone() {
            let from = SocketAddrV4::new(*s.ip(), 0);
            actions.extend(self.on_ping(now, from, SocketAddr::V4(s), ping));
        }
        actions
    }

    /// An answer that came back to the relay socket of interface `iface`: forwarded to the
    /// recipients of the fan-out still open there.
    pub fn on_answer(&mut self, now: Instant, iface: Ipv4Addr, datagram: &[u8]) -> Vec<Action> {
        match self.open.get_mut(&iface) {
            Some(f) if f.until > now => {
                if !f.answers.iter().any(|a| a == datagram) {
                    f.answers.push(datagram.to_vec());
                }
                f.recipients
                    .iter()
                    .map(|to| Action::Forward {
                        to: *to,
                        datagram: datagram.to_vec(),
                    })
                    .collect()
            }
            _ => vec![],
        }
    }

    /// A node's start-up announcement heard on the client port, from `from`: forwarded to each
    /// scheduler node not on the node's own subnet (that one heard it already).
    pub fn on_announcement(&self, from: SocketAddrV4, datagram: &[u8]) -> Vec<Action> {
        self.announce_to(&self.schedulers, from, datagram)
    }

    fn announce_to(
        &self,
        schedulers: &[SocketAddrV4],
        from: SocketAddrV4,
        datagram: &[u8],
    ) -> Vec<Action> {
        if self.is_own(*from.ip()) {
            return vec![];
        }
        let subnet_of_node = self.interfaces.iter().find(|i| same_subnet(i, *from.ip()));
        schedulers
            .iter()
            .filter(|s| !subnet_of_node.is_some_and(|i| same_subnet(i, *s.ip())))
            .map(|s| Action::Forward {
                to: SocketAddr::V4(*s),
                datagram: datagram.to_vec(),
            })
            .collect()
    }

    /// A dispy client's ping from `from` (UDP, or TCP to the relay port): the interfaces to
    /// relay it on once the client confirms (`RELAY_INFO`) — all but the sender's subnet. None
    /// for a ping the relay sent itself or relayed already, or a client whose ping was relayed
    /// within [`ANSWER_WINDOW`] (a client pings the relay by TCP and by broadcast at once).
    pub fn on_dispy_ping(
        &mut self,
        now: Instant,
        from: SocketAddrV4,
        ping: &dispy::ClientPing,
    ) -> Vec<Ipv4Addr> {
        if ping.relayed || self.is_own(*from.ip()) {
            return vec![];
        }
        self.dispy_recent.retain(|_, until| *until > now);
        let key = (ping.ip_addrs.join(","), ping.port);
        if self.dispy_recent.contains_key(&key) || self.dispy_recent.len() >= MAX_DISPY_CLIENTS {
            return vec![];
        }
        self.dispy_recent.insert(key, now + ANSWER_WINDOW);
        self.interfaces
            .iter()
            .filter(|i| !same_subnet(i, *from.ip()))
            .map(|i| i.ip)
            .collect()
    }

    /// The dispy client at `client` confirmed a relayed ping: node announcements go to it too.
    pub fn dispy_client_confirmed(&mut self, client: SocketAddrV4) {
        self.dispy_client = Some(client);
    }

    /// A dispy node's announcement (`PING:` on the client port) from `from`: forwarded as it
    /// is to the scheduler nodes and to the latest dispy client, unless on the node's subnet
    /// (the I/O side sends it over TCP, where dispy's client takes a node's announcement).
    pub fn on_dispy_announcement(&self, from: SocketAddrV4, datagram: &[u8]) -> Vec<Action> {
        let mut to = self.schedulers.clone();
        if let Some(c) = self.dispy_client.filter(|c| !to.contains(c)) {
            to.push(c);
        }
        self.announce_to(&to, from, datagram)
    }
}

/// dispy 4.15's discovery messages as the relay reads and writes them (`dispynetrelay.py`):
/// bytes in, data out; every unreadable input an error naming what was wrong.
pub mod dispy {
    use dispy_core::pickle::{self, Value};

    /// The prefix of a dispy ping, a node's announcement and a relayed ping.
    pub const PING: &[u8] = b"PING:";
    /// What decoding one of these small messages may materialize (they are a few hundred bytes).
    const BUDGET: usize = 64 * 1024;
    /// At most this many client addresses are tried for `RELAY_INFO`.
    pub const MAX_CLIENT_ADDRS: usize = 4;

    /// A client's discovery ping (`broadcast_ping` / `send_ping_node` in dispy's client).
    #[derive(Debug, Clone, PartialEq)]
    pub struct ClientPing {
        pub version: String,
        /// Where the client takes connections (its `ip_addrs`), at `port`.
        pub ip_addrs: Vec<String>,
        pub port: u16,
        pub sign: Option<String>,
        /// Sent by a relay (`'relay': 'y'`): not relayed again.
        pub relayed: bool,
    }

    /// A node's start-up announcement (`broadcast_ping_msg` in dispynode.py).
    #[derive(Debug, Clone, PartialEq)]
    pub struct NodeAnnouncement {
        pub ip_addr: String,
        pub port: u16,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub enum Message {
        ClientPing(ClientPing),
        Node(NodeAnnouncement),
    }

    fn port(v: &Value, what: &str) -> Result<u16, String> {
        match v.as_dict_get("port") {
            Some(p) => p
                .as_int()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{what}: \"port\" is {p:?}, not a port number")),
            None => Err(format!("{what}: no \"port\"")),
        }
    }

    fn text(v: &Value, key: &str) -> Option<String> {
        v.as_dict_get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// A `PING:` datagram or TCP message: a client's ping (it has `ip_addrs`) or a node's
    /// announcement (it has `ip_addr`).
    pub fn parse(msg: &[u8]) -> Result<Message, String> {
        let body = msg
            .strip_prefix(PING)
            .ok_or("not a dispy message: no \"PING:\" prefix")?;
        let v = pickle::decode_within(body, BUDGET)
            .map_err(|e| format!("dispy ping: unreadable pickle: {e}"))?;
        if v.as_dict().is_none() {
            return Err(format!("dispy ping: a {}, not a dict", v.kind()));
        }
        let version = text(&v, "version").ok_or("dispy ping: no \"version\" str")?;
        if let Some(addrs) = v.as_dict_get("ip_addrs") {
            let addrs = addrs
                .as_seq()
                .ok_or("dispy ping: \"ip_addrs\" is not a list")?;
            let ip_addrs: Vec<String> = addrs
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            if ip_addrs.is_empty() {
                return Err("dispy ping: \"ip_addrs\" names no address".into());
            }
            return Ok(Message::ClientPing(ClientPing {
                version,
                ip_addrs,
                port: port(&v, "dispy ping")?,
                sign: text(&v, "sign").filter(|s| !s.is_empty()),
                relayed: v
                    .as_dict_get("relay")
                    .is_some_and(|r| !r.is_none() && r.as_str() != Some("")),
            }));
        }
        match text(&v, "ip_addr") {
            Some(ip_addr) => Ok(Message::Node(NodeAnnouncement {
                ip_addr,
                port: port(&v, "dispy node announcement")?,
            })),
            None => Err(
                "dispy ping: neither \"ip_addrs\" (a client's) nor \"ip_addr\" (a node's)".into(),
            ),
        }
    }

    fn dict(items: Vec<(&str, Value)>) -> Value {
        Value::Dict(items.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// `RELAY_INFO:` for the client at `client_ip`, as dispy's relay sends it. The client
    /// answers only if `version` is its own and, when the ping was signed, `auth` — the
    /// relay's `sha1(secret + sign)` — equals its own: a relay without the client's secret
    /// cannot make it announce itself.
    pub fn relay_info(ping: &ClientPing, client_ip: &str, secret: &str) -> Vec<u8> {
        let mut items = vec![
            ("version", ping.version.as_str().into()),
            (
                "ip_addrs",
                Value::List(ping.ip_addrs.iter().map(|a| a.as_str().into()).collect()),
            ),
            ("port", Value::Int(ping.port.into())),
            (
                "sign",
                ping.sign.as_deref().map_or(Value::None, Value::from),
            ),
            ("relay", "y".into()),
            ("scheduler_ip_addr", client_ip.into()),
        ];
        if let Some(sign) = &ping.sign {
            items.push((
                "auth",
                Value::bytes(crate::auth::auth_code(secret, sign).into_bytes()),
            ));
        }
        let body = pickle::encode(&dict(items)).expect("a dict of str, int and bytes encodes");
        [&b"RELAY_INFO:"[..], &body].concat()
    }

    /// The client's answer to `RELAY_INFO`: the port it takes nodes' connections on, or why
    /// it will not have the ping relayed.
    pub fn relay_info_reply(frame: &[u8]) -> Result<u16, String> {
        let v = pickle::decode_within(frame, BUDGET)
            .map_err(|e| format!("unreadable RELAY_INFO reply: {e}"))?;
        if v.is_none() {
            return Err("the client refused RELAY_INFO (its secret or dispy version differs from the relay's ping)".into());
        }
        port(&v, "RELAY_INFO reply")
    }

    /// The ping the relay broadcasts for a client that confirmed at `client_ip`:`port`. It
    /// names only the client and carries no sign, so each node answers with its own
    /// announcement to the client, which then authenticates the node itself; the client's
    /// sign, and the `auth` derived from it, are never broadcast.
    pub fn relayed_ping(version: &str, client_ip: &str, port: u16) -> Vec<u8> {
        let v = dict(vec![
            ("version", version.into()),
            ("ip_addrs", Value::List(vec![client_ip.into()])),
            ("port", Value::Int(port.into())),
            ("sign", Value::None),
            ("relay", "y".into()),
            ("scheduler_ip_addr", client_ip.into()),
        ]);
        [
            PING,
            &pickle::encode(&v).expect("a dict of str and int encodes"),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispy_core::protocol::NodeAnnouncement;

    fn iface(ip: [u8; 4], prefix: u32) -> Interface {
        let mask = Ipv4Addr::from(u32::MAX << (32 - prefix));
        let ip = Ipv4Addr::from(ip);
        Interface {
            ip,
            netmask: mask,
            broadcast: Some(Ipv4Addr::from(u32::from(ip) | !u32::from(mask))),
        }
    }

    /// A relay on 10.0.1.1/24 (clients) and 10.0.2.1/24 (nodes).
    fn relay(schedulers: &[&str]) -> Relay {
        Relay::new(
            vec![iface([10, 0, 1, 1], 24), iface([10, 0, 2, 1], 24)],
            schedulers.iter().map(|s| s.parse().unwrap()).collect(),
        )
    }

    fn pong() -> Vec<u8> {
        encode_datagram(&Discovery::Pong(NodeAnnouncement {
            name: "n1".into(),
            addr: "10.0.2.7".into(),
            port: 9701,
            cpus: 4,
            version: "0.1.0".into(),
            protocol: 1,
            tls: false,
        }))
    }

    #[test]
    fn native_datagrams_are_recognised_and_foreign_ones_are_not() {
        let n = Native;
        assert_eq!(n.recognise(&n.own_ping()), Some(Seen::Ping));
        assert_eq!(
            n.recognise(&pong()),
            Some(Seen::Answer {
                node: "n1 (10.0.2.7:9701)".into()
            })
        );
        assert_eq!(n.recognise(b"PING:\x80\x04}q\x00."), None);
        assert_eq!(n.recognise(b"NDSP\xc1broken"), None);
        assert_eq!(n.recognise(b""), None);
    }

    #[test]
    fn a_ping_goes_to_the_other_subnets_and_answers_back_to_the_client() {
        let mut r = relay(&[]);
        let now = Instant::now();
        let client: SocketAddrV4 = "10.0.1.9:40000".parse().unwrap();
        let ping = Native.own_ping();
        let a = r.on_ping(now, client, client.into(), &ping);
        assert_eq!(
            a,
            [Action::FanOut {
                iface: Ipv4Addr::new(10, 0, 2, 1),
                datagram: ping.clone()
            }]
        );
        let answer = pong();
        let f = r.on_answer(now, Ipv4Addr::new(10, 0, 2, 1), &answer);
        assert_eq!(
            f,
            [Action::Forward {
                to: client.into(),
                datagram: answer.clone()
            }]
        );
        // After the window, answers go nowhere.
        let later = now + ANSWER_WINDOW + Duration::from_millis(1);
        assert!(r
            .on_answer(later, Ipv4Addr::new(10, 0, 2, 1), &answer)
            .is_empty());
    }

    #[test]
    fn pings_during_an_open_fan_out_join_it_instead_of_sending_again() {
        let mut r = relay(&[]);
        let now = Instant::now();
        let ping = Native.own_ping();
        let c1: SocketAddrV4 = "10.0.1.9:40000".parse().unwrap();
        let c2: SocketAddrV4 = "10.0.1.10:40001".parse().unwrap();
        assert_eq!(r.on_ping(now, c1, c1.into(), &ping).len(), 1);
        // The same client again (it pings the subnet and the limited broadcast) and another.
        assert!(r.on_ping(now, c1, c1.into(), &ping).is_empty());
        assert!(r
            .on_ping(now + Duration::from_millis(10), c2, c2.into(), &ping)
            .is_empty());
        let f = r.on_answer(now, Ipv4Addr::new(10, 0, 2, 1), &pong());
        let to: Vec<SocketAddr> = f
            .iter()
            .map(|a| match a {
                Action::Forward { to, .. } => *to,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(to, [SocketAddr::from(c1), SocketAddr::from(c2)]);
        // Once the window has passed, a ping fans out again.
        let later = now + ANSWER_WINDOW + Duration::from_millis(1);
        assert_eq!(r.on_ping(later, c1, c1.into(), &ping).len(), 1);
    }

    #[test]
    fn a_client_that_joins_an_open_fan_out_gets_the_answers_so_far() {
        let mut r = relay(&[]);
        let now = Instant::now();
        let ping = Native.own_ping();
        let c1: SocketAddrV4 = "10.0.1.9:40000".parse().unwrap();
        let c2: SocketAddrV4 = "10.0.1.9:40002".parse().unwrap();
        r.on_ping(now, c1, c1.into(), &ping);
        r.on_answer(now, Ipv4Addr::new(10, 0, 2, 1), &pong());
        // The same answer twice (a node answering on two addresses of one subnet) is kept once.
        r.on_answer(now, Ipv4Addr::new(10, 0, 2, 1), &pong());
        let a = r.on_ping(now + Duration::from_secs(1), c2, c2.into(), &ping);
        assert_eq!(
            a,
            [Action::Forward {
                to: c2.into(),
                datagram: pong()
            }]
        );
    }

    #[test]
    fn the_relays_own_pings_are_not_relayed_again() {
        let mut r = relay(&[]);
        let own: SocketAddrV4 = "10.0.2.1:5555".parse().unwrap();
        assert!(r
            .on_ping(Instant::now(), own, own.into(), &Native.own_ping())
            .is_empty());
        assert!(r.on_announcement(own, &pong()).is_empty());
    }

    #[test]
    fn a_ping_from_a_far_subnet_goes_to_every_subnet_of_the_relay() {
        let mut r = relay(&[]);
        let far: SocketAddrV4 = "192.168.5.5:40000".parse().unwrap();
        let a = r.on_ping(Instant::now(), far, far.into(), &Native.own_ping());
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn interfaces_without_broadcast_are_left_out() {
        let mut p2p = iface([10, 0, 3, 1], 32);
        p2p.broadcast = None;
        let mut r = Relay::new(vec![iface([10, 0, 1, 1], 24), p2p], vec![]);
        let far: SocketAddrV4 = "192.168.5.5:40000".parse().unwrap();
        let a = r.on_ping(Instant::now(), far, far.into(), &Native.own_ping());
        assert_eq!(
            a,
            [Action::FanOut {
                iface: Ipv4Addr::new(10, 0, 1, 1),
                datagram: Native.own_ping()
            }]
        );
    }

    #[test]
    fn announcements_go_to_schedulers_on_other_subnets() {
        let r = relay(&["10.0.1.5:9700", "10.0.2.6:9700"]);
        let node: SocketAddrV4 = "10.0.2.7:9701".parse().unwrap();
        let a = r.on_announcement(node, &pong());
        assert_eq!(
            a,
            [Action::Forward {
                to: "10.0.1.5:9700".parse().unwrap(),
                datagram: pong()
            }]
        );
    }

    #[test]
    fn the_relay_pings_for_its_schedulers_and_forwards_answers_to_their_client_port() {
        let mut r = relay(&["10.0.1.5:9700"]);
        let now = Instant::now();
        let a = r.ping_for_schedulers(now, &Native.own_ping());
        assert_eq!(
            a,
            [Action::FanOut {
                iface: Ipv4Addr::new(10, 0, 2, 1),
                datagram: Native.own_ping()
            }]
        );
        assert_eq!(
            r.on_answer(now, Ipv4Addr::new(10, 0, 2, 1), &pong()),
            [Action::Forward {
                to: "10.0.1.5:9700".parse().unwrap(),
                datagram: pong()
            }]
        );
    }

    // Made by dispy 4.15.2's client and node (pycos.serialize) for these values:
    // a client's ping {'version': '4.15.2', 'sign': 'ab'*20, 'port': 9700,
    // 'ip_addrs': ['10.0.1.9'], 'node_ip_addr': '10.0.1.1'}, ...
    const PYTHON_CLIENT_PING: &str = "50494e473a80059587000000000000007d94288c0776657273696f6e948c06342e31352e32948c047369676e948c2861626162616261626162616261626162616261626162616261626162616261626162616261626162948c04706f7274944de4258c0869705f6164647273945d948c0831302e302e312e3994618c0c6e6f64655f69705f61646472948c0831302e302e312e3194752e";
    // ... a node's announcement {'ip_addr': '10.0.2.7', 'port': 9701, 'sign': 'cd'*20,
    // 'version': '4.15.2', 'scheduler_ip_addr': None}, ...
    const PYTHON_NODE_PING: &str = "50494e473a8005957e000000000000007d94288c0769705f61646472948c0831302e302e322e37948c04706f7274944de5258c047369676e948c2863646364636463646364636463646364636463646364636463646364636463646364636463646364948c0776657273696f6e948c06342e31352e32948c117363686564756c65725f69705f61646472944e752e";
    // ... the client's RELAY_INFO answer {'sign': 'ef'*20, 'ip_addrs': ['10.0.1.9'],
    // 'port': 9700}, and its refusal, None.
    const PYTHON_RELAY_INFO_REPLY: &str = "8005955a000000000000007d94288c047369676e948c2865666566656665666566656665666566656665666566656665666566656665666566656665666566948c0869705f6164647273945d948c0831302e302e312e3994618c04706f7274944de425752e";
    const PYTHON_NONE: &str = "80054e2e";

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    fn client_ping() -> dispy::ClientPing {
        match dispy::parse(&unhex(PYTHON_CLIENT_PING)).unwrap() {
            dispy::Message::ClientPing(p) => p,
            other => panic!("{other:?}"),
        }
    }

    fn decoded(msg: &[u8], prefix: &[u8]) -> dispy_core::pickle::Value {
        dispy_core::pickle::decode(msg.strip_prefix(prefix).expect("the prefix")).unwrap()
    }

    #[test]
    fn dispys_client_ping_and_node_announcement_are_told_apart() {
        assert_eq!(
            client_ping(),
            dispy::ClientPing {
                version: "4.15.2".into(),
                ip_addrs: vec!["10.0.1.9".into()],
                port: 9700,
                sign: Some("ab".repeat(20)),
                relayed: false,
            }
        );
        assert_eq!(
            dispy::parse(&unhex(PYTHON_NODE_PING)),
            Ok(dispy::Message::Node(dispy::NodeAnnouncement {
                ip_addr: "10.0.2.7".into(),
                port: 9701
            }))
        );
        // Native datagrams and garbage are not dispy's, and say why.
        let e = dispy::parse(&Native.own_ping()).unwrap_err();
        assert!(e.contains("no \"PING:\" prefix"), "{e}");
        let e = dispy::parse(b"PING:\x80\x05N.").unwrap_err();
        assert!(
            e.contains("a None, not a dict") || e.contains("not a dict"),
            "{e}"
        );
        let e = dispy::parse(b"PING:\x80\x05}\x94.").unwrap_err();
        assert!(e.contains("no \"version\""), "{e}");
        let e = dispy::parse(b"PING:garbage").unwrap_err();
        assert!(e.contains("unreadable pickle"), "{e}");
    }

    #[test]
    fn a_relayed_ping_is_recognised_so_it_is_never_relayed_again() {
        let relayed = dispy::relayed_ping("4.15.2", "10.0.1.9", 9700);
        let dispy::Message::ClientPing(p) = dispy::parse(&relayed).unwrap() else {
            panic!("not a client ping");
        };
        assert!(p.relayed);
        let mut r = relay(&[]);
        let from: SocketAddrV4 = "10.0.2.1:40000".parse().unwrap();
        assert!(r
            .on_dispy_ping(Instant::now(), "192.168.9.9:1".parse().unwrap(), &p)
            .is_empty());
        // The relay's own broadcast, heard back on its relay port, is not relayed either.
        assert!(r
            .on_dispy_ping(Instant::now(), from, &client_ping())
            .is_empty());
    }

    #[test]
    fn relay_info_carries_what_dispys_client_checks_and_auth_is_sha1_of_secret_and_its_sign() {
        let msg = dispy::relay_info(&client_ping(), "10.0.1.9", "s3cret");
        let v = decoded(&msg, b"RELAY_INFO:");
        assert_eq!(v.as_dict_get("version").unwrap().as_str(), Some("4.15.2"));
        assert_eq!(
            v.as_dict_get("scheduler_ip_addr").unwrap().as_str(),
            Some("10.0.1.9")
        );
        assert_eq!(v.as_dict_get("relay").unwrap().as_str(), Some("y"));
        assert_eq!(v.as_dict_get("port").unwrap().as_int(), Some(9700));
        // The client compares bytes: dispy.auth_code returns hexdigest().encode().
        assert_eq!(
            v.as_dict_get("auth").unwrap().as_bytes(),
            Some(crate::auth::auth_code("s3cret", &"ab".repeat(20)).as_bytes())
        );
        // Unsigned (the relay's own ping for a --scheduler_node): no auth, which the client
        // accepts whatever its secret.
        let unsigned = dispy::ClientPing {
            sign: None,
            ..client_ping()
        };
        let v = decoded(
            &dispy::relay_info(&unsigned, "10.0.1.9", "s3cret"),
            b"RELAY_INFO:",
        );
        assert!(v.as_dict_get("auth").is_none());
        assert!(v.as_dict_get("sign").unwrap().is_none());
    }

    #[test]
    fn the_clients_relay_info_answer_gives_its_port_and_none_is_a_refusal() {
        assert_eq!(
            dispy::relay_info_reply(&unhex(PYTHON_RELAY_INFO_REPLY)),
            Ok(9700)
        );
        let e = dispy::relay_info_reply(&unhex(PYTHON_NONE)).unwrap_err();
        assert!(e.contains("refused"), "{e}");
        let e = dispy::relay_info_reply(b"").unwrap_err();
        assert!(e.contains("unreadable RELAY_INFO reply"), "{e}");
    }

    #[test]
    fn the_relayed_ping_names_only_the_client_and_carries_neither_sign_nor_auth() {
        let msg = dispy::relayed_ping("4.15.2", "10.0.1.9", 9700);
        let v = decoded(&msg, b"PING:");
        let addrs: Vec<_> = v
            .as_dict_get("ip_addrs")
            .unwrap()
            .as_seq()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(addrs, ["10.0.1.9"]);
        assert_eq!(v.as_dict_get("port").unwrap().as_int(), Some(9700));
        assert_eq!(v.as_dict_get("version").unwrap().as_str(), Some("4.15.2"));
        // A node answers a ping without a sign with its own announcement (dispynode.py's
        // send_pong_msg), so the client authenticates the node itself.
        assert!(v.as_dict_get("sign").unwrap().is_none());
        assert!(v.as_dict_get("auth").is_none());
        assert_eq!(v.as_dict_get("relay").unwrap().as_str(), Some("y"));
    }

    #[test]
    fn a_dispy_ping_is_relayed_on_the_other_subnets_once_per_client_and_window() {
        let mut r = relay(&[]);
        let now = Instant::now();
        let client: SocketAddrV4 = "10.0.1.9:40000".parse().unwrap();
        let p = client_ping();
        assert_eq!(
            r.on_dispy_ping(now, client, &p),
            [Ipv4Addr::new(10, 0, 2, 1)]
        );
        // Its broadcast heard too, and another client meanwhile (answers go to each client
        // directly, so it is relayed for it).
        assert!(r.on_dispy_ping(now, client, &p).is_empty());
        let other = dispy::ClientPing {
            ip_addrs: vec!["10.0.1.10".into()],
            ..client_ping()
        };
        assert_eq!(r.on_dispy_ping(now, client, &other).len(), 1);
        let later = now + ANSWER_WINDOW + Duration::from_millis(1);
        assert_eq!(r.on_dispy_ping(later, client, &p).len(), 1);
        // From a subnet the relay is not on: every subnet.
        let far: SocketAddrV4 = "192.168.5.5:40000".parse().unwrap();
        assert_eq!(r.on_dispy_ping(later, far, &other).len(), 2);
    }

    #[test]
    fn a_flood_of_dispy_pings_naming_different_clients_is_bounded_per_window() {
        let mut r = relay(&[]);
        let now = Instant::now();
        let from: SocketAddrV4 = "10.0.1.9:40000".parse().unwrap();
        let relayed = (0..MAX_DISPY_CLIENTS + 10)
            .filter(|n| {
                let p = dispy::ClientPing {
                    port: 1000 + *n as u16,
                    ..client_ping()
                };
                !r.on_dispy_ping(now, from, &p).is_empty()
            })
            .count();
        assert_eq!(relayed, MAX_DISPY_CLIENTS);
        let later = now + ANSWER_WINDOW + Duration::from_millis(1);
        assert_eq!(r.on_dispy_ping(later, from, &client_ping()).len(), 1);
    }

    #[test]
    fn dispy_node_announcements_go_to_the_schedulers_and_the_client_that_last_confirmed() {
        let mut r = relay(&["10.0.1.5:9700"]);
        let node: SocketAddrV4 = "10.0.2.7:9701".parse().unwrap();
        let ann = unhex(PYTHON_NODE_PING);
        let to = |a: Vec<Action>| -> Vec<SocketAddr> {
            a.into_iter()
                .map(|a| match a {
                    Action::Forward { to, datagram } => {
                        assert_eq!(datagram, ann);
                        to
                    }
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(
            to(r.on_dispy_announcement(node, &ann)),
            ["10.0.1.5:9700".parse::<SocketAddr>().unwrap()]
        );
        r.dispy_client_confirmed("10.0.1.9:9700".parse().unwrap());
        assert_eq!(
            to(r.on_dispy_announcement(node, &ann)),
            [
                "10.0.1.5:9700".parse::<SocketAddr>().unwrap(),
                "10.0.1.9:9700".parse().unwrap()
            ]
        );
        // A client on the node's own subnet heard the broadcast already.
        r.dispy_client_confirmed("10.0.2.9:9700".parse().unwrap());
        assert_eq!(
            to(r.on_dispy_announcement(node, &ann)),
            ["10.0.1.5:9700".parse::<SocketAddr>().unwrap()]
        );
    }
}
