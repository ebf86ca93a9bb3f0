//! The NBD server keeps serving when `accept` fails (here EMFILE: the process is out of file
//! descriptors) and accepts again once it can. Alone in its binary: it lowers the process's
//! descriptor limit.

mod nbd_common;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nbd_common::*;

fn nofile() -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct passed, which lives across the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r
}

fn set_nofile(r: &libc::rlimit) {
    // SAFETY: setrlimit only reads the struct passed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, r) }, 0);
}

#[test]
fn an_accept_failure_does_not_stop_the_server() {
    let disk = MemExport::new(1 << 20, false);
    let srv = server(vec![("disk", Arc::clone(&disk))]);
    let (sock, serving) = serve_unix(&srv, "emfile");
    // A client connected before the descriptors run out.
    let mut b = UnixStream::connect(&sock).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    greet(&mut b);
    go(&mut b, "disk");

    // Run out of descriptors: a low limit, filled up to one free slot, which the next
    // client's socket takes; the server's accept of that client then fails with EMFILE.
    let saved = nofile();
    set_nofile(&libc::rlimit {
        rlim_cur: 256,
        rlim_max: saved.rlim_max,
    });
    let mut fillers = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => fillers.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                break;
            }
        }
    }
    fillers.pop();
    let mut a = UnixStream::connect(&sock).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        serving.try_recv().is_err(),
        "the server ended on an accept failure"
    );
    // The connected client is still served meanwhile.
    request(&mut b, 0, WRITE, 1, 0, 512, &[3; 512]);
    assert_eq!(reply(&mut b), (0, 1));

    // Descriptors free again: the waiting client is accepted.
    drop(fillers);
    set_nofile(&saved);
    greet(&mut a);
    go(&mut a, "disk");
    request(&mut a, 0, READ, 2, 0, 512, &[]);
    assert_eq!(reply(&mut a), (0, 2));
    let mut back = [0u8; 512];
    std::io::Read::read_exact(&mut a, &mut back).unwrap();
    assert_eq!(back, [3; 512]);

    srv.shutdown_flag().store(true, Ordering::SeqCst);
    let r = serving.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(r, Ok(()));
    assert_eq!(disk.durable.lock().unwrap()[..512], [3; 512]);
    let _ = std::fs::remove_file(&sock);
}
