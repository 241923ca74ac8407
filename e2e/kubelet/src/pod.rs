//! One worker per pod: starts its containers as processes, restarts them per
//! restartPolicy with backoff, probes them, reports status, and stops them
//! when the pod is deleted (SIGTERM, grace period, SIGKILL).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::{Api, Resource};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::node::now;
use crate::spec::{self, Launch, PodDir};
use crate::status::{self, Exit, Run};
use crate::{probe, Context, NodeInfo, PodSender};

pub struct Handle {
    pub node: String,
    pub pod: PodSender,
    pub shutdown: watch::Sender<bool>,
    pub task: JoinHandle<()>,
}

pub fn spawn(ctx: Arc<Context>, node: Arc<NodeInfo>, pod: Pod) -> Handle {
    let (pod_tx, pod_rx) = watch::channel(Some(pod));
    let (stop_tx, stop_rx) = watch::channel(false);
    let node_name = node.name.clone();
    let task = tokio::spawn(async move {
        let name = {
            let p = pod_rx.borrow();
            let m = &p.as_ref().unwrap().metadata;
            format!(
                "{}/{}",
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default()
            )
        };
        let mut w = Worker::new(ctx, node, pod_rx, stop_rx);
        if let Err(e) = w.run().await {
            tracing::error!(pod = %name, "pod worker: {e:#}");
        }
        w.cleanup().await;
    });
    Handle {
        node: node_name,
        pod: pod_tx,
        shutdown: stop_tx,
        task,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ProbeKind {
    Readiness,
    Liveness,
}

enum Event {
    Exit {
        idx: usize,
        gen: u64,
        status: ExitStatus,
    },
    Probe {
        idx: usize,
        gen: u64,
        kind: ProbeKind,
        result: Result<(), String>,
    },
}

/// A container and the process that currently stands for it.
struct Slot {
    spec: Container,
    init: bool,
    st: status::Container,
    pid: Option<i32>,
    /// Bumped on each start, so events of an earlier process are ignored.
    gen: u64,
    started: Option<(Instant, Time)>,
    launch: Option<Launch>,
    next_start: Option<Instant>,
    backoff: Duration,
    /// Ended for good (restartPolicy says no more).
    done: bool,
    next_probe: BTreeMap<&'static str, Instant>,
    probe_running: BTreeMap<&'static str, bool>,
    ready_ok: i32,
    ready_fail: i32,
    live_fail: i32,
}

enum Wake {
    Pod(bool),
    Stop,
    Event(Event),
    Timer,
    Refresh,
}

/// How often a running pod's ConfigMap and Secret volumes are brought up to date.
const VOLUME_REFRESH: Duration = Duration::from_secs(2);

enum Outcome {
    Deleted { grace: Duration },
    Vanished,
    Shutdown,
}

struct Worker {
    ctx: Arc<Context>,
    node: Arc<NodeInfo>,
    rx: watch::Receiver<Option<Pod>>,
    stop: watch::Receiver<bool>,
    pod: Pod,
    api: Api<Pod>,
    dir: PodDir,
    pod_ip: Option<Ipv4Addr>,
    slots: Vec<Slot>,
    conditions: status::Conditions,
    last_status: Option<serde_json::Value>,
    start_time: Time,
    sandbox_ready: bool,
    init_failed: bool,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    recorder: Recorder,
    /// Last start error per container, so a retried failure is reported once.
    last_error: BTreeMap<String, String>,
}

fn name_of(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

impl Worker {
    fn new(
        ctx: Arc<Context>,
        node: Arc<NodeInfo>,
        rx: watch::Receiver<Option<Pod>>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let pod = rx.borrow().clone().expect("a new worker starts with a pod");
        let api = Api::namespaced(
            ctx.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let dir = PodDir::new(&ctx.args.root_dir, &pod);
        let (events_tx, events) = mpsc::channel(64);
        let spec = pod.spec.clone().unwrap_or_default();
        // what an earlier run of this kubelet reported: restart counts, and
        // whether a process had started (then the next start is a restart)
        let prev: BTreeMap<String, (i32, bool)> = pod
            .status
            .iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            })
            .map(|c| (c.name.clone(), (c.restart_count, c.container_id.is_some())))
            .collect();
        let backoff = Duration::from_secs_f64(ctx.args.backoff_initial);
        let slot = |c: &Container, init: bool| {
            let mut st = status::Container::new(&c.name, c.image.as_deref().unwrap_or(""));
            let (restarts, had_process) = prev.get(&c.name).copied().unwrap_or((0, false));
            st.restart_count = restarts;
            st.ever_started = had_process;
            Slot {
                spec: c.clone(),
                init,
                st,
                pid: None,
                gen: 0,
                started: None,
                launch: None,
                next_start: Some(Instant::now()),
                backoff,
                done: false,
                next_probe: BTreeMap::new(),
                probe_running: BTreeMap::new(),
                ready_ok: 0,
                ready_fail: 0,
                live_fail: 0,
            }
        };
        let mut slots: Vec<Slot> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| slot(c, true))
            .collect();
        slots.extend(spec.containers.iter().map(|c| slot(c, false)));
        let recorder = Recorder::new(
            ctx.client.clone(),
            Reporter {
                controller: "kubelet".into(),
                instance: Some(node.name.clone()),
            },
        );
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .unwrap_or_else(now);
        Worker {
            ctx,
            node,
            rx,
            stop,
            pod,
            api,
            dir,
            pod_ip: None,
            slots,
            conditions: Default::default(),
            last_status: None,
            start_time,
            sandbox_ready: false,
            init_failed: false,
            events_tx,
            events,
            recorder,
            last_error: BTreeMap::new(),
        }
    }

    /// Records a Kubernetes Event on the pod, as a kubelet does; never blocks
    /// the worker, and a failure to record is only logged.
    fn event(&self, warning: bool, reason: &str, action: &str, note: String) {
        let recorder = self.recorder.clone();
        let reference = self.pod.object_ref(&());
        let ev = KubeEvent {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::debug!("recording event: {e}");
            }
        });
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    fn ips(&self) -> (String, String) {
        let host = self.node.ip.to_string();
        (self.pod_ip.map(|i| i.to_string()).unwrap_or_default(), host)
    }

    fn init_done(&self) -> bool {
        self.slots.iter().filter(|s| s.init).all(|s| s.done)
    }

    fn terminal(&self) -> bool {
        let ph = self.phase();
        ph == "Succeeded" || ph == "Failed"
    }

    fn phase(&self) -> &'static str {
        let main: Vec<status::Container> = self
            .slots
            .iter()
            .filter(|s| !s.init)
            .map(|s| s.st.clone())
            .collect();
        status::phase(self.init_failed, self.init_done(), &main)
    }

    async fn report(&mut self) {
        let (pod_ip, host_ip) = self.ips();
        let init: Vec<_> = self
            .slots
            .iter()
            .filter(|s| s.init)
            .map(|s| s.st.clone())
            .collect();
        let main: Vec<_> = self
            .slots
            .iter()
            .filter(|s| !s.init)
            .map(|s| s.st.clone())
            .collect();
        let init_done = self.init_done();
        let st = status::pod_status(
            &mut self.conditions,
            &now(),
            &self.start_time,
            &pod_ip,
            &host_ip,
            self.sandbox_ready,
            self.init_failed,
            init_done,
            &init,
            &main,
        );
        let mut value = serde_json::to_value(&st).unwrap_or_default();
        if pod_ip.is_empty() {
            value["podIP"] = serde_json::Value::Null;
            value["podIPs"] = serde_json::Value::Null;
        }
        if self.last_status.as_ref() == Some(&value) {
            return;
        }
        let patch = json!({ "status": value });
        match self
            .api
            .patch_status(
                &name_of(&self.pod),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => self.last_status = Some(value),
            Err(e) => tracing::warn!(pod = %name_of(&self.pod), "status update: {e}"),
        }
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let phase = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            // finished before this kubelet started: only its deletion is left
            return self.wait_for_deletion_of_finished().await;
        }
        if self.pod.metadata.deletion_timestamp.is_some() {
            return self.finish_deletion().await;
        }
        self.pod_ip = Some(if self.host_network() {
            self.node.ip
        } else {
            let wanted = self
                .pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse().ok());
            self.node.allocate_ip(wanted).await?
        });
        self.report().await;

        // volumes; retried until the ConfigMaps/Secrets they need exist
        let volumes = loop {
            let (pod_ip, host_ip) = self.ips();
            match spec::materialise_volumes(&self.ctx, &self.pod, &self.dir, &pod_ip, &host_ip)
                .await
            {
                Ok(v) => break v,
                Err(e) => {
                    let msg = format!("{e:#}");
                    for s in &mut self.slots {
                        s.st.run = Run::Waiting {
                            reason: "CreateContainerConfigError".into(),
                            message: Some(msg.clone()),
                        };
                    }
                    self.report().await;
                    if let Some(o) = self
                        .wait_pod_change(Some(Instant::now() + Duration::from_secs(2)))
                        .await
                    {
                        return self.finish(o).await;
                    }
                }
            }
        };
        self.sandbox_ready = true;
        let mut refresh = tokio::time::interval_at(Instant::now() + VOLUME_REFRESH, VOLUME_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            self.start_due(&volumes).await;
            self.report().await;
            if self.terminal() {
                return self.wait_for_deletion_of_finished().await;
            }
            let wake = self
                .slots
                .iter()
                .flat_map(|s| {
                    s.next_start
                        .into_iter()
                        .chain(s.next_probe.values().copied())
                })
                .min();
            let woke = tokio::select! {
                r = self.rx.changed() => Wake::Pod(r.is_ok()),
                _ = self.stop.changed() => Wake::Stop,
                Some(ev) = self.events.recv() => Wake::Event(ev),
                _ = sleep_until(wake) => Wake::Timer,
                _ = refresh.tick() => Wake::Refresh,
            };
            match woke {
                Wake::Pod(ok) => {
                    if let Some(o) = self.on_pod_change(ok) {
                        return self.finish(o).await;
                    }
                }
                Wake::Stop => return self.finish(Outcome::Shutdown).await,
                Wake::Event(ev) => self.handle(ev),
                Wake::Timer => self.start_probes(),
                Wake::Refresh => {
                    if let Err(e) = spec::refresh_volumes(&self.ctx, &self.pod, &self.dir).await {
                        tracing::debug!(pod = %name_of(&self.pod), "volumes not refreshed: {e:#}");
                    }
                }
            }
        }
    }

    /// Waits for a change of the pod object or a shutdown, up to `until`.
    /// Some(..) when the worker must stop.
    async fn wait_pod_change(&mut self, until: Option<Instant>) -> Option<Outcome> {
        tokio::select! {
            r = self.rx.changed() => self.on_pod_change(r.is_ok()),
            _ = self.stop.changed() => Some(Outcome::Shutdown),
            _ = sleep_until(until) => None,
        }
    }

    /// The pod object changed: Some(..) when the worker must stop.
    fn on_pod_change(&mut self, ok: bool) -> Option<Outcome> {
        if !ok {
            return Some(Outcome::Shutdown);
        }
        let p = self.rx.borrow_and_update().clone();
        match p {
            None => Some(Outcome::Vanished),
            Some(p) => {
                let deleting = p.metadata.deletion_timestamp.is_some();
                let grace = p
                    .metadata
                    .deletion_grace_period_seconds
                    .or_else(|| {
                        p.spec
                            .as_ref()
                            .and_then(|s| s.termination_grace_period_seconds)
                    })
                    .unwrap_or(30)
                    .max(0) as u64;
                self.pod = p;
                deleting.then_some(Outcome::Deleted {
                    grace: Duration::from_secs(grace),
                })
            }
        }
    }

    async fn finish(&mut self, o: Outcome) -> anyhow::Result<()> {
        match o {
            Outcome::Deleted { grace } => {
                self.terminate(grace).await;
                self.finish_deletion().await
            }
            Outcome::Vanished => {
                self.terminate(Duration::ZERO).await;
                Ok(())
            }
            Outcome::Shutdown => {
                self.terminate(Duration::from_secs(5)).await;
                Ok(())
            }
        }
    }

    async fn wait_for_deletion_of_finished(&mut self) -> anyhow::Result<()> {
        loop {
            match self.wait_pod_change(None).await {
                Some(Outcome::Deleted { .. }) => return self.finish_deletion().await,
                Some(_) => return Ok(()),
                None => {}
            }
        }
    }

    /// All processes are gone: remove the pod object, as a kubelet does.
    async fn finish_deletion(&mut self) -> anyhow::Result<()> {
        let uid = self.pod.metadata.uid.clone();
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid,
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.api.delete(&name_of(&self.pod), &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(anyhow::anyhow!("deleting pod {}: {e}", name_of(&self.pod))),
        }
        tracing::info!(pod = %name_of(&self.pod), "pod removed");
        Ok(())
    }

    /// SIGTERM to every process group, SIGKILL after `grace`.
    async fn terminate(&mut self, grace: Duration) {
        let pids: Vec<i32> = self.slots.iter().filter_map(|s| s.pid).collect();
        if pids.is_empty() {
            return;
        }
        tracing::info!(pod = %name_of(&self.pod), ?pids, ?grace, "stopping containers");
        for s in self.slots.iter().filter(|s| s.pid.is_some()) {
            self.event(
                false,
                "Killing",
                "Kill",
                format!(
                    "Stopping container {} (grace period {}s)",
                    s.spec.name,
                    grace.as_secs()
                ),
            );
        }
        let sig = if grace.is_zero() {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        for &pid in &pids {
            signal_group(pid, sig);
        }
        let deadline = Instant::now() + grace;
        while self.slots.iter().any(|s| s.pid.is_some()) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => self.record_stop(ev),
                Ok(None) | Err(_) => break,
            }
        }
        let left: Vec<i32> = self.slots.iter().filter_map(|s| s.pid).collect();
        for &pid in &left {
            tracing::info!(pod = %name_of(&self.pod), pid, "grace period over; SIGKILL");
            signal_group(pid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.slots.iter().any(|s| s.pid.is_some()) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => self.record_stop(ev),
                Ok(None) | Err(_) => break,
            }
        }
        // anything the containers left behind in their process groups
        for &pid in &pids {
            signal_group(pid, libc::SIGKILL);
        }
    }

    fn record_stop(&mut self, ev: Event) {
        if let Event::Exit { idx, gen, status } = ev {
            let s = &mut self.slots[idx];
            if s.gen == gen {
                let exit = exit_of(s, status);
                s.pid = None;
                s.st.ready = false;
                s.st.run = Run::Terminated(exit);
                s.done = true;
            }
        }
    }

    pub async fn cleanup(&mut self) {
        if let Some(ip) = self.pod_ip.take() {
            if !self.host_network() {
                self.node.release_ip(ip).await;
            }
        }
        if !*self.stop.borrow() {
            let _ = std::fs::remove_dir_all(&self.dir.0);
        }
    }

    /// Starts every container whose turn it is: init containers one at a
    /// time and in order, then all the others.
    async fn start_due(&mut self, volumes: &BTreeMap<String, PathBuf>) {
        let now_i = Instant::now();
        let init_done = self.init_done();
        let first_pending_init = self.slots.iter().position(|s| s.init && !s.done);
        for idx in 0..self.slots.len() {
            let s = &self.slots[idx];
            let turn = if s.init {
                Some(idx) == first_pending_init
            } else {
                init_done
            };
            if !turn || s.done || s.pid.is_some() || !matches!(s.next_start, Some(t) if t <= now_i)
            {
                continue;
            }
            if let Err(e) = self.start(idx, volumes).await {
                let msg = format!("{e:#}");
                let reason = if msg.contains("image map") {
                    "ErrImageNeverPull"
                } else {
                    "CreateContainerError"
                };
                let cname = self.slots[idx].spec.name.clone();
                if self.last_error.insert(cname.clone(), msg.clone()).as_ref() != Some(&msg) {
                    tracing::warn!(pod = %name_of(&self.pod), container = %cname, "cannot start: {msg}");
                    self.event(true, "Failed", "Start", format!("Error: {msg}"));
                }
                let s = &mut self.slots[idx];
                s.st.run = Run::Waiting {
                    reason: reason.into(),
                    message: Some(msg),
                };
                s.next_start = Some(Instant::now() + Duration::from_secs(2));
            }
        }
    }

    async fn start(
        &mut self,
        idx: usize,
        volumes: &BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<()> {
        let (pod_ip, host_ip) = self.ips();
        let c = self.slots[idx].spec.clone();
        let launch = spec::launch(
            &self.ctx, &self.pod, &c, &self.dir, volumes, &pod_ip, &host_ip,
        )
        .await?;
        let log_path = self.dir.log(&c.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = tokio::process::Command::new(&launch.program);
        cmd.args(&launch.args)
            .env_clear()
            .envs(launch.env.iter().cloned())
            .current_dir(&launch.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // own process group: signals reach the program's children too
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it makes the kernel kill the
        // process if this kubelet dies without stopping it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {} {:?}: {e}", launch.program, launch.args))?;
        let pid = child.id().unwrap_or(0) as i32;
        self.event(
            false,
            "Started",
            "Start",
            format!(
                "Started container {} (pid {pid}, {})",
                c.name, launch.program
            ),
        );
        self.last_error.remove(&c.name);
        let s = &mut self.slots[idx];
        s.gen += 1;
        let gen = s.gen;
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let _ = tx.send(Event::Exit { idx, gen, status }).await;
            }
        });
        if s.st.ever_started || s.st.last.is_some() {
            s.st.restart_count += 1;
        }
        let t = now();
        tracing::info!(pod = %name_of(&self.pod), container = %c.name, pid, program = %launch.program, "started");
        s.pid = Some(pid);
        s.started = Some((Instant::now(), t.clone()));
        s.next_start = None;
        s.st.ever_started = true;
        s.st.image_id = format!(
            "process://{}",
            resolve(&launch.program, &launch.env).display()
        );
        s.st.run = Run::Running {
            started_at: t,
            container_id: format!("process://{pid}"),
        };
        s.ready_ok = 0;
        s.ready_fail = 0;
        s.live_fail = 0;
        s.probe_running.clear();
        s.next_probe.clear();
        for (key, p) in [
            ("readiness", &c.readiness_probe),
            ("liveness", &c.liveness_probe),
        ] {
            if let Some(p) = p {
                let delay = Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64);
                s.next_probe.insert(key, Instant::now() + delay);
            }
        }
        s.st.ready = c.readiness_probe.is_none();
        s.launch = Some(launch);
        Ok(())
    }

    fn handle(&mut self, ev: Event) {
        if let Some((warning, reason, action, note)) = self.handle_event(ev) {
            self.event(warning, reason, action, note);
        }
    }

    /// Applies an exit or probe result; returns the Event to record, if any.
    fn handle_event(&mut self, ev: Event) -> Option<(bool, &'static str, &'static str, String)> {
        let mut out = None;
        match ev {
            Event::Exit { idx, gen, status } => {
                let policy = self.restart_policy();
                let backoff_max = Duration::from_secs_f64(self.ctx.args.backoff_max);
                let backoff_initial = Duration::from_secs_f64(self.ctx.args.backoff_initial);
                let pod_name = name_of(&self.pod);
                let s = &mut self.slots[idx];
                if s.gen != gen {
                    return None;
                }
                let exit = exit_of(s, status);
                let ran_for = s
                    .started
                    .as_ref()
                    .map(|(i, _)| i.elapsed())
                    .unwrap_or_default();
                tracing::info!(pod = %pod_name, container = %s.spec.name, code = exit.exit_code, signal = ?exit.signal, "exited");
                s.pid = None;
                s.st.ready = false;
                s.next_probe.clear();
                let failed = exit.exit_code != 0;
                let restart = if s.init {
                    failed && policy != "Never"
                } else {
                    policy == "Always" || (policy == "OnFailure" && failed)
                };
                if s.init && !failed {
                    s.done = true;
                    s.st.run = Run::Terminated(exit);
                } else if restart {
                    if ran_for > Duration::from_secs(600) {
                        s.backoff = backoff_initial;
                    }
                    let delay = s.backoff;
                    s.backoff = (s.backoff * 2).min(backoff_max);
                    s.st.last = Some(exit);
                    s.st.run = Run::Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: Some(format!(
                            "back-off {delay:?} restarting failed container={} pod={pod_name}",
                            s.spec.name
                        )),
                    };
                    s.next_start = Some(Instant::now() + delay);
                    out = Some((
                        true,
                        "BackOff",
                        "Restart",
                        format!(
                            "Back-off {delay:?} restarting failed container {} (exit code {})",
                            s.spec.name,
                            s.st.last.as_ref().map(|e| e.exit_code).unwrap_or(0)
                        ),
                    ));
                } else {
                    s.done = true;
                    s.st.run = Run::Terminated(exit);
                    if s.init {
                        self.init_failed = true;
                    }
                }
            }
            Event::Probe {
                idx,
                gen,
                kind,
                result,
            } => {
                let s = &mut self.slots[idx];
                if s.gen != gen || s.pid.is_none() {
                    return None;
                }
                let (key, p) = match kind {
                    ProbeKind::Readiness => ("readiness", s.spec.readiness_probe.clone()),
                    ProbeKind::Liveness => ("liveness", s.spec.liveness_probe.clone()),
                };
                let p = p?;
                s.probe_running.insert(key, false);
                let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
                s.next_probe.insert(key, Instant::now() + period);
                let success_threshold = p.success_threshold.unwrap_or(1).max(1);
                let failure_threshold = p.failure_threshold.unwrap_or(3).max(1);
                match (kind, result) {
                    (ProbeKind::Readiness, Ok(())) => {
                        s.ready_fail = 0;
                        s.ready_ok += 1;
                        if s.ready_ok >= success_threshold {
                            s.st.ready = true;
                        }
                    }
                    (ProbeKind::Readiness, Err(e)) => {
                        s.ready_ok = 0;
                        s.ready_fail += 1;
                        tracing::debug!(container = %s.spec.name, "readiness probe failed: {e}");
                        if s.ready_fail == failure_threshold {
                            out = Some((
                                true,
                                "Unhealthy",
                                "Probe",
                                format!("Readiness probe failed: {e}"),
                            ));
                        }
                        if s.ready_fail >= failure_threshold {
                            s.st.ready = false;
                        }
                    }
                    (ProbeKind::Liveness, Ok(())) => s.live_fail = 0,
                    (ProbeKind::Liveness, Err(e)) => {
                        s.live_fail += 1;
                        if s.live_fail >= failure_threshold {
                            out = Some((
                                true,
                                "Unhealthy",
                                "Probe",
                                format!("Liveness probe failed: {e}"),
                            ));
                            tracing::info!(container = %s.spec.name, "liveness probe failed {} times ({e}); killing", s.live_fail);
                            if let Some(pid) = s.pid {
                                signal_group(pid, libc::SIGKILL);
                            }
                            s.next_probe.clear();
                        }
                    }
                }
            }
        }
        out
    }

    fn start_probes(&mut self) {
        let now_i = Instant::now();
        let (pod_ip, _) = self.ips();
        for (idx, s) in self.slots.iter_mut().enumerate() {
            let (Some(_), Some(launch)) = (s.pid, s.launch.clone()) else {
                continue;
            };
            for (key, kind, p) in [
                (
                    "readiness",
                    ProbeKind::Readiness,
                    s.spec.readiness_probe.clone(),
                ),
                (
                    "liveness",
                    ProbeKind::Liveness,
                    s.spec.liveness_probe.clone(),
                ),
            ] {
                let Some(p) = p else { continue };
                let due = s.next_probe.get(key).is_some_and(|t| *t <= now_i);
                if !due || s.probe_running.get(key).copied().unwrap_or(false) {
                    continue;
                }
                s.probe_running.insert(key, true);
                // not due again until this one reports
                s.next_probe.insert(key, now_i + Duration::from_secs(3600));
                let tx = self.events_tx.clone();
                let (gen, c, launch, ip) = (s.gen, s.spec.clone(), launch.clone(), pod_ip.clone());
                tokio::spawn(async move {
                    let result = probe::run(&p, &c, &launch, &ip).await;
                    let _ = tx
                        .send(Event::Probe {
                            idx,
                            gen,
                            kind,
                            result,
                        })
                        .await;
                });
            }
        }
    }
}

fn exit_of(s: &Slot, status: ExitStatus) -> Exit {
    let (code, signal) = match (status.code(), status.signal()) {
        (Some(c), _) => (c, None),
        (None, Some(sig)) => (128 + sig, Some(sig)),
        (None, None) => (255, None),
    };
    Exit {
        exit_code: code,
        signal,
        started_at: s
            .started
            .as_ref()
            .map(|(_, t)| t.clone())
            .unwrap_or_else(now),
        finished_at: now(),
        container_id: format!("process://{}", s.pid.unwrap_or(0)),
    }
}

/// The file a program name stands for, by the PATH it is started with.
fn resolve(program: &str, env: &[(String, String)]) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    std::env::split_paths(path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

fn signal_group(pid: i32, sig: i32) {
    if pid > 1 {
        // SAFETY: plain kill(2) on a process group this kubelet created.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
