//! The pod model against a fake agent: call ordering, exits, a lost agent, a second container,
//! failed creates, OOM events and shutdown.

use std::time::Duration;

use cocoon_protocol::ProcessRef;

use super::fake::Rig;
use crate::events::Event;
use crate::process::{Exit, Status, StdioPaths};
use crate::Error;

fn init(cid: &str) -> ProcessRef {
    ProcessRef::init(cid)
}

/// Waits (bounded) until the pod has published `n` events.
async fn events_at_least(rig: &Rig, n: usize) -> Vec<Event> {
    for _ in 0..200 {
        let ev = rig.events();
        if ev.len() >= n {
            return ev;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("only these events arrived: {:?}", rig.events());
}

#[tokio::test]
async fn create_start_kill_delete_run_in_order_and_the_last_delete_stops_the_vm() {
    let rig = Rig::new();
    let pid = rig.pod.create(rig.create_request("c1")).await.unwrap();
    assert_eq!(
        rig.pod.state(&init("c1")).await.unwrap().status,
        Status::Created
    );
    assert_eq!(rig.pod.start(&init("c1")).await.unwrap(), 100);
    assert_eq!(
        rig.pod.state(&init("c1")).await.unwrap().status,
        Status::Running
    );
    rig.pod.signal(&init("c1"), 9, false).await.unwrap();
    let exit = rig.pod.wait(&init("c1")).await.unwrap();
    assert_eq!(exit.status, 137);
    let st = rig.pod.state(&init("c1")).await.unwrap();
    assert_eq!((st.status, st.exit), (Status::Stopped, Some(exit)));
    let (deleted_pid, deleted_exit) = rig.pod.delete(&init("c1")).await.unwrap();
    assert_eq!((deleted_pid, deleted_exit), (pid, exit));
    assert_eq!(
        rig.journal.entries(),
        [
            "vm boot pod1",
            "mount c1/rootfs",
            "agent create c1",
            "agent start c1",
            "agent signal c1/- 9",
            "agent remove c1",
            "unmount c1/rootfs",
            "vm shutdown",
        ]
    );
    let topics: Vec<_> = rig.events().iter().map(Event::topic).collect();
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert!(matches!(
        rig.pod.state(&init("c1")).await,
        Err(Error::NotFound(_))
    ));
    // The crash record went with the VM.
    assert!(!rig.dir.path().join(crate::state::FILE).exists());
}

#[tokio::test]
async fn an_exec_runs_reports_its_exit_and_is_forgotten_on_delete() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.pod.start(&init("c1")).await.unwrap();
    let e1 = ProcessRef::exec("c1", "e1");
    rig.pod
        .add_exec(&e1, StdioPaths::default(), br#"{"args":["ls"]}"#.to_vec())
        .await
        .unwrap();
    let again = rig.pod.add_exec(&e1, StdioPaths::default(), vec![]).await;
    assert!(matches!(again, Err(Error::AlreadyExists(_))), "{again:?}");
    assert_eq!(rig.pod.state(&e1).await.unwrap().status, Status::Created);
    let pid = rig.pod.start(&e1).await.unwrap();
    rig.pod.signal(&e1, 15, false).await.unwrap();
    assert_eq!(rig.pod.wait(&e1).await.unwrap().status, 143);
    // The init is untouched by its exec's exit.
    assert_eq!(
        rig.pod.state(&init("c1")).await.unwrap().status,
        Status::Running
    );
    let (gone_pid, gone) = rig.pod.delete(&e1).await.unwrap();
    assert_eq!((gone_pid, gone.status), (pid, 143));
    assert!(matches!(rig.pod.state(&e1).await, Err(Error::NotFound(_))));
    let j = rig.journal.entries();
    assert!(
        j.contains(&r#"agent exec c1/e1 {"args":["ls"]}"#.to_owned()),
        "{j:?}"
    );
    assert!(j.contains(&"agent signal c1/e1 15".to_owned()), "{j:?}");
    let ev = events_at_least(&rig, 5).await;
    assert!(ev.contains(&Event::ExecAdded(e1.clone())), "{ev:?}");
    assert!(ev.contains(&Event::ExecStarted {
        process: e1.clone(),
        pid
    }));
    assert!(ev.iter().any(|e| matches!(e, Event::Exit { process, exit: Exit { status: 143, .. }, .. } if *process == e1)));
}

#[tokio::test]
async fn an_exec_that_fails_to_start_ends_so_that_its_wait_returns() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.pod.start(&init("c1")).await.unwrap();
    let bad = ProcessRef::exec("c1", "bad1");
    rig.pod
        .add_exec(
            &bad,
            StdioPaths::default(),
            br#"{"args":["nope"]}"#.to_vec(),
        )
        .await
        .unwrap();
    assert!(rig.pod.start(&bad).await.is_err());
    // containerd's clean-up of a failed exec waits on it, then deletes it.
    let exit = tokio::time::timeout(Duration::from_secs(5), rig.pod.wait(&bad))
        .await
        .expect("Wait on an exec that never started must return")
        .unwrap();
    assert_eq!(exit.status, 255);
    assert_eq!(rig.pod.state(&bad).await.unwrap().status, Status::Stopped);
    rig.pod.delete(&bad).await.unwrap();
    assert_eq!(
        rig.pod.state(&init("c1")).await.unwrap().status,
        Status::Running
    );
}

#[tokio::test]
async fn a_second_container_joins_the_vm_and_the_vm_outlives_the_first() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.pod.create(rig.create_request("c2")).await.unwrap();
    let dup = rig.pod.create(rig.create_request("c2")).await;
    assert!(matches!(dup, Err(Error::AlreadyExists(_))), "{dup:?}");
    rig.pod.delete(&init("c1")).await.unwrap();
    assert!(!rig.journal.entries().contains(&"vm shutdown".to_owned()));
    // The survivor still talks to the same guest.
    rig.pod.start(&init("c2")).await.unwrap();
    rig.pod.delete(&init("c2")).await.unwrap();
    let j = rig.journal.entries();
    assert_eq!(
        j.iter().filter(|e| e.starts_with("vm boot")).count(),
        1,
        "{j:?}"
    );
    assert_eq!(j.last().map(String::as_str), Some("vm shutdown"), "{j:?}");
    // A later container boots a new VM.
    rig.pod.create(rig.create_request("c3")).await.unwrap();
    let boots = rig
        .journal
        .entries()
        .iter()
        .filter(|e| e.starts_with("vm boot"))
        .count();
    assert_eq!(boots, 2);
}

#[tokio::test]
async fn a_lost_agent_ends_every_process_with_255() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.pod.start(&init("c1")).await.unwrap();
    rig.factory.kill_vm();
    let exit = tokio::time::timeout(Duration::from_secs(10), rig.pod.wait(&init("c1")))
        .await
        .expect("the exit of a process in a dead VM must be reported")
        .unwrap();
    assert_eq!(exit.status, 255);
    assert_eq!(
        rig.pod.state(&init("c1")).await.unwrap().status,
        Status::Stopped
    );
    let ev = events_at_least(&rig, 3).await;
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::Exit {
                exit: Exit { status: 255, .. },
                ..
            }
        )),
        "{ev:?}"
    );
    // Kill has nothing left to signal and succeeds: a pod's stop must not fail on it.
    rig.pod.signal(&init("c1"), 9, false).await.unwrap();
    // Calls that need the agent fail with its error instead of hanging.
    let e = rig.pod.pids("c1").await.unwrap_err();
    assert!(matches!(e, Error::Agent { .. }), "{e:?}");
    // Delete still cleans up the host side and stops the VM.
    rig.pod.delete(&init("c1")).await.unwrap();
    let j = rig.journal.entries();
    assert!(
        j.ends_with(&["unmount c1/rootfs".to_owned(), "vm shutdown".to_owned()]),
        "{j:?}"
    );
}

/// A frozen guest (a stopped QEMU) answers nothing: calls fail within the bound and name
/// what hung and the pod; SIGTERM fails like any call; SIGKILL, which must not fail, stops
/// the VM, so the process ends (255) and delete cleans up.
#[tokio::test]
async fn a_frozen_guest_costs_bounded_waits_and_sigkill_stops_its_vm() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.pod.start(&init("c1")).await.unwrap();
    rig.freeze();
    let limit = super::fake::FAKE_CALL_TIMEOUT;
    let t0 = std::time::Instant::now();
    let e = tokio::time::timeout(limit * 5, rig.pod.signal(&init("c1"), 15, false))
        .await
        .expect("a call on a frozen guest must not hang")
        .unwrap_err();
    assert!(t0.elapsed() < limit * 5, "waited {:?}", t0.elapsed());
    match &e {
        Error::Timeout { call, pod, after } => {
            assert_eq!((*call, pod.as_str(), *after), ("kill", "pod1", limit));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(e.to_string().contains("pod pod1"), "{e}");
    assert_eq!(
        rig.pod.state(&init("c1")).await.unwrap().status,
        Status::Running
    );
    rig.pod.signal(&init("c1"), 9, false).await.unwrap();
    assert!(rig.journal.entries().contains(&"vm killed".to_owned()));
    let exit = tokio::time::timeout(Duration::from_secs(10), rig.pod.wait(&init("c1")))
        .await
        .expect("the process of a killed VM must end")
        .unwrap();
    assert_eq!(exit.status, 255);
    rig.pod.delete(&init("c1")).await.unwrap();
    assert!(rig.journal.entries().ends_with(&["vm shutdown".to_owned()]));
}

#[tokio::test]
async fn a_failed_create_leaves_no_mount_and_no_vm() {
    let rig = Rig::new();
    let e = rig
        .pod
        .create(rig.create_request("bad1"))
        .await
        .unwrap_err();
    // The agent's own status reaches containerd with its code.
    let crate::Error::Agent {
        call: "create",
        source: ttrpc::Error::RpcStatus(s),
        ..
    } = &e
    else {
        panic!("{e:?}");
    };
    assert_eq!(s.message, "no such executable");
    assert_eq!(
        rig.journal.entries(),
        [
            "vm boot pod1",
            "mount bad1/rootfs",
            "agent create bad1",
            "unmount bad1/rootfs",
            "vm shutdown"
        ]
    );
    assert!(!rig.dir.path().join("mounts/bad1").exists());

    // With a container running, a failed create leaves it and the VM alone.
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.mounter
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    rig.pod.create(rig.create_request("c2")).await.unwrap_err();
    let j = rig.journal.entries();
    assert_eq!(
        j.last().map(String::as_str),
        Some("unmount c2/rootfs"),
        "{j:?}"
    );
    assert_eq!(
        rig.pod.state(&init("c1")).await.unwrap().status,
        Status::Created
    );
    // Only successful creates were announced.
    let topics: Vec<_> = rig.events().iter().map(Event::topic).collect();
    assert_eq!(topics, ["/tasks/create"]);
}

#[tokio::test]
async fn a_vm_that_does_not_boot_fails_the_create() {
    let rig = Rig::new();
    rig.factory.fail_boots();
    let e = rig.pod.create(rig.create_request("c1")).await.unwrap_err();
    assert!(matches!(e, Error::Boot(_)), "{e:?}");
    assert_eq!(rig.journal.entries(), ["vm boot pod1"]);
    assert!(matches!(
        rig.pod.signal(&init("c1"), 9, false).await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test]
async fn oom_events_are_published_only_for_containers_of_this_pod() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.oom.send("someone-elses".into()).unwrap();
    rig.oom.send("c1".into()).unwrap();
    let ev = events_at_least(&rig, 2).await;
    assert_eq!(ev[1], Event::Oom("c1".into()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(rig.events().len(), 2, "{:?}", rig.events());
}

#[tokio::test]
async fn a_flood_of_oom_events_is_throttled_per_container() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.pod.create(rig.create_request("c2")).await.unwrap();
    for _ in 0..50 {
        rig.oom.send("c1".into()).unwrap();
    }
    rig.oom.send("c2".into()).unwrap();
    let ev = events_at_least(&rig, 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ooms: Vec<_> = rig
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Oom(_)))
        .collect();
    assert_eq!(
        ooms,
        [Event::Oom("c1".into()), Event::Oom("c2".into())],
        "{ev:?}"
    );
}

#[tokio::test]
async fn shutdown_lets_the_shim_go_only_when_no_container_is_left() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    assert!(!rig.pod.shutdown().await);
    assert!(!rig.journal.entries().contains(&"vm shutdown".to_owned()));
    rig.pod.delete(&init("c1")).await.unwrap();
    assert!(rig.pod.shutdown().await);
    // Nothing left to stop a second time.
    let stops = rig
        .journal
        .entries()
        .iter()
        .filter(|e| *e == "vm shutdown")
        .count();
    assert_eq!(stops, 1);
}

#[tokio::test]
async fn the_crash_record_lists_the_vm_and_each_mounted_rootfs() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.pod.create(rig.create_request("c2")).await.unwrap();
    let st = crate::state::SandboxState::load(rig.dir.path()).unwrap();
    assert_eq!(st.sandbox_id, "pod1");
    assert_eq!(st.pids, [("fake-vmm".to_owned(), u32::MAX - 1)]);
    assert_eq!(st.mounts.len(), 2);
    rig.pod.delete(&init("c1")).await.unwrap();
    let st = crate::state::SandboxState::load(rig.dir.path()).unwrap();
    assert_eq!(st.mounts, [rig.dir.path().join("mounts/c2/rootfs")]);
}

#[tokio::test]
async fn a_kill_the_dead_vm_never_delivers_still_succeeds() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.pod.start(&init("c1")).await.unwrap();
    rig.pod.create(rig.create_request("c2")).await.unwrap();
    rig.factory.kill_vm();
    // c2 was created, never started: no exit watcher marks it stopped, yet the VM is gone.
    rig.pod.signal(&init("c2"), 9, false).await.unwrap();
    rig.pod.delete(&init("c2")).await.unwrap();
    rig.pod.delete(&init("c1")).await.unwrap();
    assert!(rig.journal.entries().ends_with(&["vm shutdown".to_owned()]));
}

#[tokio::test]
async fn terminate_tears_down_every_container_and_the_vm() {
    let rig = Rig::new();
    rig.pod.create(rig.create_request("c1")).await.unwrap();
    rig.pod.start(&init("c1")).await.unwrap();
    rig.pod.create(rig.create_request("c2")).await.unwrap();
    rig.pod.terminate().await;
    let j = rig.journal.entries();
    for want in ["unmount c1/rootfs", "unmount c2/rootfs"] {
        assert!(j.contains(&want.to_owned()), "{j:?}");
    }
    assert_eq!(j.last().map(String::as_str), Some("vm shutdown"), "{j:?}");
    // The pod is empty: the shim may go.
    assert!(rig.pod.shutdown().await);
    assert!(rig.pod.state(&init("c1")).await.is_err());
}

#[tokio::test]
async fn a_volume_shared_by_two_containers_is_bound_once_until_the_last_goes() {
    let rig = Rig::new();
    let src = rig.dir.path().join("vol");
    std::fs::create_dir(&src).unwrap();
    let with_volume = |id: &str, opts: &[&str]| {
        let mut req = rig.create_request(id);
        req.spec = serde_json::json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": src, "options": opts}
        ]});
        req.spec_json = req.spec.to_string().into_bytes();
        req
    };
    rig.pod.create(with_volume("c1", &["rbind"])).await.unwrap();
    rig.pod.create(with_volume("c2", &["rbind"])).await.unwrap();
    rig.pod
        .create(with_volume("c3", &["rbind", "ro"]))
        .await
        .unwrap();
    rig.pod.delete(&init("c1")).await.unwrap();
    rig.pod.delete(&init("c3")).await.unwrap();
    let binds = |j: &[String]| -> Vec<String> {
        j.iter()
            .filter(|e| e.contains("_volumes"))
            .cloned()
            .collect()
    };
    assert_eq!(
        binds(&rig.journal.entries()),
        ["bind _volumes/0", "bind _volumes/1", "unmount _volumes/1",],
        "c2 still holds _volumes/0; the read-only use has a bind of its own"
    );
    rig.pod.delete(&init("c2")).await.unwrap();
    assert!(binds(&rig.journal.entries()).ends_with(&["unmount _volumes/0".to_owned()]));
}

/// Each container's `oomScoreAdj` is handed to the VM, which raises its processes to it.
#[tokio::test]
async fn a_containers_oom_score_is_handed_to_the_vm() {
    let rig = Rig::new();
    let mut req = rig.create_request("c1");
    req.spec = serde_json::json!({"process": {"oomScoreAdj": 500}});
    rig.pod.create(req).await.unwrap();
    rig.pod.create(rig.create_request("c2")).await.unwrap();
    let scores: Vec<String> = rig
        .journal
        .entries()
        .into_iter()
        .filter(|e| e.starts_with("oom score"))
        .collect();
    assert_eq!(scores, ["oom score 500"], "only the container that asked");
}
