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
