//! The one task that talks to the nodes. The controllers tell it what the API server holds
//! ([`Request`]); it keeps a connection to every node of every JobCluster and writes DispyJob
//! statuses back.
//!
//! What it decides is [`state::EngineState`], a sans-IO machine with its rules in its module
//! doc. This module is the thin IO around it: it reads the clock, feeds the state every
//! request, node event and IO outcome, and carries out the effects it returns, each as a
//! task whose outcome comes back as the next input. It holds only what cannot be data: the
//! node connections, the writer, and the controllers' reply channels.

pub mod arrays;
pub mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispy_core::driver::{NodeNews, Outgoing};
use dispy_core::manifest::{DispyJobStatus, JobCounts, NodeSummary};
use dispy_core::protocol::{Computation, JobRequest};
use dispy_core::scheduler::{ClusterPolicy, JobKey, NodeId};
use dispy_core::{ClientConfig, NodeClient};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::writer::Writer;
use state::{ConnectSpec, Effect, EngineState, Hello, Input, Now, ReplyTo};

pub use dispy_core::driver::File;

/// A JobCluster as the engine needs it, read from the API server by its controller.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterInfo {
    /// The computation's name on the nodes and the scheduler's cluster id:
    /// `namespace/name/uid-prefix`, so a re-created JobCluster is a new computation.
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub computation: Option<Computation>,
    pub files: Vec<File>,
    pub policy: ClusterPolicy,
    pub suspended: bool,
    pub secret: String,
    /// `spec.tls`: the nodes' certificate (PEM), which the engine pins.
    pub tls_cert: Option<Vec<u8>>,
    pub pulse_interval: Duration,
    /// Node addresses (`host:port`) with the pod behind each, if any.
    pub nodes: BTreeMap<NodeId, Option<String>>,
}

/// A DispyJob as the engine needs it.
#[derive(Clone, Debug)]
pub struct JobInfo {
    pub key: JobKey,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub request: JobRequest,
    pub files: Vec<File>,
    /// `spec.node`: a node name, pod name or address.
    pub node: Option<String>,
    pub deadline: Option<Duration>,
    /// Its own `reentrant`/`backoffLimit` where they differ from its cluster's (an array's).
    pub policy: Option<ClusterPolicy>,
    /// The status stored in the API server when the controller read the object.
    pub stored: DispyJobStatus,
}

impl JobInfo {
    /// What is still read of a job once its terminal status is stored: its key, names and
    /// a summary of that status (see [`Job::seal`](state::Job)).
    pub fn ended(&self) -> JobInfo {
        JobInfo {
            request: JobRequest {
                id: self.request.id,
                args: String::new(),
                kwargs: String::new(),
                depends: Vec::new(),
            },
            files: Vec::new(),
            stored: self.stored.ended_summary(),
            ..self.clone()
        }
    }
}

/// What the engine reports for a JobCluster's status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterStats {
    pub nodes: Vec<NodeSummary>,
    pub cpus: u32,
    pub busy: u32,
    pub counts: JobCounts,
}

/// What the controllers tell the engine.
pub enum Request {
    Cluster(Box<ClusterInfo>),
    /// The JobCluster is being deleted: cancel its jobs, close the computation on every node
    /// (cleanup runs), then reply.
    ClusterGone {
        id: String,
        reply: oneshot::Sender<()>,
    },
    Job(Box<JobInfo>),
    /// The DispyJob is being deleted: terminate it on its node and reply once it has stopped.
    JobGone {
        key: JobKey,
        reply: oneshot::Sender<()>,
    },
    /// Reply once no status write is in flight or waiting (graceful shutdown).
    Drain {
        reply: oneshot::Sender<()>,
    },
    /// A DispyJobArray read for the first time.
    Array(Box<arrays::ArrayInfo>),
    ArraySuspend {
        key: arrays::ArrayKey,
        suspended: bool,
    },
    /// The DispyJobArray is being deleted: terminate its running jobs, reply once they stopped.
    ArrayGone {
        key: arrays::ArrayKey,
        reply: oneshot::Sender<()>,
    },
}

/// What reaches the engine's task.
enum Msg {
    Request(Request),
    /// An IO step's outcome, for the state.
    Input(Input),
    /// A new connection to a node (its events follow on the same channel).
    Client {
        node: NodeId,
        client: NodeClient,
    },
}

/// What the controllers hold to talk to the engine.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
    stats: Arc<Mutex<HashMap<String, ClusterStats>>>,
    /// Jobs the engine has been given (and not told gone): sending them again changes nothing.
    known: Arc<Mutex<HashSet<JobKey>>>,
    /// The same for DispyJobArrays, by `namespace/name`.
    known_arrays: Arc<Mutex<HashSet<arrays::ArrayKey>>>,
}

impl Handle {
    pub fn send(&self, request: Request) {
        let _ = self.tx.send(Msg::Request(request));
    }

    /// Whether the engine already has this job, so a controller need not read the job's
    /// ConfigMaps and send it again.
    pub fn knows(&self, key: &JobKey) -> bool {
        self.known.lock().unwrap().contains(key)
    }

    /// Whether the engine already has this array.
    pub fn knows_array(&self, key: &str) -> bool {
        self.known_arrays.lock().unwrap().contains(key)
    }

    /// Stats of the JobCluster `namespace/name`.
    pub fn stats(&self, cluster: &str) -> ClusterStats {
        self.stats
            .lock()
            .unwrap()
            .get(cluster)
            .cloned()
            .unwrap_or_default()
    }

    /// Sends `make(reply)` and waits for the reply, at most `limit`.
    pub async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<()>) -> Request,
        limit: Duration,
    ) -> bool {
        let (reply, done) = oneshot::channel();
        self.send(make(reply));
        matches!(tokio::time::timeout(limit, done).await, Ok(Ok(())))
    }
}

/// Starts the engine; the returned handle is how controllers reach it.
pub fn start(
    writer: Writer,
    metrics: Arc<Metrics>,
    changed: mpsc::UnboundedSender<(String, String)>,
) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Mutex::new(HashMap::new()));
    let known = Arc::new(Mutex::new(HashSet::new()));
    let known_arrays = Arc::new(Mutex::new(HashSet::new()));
    let io = Io {
        state: EngineState::new(now(), metrics),
        rx,
        tx: tx.clone(),
        clients: HashMap::new(),
        replies: HashMap::new(),
        next_reply: 0,
        writer,
        stats: stats.clone(),
        known: known.clone(),
        known_arrays: known_arrays.clone(),
        changed,
    };
    tokio::spawn(io.run());
    Handle {
        tx,
        stats,
        known,
        known_arrays,
    }
}

fn now() -> Now {
    Now {
        at: Instant::now(),
        unix: dispy_core::job::now_secs(),
    }
}

struct Io {
    state: EngineState,
    rx: mpsc::UnboundedReceiver<Msg>,
    tx: mpsc::UnboundedSender<Msg>,
    clients: HashMap<NodeId, NodeClient>,
    replies: HashMap<u64, oneshot::Sender<()>>,
    next_reply: u64,
    writer: Writer,
    stats: Arc<Mutex<HashMap<String, ClusterStats>>>,
    known: Arc<Mutex<HashSet<JobKey>>>,
    known_arrays: Arc<Mutex<HashSet<arrays::ArrayKey>>>,
    /// Told the `namespace/name` of a JobCluster whose stats changed.
    changed: mpsc::UnboundedSender<(String, String)>,
}

impl Io {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            let input = tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.input(msg),
                    None => return,
                },
                _ = tick.tick() => Some(Input::Tick),
            };
            if let Some(input) = input {
                let effects = self.state.handle(now(), input);
                for effect in effects {
                    self.carry_out(effect);
                }
            }
        }
    }

    fn reply_to(&mut self, reply: oneshot::Sender<()>) -> ReplyTo {
        self.next_reply += 1;
        self.replies.insert(self.next_reply, reply);
        ReplyTo(self.next_reply)
    }

    fn input(&mut self, msg: Msg) -> Option<Input> {
        Some(match msg {
            Msg::Input(input) => input,
            Msg::Request(Request::Cluster(info)) => Input::Cluster(Arc::new(*info)),
            Msg::Request(Request::Job(info)) => Input::Job(Arc::new(*info)),
            Msg::Request(Request::ClusterGone { id, reply }) => Input::ClusterGone {
                id,
                reply: self.reply_to(reply),
            },
            Msg::Request(Request::JobGone { key, reply }) => Input::JobGone {
                key,
                reply: self.reply_to(reply),
            },
            Msg::Request(Request::Drain { reply }) => Input::Drain {
                reply: self.reply_to(reply),
            },
            Msg::Request(Request::Array(info)) => Input::Array(Arc::new(*info)),
            Msg::Request(Request::ArraySuspend { key, suspended }) => {
                Input::ArraySuspend { key, suspended }
            }
            Msg::Request(Request::ArrayGone { key, reply }) => Input::ArrayGone {
                key,
                reply: self.reply_to(reply),
            },
            Msg::Client { node, client } => {
                let hello = Hello {
                    name: client.info().name.clone(),
                    cpus: client.info().cpus,
                };
                self.clients.insert(node.clone(), client);
                Input::Connected {
                    node,
                    result: Ok(hello),
                }
            }
        })
    }

    /// Sends what a task learnt back to the engine.
    fn back(&self) -> impl Fn(Input) + Send + 'static {
        let tx = self.tx.clone();
        move |input| {
            let _ = tx.send(Msg::Input(input));
        }
    }

    fn carry_out(&mut self, effect: Effect) {
        match effect {
            Effect::Connect { node, spec } => self.connect(node, spec),
            Effect::Disconnect { node } => {
                self.clients.remove(&node);
            }
            Effect::SetUp { node, cluster } => {
                let (client, back) = (self.clients.get(&node).cloned(), self.back());
                tokio::spawn(async move {
                    let result = match (client, &cluster.computation) {
                        (None, _) => Err("the node is not connected".to_string()),
                        (Some(_), None) => Ok(Vec::new()),
                        (Some(client), Some(spec)) => {
                            dispy_core::driver::set_up(&client, &cluster.id, spec, &cluster.files)
                                .await
                        }
                    };
                    back(Input::SetUp {
                        cluster: cluster.id.clone(),
                        node,
                        result,
                    });
                });
            }
            Effect::Submit {
                node,
                cluster,
                jobs,
            } => {
                let (client, back) = (self.clients.get(&node).cloned(), self.back());
                tokio::spawn(async move {
                    let jobs = jobs
                        .iter()
                        .map(|j| Outgoing {
                            key: j.key.clone(),
                            request: j.request.clone(),
                            files: j.files.clone(),
                        })
                        .collect();
                    let refused =
                        dispy_core::driver::submit_batch(client.as_ref(), &cluster, jobs).await;
                    for (key, reason) in refused {
                        back(Input::SubmitFailed {
                            key,
                            node: node.clone(),
                            reason,
                        });
                    }
                });
            }
            Effect::Cancel { node, key } => {
                if let Some(client) = self.clients.get(&node).cloned() {
                    tokio::spawn(async move {
                        let _ = client.cancel(&key.cluster, key.job).await;
                    });
                }
            }
            Effect::Ack { node, key } => {
                if let Some(client) = self.clients.get(&node).cloned() {
                    tokio::spawn(async move {
                        let _ = client.ack(&key.cluster, vec![key.job]).await;
                    });
                }
            }
            Effect::Close {
                cluster,
                nodes,
                reply,
            } => {
                let clients: Vec<NodeClient> = nodes
                    .iter()
                    .filter_map(|n| self.clients.get(n).cloned())
                    .collect();
                let reply = self.replies.remove(&reply.0);
                tokio::spawn(async move {
                    let closes = clients.into_iter().map(|c| {
                        let id = cluster.clone();
                        async move {
                            if let Err(e) = c.close(&id, true).await {
                                tracing::warn!(node = %c.addr(), "closing {id}: {e}");
                            }
                        }
                    });
                    futures::future::join_all(closes).await;
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                });
            }
            Effect::Store { key, write, files } => {
                let (writer, back) = (self.writer.clone(), self.back());
                tokio::spawn(async move {
                    let result = writer.store(*write).await;
                    back(Input::Written { key, files, result });
                });
            }
            Effect::Event {
                on,
                reason,
                note,
                warning,
                routine,
            } => {
                if routine {
                    self.writer.routine_event(on, &reason, note);
                } else {
                    self.writer.publish(on, &reason, note, warning);
                }
            }
            Effect::Reply(reply) => {
                if let Some(reply) = self.replies.remove(&reply.0) {
                    let _ = reply.send(());
                }
            }
            Effect::Stats {
                namespace,
                name,
                stats,
            } => {
                let key = format!("{namespace}/{name}");
                match stats {
                    Some(s) => {
                        self.stats.lock().unwrap().insert(key, s);
                        let _ = self.changed.send((namespace, name));
                    }
                    None => {
                        self.stats.lock().unwrap().remove(&key);
                    }
                }
            }
            Effect::Knows { key, known } => {
                let mut set = self.known.lock().unwrap();
                if known {
                    set.insert(key);
                } else {
                    set.remove(&key);
                }
            }
            Effect::StoreArray { key, write } => {
                let (writer, back) = (self.writer.clone(), self.back());
                tokio::spawn(async move {
                    let result = writer.store_array(*write).await;
                    back(Input::ArrayWritten { key, result });
                });
            }
            Effect::ArrayKnows { key, known } => {
                let mut set = self.known_arrays.lock().unwrap();
                if known {
                    set.insert(key);
                } else {
                    set.remove(&key);
                }
            }
        }
    }

    /// Connects; the client and then each of its events come back in order on the channel.
    fn connect(&mut self, node: NodeId, spec: ConnectSpec) {
        let (tx, back) = (self.tx.clone(), self.back());
        let tls = match &spec.tls_cert {
            None => None,
            Some((pem, cluster)) => {
                let trust = dispy_core::tls::Trust::PinnedPem {
                    pem: pem.clone(),
                    source: format!("the TLS Secret of {cluster}"),
                };
                match dispy_core::tls::client_config(&trust) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        let reason = format!("cannot use the cluster's TLS certificate: {e}");
                        return back(Input::Connected {
                            node,
                            result: Err(reason),
                        });
                    }
                }
            }
        };
        let config = ClientConfig {
            tls,
            secret: spec.secret,
            name: format!("dispy-operator ({})", std::process::id()),
            pulse_interval: spec.pulse_interval,
            connect_timeout: Duration::from_secs(5),
            owner: spec.owner,
            ..Default::default()
        };
        tokio::spawn(async move {
            match NodeClient::connect(&node, &config).await {
                Ok((client, mut events)) => {
                    let _ = tx.send(Msg::Client {
                        node: node.clone(),
                        client,
                    });
                    while let Some(ev) = events.recv().await {
                        let news = NodeNews::of(ev);
                        let input = Input::FromNode {
                            node: node.clone(),
                            news,
                        };
                        if tx.send(Msg::Input(input)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => back(Input::Connected {
                    node,
                    result: Err(e.to_string()),
                }),
            }
        });
    }
}
