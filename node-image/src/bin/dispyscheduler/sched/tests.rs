//! The scheduler's decisions from events alone: no sockets, a clock passed in.

use super::*;

fn config(policy: Policy) -> Config {
    Config {
        policy,
        pulse_interval: 1.0,
        ping_interval: None,
        zombie_interval: Some(60.0),
        cooperative: false,
        nodes: vec![],
        listed_only: false,
    }
}

/// Answers every SCHEDULED with ACK and every setup with success; returns the other actions.
fn settle(s: &mut Scheduler, now: f64) -> Vec<Action> {
    let mut rest = Vec::new();
    loop {
        let actions = s.take_actions();
        if actions.is_empty() {
            return rest;
        }
        for a in actions {
            match a {
                Action::Client {
                    compute_id,
                    msg: ToClient::Scheduled { .. },
                } => s.scheduled(now, compute_id, true),
                Action::Setup {
                    node, compute_id, ..
                } => {
                    let cpus = s.nodes[&node.ip].avail_cpus;
                    s.setup_done(now, &node.ip, compute_id, Ok(cpus));
                }
                other => rest.push(other),
            }
        }
    }
}

fn node(s: &mut Scheduler, ip: &str, cpus: u32) {
    s.node_found(
        0.0,
        NodeInfo {
            ip: ip.into(),
            port: 9701,
            name: format!("n-{ip}"),
            cpus,
            auth: format!("token-{ip}"),
            scheduler_ip: "10.0.0.9".into(),
            keepalive: false,
        },
    );
}

fn computation(s: &mut Scheduler, auth: &str, exclusive: bool, reentrant: bool) -> ComputeId {
    let id = s.new_computation(
        0.0,
        NewComputation {
            client_auth: auth.into(),
            node_auth: format!("node-{auth}"),
            compute: Value::None,
            exclusive,
            reentrant,
            allocs: vec![],
            client_ip: "10.0.0.1".into(),
            client_port: 9700,
        },
    );
    s.schedule(0.0, id, auth).unwrap();
    id
}

fn submit(s: &mut Scheduler, id: ComputeId, auth: &str) -> Uid {
    let uid = s.new_uid();
    s.submit(0.0, id, auth, uid, format!("h{uid}"), None, Value::None)
        .unwrap();
    uid
}

fn runs(actions: &[Action]) -> Vec<(Uid, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Run { uid, node, .. } => Some((*uid, node.ip.clone())),
            _ => None,
        })
        .collect()
}

fn results(actions: &[Action]) -> Vec<(Uid, ClientReply)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Client {
                msg: ToClient::Result { uid, reply },
                ..
            } => Some((*uid, reply.clone())),
            _ => None,
        })
        .collect()
}

fn finish(s: &mut Scheduler, uid: Uid, ip: &str) -> bool {
    let hash = s.jobs[&uid].node_hash();
    s.job_reply(1.0, ip, uid, &hash, 11, Value::Dict(vec![]))
}

#[test]
fn no_node_runs_more_jobs_than_its_cpus() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 2);
    node(&mut s, "10.0.0.3", 1);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    let uids: Vec<Uid> = (0..10).map(|_| submit(&mut s, id, "a")).collect();
    let started = runs(&settle(&mut s, 0.0));
    assert_eq!(started.len(), 3);
    assert_eq!(started.iter().filter(|(_, ip)| ip == "10.0.0.2").count(), 2);
    // Each finished job frees its cpu for exactly one more.
    let (uid, ip) = started[0].clone();
    assert!(finish(&mut s, uid, &ip));
    let next = runs(&settle(&mut s, 1.0));
    assert_eq!(next, vec![(uids[3], ip)]);
    for n in s.nodes.values() {
        assert!(n.busy <= n.cpus);
    }
}

#[test]
fn a_computation_set_up_later_gets_jobs_once_its_setup_succeeds() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    let uid = submit(&mut s, id, "a");
    assert!(runs(&settle(&mut s, 0.0)).is_empty(), "no node yet");
    node(&mut s, "10.0.0.2", 1);
    assert_eq!(runs(&settle(&mut s, 0.0)), vec![(uid, "10.0.0.2".into())]);
}

#[test]
fn a_failed_setup_closes_the_computation_on_that_node_and_sends_it_nothing() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let id = computation(&mut s, "a", false, false);
    let actions = s.take_actions();
    let scheduled = actions.iter().any(|a| {
        matches!(
            a,
            Action::Client {
                msg: ToClient::Scheduled { .. },
                ..
            }
        )
    });
    assert!(scheduled);
    s.scheduled(0.0, id, true);
    let setups: Vec<Action> = s
        .take_actions()
        .into_iter()
        .filter(|a| !matches!(a, Action::Broadcast))
        .collect();
    assert!(matches!(setups[..], [Action::Setup { .. }]));
    s.setup_done(0.0, "10.0.0.2", id, Err("boom".into()));
    let after = s.take_actions();
    assert!(matches!(after[..], [Action::Close { .. }]));
    submit(&mut s, id, "a");
    assert!(runs(&s.take_actions()).is_empty());
}

fn order(policy: Policy) -> String {
    let mut s = Scheduler::new(config(policy), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let a = computation(&mut s, "a", false, false);
    let b = computation(&mut s, "b", false, false);
    settle(&mut s, 0.0);
    // B submits first; A (created first) after B's first job is running.
    let mut tag: BTreeMap<Uid, char> = BTreeMap::new();
    for _ in 0..3 {
        tag.insert(submit(&mut s, b, "b"), 'B');
    }
    for _ in 0..3 {
        tag.insert(submit(&mut s, a, "a"), 'A');
    }
    let mut seq = String::new();
    let mut running = runs(&settle(&mut s, 0.0));
    while let Some((uid, ip)) = running.pop() {
        seq.push(tag[&uid]);
        finish(&mut s, uid, &ip);
        running.extend(runs(&settle(&mut s, 1.0)));
    }
    seq
}

#[test]
fn default_order_is_the_earliest_submitted_job() {
    assert_eq!(order(Policy::EarliestJob), "BBBAAA");
}

#[test]
fn early_cluster_order_prefers_the_computation_created_first() {
    assert_eq!(order(Policy::EarliestCluster), "BAAABB");
}

#[test]
fn fair_order_alternates_between_computations() {
    assert_eq!(order(Policy::FairCluster), "BABABA");
}

#[test]
fn a_lost_node_requeues_reentrant_jobs_and_abandons_the_others() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    node(&mut s, "10.0.0.3", 1);
    let re = computation(&mut s, "re", false, true);
    settle(&mut s, 0.0);
    let first = submit(&mut s, re, "re");
    let second = submit(&mut s, re, "re");
    let started = runs(&settle(&mut s, 0.0));
    assert_eq!(started.len(), 2);
    let doomed = started.iter().find(|(u, _)| *u == first).unwrap().1.clone();
    let live = started
        .iter()
        .find(|(u, _)| *u == second)
        .unwrap()
        .1
        .clone();
    let old_hash = s.jobs[&first].node_hash();
    s.node_lost(2.0, &doomed);
    let actions = settle(&mut s, 2.0);
    assert!(actions.iter().any(
        |a| matches!(a, Action::Client { msg: ToClient::NodeClosed { ip }, .. } if *ip == doomed)
    ));
    assert!(runs(&actions).is_empty(), "the live node is busy");
    finish(&mut s, second, &live);
    assert_eq!(runs(&settle(&mut s, 3.0)), vec![(first, live.clone())]);
    // The lost node's late reply for the old attempt is not taken.
    assert!(!s.job_reply(4.0, &doomed, first, &old_hash, 11, Value::None));
    // The new attempt's reply is, with the client's hash restored.
    let new_hash = s.jobs[&first].node_hash();
    assert_ne!(new_hash, old_hash);
    let mut reply = Value::instance(
        "dispy",
        "_JobReply",
        [("hash", Value::from(new_hash.as_str()))],
    );
    set_attr(&mut reply, "uid", Value::Int(first as i64));
    assert!(s.job_reply(5.0, &live, first, &new_hash, 11, reply));
    let got = results(&settle(&mut s, 5.0));
    match &got[..] {
        [(uid, ClientReply::Node(v))] => {
            assert_eq!(*uid, first);
            assert_eq!(v.attr("hash"), Some(&Value::from(format!("h{first}"))));
        }
        other => panic!("{other:?}"),
    }

    let plain = computation(&mut s, "plain", false, false);
    settle(&mut s, 5.0);
    let j = submit(&mut s, plain, "plain");
    let on = runs(&settle(&mut s, 5.0));
    assert_eq!(on, vec![(j, live.clone())]);
    s.node_lost(6.0, &live);
    let got = results(&settle(&mut s, 6.0));
    assert!(
        matches!(&got[..], [(u, ClientReply::Made { status: status::ABANDONED, .. })] if *u == j)
    );
    assert!(s.jobs.is_empty());
}

#[test]
fn a_busy_node_silent_for_five_pulses_is_lost() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let id = computation(&mut s, "a", false, true);
    settle(&mut s, 0.0);
    submit(&mut s, id, "a");
    settle(&mut s, 0.0);
    s.node_pulse(3.0, "10.0.0.2");
    s.tick(7.0);
    assert!(s.nodes.contains_key("10.0.0.2"), "4 s of silence");
    s.tick(8.5);
    assert!(!s.nodes.contains_key("10.0.0.2"));
    assert_eq!(
        s.clusters[&id].queue.len(),
        1,
        "its reentrant job is queued again"
    );
}

#[test]
fn a_reply_from_another_node_or_with_a_wrong_hash_is_ignored() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    let uid = submit(&mut s, id, "a");
    settle(&mut s, 0.0);
    assert!(!s.job_reply(1.0, "10.0.0.7", uid, &format!("h{uid}"), 11, Value::None));
    assert!(!s.job_reply(1.0, "10.0.0.2", uid, "forged", 11, Value::None));
    assert!(!s.job_reply(1.0, "10.0.0.2", uid + 1, "h", 11, Value::None));
    assert!(s.jobs.contains_key(&uid));
}

#[test]
fn cancel_of_a_queued_job_replies_cancelled_and_of_a_running_one_terminates_it() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    let running = submit(&mut s, id, "a");
    let queued = submit(&mut s, id, "a");
    settle(&mut s, 0.0);
    s.cancel(1.0, id, "a", queued).unwrap();
    let got = results(&settle(&mut s, 1.0));
    assert!(
        matches!(&got[..], [(u, ClientReply::Made { status: status::CANCELLED, hash, .. })] if *u == queued && *hash == format!("h{queued}"))
    );
    s.cancel(1.0, id, "a", running).unwrap();
    let actions = settle(&mut s, 1.0);
    assert!(matches!(&actions[..], [Action::Terminate { uid, .. }] if *uid == running));
    assert_eq!(
        s.cancel(1.0, id, "a", queued),
        Err(Refusal::UnknownJob(queued, id))
    );
}

#[test]
fn one_client_cannot_act_on_another_clients_computation() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let a = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    let uid = submit(&mut s, a, "a");
    let wrong = Err(Refusal::WrongAuth(a));
    assert_eq!(s.cancel(0.0, a, "b", uid), wrong);
    assert_eq!(s.close(a, "b", true), wrong);
    assert_eq!(s.node_jobs(a, "b", "10.0.0.2"), Err(Refusal::WrongAuth(a)));
    assert_eq!(
        s.submit(0.0, a, "b", 99, "h".into(), None, Value::None),
        wrong
    );
    assert_eq!(s.pending(a, "b"), Err(Refusal::WrongAuth(a)));
    assert!(s.clusters.contains_key(&a));
}

#[test]
fn an_exclusive_computation_waits_for_others_and_others_wait_for_it() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 2);
    let x = computation(&mut s, "x", true, false);
    settle(&mut s, 0.0);
    let y = computation(&mut s, "y", false, false);
    let actions = s.take_actions();
    assert!(
        actions.is_empty(),
        "no SCHEDULED for y while x is active: {actions:?}"
    );
    assert_eq!(s.clusters[&y].phase, Phase::Waiting);
    s.close(x, "x", false).unwrap();
    let actions = s.take_actions();
    assert!(actions.iter().any(|a| matches!(a, Action::Client { compute_id, msg: ToClient::Scheduled { .. } } if *compute_id == y)));
    s.scheduled(0.0, y, true);
    settle(&mut s, 0.0);
    let z = computation(&mut s, "z", true, false);
    assert!(s.take_actions().is_empty());
    assert_eq!(s.clusters[&z].phase, Phase::Waiting);
}

#[test]
fn a_silent_client_loses_its_computation_after_the_zombie_interval() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let quiet = computation(&mut s, "q", false, false);
    let alive = computation(&mut s, "l", false, false);
    settle(&mut s, 0.0);
    submit(&mut s, quiet, "q");
    settle(&mut s, 0.0);
    s.client_pulse(50.0, "10.0.0.1", 9999);
    s.node_pulse(58.5, "10.0.0.2");
    s.tick(59.0);
    assert!(s.clusters.contains_key(&quiet));
    // Only the pulse of the other client's port counts for it.
    s.clusters.get_mut(&alive).unwrap().client_port = 9710;
    s.client_pulse(55.0, "10.0.0.1", 9710);
    s.node_pulse(60.5, "10.0.0.2");
    s.tick(61.0);
    assert!(!s.clusters.contains_key(&quiet));
    assert!(s.clusters.contains_key(&alive));
    let actions = s.take_actions();
    assert!(actions.iter().any(|a| matches!(a, Action::Close { compute_id, terminate_pending: true, .. } if *compute_id == quiet)), "{actions:?}");
    assert!(actions.iter().any(
        |a| matches!(a, Action::Forget { compute_id, why: Gone::Zombie } if *compute_id == quiet)
    ));
}

#[test]
fn a_result_is_sent_again_until_the_client_acknowledges_it() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    let uid = submit(&mut s, id, "a");
    settle(&mut s, 0.0);
    finish(&mut s, uid, "10.0.0.2");
    assert_eq!(results(&settle(&mut s, 1.0)).len(), 1);
    s.delivered(1.0, id, uid, false);
    s.tick(2.5);
    assert_eq!(results(&settle(&mut s, 2.5)).len(), 1, "sent again");
    s.delivered(2.6, id, uid, true);
    s.tick(5.0);
    assert!(results(&settle(&mut s, 5.0)).is_empty());
    assert_eq!(s.pending(id, "a"), Ok((vec![], 0)));
}

#[test]
fn a_pinned_job_runs_only_on_its_node() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    node(&mut s, "10.0.0.3", 1);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    for _ in 0..2 {
        let uid = s.new_uid();
        s.submit(
            0.0,
            id,
            "a",
            uid,
            "h".into(),
            Some("10.0.0.3".into()),
            Value::None,
        )
        .unwrap();
    }
    let started = runs(&settle(&mut s, 0.0));
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].1, "10.0.0.3");
    assert_eq!(
        s.submit(
            0.0,
            id,
            "a",
            77,
            "h".into(),
            Some("10.0.0.9".into()),
            Value::None
        ),
        Err(Refusal::UnknownNode("10.0.0.9".into(), id))
    );
}

#[test]
fn a_restarted_node_loses_what_ran_there() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    let uid = submit(&mut s, id, "a");
    settle(&mut s, 0.0);
    s.node_found(
        3.0,
        NodeInfo {
            ip: "10.0.0.2".into(),
            port: 9701,
            name: "n".into(),
            cpus: 1,
            auth: "new-token".into(),
            scheduler_ip: "10.0.0.9".into(),
            keepalive: false,
        },
    );
    let actions = settle(&mut s, 3.0);
    assert!(
        matches!(&results(&actions)[..], [(u, ClientReply::Made { status: status::ABANDONED, .. })] if *u == uid)
    );
    assert_eq!(s.nodes["10.0.0.2"].auth, "new-token");
    assert!(s.nodes["10.0.0.2"].clusters.contains(&id), "set up again");
}

#[test]
fn node_allocations_match_patterns_and_count_cpus_as_dispy() {
    let a = NodeAlloc {
        host: "10.0.*.2".into(),
        ..NodeAlloc::any()
    };
    assert!(a.matches("10.0.7.2") && !a.matches("10.0.7.3") && !a.matches("11.0.7.2"));
    assert_eq!(a.allocate("10.0.1.2", 8), 8);
    assert_eq!(
        NodeAlloc {
            cpus: 3,
            ..a.clone()
        }
        .allocate("10.0.1.2", 8),
        3
    );
    assert_eq!(
        NodeAlloc {
            cpus: -2,
            ..a.clone()
        }
        .allocate("10.0.1.2", 8),
        6
    );
    assert_eq!(
        NodeAlloc {
            cpus: -9,
            ..a.clone()
        }
        .allocate("10.0.1.2", 8),
        0
    );
    assert_eq!(a.allocate("10.9.9.9", 8), 0);
}

#[test]
fn the_scheduler_node_list_limits_nodes_and_broadcast() {
    let mut cfg = config(Policy::EarliestJob);
    cfg.nodes = vec![NodeAlloc {
        host: "10.0.0.2".into(),
        ..NodeAlloc::any()
    }];
    let mut s = Scheduler::new(cfg, 0.0);
    s.start();
    assert_eq!(
        s.take_actions(),
        vec![Action::Ping {
            ip: "10.0.0.2".into(),
            port: None
        }]
    );
    node(&mut s, "10.0.0.5", 4);
    assert!(s.nodes.is_empty(), "not on the list");
    // A client's '*' does not make a listed scheduler broadcast.
    let _ = computation(&mut s, "a", false, false);
    let actions = settle(&mut s, 0.0);
    assert!(!actions.contains(&Action::Broadcast));
    let mut open = Scheduler::new(config(Policy::EarliestJob), 0.0);
    open.start();
    assert_eq!(open.take_actions(), vec![Action::Broadcast]);
}

#[test]
fn closing_a_computation_keeps_its_running_jobs_counted_until_their_node_replies() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let a = computation(&mut s, "a", false, false);
    let b = computation(&mut s, "b", false, false);
    settle(&mut s, 0.0);
    let ua = submit(&mut s, a, "a");
    let ub = submit(&mut s, b, "b");
    settle(&mut s, 0.0);
    s.close(a, "a", true).unwrap();
    assert!(
        runs(&settle(&mut s, 1.0)).is_empty(),
        "the cpu is still a's job's"
    );
    assert!(finish(&mut s, ua, "10.0.0.2"));
    let actions = settle(&mut s, 2.0);
    assert!(results(&actions).is_empty(), "a is gone: no result to send");
    assert_eq!(runs(&actions), vec![(ub, "10.0.0.2".into())]);
}

fn listed(hosts: &[&str]) -> Vec<NodeAlloc> {
    hosts
        .iter()
        .map(|h| NodeAlloc {
            host: h.to_string(),
            port: Some(9701),
            ..NodeAlloc::any()
        })
        .collect()
}

#[test]
fn a_nodes_file_list_is_all_there_is_even_when_empty_and_never_broadcasts() {
    let mut cfg = config(Policy::EarliestJob);
    cfg.listed_only = true;
    let mut s = Scheduler::new(cfg, 0.0);
    s.start();
    assert_eq!(
        s.take_actions(),
        vec![],
        "no node listed: no ping, no broadcast"
    );
    node(&mut s, "10.0.0.5", 4);
    assert!(s.nodes.is_empty(), "an empty file lists no node");
    s.set_nodes(1.0, listed(&["10.0.0.2", "10.0.0.3"]));
    assert_eq!(
        s.take_actions(),
        vec![
            Action::Ping {
                ip: "10.0.0.2".into(),
                port: Some(9701)
            },
            Action::Ping {
                ip: "10.0.0.3".into(),
                port: Some(9701)
            }
        ]
    );
}

#[test]
fn a_node_dropped_from_the_nodes_file_is_closed_and_its_reentrant_jobs_run_on_the_others() {
    let mut cfg = config(Policy::EarliestJob);
    cfg.listed_only = true;
    cfg.nodes = listed(&["10.0.0.2", "10.0.0.3"]);
    let mut s = Scheduler::new(cfg, 0.0);
    node(&mut s, "10.0.0.2", 1);
    node(&mut s, "10.0.0.3", 1);
    let id = computation(&mut s, "a", false, true);
    settle(&mut s, 0.0);
    let a = submit(&mut s, id, "a");
    let b = submit(&mut s, id, "a");
    let started = runs(&settle(&mut s, 0.0));
    assert_eq!(started.len(), 2);
    let on_3 = started.iter().find(|(_, ip)| ip == "10.0.0.3").unwrap().0;
    let on_2 = if on_3 == a { b } else { a };

    // 10.0.0.4 joins (scale up): pinged, found, set up.
    s.set_nodes(1.0, listed(&["10.0.0.2", "10.0.0.3", "10.0.0.4"]));
    assert!(s.take_actions().contains(&Action::Ping {
        ip: "10.0.0.4".into(),
        port: Some(9701)
    }));
    node(&mut s, "10.0.0.4", 1);
    settle(&mut s, 1.0);
    assert!(s.nodes["10.0.0.4"].clusters.contains(&id));

    // 10.0.0.3 leaves (scale down): closed there, its job runs again on the free node.
    s.set_nodes(2.0, listed(&["10.0.0.2", "10.0.0.4"]));
    let actions = settle(&mut s, 2.0);
    assert!(actions.iter().any(|a| matches!(a,
        Action::Close { node, compute_id, terminate_pending: true, .. }
            if node.ip == "10.0.0.3" && *compute_id == id)));
    assert!(!s.nodes.contains_key("10.0.0.3"));
    assert_eq!(runs(&actions), vec![(on_3, "10.0.0.4".to_string())]);
    assert_eq!(s.jobs[&on_2].node.as_deref(), Some("10.0.0.2"));
    // An announcement from the dropped node is not taken.
    node(&mut s, "10.0.0.3", 1);
    assert!(!s.nodes.contains_key("10.0.0.3"));
}

#[test]
fn allocate_deallocate_and_close_node_steer_a_computations_jobs() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    node(&mut s, "10.0.0.3", 1);
    let id = s.new_computation(
        0.0,
        NewComputation {
            client_auth: "a".into(),
            node_auth: "na".into(),
            compute: Value::None,
            exclusive: false,
            reentrant: false,
            allocs: vec![NodeAlloc {
                host: "10.0.0.2".into(),
                ..NodeAlloc::any()
            }],
            client_ip: "10.0.0.1".into(),
            client_port: 9700,
        },
    );
    s.schedule(0.0, id, "a").unwrap();
    settle(&mut s, 0.0);
    assert!(
        !s.nodes["10.0.0.3"].clusters.contains(&id),
        "not in its nodes="
    );
    let more = NodeAlloc {
        host: "10.0.0.3".into(),
        ..NodeAlloc::any()
    };
    s.allocate_node(0.0, id, "a", vec![more]).unwrap();
    settle(&mut s, 0.0);
    assert!(s.nodes["10.0.0.3"].clusters.contains(&id));
    s.deallocate_node(id, "a", "10.0.0.2").unwrap();
    let uids: Vec<Uid> = (0..2).map(|_| submit(&mut s, id, "a")).collect();
    assert_eq!(
        runs(&settle(&mut s, 0.0)),
        vec![(uids[0], "10.0.0.3".into())]
    );
    // Allocated again: it is still set up there, so no new setup.
    let back = NodeAlloc {
        host: "10.0.0.2".into(),
        ..NodeAlloc::any()
    };
    s.allocate_node(0.0, id, "a", vec![back]).unwrap();
    let actions = s.take_actions();
    assert!(!actions.iter().any(|a| matches!(a, Action::Setup { .. })));
    assert_eq!(runs(&actions), vec![(uids[1], "10.0.0.2".into())]);
    s.close_node(id, "a", "10.0.0.3", true).unwrap();
    let actions = s.take_actions();
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Close { node, .. } if node.ip == "10.0.0.3")));
    assert_eq!(
        s.deallocate_node(id, "a", "10.0.0.3"),
        Err(Refusal::UnknownNode("10.0.0.3".into(), id))
    );
    assert_eq!(
        s.close_node(id, "b", "10.0.0.2", true),
        Err(Refusal::WrongAuth(id))
    );
}

#[test]
fn listed_nodes_not_found_are_asked_again() {
    let mut cfg = config(Policy::EarliestJob);
    cfg.nodes = vec![
        NodeAlloc {
            host: "10.0.0.2".into(),
            ..NodeAlloc::any()
        },
        NodeAlloc {
            host: "10.0.0.3".into(),
            ..NodeAlloc::any()
        },
    ];
    let mut s = Scheduler::new(cfg, 0.0);
    s.start();
    s.take_actions();
    node(&mut s, "10.0.0.2", 1);
    s.take_actions();
    s.tick(10.0);
    assert!(s.take_actions().is_empty());
    s.tick(31.0);
    assert_eq!(
        s.take_actions(),
        vec![Action::Ping {
            ip: "10.0.0.3".into(),
            port: None
        }]
    );
}

#[test]
fn a_node_changing_its_cpus_gets_that_many_jobs() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    for _ in 0..3 {
        submit(&mut s, id, "a");
    }
    assert_eq!(runs(&settle(&mut s, 0.0)).len(), 1);
    s.node_cpus(1.0, "10.0.0.2", 3);
    assert_eq!(runs(&settle(&mut s, 1.0)).len(), 2);
}

#[test]
fn shutdown_ends_every_job_terminated_and_closes_every_computation() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    let running = submit(&mut s, id, "a");
    let queued = submit(&mut s, id, "a");
    settle(&mut s, 0.0);
    s.shutdown();
    let actions = s.take_actions();
    let got = results(&actions);
    assert_eq!(got.len(), 2);
    for (uid, reply) in got {
        assert!([running, queued].contains(&uid));
        assert!(matches!(
            reply,
            ClientReply::Made {
                status: status::TERMINATED,
                ..
            }
        ));
    }
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Close {
            terminate_pending: true,
            ..
        }
    )));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Forget {
            why: Gone::Shutdown,
            ..
        }
    )));
    assert!(s.clusters.is_empty() && s.jobs.is_empty());
}

#[test]
fn a_job_acknowledged_but_not_queued_ends_cancelled_for_its_client() {
    let mut s = Scheduler::new(config(Policy::EarliestJob), 0.0);
    node(&mut s, "10.0.0.2", 1);
    let id = computation(&mut s, "a", false, false);
    settle(&mut s, 0.0);
    let uid = s.new_uid();
    let pinned = Some("10.0.0.2".to_string());
    s.node_lost(0.0, "10.0.0.2");
    s.take_actions();
    assert!(s
        .submit(0.0, id, "a", uid, "h".into(), pinned, Value::None)
        .is_err());
    s.not_queued(id, uid, "h".into());
    let got = results(&s.take_actions());
    assert!(
        matches!(&got[..], [(u, ClientReply::Made { status: status::CANCELLED, .. })] if *u == uid)
    );
    assert_eq!(s.pending(id, "a").unwrap().1, 0);
    assert_eq!(
        s.set_node_cpus(0.0, id, "a", "10.0.0.2", 1),
        Err(Refusal::NotExclusive(id))
    );
}
