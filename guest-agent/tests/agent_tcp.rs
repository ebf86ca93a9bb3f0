//! The agent served in-process over TCP on localhost, driven by the host client (no CRIU needed).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use guest_agent::agent::{Agent, AgentConfig};
use guest_agent::host::{AgentClient, HostError};
use guest_agent::protocol::{
    ErrorKind, FileHeader, FileKind, FrameKind, Request, Response, ServiceAddr, VERSION,
    WorkloadSpec, read_message, write_frame, write_message,
};
use guest_agent::transport::{self, Endpoint};

fn start_agent() -> (Endpoint, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let t = transport::listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let ep = t.endpoint();
    let agent = Agent::new(AgentConfig {
        work_dir: dir.path().to_path_buf(),
    });
    thread::spawn(move || {
        let _ = Arc::clone(&agent).serve(t.as_ref());
    });
    (ep, dir)
}

#[test]
fn ping_and_exec_stream_output_and_status() {
    let (ep, _d) = start_agent();
    let mut c = AgentClient::connect(&ep, Duration::from_secs(5)).unwrap();
    assert_eq!(c.ping().unwrap(), env!("CARGO_PKG_VERSION"));
    let out = c
        .exec(&["sh", "-c", "echo out; echo err >&2; exit 7"], None)
        .unwrap();
    assert_eq!(
        (
            out.code,
            out.timed_out,
            out.stdout.as_str(),
            out.stderr.as_str()
        ),
        (Some(7), false, "out\n", "err\n")
    );
    // Large output arrives complete, in order.
    let out = c.exec(&["seq", "1", "100000"], None).unwrap();
    let expect: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out.stdout, expect);
    let out = c
        .exec(&["sleep", "10"], Some(Duration::from_millis(200)))
        .unwrap();
    assert!(out.timed_out && out.code.is_none(), "{out:?}");
    let e = c.exec(&["/nonexistent/cmd"], None).unwrap_err();
    assert!(
        matches!(
            e,
            HostError::Agent {
                kind: ErrorKind::Command,
                ..
            }
        ),
        "{e}"
    );
    // The connection stays usable after an error.
    c.ping().unwrap();
}

/// A workload of three tasks: a shell and two sleeps.
fn sleeper_tree() -> WorkloadSpec {
    WorkloadSpec {
        argv: vec!["sh".into(), "-c".into(), "sleep 30 & sleep 30; wait".into()],
        cwd: None,
        env: vec![],
        data_files: vec![],
        pid_base: None,
        service: None,
    }
}

/// The supervised tree once it has at least `n` tasks (up to 2.5 s).
fn wait_tree(c: &mut AgentClient, n: usize) -> Vec<u32> {
    let mut tree = vec![];
    for _ in 0..50 {
        tree = c.status().unwrap().1;
        if tree.len() >= n {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    tree
}

#[test]
fn workload_start_status_and_bad_state_requests() {
    let (ep, _d) = start_agent();
    let mut c = AgentClient::connect(&ep, Duration::from_secs(5)).unwrap();
    let spec = sleeper_tree();
    let pid = c.start(&spec).unwrap();
    // Own session: the workload is a session leader.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], pid.to_string(), "session id of {pid}: {stat}");
    let tree = wait_tree(&mut c, 3);
    assert!(tree.len() >= 3 && tree.contains(&pid), "{tree:?}");
    let e = c.start(&spec).unwrap_err();
    assert!(
        matches!(
            e,
            HostError::Agent {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{e}"
    );
    let e = c.release().unwrap_err();
    assert!(
        matches!(
            e,
            HostError::Agent {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{e}"
    );
    for p in tree {
        // SAFETY: kill(2) on PIDs of the tree this test started.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
}

#[test]
fn restore_rejects_unsafe_paths_and_foreign_data_files() {
    let (ep, d) = start_agent();
    let spec = WorkloadSpec {
        argv: vec!["true".into()],
        cwd: None,
        env: vec![],
        data_files: vec![d.path().join("data").display().to_string()],
        pid_base: None,
        service: None,
    };
    for (kind, name) in [
        (FileKind::Image, "../escape"),
        (FileKind::Image, "/abs"),
        (FileKind::Data, "/etc/passwd"),
    ] {
        let mut c = AgentClient::connect(&ep, Duration::from_secs(5)).unwrap();
        c.send(&Request::Restore {
            spec: spec.clone(),
            tree: vec![],
            fault: None,
        })
        .unwrap();
        c.send(&Request::File(FileHeader {
            kind,
            name: name.into(),
            size: 1,
            mode: 0o644,
            link: None,
        }))
        .unwrap();
        match c.recv().unwrap() {
            Response::Error {
                kind: ErrorKind::BadRequest,
                message,
            } => assert!(message.contains(name), "{message}"),
            r => panic!("{name}: {r:?}"),
        }
    }
    assert!(!std::path::Path::new("/escape").exists());
    // A stream that ends early (connection dropped mid-file) leaves no partial data file behind.
    let mut c = TcpStream::connect(match ep {
        Endpoint::Tcp(a) => a,
        Endpoint::Vsock { .. } | Endpoint::VsockUds { .. } => unreachable!(),
    })
    .unwrap();
    write_message(
        &mut c,
        &Request::Restore {
            spec: spec.clone(),
            tree: vec![],
            fault: None,
        },
    )
    .unwrap();
    let h = FileHeader {
        kind: FileKind::Data,
        name: spec.data_files[0].clone(),
        size: 10,
        mode: 0o644,
        link: None,
    };
    write_message(&mut c, &Request::File(h)).unwrap();
    write_frame(&mut c, FrameKind::Data, b"abc").unwrap();
    drop(c);
    thread::sleep(Duration::from_millis(300));
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        !leftovers
            .iter()
            .any(|n| n.to_string_lossy().contains("data")),
        "{leftovers:?}"
    );
}

#[test]
fn malformed_input_gets_typed_protocol_errors() {
    let (ep, _d) = start_agent();
    let addr = match ep {
        Endpoint::Tcp(a) => a,
        Endpoint::Vsock { .. } | Endpoint::VsockUds { .. } => unreachable!(),
    };
    // Valid frame, bad JSON: error response, connection stays usable.
    let mut s = TcpStream::connect(addr).unwrap();
    write_frame(&mut s, FrameKind::Message, b"{\"op\":\"launch_missiles\"}").unwrap();
    let r: Response = read_message(&mut s).unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::Protocol,
                ..
            }
        ),
        "{r:?}"
    );
    write_message(&mut s, &Request::Ping).unwrap();
    assert!(matches!(
        read_message::<_, Response>(&mut s).unwrap(),
        Response::Pong { .. }
    ));
    // Unknown protocol version: error response, then the agent closes the connection.
    let mut hdr = [0u8; 12];
    hdr[..4].copy_from_slice(b"MVGA");
    hdr[4] = VERSION + 1;
    hdr[5] = 1;
    s.write_all(&hdr).unwrap();
    match read_message::<_, Response>(&mut s).unwrap() {
        Response::Error {
            kind: ErrorKind::Protocol,
            message,
        } => assert!(message.contains("version"), "{message}"),
        r => panic!("{r:?}"),
    }
    assert!(read_message::<_, Response>(&mut s).is_err());
    // Oversized frame announced: rejected without reading the payload.
    let mut s = TcpStream::connect(addr).unwrap();
    hdr[4] = VERSION;
    hdr[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&hdr).unwrap();
    match read_message::<_, Response>(&mut s).unwrap() {
        Response::Error {
            kind: ErrorKind::Protocol,
            message,
        } => assert!(message.contains("exceeds"), "{message}"),
        r => panic!("{r:?}"),
    }
}

#[test]
fn restarted_agent_takes_over_the_workload_state() {
    let (ep, d) = start_agent();
    let mut c = AgentClient::connect(&ep, Duration::from_secs(5)).unwrap();
    let spec = WorkloadSpec {
        argv: vec!["sleep".into(), "30".into()],
        cwd: None,
        env: vec![],
        data_files: vec!["/tmp/x".into()],
        pid_base: None,
        service: None,
    };
    let pid = c.start(&spec).unwrap();
    // A second agent process on the same work directory (as after a crash and restart).
    let t = transport::listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let ep2 = t.endpoint();
    let agent = Agent::new(AgentConfig {
        work_dir: d.path().to_path_buf(),
    });
    thread::spawn(move || {
        let _ = Arc::clone(&agent).serve(t.as_ref());
    });
    let mut c2 = AgentClient::connect(&ep2, Duration::from_secs(5)).unwrap();
    c2.send(&Request::Status).unwrap();
    match c2.recv().unwrap() {
        Response::Status {
            spec: Some(s),
            pid: Some(p),
            tree,
        } => {
            assert_eq!((s, p), (spec, pid));
            assert!(tree.contains(&pid));
        }
        r => panic!("{r:?}"),
    }
    // SAFETY: kill(2) on the process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// A stand-in for a VMM's vsock host socket: accepts Unix connections, answers `CONNECT
/// <port>` with `OK`, refuses other ports, and hands the stream to the agent.
fn start_vsock_uds_agent(dir: &std::path::Path, agent_port: u32) -> std::path::PathBuf {
    use std::io::{BufRead, BufReader};
    let path = dir.join("vm.vsock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let agent = Agent::new(AgentConfig {
        work_dir: dir.join("agent"),
    });
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut line = String::new();
            let mut r = BufReader::with_capacity(1, s.try_clone().unwrap());
            if r.read_line(&mut line).is_err() {
                continue;
            }
            if line.trim_end() != format!("CONNECT {agent_port}") {
                continue; // dropped: the client sees EOF
            }
            s.write_all(b"OK 1073741824\n").unwrap();
            let agent = Arc::clone(&agent);
            thread::spawn(move || agent.handle_connection(Box::new(s)));
        }
    });
    path
}

#[test]
fn host_reaches_an_agent_through_a_vmm_vsock_socket_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = start_vsock_uds_agent(dir.path(), 1024);
    let ep: Endpoint = format!("vsock-uds:{}:1024", path.display())
        .parse()
        .unwrap();
    let mut c = AgentClient::connect(&ep, Duration::from_secs(5)).unwrap();
    assert_eq!(c.ping().unwrap(), env!("CARGO_PKG_VERSION"));
    c.reconnect(Duration::from_secs(5)).unwrap();
    assert_eq!(c.exec(&["echo", "hi"], None).unwrap().stdout, "hi\n");
    // A port nobody serves: the CONNECT is refused, a typed error.
    let other: Endpoint = format!("vsock-uds:{}:7", path.display()).parse().unwrap();
    assert!(AgentClient::connect(&other, Duration::from_secs(2)).is_err());
    // And the listen side is refused: agents listen on vsock:PORT.
    assert!(transport::listen(&ep).is_err());
}

/// `discard` (on a clone of the VM): the whole tree is killed, the agent forgets it and can
/// start (or restore) another; with nothing to discard it is a no-op.
#[test]
fn discard_kills_the_supervised_tree_and_forgets_it() {
    let (ep, _d) = start_agent();
    let mut c = AgentClient::connect(&ep, Duration::from_secs(5)).unwrap();
    c.discard().unwrap();
    let spec = sleeper_tree();
    let pid = c.start(&spec).unwrap();
    let tree = wait_tree(&mut c, 3);
    assert!(tree.len() >= 3 && tree.contains(&pid), "{tree:?}");
    c.discard().unwrap();
    for p in &tree {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().chars().next());
        assert!(
            matches!(state, None | Some(Some('Z'))),
            "task {p} of the discarded tree lives on: {stat}"
        );
    }
    let (pid_now, tree_now) = c.status().unwrap();
    assert!(pid_now.is_none() && tree_now.is_empty());
    // Forgotten: a new workload may start.
    let pid2 = c.start(&spec).unwrap();
    assert_ne!(pid2, 0);
    c.discard().unwrap();
}

// --- `discard` with a service address, in a network namespace of its own (root only): the
// connections the killed workload leaves behind are destroyed, not left holding their address
// pairs (a clone that then restores the same connections could not reconnect them).

const HELPER_ENV: &str = "AGENT_TEST_SERVE_ON";

/// Not a test: the workload the test below starts (this binary again). Serves one connection on
/// the address in `AGENT_TEST_SERVE_ON` and holds it.
#[test]
#[ignore = "helper process for discard_destroys_the_connections_on_the_service_address"]
fn helper_serve_one_connection() {
    let Ok(addr) = std::env::var(HELPER_ENV) else {
        return;
    };
    let l = TcpListener::bind(&addr).unwrap();
    let (mut c, _) = l.accept().unwrap();
    c.write_all(b"hello\n").unwrap();
    thread::sleep(Duration::from_secs(120));
}

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().unwrap();
    assert!(st.success(), "{cmd}");
}

fn ss(filter: &str) -> String {
    let out = Command::new("ss")
        .args(["-t", "-n", "-H", "src", filter])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn discard_destroys_the_connections_on_the_service_address() {
    let test = "discard_destroys_the_connections_on_the_service_address";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("ss").arg("-V").output().is_err() {
        println!("SKIP: {test}: needs root and ss (iproute2)");
        return;
    }
    // Everything (the agent's threads and the commands they run) in a network namespace of this
    // thread's own: threads and processes it creates inherit it.
    thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        sh("ip link set lo up && ip link add d0 type veth peer name d1 && ip link set d1 up && ip link set d0 up && \
            ip addr add 10.9.0.1/24 dev d0 && ip addr add 10.9.0.10/32 dev d0");
        let (ep, _dir) = start_agent();
        let mut c = AgentClient::connect(&ep, Duration::from_secs(5)).unwrap();
        let exe = std::env::current_exe().unwrap();
        let spec = WorkloadSpec {
            argv: vec![
                exe.to_string_lossy().into_owned(),
                "--exact".into(),
                "helper_serve_one_connection".into(),
                "--ignored".into(),
            ],
            cwd: None,
            env: vec![(HELPER_ENV.into(), "10.9.0.10:7001".into())],
            data_files: vec![],
            pid_base: None,
            service: Some(ServiceAddr {
                ip: "10.9.0.10".parse().unwrap(),
                prefix: 32,
                dev: "d0".into(),
            }),
        };
        c.start(&spec).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut client = loop {
            match TcpStream::connect("10.9.0.10:7001") {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "helper never listened: {e}");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let mut hello = [0u8; 6];
        client.read_exact(&mut hello).unwrap();
        assert!(ss("10.9.0.10").contains("ESTAB"));
        c.discard().unwrap();
        // The killed server's side of the connection is gone, not in FIN-WAIT (the client
        // still holds its end open), and the address is dropped. (The client here is local
        // and its end also has the service address as source, so it goes too.)
        assert_eq!(ss("10.9.0.10"), "", "sockets left on the service address");
        let addrs = Command::new("ip")
            .args(["-o", "-4", "addr", "show", "dev", "d0"])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&addrs.stdout).contains("10.9.0.10/"));
        // The client saw the end of the stream (the FIN, then the reset).
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
    })
    .join()
    .unwrap();
}
