//! The CRIU guest-agent driver behind the orchestrator's trait, against a real `guest-agent`
//! served in-process behind a stand-in for a VMM's vsock host socket (`CONNECT <port>`). The
//! dump/restore path itself needs CRIU in a Linux guest: the QEMU handoff harness
//! (`guest-agent/tests/handoff_qemu.rs`) moves the Java service through the same
//! `checkpoint_image`/`restore_image` calls.

use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::time::Duration;

use guest_agent::agent::{Agent, AgentConfig};
use upgrade::agent::{AgentConnector, AgentEndpoint, AgentError, Role, WorkloadImage};
use upgrade::criu_agent::CriuConnector;

fn stand_in(dir: &std::path::Path, port: u32) -> std::path::PathBuf {
    let path = dir.join("vm.vsock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let agent = Agent::new(AgentConfig {
        work_dir: dir.join("agent"),
    });
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut line = String::new();
            let mut r = BufReader::with_capacity(1, s.try_clone().unwrap());
            if r.read_line(&mut line).is_err() || line.trim_end() != format!("CONNECT {port}") {
                continue;
            }
            s.write_all(b"OK 1073741824\n").unwrap();
            let agent = Arc::clone(&agent);
            std::thread::spawn(move || agent.handle_connection(Box::new(s)));
        }
    });
    path
}

#[test]
fn the_criu_driver_runs_commands_and_refuses_what_the_agent_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let uds = stand_in(dir.path(), 1024);
    let ep = AgentEndpoint {
        role: Role::Backup,
        uds: uds.clone(),
        port: 1024,
        timeout: Duration::from_secs(5),
    };
    let mut a = CriuConnector::default().connect(&ep).unwrap();
    assert_eq!(a.exec(&["true".into()], Duration::from_secs(5)).unwrap(), 0);
    assert_eq!(
        a.exec(
            &["sh".into(), "-c".into(), "exit 3".into()],
            Duration::from_secs(5)
        )
        .unwrap(),
        3
    );
    assert!(matches!(
        a.exec(&["sleep".into(), "5".into()], Duration::from_millis(200)),
        Err(AgentError::Timeout(_))
    ));
    assert!(a.status().unwrap().contains("None"), "no workload");
    a.freeze().unwrap();
    // Nothing runs: checkpoint and rollback are refused by the agent, typed.
    assert!(matches!(a.checkpoint(), Err(AgentError::Refused(_))));
    assert!(matches!(a.rollback(), Err(AgentError::Refused(_))));
    // A malformed image never reaches the agent.
    assert!(
        a.restore(&WorkloadImage {
            bytes: b"junk".to_vec()
        })
        .is_err()
    );
    // The connection still works after the refusals.
    assert_eq!(a.exec(&["true".into()], Duration::from_secs(5)).unwrap(), 0);
    // A port nobody serves.
    let other = AgentEndpoint { port: 9, ..ep };
    assert!(CriuConnector::default().connect(&other).is_err());
}
