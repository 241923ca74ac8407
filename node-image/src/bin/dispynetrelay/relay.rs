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

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use dispy_core::discovery::Interface;
use dispy_core::protocol::{decode_datagram, encode_datagram, Discovery, PROTOCOL_VERSION};

/// How long answers to a fanned-out ping are forwarded (clients wait 2 s for answers).
pub const ANSWER_WINDOW: Duration = Duration::from_secs(3);

/// A discovery datagram, in whichever wire format it came.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A client's discovery ping.
    Ping,
    /// A node's answer to a ping, or its start-up announcement; `node` names it for logs.
    Answer { node: String },
}

/// A discovery wire format the relay understands. The native one is [`Native`]; dispy's own
/// (`PING:` + a pickled dict, nodes answering the client over TCP) fits the same shape: it
/// would recognise its datagrams and build the ping to fan out from the client's (dispy
/// marks relayed pings with `'relay': 'y'`), with answers going straight to the client.
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
        if self.is_own(*from.ip()) {
            return vec![];
        }
        let subnet_of_node = self.interfaces.iter().find(|i| same_subnet(i, *from.ip()));
        self.schedulers
            .iter()
            .filter(|s| !subnet_of_node.is_some_and(|i| same_subnet(i, *s.ip())))
            .map(|s| Action::Forward {
                to: SocketAddr::V4(*s),
                datagram: datagram.to_vec(),
            })
            .collect()
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
}
