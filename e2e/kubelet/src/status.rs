//! Pod status as a kubelet reports it, computed from what the processes did.
//! Pure: data in, `PodStatus` out.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// How a process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub started_at: Time,
    pub finished_at: Time,
    pub container_id: String,
}

impl Exit {
    fn state(&self) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: self.exit_code,
                signal: self.signal,
                reason: Some(
                    if self.exit_code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    }
                    .into(),
                ),
                started_at: Some(self.started_at.clone()),
                finished_at: Some(self.finished_at.clone()),
                container_id: Some(self.container_id.clone()),
                message: None,
            }),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Run {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Time,
        container_id: String,
    },
    /// Ended and will not be started again.
    Terminated(Exit),
}

/// One container as the pod worker tracks it.
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub run: Run,
    pub last: Option<Exit>,
    pub restart_count: i32,
    pub ready: bool,
    /// Has run at least once.
    pub ever_started: bool,
}

impl Container {
    pub fn new(name: &str, image: &str) -> Self {
        Container {
            name: name.into(),
            image: image.into(),
            image_id: String::new(),
            run: Run::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last: None,
            restart_count: 0,
            ready: false,
            ever_started: false,
        }
    }

    fn status(&self) -> ContainerStatus {
        let (state, container_id, started) = match &self.run {
            Run::Waiting { reason, message } => (
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: message.clone(),
                    }),
                    ..Default::default()
                },
                self.last.as_ref().map(|l| l.container_id.clone()),
                false,
            ),
            Run::Running {
                started_at,
                container_id,
            } => (
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(started_at.clone()),
                    }),
                    ..Default::default()
                },
                Some(container_id.clone()),
                true,
            ),
            Run::Terminated(e) => (e.state(), Some(e.container_id.clone()), false),
        };
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: self.image_id.clone(),
            container_id,
            ready: self.ready && matches!(self.run, Run::Running { .. }),
            started: Some(started),
            restart_count: self.restart_count,
            state: Some(state),
            last_state: Some(self.last.as_ref().map(Exit::state).unwrap_or_default()),
            ..Default::default()
        }
    }
}

/// Pod phase from its containers: Succeeded/Failed once every container has
/// ended for good, Running once all have started at least once, else Pending.
pub fn phase(init_failed: bool, init_done: bool, containers: &[Container]) -> &'static str {
    if init_failed {
        return "Failed";
    }
    if !init_done {
        return "Pending";
    }
    let ended: Vec<&Exit> = containers
        .iter()
        .filter_map(|c| match &c.run {
            Run::Terminated(e) => Some(e),
            _ => None,
        })
        .collect();
    if !containers.is_empty() && ended.len() == containers.len() {
        return if ended.iter().all(|e| e.exit_code == 0) {
            "Succeeded"
        } else {
            "Failed"
        };
    }
    if containers.iter().all(|c| c.ever_started) {
        "Running"
    } else {
        "Pending"
    }
}

/// Keeps condition transition times stable between reports.
#[derive(Debug, Default)]
pub struct Conditions(BTreeMap<String, (bool, Time)>);

impl Conditions {
    fn get(&mut self, type_: &str, value: bool, now: &Time) -> PodCondition {
        let entry = self
            .0
            .entry(type_.to_string())
            .or_insert_with(|| (value, now.clone()));
        if entry.0 != value {
            *entry = (value, now.clone());
        }
        PodCondition {
            type_: type_.into(),
            status: if value { "True" } else { "False" }.into(),
            last_transition_time: Some(entry.1.clone()),
            ..Default::default()
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn pod_status(
    conditions: &mut Conditions,
    now: &Time,
    start_time: &Time,
    pod_ip: &str,
    host_ip: &str,
    sandbox_ready: bool,
    init_failed: bool,
    init_done: bool,
    init: &[Container],
    containers: &[Container],
) -> PodStatus {
    let phase = phase(init_failed, init_done, containers);
    let all_ready = !containers.is_empty()
        && containers
            .iter()
            .all(|c| c.ready && matches!(c.run, Run::Running { .. }));
    let terminal = phase == "Succeeded" || phase == "Failed";
    let conds = vec![
        conditions.get("PodReadyToStartContainers", sandbox_ready && !terminal, now),
        conditions.get("Initialized", init_done, now),
        conditions.get("ContainersReady", all_ready, now),
        conditions.get("Ready", all_ready, now),
        conditions.get("PodScheduled", true, now),
    ];
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conds),
        host_ip: Some(host_ip.into()),
        host_ips: Some(vec![HostIP { ip: host_ip.into() }]),
        pod_ip: Some(pod_ip.into()),
        pod_ips: Some(vec![PodIP { ip: pod_ip.into() }]),
        start_time: Some(start_time.clone()),
        init_container_statuses: (!init.is_empty())
            .then(|| init.iter().map(Container::status).collect()),
        container_statuses: Some(containers.iter().map(Container::status).collect()),
        qos_class: None,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }
    fn exit(code: i32) -> Exit {
        Exit {
            exit_code: code,
            signal: None,
            started_at: t(),
            finished_at: t(),
            container_id: "process://1".into(),
        }
    }
    fn c(run: Run, ready: bool) -> Container {
        Container {
            ever_started: !matches!(run, Run::Waiting { .. }),
            run,
            ready,
            ..Container::new("c", "img")
        }
    }
    fn running() -> Run {
        Run::Running {
            started_at: t(),
            container_id: "process://2".into(),
        }
    }

    #[test]
    fn phases() {
        assert_eq!(phase(false, false, &[c(running(), true)]), "Pending");
        assert_eq!(phase(true, false, &[]), "Failed");
        let waiting = Run::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        };
        assert_eq!(phase(false, true, &[c(waiting.clone(), false)]), "Pending");
        assert_eq!(
            phase(false, true, &[c(running(), false), c(waiting, false)]),
            "Pending"
        );
        assert_eq!(phase(false, true, &[c(running(), false)]), "Running");
        assert_eq!(
            phase(
                false,
                true,
                &[c(Run::Terminated(exit(0)), false), c(running(), true)]
            ),
            "Running"
        );
        assert_eq!(
            phase(false, true, &[c(Run::Terminated(exit(0)), false)]),
            "Succeeded"
        );
        assert_eq!(
            phase(
                false,
                true,
                &[
                    c(Run::Terminated(exit(0)), false),
                    c(Run::Terminated(exit(3)), false)
                ]
            ),
            "Failed"
        );
    }

    #[test]
    fn ready_needs_every_container_running_and_ready() {
        let mut conds = Conditions::default();
        let s = pod_status(
            &mut conds,
            &t(),
            &t(),
            "127.11.0.2",
            "127.0.0.11",
            true,
            false,
            true,
            &[],
            &[c(running(), true), c(running(), false)],
        );
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "False");
        let s = pod_status(
            &mut conds,
            &t(),
            &t(),
            "127.11.0.2",
            "127.0.0.11",
            true,
            false,
            true,
            &[],
            &[c(running(), true)],
        );
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(s.pod_ip.as_deref(), Some("127.11.0.2"));
        assert_eq!(
            s.container_statuses.unwrap()[0].container_id.as_deref(),
            Some("process://2")
        );
    }
}
