//! One process per queue: the directory's lock file.

use dualwrite_logqueue::{LogQueue, OpenError, QueueConfig};

#[test]
fn a_second_open_fails_with_a_clear_error_until_the_first_queue_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let first = LogQueue::open(&path, QueueConfig::default()).unwrap();

    let err = LogQueue::open(&path, QueueConfig::default()).unwrap_err();
    assert!(
        matches!(err, OpenError::Locked { dir: ref d } if *d == path),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("LOCK"), "{text}");
    assert!(text.contains("stop the other dualwrite process"), "{text}");

    drop(first);
    let again = LogQueue::open(&path, QueueConfig::default()).unwrap();
    assert_eq!(again.dir(), path);
}

/// Regression: a child being spawned shares the lock file's description until it `exec`s, so
/// a queue closed and reopened in that instant found its own lock still held (the torn-tail
/// test failed that way while the crash test spawned its children).
#[test]
fn reopening_while_this_process_spawns_children_finds_the_lock_free() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spawning = stop.clone();
    let spawner = std::thread::spawn(move || {
        let mut spawned = 0;
        while !spawning.load(std::sync::atomic::Ordering::Relaxed) {
            std::process::Command::new("true").status().unwrap();
            spawned += 1;
        }
        spawned
    });
    for i in 0..200 {
        let queue = LogQueue::open(&path, QueueConfig::default())
            .unwrap_or_else(|e| panic!("reopen {i}: {e}"));
        drop(queue);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(spawner.join().unwrap() > 0);
}
