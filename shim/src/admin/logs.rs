//! `GET /logs[?follow]`: the guest's console, for `cocoon logs`. The console relay
//! (`vmm-driver/src/console.rs`) writes it with host wall-clock stamps and the agent's lines
//! in it; this only reads the files: a frozen or dead guest can't hold it up.
//!
//! A pod restored from the VM template never booted a kernel of its own: its guest's boot
//! lines are in the template's console, which comes first, under a header that says so.
//! Then the pod's own: `console.log.1` (once the console rotated) and `console.log`. With
//! `follow`, what is appended after (across a rotation) until the VM's run directory goes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::pod::VmFacts;

/// How often a followed console is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// The files of a VM's console, oldest first.
#[derive(Debug, Clone)]
pub struct Sources {
    template: Option<PathBuf>,
    console: PathBuf,
}

impl Sources {
    pub fn of(vm: &VmFacts) -> Sources {
        Sources {
            template: vm.template_console_log.clone(),
            console: vm.console_log.clone(),
        }
    }
}

/// Sends the console into `tx`, then with `follow` what is added to it, until the console is
/// gone (the VM stopped) or the reader is.
pub async fn stream(src: Sources, follow: bool, tx: mpsc::Sender<Bytes>) {
    if let Some(t) = &src.template {
        let head = format!(
            "--- the VM template's boot ({}): this pod was restored from it ---\n",
            t.display()
        );
        let body = tokio::fs::read(t).await.unwrap_or_default();
        let tail = "--- this pod, from its restore on ---\n";
        for part in [Bytes::from(head), Bytes::from(body), Bytes::from(tail)] {
            if tx.send(part).await.is_err() {
                return;
            }
        }
    }
    let rotated = src.console.with_extension("log.1");
    if let Ok(old) = tokio::fs::read(&rotated).await {
        if tx.send(Bytes::from(old)).await.is_err() {
            return;
        }
    }
    let Ok(mut file) = tokio::fs::File::open(&src.console).await else {
        return;
    };
    if copy_rest(&mut file, &tx).await.is_err() || !follow {
        return;
    }
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        if copy_rest(&mut file, &tx).await.is_err() {
            return;
        }
        match same_file(&file, &src.console).await {
            Some(true) => {}
            // Rotated: the rest of the old one is read above; on to the new one.
            Some(false) => match tokio::fs::File::open(&src.console).await {
                Ok(f) => file = f,
                Err(_) => return,
            },
            // Gone with the VM's run directory.
            None => return,
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Sends what `file` holds from where it was read up to; Err when the reader is gone.
async fn copy_rest(file: &mut tokio::fs::File, tx: &mpsc::Sender<Bytes>) -> Result<(), ()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return Ok(());
        }
        tx.send(Bytes::copy_from_slice(&buf[..n]))
            .await
            .map_err(|_| ())?;
    }
}

/// Whether `path` is still the file `file` has open; None when there is none.
async fn same_file(file: &tokio::fs::File, path: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let now = tokio::fs::metadata(path).await.ok()?;
    let open = file.metadata().await.ok()?;
    Some(now.ino() == open.ino() && now.dev() == open.dev())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(mut rx: mpsc::Receiver<Bytes>) -> String {
        let mut all = Vec::new();
        while let Some(b) = rx.recv().await {
            all.extend_from_slice(&b);
        }
        String::from_utf8(all).unwrap()
    }

    #[tokio::test]
    async fn template_then_rotated_then_current() {
        let dir = tempfile::tempdir().unwrap();
        let (t, c) = (dir.path().join("t.log"), dir.path().join("console.log"));
        std::fs::write(&t, "boot\n").unwrap();
        std::fs::write(dir.path().join("console.log.1"), "old\n").unwrap();
        std::fs::write(&c, "new\n").unwrap();
        let (tx, rx) = mpsc::channel(4);
        let src = Sources {
            template: Some(t),
            console: c,
        };
        tokio::spawn(stream(src, false, tx));
        let text = collect(rx).await;
        let boot = text.find("boot\n").unwrap();
        let old = text.find("old\n").unwrap();
        let new = text.find("new\n").unwrap();
        assert!(boot < old && old < new, "{text}");
        assert!(text.contains("restored from it"), "{text}");
    }

    /// Follow goes on across a rotation and ends when the console goes.
    #[tokio::test]
    async fn follow_sees_appends_rotations_and_the_end() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("console.log");
        std::fs::write(&c, "one\n").unwrap();
        let (tx, rx) = mpsc::channel(4);
        let src = Sources {
            template: None,
            console: c.clone(),
        };
        let reader = tokio::spawn(collect(rx));
        tokio::spawn(stream(src, true, tx));
        tokio::time::sleep(FOLLOW_EVERY).await;
        let mut f = std::fs::OpenOptions::new().append(true).open(&c).unwrap();
        f.write_all(b"two\n").unwrap();
        tokio::time::sleep(FOLLOW_EVERY * 2).await;
        std::fs::rename(&c, dir.path().join("console.log.1")).unwrap();
        f.write_all(b"three\n").unwrap();
        std::fs::write(&c, "four\n").unwrap();
        tokio::time::sleep(FOLLOW_EVERY * 3).await;
        std::fs::remove_file(&c).unwrap();
        let text = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("follow ends when the console is gone")
            .unwrap();
        assert_eq!(text, "one\ntwo\nthree\nfour\n");
    }
}
