//! With the sandbox on, a spawned thread runs under its filter (its own process: `init` is
//! once per process).

use sandbox::{Config, Mode, ThreadKind};

/// The `Seccomp:` mode and `Seccomp_filters:` count of the calling thread.
fn seccomp_status() -> (String, String) {
    let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    (field("Seccomp:"), field("Seccomp_filters:"))
}

#[test]
fn spawned_threads_run_under_their_filter() {
    sandbox::init(Config {
        mode: Mode::Enforce,
        drop_to: None,
    })
    .unwrap();
    assert!(sandbox::enabled());
    assert!(matches!(
        sandbox::init(Config {
            mode: Mode::Enforce,
            drop_to: None
        }),
        Err(sandbox::SandboxError::AlreadyInitialized)
    ));
    // This thread has no filter.
    assert_eq!(seccomp_status().0, "0");
    // An NBD connection thread may open files (a journal's compaction): it reads its status.
    let h = sandbox::spawn(
        ThreadKind::NbdConnection,
        std::thread::Builder::new().name("t".into()),
        seccomp_status,
    )
    .unwrap();
    // Mode 2 (filter); the spawner's two filters (allow-list, no clone3) and its own.
    assert_eq!(h.join().unwrap(), ("2".to_string(), "3".to_string()));
}
