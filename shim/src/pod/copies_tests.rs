//! Copied files against the fake agent: put once per pod, sent again after a host change,
//! removed with the last container that binds them; a source too big to copy is shared.

use std::time::Duration;

use cocoon_protocol::ProcessRef;

use super::fake::Rig;
use crate::pod::CreateRequest;

fn binding(rig: &Rig, id: &str, src: &std::path::Path, dest: &str, opts: &[&str]) -> CreateRequest {
    let mut req = rig.create_request(id);
    req.spec = serde_json::json!({"mounts": [
        {"destination": dest, "type": "bind", "source": src, "options": opts}
    ]});
    req.spec_json = req.spec.to_string().into_bytes();
    req
}

fn puts(rig: &Rig) -> Vec<String> {
    rig.journal
        .entries()
        .into_iter()
        .filter(|e| e.starts_with("agent put"))
        .collect()
}

#[tokio::test]
async fn a_pod_file_is_copied_once_updated_after_a_host_write_and_removed_with_its_last_user() {
    let rig = Rig::new();
    let hosts = rig.dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let name = crate::volumes::copied::name_for(&hosts);
    rig.pod.create(rig.create_request("keeper")).await.unwrap();
    for id in ["c1", "c2"] {
        let req = binding(&rig, id, &hosts, "/etc/hosts", &["rbind", "rw"]);
        rig.pod.create(req).await.unwrap();
    }
    assert_eq!(puts(&rig), [format!("agent put {name} 1 entries")]);
    assert!(
        !rig.journal.entries().iter().any(|e| e.contains("_volumes")),
        "nothing bound on the share"
    );

    std::fs::write(&hosts, "127.0.0.1 localhost\n10.0.0.2 peer\n").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while puts(&rig).len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no update: {:?}",
            puts(&rig)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(super::copies::POLL * 2).await;
    assert_eq!(puts(&rig).len(), 2, "an unchanged source is not sent again");

    rig.pod.delete(&ProcessRef::init("c1")).await.unwrap();
    assert_eq!(puts(&rig).len(), 2, "c2 still binds it");
    rig.pod.delete(&ProcessRef::init("c2")).await.unwrap();
    assert_eq!(
        puts(&rig).last().unwrap(),
        &format!("agent put {name} remove")
    );
}

#[tokio::test]
async fn a_file_too_big_to_copy_is_shared_and_a_writable_host_file_is_never_copied() {
    let rig = Rig::new();
    let big = rig.dir.path().join("big.conf");
    let size = crate::volumes::copied::COPY_MAX_BYTES + 1;
    std::fs::write(&big, vec![b'x'; usize::try_from(size).unwrap()]).unwrap();
    rig.pod
        .create(binding(&rig, "c1", &big, "/etc/big.conf", &["rbind", "ro"]))
        .await
        .unwrap();
    let small = rig.dir.path().join("app.log");
    std::fs::write(&small, "").unwrap();
    rig.pod
        .create(binding(
            &rig,
            "c2",
            &small,
            "/var/log/app.log",
            &["rbind", "rw"],
        ))
        .await
        .unwrap();
    assert!(puts(&rig).is_empty(), "{:?}", puts(&rig));
    let binds = rig
        .journal
        .entries()
        .into_iter()
        .filter(|e| e.starts_with("bind _volumes"))
        .count();
    assert_eq!(binds, 2, "{:?}", rig.journal.entries());
}

#[tokio::test]
async fn a_termination_log_goes_back_to_the_host_before_the_exit_is_published() {
    let rig = Rig::new();
    let dir = rig.dir.path().join("pods/uid-1/containers/app");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("5f1d2e3c");
    std::fs::write(&log, "").unwrap();
    let req = binding(&rig, "c1", &log, "/dev/termination-log", &["rbind", "rw"]);
    rig.pod.create(req).await.unwrap();
    rig.pod.start(&ProcessRef::init("c1")).await.unwrap();
    rig.pod
        .signal(&ProcessRef::init("c1"), 9, false)
        .await
        .unwrap();
    rig.pod.wait(&ProcessRef::init("c1")).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "written in the guest\n",
        "the host file has the guest's content once the exit is out"
    );
    let name = crate::volumes::copied::name_for(&log);
    assert_eq!(
        puts(&rig),
        [format!("agent put {name} 1 entries")],
        "copied in, not shared"
    );
}
