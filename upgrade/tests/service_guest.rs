//! The `service` test guest under KVM (`test-guests/guests/service.c`, host side
//! `upgrade::service_guest`): it serves checked, logged requests over vsock; its agent runs
//! commands, freezes and rolls back; a live clone of it goes standby on the transport reset and
//! takes over the service state from a checkpoint, and the live connections themselves move to
//! it (exported from the source's vsock device, imported into the clone's); bad agent input gets
//! `err` answers.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::legacy::{SerialOutput, SharedBuffer};
use std::os::unix::fs::FileExt;
use upgrade::service_guest::{
    DEFAULT_AGENT_PORT, DEFAULT_SERVICE_PORT, Mode, ServiceAgent, ServiceClient, ServiceGuestError,
    ServiceImage, ServiceVmConfig, Status, check_log, next_checksum, read_disk_state,
};

use vmm::Machine;
use vmm::machine::CloneOptions;

const LIMIT: Duration = Duration::from_secs(20);
const DISK_SIZE: u64 = 8 << 20;

/// A running service VM with its serial output captured.
struct ServiceVm {
    machine: Machine,
    serial: SharedBuffer,
    uds: PathBuf,
}

impl ServiceVm {
    /// Creates a disk in `dir/<name>`, boots a service guest on it (vsock CID `cid`, socket
    /// `dir/<name>.sock`) and waits for its banner.
    fn start(dir: &Path, name: &str, cid: u64) -> Self {
        let t = Instant::now();
        let disk_dir = dir.join(name);
        std::fs::create_dir_all(&disk_dir).unwrap();
        let disk = ServiceVmConfig::create_disk(&disk_dir, DISK_SIZE).unwrap();
        let uds = dir.join(format!("{name}.sock"));
        let cfg = ServiceVmConfig::config(&disk, &uds, cid, 64);
        let serial = SharedBuffer::default();
        let mut machine = Machine::new(cfg, Some(SerialOutput::Buffer(serial.clone()))).unwrap();
        machine.boot().unwrap();
        machine.start().unwrap();
        let vm = Self {
            machine,
            serial,
            uds,
        };
        assert!(
            vm.wait_serial("service: ready version=1 seq=0\n", LIMIT),
            "{}",
            vm.serial_text()
        );
        println!("{name}: boot to ready {:?}", t.elapsed());
        vm
    }

    fn serial_text(&self) -> String {
        String::from_utf8_lossy(&self.serial.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    fn wait_serial(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.serial_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.serial_text().contains(needle)
    }

    fn client(&self) -> ServiceClient {
        ServiceClient::connect(&self.uds, DEFAULT_SERVICE_PORT, LIMIT)
            .unwrap_or_else(|e| panic!("service connect: {e:?}\n{}", self.serial_text()))
    }

    fn agent(&self) -> ServiceAgent {
        ServiceAgent::connect(&self.uds, DEFAULT_AGENT_PORT, LIMIT)
            .unwrap_or_else(|e| panic!("agent connect: {e:?}\n{}", self.serial_text()))
    }

    /// A `shared_*` variable of the guest (read through the RAM memfd: the first region starts
    /// at guest address 0 and offset 0).
    fn shared(&self, name: &'static str) -> u64 {
        let addr = vmm_test_guests::SERVICE.symbol(name).unwrap();
        let mut b = [0u8; 8];
        self.machine
            .vm()
            .ram()
            .memfd()
            .read_exact_at(&mut b, addr)
            .unwrap();
        u64::from_le_bytes(b)
    }
}

/// A value for request `seq` (anything will do; not a function of seq alone).
fn value(seq: u64, salt: u64) -> u64 {
    seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt
}

/// `n` sequential requests on `client`, each checked; records them in `acked`.
fn serve_n(client: &mut ServiceClient, n: u64, salt: u64, acked: &mut Vec<(u64, u64)>) {
    for _ in 0..n {
        let seq = client.acked().0 + 1;
        let v = value(seq, salt);
        let r = client.request(v).unwrap();
        assert_eq!(r.seq, seq);
        acked.push((seq, v));
    }
}

fn status_of(agent: &mut ServiceAgent) -> Status {
    agent.status().unwrap()
}

#[test]
fn serves_checked_requests_and_logs_them_durably() {
    if !microvmm_tests::kvm_or_skip("serves_checked_requests_and_logs_them_durably") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vm = ServiceVm::start(dir.path(), "a", 3);
    let mut client = vm.client();
    let mut acked = Vec::new();

    let t = Instant::now();
    serve_n(&mut client, 300, 1, &mut acked);
    let took = t.elapsed();
    println!(
        "300 sequential requests (each logged + flushed) in {took:?}, {:?} per request",
        took / 300
    );
    let mut agent = vm.agent();
    let st = status_of(&mut agent);
    assert_eq!(
        (st.mode, st.version, st.seq, st.checksum, st.conns),
        (Mode::Serving, 1, 300, client.acked().1, 1)
    );
    assert_eq!(vm.shared("shared_seq"), 300);
    assert_eq!(vm.shared("shared_requests"), 300);
    assert_eq!(vm.shared("shared_mode"), Mode::Serving.shared_value());

    // A wrong seq is rejected and not logged; the client's sequence is untouched.
    client.send_raw(7, 7).unwrap();
    let r = client.read_raw().unwrap();
    assert_eq!((r.seq, r.checksum), (7, u64::MAX));
    client.send_raw(302, 1).unwrap();
    assert_eq!(client.read_raw().unwrap().checksum, u64::MAX);

    // Pipelined: 20 sent, then 20 read.
    let t = Instant::now();
    for _ in 0..20 {
        let seq = client.acked().0 + 1 + client.in_flight() as u64;
        let v = value(seq, 2);
        assert_eq!(client.send_request(v).unwrap(), seq);
        acked.push((seq, v));
    }
    for i in 0..20 {
        assert_eq!(client.read_reply().unwrap().seq, 301 + i);
    }
    println!("20 pipelined requests in {:?}", t.elapsed());

    // A request split across writes, and two requests in one write.
    let seq = client.acked().0 + 1;
    let mut b = Vec::new();
    for s in [seq, seq + 1] {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&value(s, 3).to_le_bytes());
        acked.push((s, value(s, 3)));
    }
    client.send_bytes(&b[..5]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    client.send_bytes(&b[5..11]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    client.send_bytes(&b[11..]).unwrap();
    let mut ck = client.acked().1;
    for s in [seq, seq + 1] {
        let r = client.read_raw().unwrap();
        ck = next_checksum(ck, s, value(s, 3));
        assert_eq!((r.seq, r.checksum), (s, ck));
    }
    client.set_start(seq + 1, ck);

    // Two connections share one sequence, interleaved.
    let mut other = vm.client().with_start(client.acked().0, client.acked().1);
    for i in 0..20 {
        let (from, to) = if i % 2 == 0 {
            (&mut client, &mut other)
        } else {
            (&mut other, &mut client)
        };
        let seq = from.acked().0 + 1;
        let v = value(seq, 4);
        from.request(v).unwrap();
        acked.push((seq, v));
        let (s, c) = from.acked();
        to.set_start(s, c);
    }
    let st = status_of(&mut agent);
    let total = acked.len() as u64;
    assert_eq!((st.seq, st.conns), (total, 2));
    assert_eq!(st.checksum, client.acked().1);
    // Up to four connections at once; a fifth is refused.
    let more: Vec<ServiceClient> = (0..2).map(|_| vm.client()).collect();
    assert_eq!(status_of(&mut agent).conns, 4);
    let fifth = ServiceClient::connect(&vm.uds, DEFAULT_SERVICE_PORT, Duration::from_secs(2));
    assert!(fifth.is_err(), "a fifth connection");
    drop((more, other));
    // The closed connections are gone from the guest.
    let end = Instant::now() + LIMIT;
    while status_of(&mut agent).conns != 1 {
        assert!(Instant::now() < end, "the closed connection stays");
        std::thread::sleep(Duration::from_millis(10));
    }

    vm.machine.stop().unwrap();
    let disk = vm.machine.disks()[0].layer.clone();
    let state = read_disk_state(disk.as_ref()).unwrap();
    assert_eq!(state.os_version, 1);
    assert_eq!(state.records.len() as u64, total);
    check_log(&state.records, &acked).unwrap();
    assert_eq!(state.records.last().unwrap().checksum, client.acked().1);
    // Reopened from its files, the delta says the same.
    drop((disk, vm));
    let reopened = block::Layer::open(&dir.path().join("a").join("disk")).unwrap();
    assert_eq!(read_disk_state(&reopened).unwrap(), state);
    println!("{total} requests served and found in the log");
}

#[test]
fn exec_upgrades_the_os_stamp_and_reports_exit_codes() {
    if !microvmm_tests::kvm_or_skip("exec_upgrades_the_os_stamp_and_reports_exit_codes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vm = ServiceVm::start(dir.path(), "a", 3);
    let mut agent = vm.agent();
    let argv = |s: &str| -> Vec<String> { s.split(' ').map(String::from).collect() };
    assert_eq!(agent.exec(&argv("upgrade"), LIMIT).unwrap(), 0);
    assert_eq!(status_of(&mut agent).version, 2);
    assert_eq!(
        agent.command("exec upgrade").unwrap(),
        "exit=0 version=3".to_string()
    );
    assert_eq!(agent.exec(&argv("true"), LIMIT).unwrap(), 0);
    assert_eq!(agent.exec(&argv("false"), LIMIT).unwrap(), 1);
    assert_eq!(agent.exec(&argv("java -jar app.jar"), LIMIT).unwrap(), 127);
    assert_eq!(agent.exec(&argv("sleep x"), LIMIT).unwrap(), 1);
    assert!(matches!(
        agent.exec(&["two words".to_string()], LIMIT),
        Err(ServiceGuestError::InvalidArgument(_))
    ));

    // sleep: about as long as asked (the guest calibrates its TSC against the PIT).
    let t = Instant::now();
    assert_eq!(agent.exec(&argv("sleep 300"), LIMIT).unwrap(), 0);
    let slept = t.elapsed();
    println!("exec sleep 300 answered after {slept:?}");
    assert!(
        slept >= Duration::from_millis(200) && slept < Duration::from_secs(3),
        "{slept:?}"
    );
    // The service goes on while a command runs (6 s: ten logged requests fit in it however
    // busy the machine is).
    let mut client = vm.client();
    let mut acked = Vec::new();
    let t = Instant::now();
    let err = agent.exec(&argv("sleep 6000"), Duration::from_millis(200));
    assert!(matches!(err, Err(ServiceGuestError::Timeout(_))), "{err:?}");
    serve_n(&mut client, 10, 5, &mut acked);
    assert!(
        t.elapsed() < Duration::from_millis(5500),
        "served meanwhile: {:?}",
        t.elapsed()
    );
    // The late answer is skipped; the next command gets its own.
    let st = status_of(&mut agent);
    assert!(
        t.elapsed() >= Duration::from_millis(5000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!((st.version, st.seq), (3, 10));

    vm.machine.stop().unwrap();
    let state = read_disk_state(vm.machine.disks()[0].layer.as_ref()).unwrap();
    assert_eq!(state.os_version, 3);
    check_log(&state.records, &acked).unwrap();
    assert_eq!(state.records.len(), 10);
}

#[test]
fn freeze_holds_requests_and_rollback_answers_them() {
    if !microvmm_tests::kvm_or_skip("freeze_holds_requests_and_rollback_answers_them") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vm = ServiceVm::start(dir.path(), "a", 3);
    let mut client = vm.client();
    let mut agent = vm.agent();
    let mut acked = Vec::new();
    serve_n(&mut client, 10, 6, &mut acked);
    assert!(matches!(
        agent.rollback(),
        Err(ServiceGuestError::Refused(r)) if r == "not frozen"
    ));

    agent.freeze().unwrap();
    agent.freeze().unwrap(); // idempotent
    assert_eq!(status_of(&mut agent).mode, Mode::Frozen);
    assert_eq!(vm.shared("shared_mode"), Mode::Frozen.shared_value());
    let mut sent = Vec::new();
    for _ in 0..5 {
        let seq = client.acked().0 + 1 + client.in_flight() as u64;
        let v = value(seq, 7);
        client.send_request(v).unwrap();
        sent.push((seq, v));
    }
    client.set_timeout(Duration::from_millis(200));
    assert!(matches!(
        client.read_reply(),
        Err(ServiceGuestError::Timeout(_))
    ));
    // A frozen service takes no new connection.
    assert!(ServiceClient::connect(&vm.uds, DEFAULT_SERVICE_PORT, Duration::from_secs(2)).is_err());
    assert_eq!(client.in_flight(), 5);
    let st = status_of(&mut agent);
    assert_eq!((st.mode, st.seq, st.conns), (Mode::Frozen, 10, 1));
    // The checkpoint of a frozen guest: the window was closed before `ok`, so the held requests
    // are still in the host socket, not in the guest.
    let image = ServiceImage::decode(&agent.checkpoint().unwrap()).unwrap();
    assert_eq!((image.seq, image.next_slot, image.os_version), (10, 10, 1));
    assert_eq!(image.checksum, client.acked().1);
    assert_eq!(image.conns.len(), 1);
    let c = &image.conns[0];
    assert_eq!(c.guest_port, DEFAULT_SERVICE_PORT);
    assert_eq!((c.fwd_cnt, c.tx_cnt), (160, 160));
    println!(
        "frozen checkpoint: {} pending bytes, rx_cnt {}",
        c.pending.len(),
        c.rx_cnt()
    );
    assert_eq!(status_of(&mut agent).mode, Mode::Frozen);

    let t = Instant::now();
    agent.rollback().unwrap();
    client.set_timeout(LIMIT);
    for &(seq, _) in &sent {
        assert_eq!(client.read_reply().unwrap().seq, seq);
    }
    println!("5 held requests answered {:?} after rollback", t.elapsed());
    acked.extend(sent);
    serve_n(&mut client, 5, 8, &mut acked);
    let st = status_of(&mut agent);
    assert_eq!((st.mode, st.seq), (Mode::Serving, 20));

    // Frozen with more than the guest's 4 KiB window in flight: nothing is lost.
    agent.freeze().unwrap();
    let first = client.acked().0 + 1;
    let sent: Vec<(u64, u64)> = (first..first + 400).map(|s| (s, value(s, 9))).collect();
    let values: Vec<u64> = sent.iter().map(|&(_, v)| v).collect();
    assert_eq!(client.send_requests(&values).unwrap(), first);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(status_of(&mut agent).seq, 20);
    agent.rollback().unwrap();
    let t = Instant::now();
    client.set_timeout(Duration::from_secs(5));
    for &(seq, _) in &sent {
        match client.read_reply() {
            Ok(r) => assert_eq!(r.seq, seq),
            Err(e) => panic!(
                "DEBUG {seq}: {e:?} status {:?} serial {}",
                agent.status(),
                vm.serial_text()
            ),
        }
    }
    println!(
        "400 held requests answered {:?} after rollback",
        t.elapsed()
    );
    acked.extend(sent);

    // Half a request received before the freeze is held in the guest and in its checkpoint;
    // the other half, sent while frozen, waits in the host socket; after the rollback the
    // request is whole and answered.
    let (seq, ck) = client.acked();
    let v = value(seq + 1, 10);
    let mut req = (seq + 1).to_le_bytes().to_vec();
    req.extend_from_slice(&v.to_le_bytes());
    client.send_bytes(&req[..8]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    agent.freeze().unwrap();
    client.send_bytes(&req[8..]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let image = ServiceImage::decode(&agent.checkpoint().unwrap()).unwrap();
    assert_eq!(image.conns[0].pending, req[..8].to_vec());
    assert_eq!(image.conns[0].rx_cnt(), acked.len() as u32 * 16 + 8);
    agent.rollback().unwrap();
    let r = client.read_raw().unwrap();
    assert_eq!(
        (r.seq, r.checksum),
        (seq + 1, next_checksum(ck, seq + 1, v))
    );
    acked.push((seq + 1, v));

    vm.machine.stop().unwrap();
    let state = read_disk_state(vm.machine.disks()[0].layer.as_ref()).unwrap();
    assert_eq!(state.records.len(), acked.len());
    check_log(&state.records, &acked).unwrap();
}

#[test]
fn a_clone_goes_standby_and_takes_over_from_a_checkpoint() {
    if !microvmm_tests::kvm_or_skip("a_clone_goes_standby_and_takes_over_from_a_checkpoint") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut a = ServiceVm::start(dir.path(), "a", 3);
    let mut client = a.client();
    let mut a_agent = a.agent();
    let mut acked = Vec::new();
    serve_n(&mut client, 100, 10, &mut acked);

    let b_uds = dir.path().join("b.sock");
    let b_disk = dir.path().join("b-disk");
    let mut opts = CloneOptions::new(ServiceVmConfig::config(
        &dir.path().join("a").join("disk"),
        &b_uds,
        4,
        64,
    ));
    let b_serial = SharedBuffer::default();
    opts.console = Some(SerialOutput::Buffer(b_serial.clone()));
    opts.disk_dirs = vec![(dir.path().join("a-disk"), b_disk.clone())];
    let t = Instant::now();
    let (mut b_machine, timeline) = a.machine.clone_running(opts).unwrap();
    println!("clone in {:?} (pause {:?})", t.elapsed(), timeline.pause);
    b_machine.start().unwrap();
    let b = ServiceVm {
        machine: b_machine,
        serial: b_serial,
        uds: b_uds,
    };

    // The clone saw the transport reset: standby, with none of A's connections.
    let t = Instant::now();
    let mut b_agent = b.agent();
    let st = loop {
        let st = status_of(&mut b_agent);
        if st.mode == Mode::Standby || t.elapsed() > Duration::from_secs(5) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    println!("clone standby after {:?}", t.elapsed());
    assert_eq!((st.mode, st.seq, st.conns), (Mode::Standby, 100, 0));
    assert!(
        b.serial_text()
            .contains("service: transport reset cid=4 mode=standby")
    );
    assert_eq!(b.shared("shared_mode"), Mode::Standby.shared_value());
    // A standby guest takes no service connection.
    assert!(ServiceClient::connect(&b.uds, DEFAULT_SERVICE_PORT, Duration::from_secs(2)).is_err());

    // The upgrade runs in the standby copy; it touches only the clone's OS region.
    assert_eq!(b_agent.exec(&["upgrade".to_string()], LIMIT).unwrap(), 0);
    assert_eq!(status_of(&mut b_agent).version, 2);
    assert_eq!(status_of(&mut a_agent).version, 1);

    // A goes on serving meanwhile.
    serve_n(&mut client, 20, 11, &mut acked);
    assert!(matches!(
        a_agent.checkpoint(),
        Err(ServiceGuestError::Refused(r)) if r == "not frozen"
    ));
    a_agent.freeze().unwrap();
    let blob = a_agent.checkpoint().unwrap();
    let image = ServiceImage::decode(&blob).unwrap();
    assert_eq!((image.seq, image.next_slot), (120, 120));
    assert_eq!(image.checksum, client.acked().1);
    assert_eq!(image.conns.len(), 1);
    assert_eq!(
        (image.conns[0].fwd_cnt, image.conns[0].tx_cnt),
        (120 * 16, 120 * 16)
    );
    assert!(matches!(
        a_agent.restore(&blob),
        Err(ServiceGuestError::Refused(r)) if r == "not standby"
    ));

    // A corrupted image is refused, whichever byte.
    for i in [0, 9, 20, blob.len() / 2, blob.len() - 1] {
        let mut bad = blob.clone();
        bad[i] ^= 0x01;
        assert!(
            matches!(b_agent.restore(&bad), Err(ServiceGuestError::Refused(r)) if r == "bad image"),
            "byte {i}"
        );
    }
    assert!(matches!(
        b_agent.restore(&blob[..blob.len() - 4]),
        Err(ServiceGuestError::Refused(_))
    ));
    assert_eq!(status_of(&mut b_agent).mode, Mode::Standby);

    let t = Instant::now();
    assert_eq!(b_agent.restore(&blob).unwrap(), 120);
    println!("restore answered in {:?}", t.elapsed());
    let st = status_of(&mut b_agent);
    assert_eq!(
        (st.mode, st.seq, st.checksum, st.conns),
        (Mode::Serving, 120, client.acked().1, 1)
    );
    assert_eq!(b.shared("shared_seq"), 120);

    a_agent.release().unwrap();
    let st = status_of(&mut a_agent);
    assert_eq!((st.mode, st.conns), (Mode::Released, 0));

    // The clone never wrote its log: its disk is the disk of the clone instant.
    let mut a_machine = a.machine;
    let mut b_machine = b.machine;
    b_machine.stop().unwrap();
    a_machine.stop().unwrap();
    let b_state = read_disk_state(b_machine.disks()[0].layer.as_ref()).unwrap();
    assert_eq!((b_state.os_version, b_state.records.len()), (2, 100));
    check_log(&b_state.records, &acked[..100]).unwrap();
    let a_state = read_disk_state(a_machine.disks()[0].layer.as_ref()).unwrap();
    assert_eq!((a_state.os_version, a_state.records.len()), (1, 120));
    check_log(&a_state.records, &acked).unwrap();
}

#[test]
fn bad_agent_input_gets_err_answers_and_the_service_goes_on() {
    if !microvmm_tests::kvm_or_skip("bad_agent_input_gets_err_answers_and_the_service_goes_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = ServiceVm::start(dir.path(), "a", 3);
    let mut client = vm.client();
    let mut agent = vm.agent();
    let mut acked = Vec::new();
    serve_n(&mut client, 5, 12, &mut acked);

    let raw = |agent: &mut ServiceAgent, b: &[u8]| agent.raw(b, LIMIT).unwrap();
    assert_eq!(raw(&mut agent, b"\n"), "err empty command");
    assert_eq!(raw(&mut agent, b"   \r\n"), "err empty command");
    assert_eq!(raw(&mut agent, b"frobnicate\n"), "err unknown command");
    assert_eq!(raw(&mut agent, b"status now\n"), "err usage");
    assert_eq!(raw(&mut agent, b"exec\n"), "err usage: exec <argv...>");
    assert_eq!(
        raw(&mut agent, b"\x00\xff\x01garbage\n"),
        "err bad characters"
    );
    assert_eq!(
        raw(&mut agent, b"a b c d e f g h i j\n"),
        "err too many arguments"
    );
    assert_eq!(raw(&mut agent, b"restore\n"), "err not standby");
    assert_eq!(raw(&mut agent, b"checkpoint\n"), "err not frozen");
    // Several commands in one write, answered in order.
    assert_eq!(raw(&mut agent, b"nope\nstatus\n"), "err unknown command");
    assert!(
        agent
            .raw(b"", LIMIT)
            .unwrap()
            .starts_with("ok mode=serving")
    );

    // A 100 KiB line: `err too long`, then the agent goes on.
    let t = Instant::now();
    let mut long = vec![b'x'; 100 << 10];
    long.push(b'\n');
    assert_eq!(raw(&mut agent, &long), "err too long");
    println!("100 KiB line refused in {:?}", t.elapsed());
    // The longest line taken is 65535 bytes.
    let mut max = b"status".to_vec();
    max.resize(65535, b' ');
    max.push(b'\n');
    assert!(raw(&mut agent, &max).starts_with("ok mode=serving"));
    let mut over = max.clone();
    over.insert(0, b' ');
    assert_eq!(raw(&mut agent, &over), "err too long");
    // Garbage from a second agent connection too, while the first goes on.
    let mut other = vm.agent();
    let mut junk = vec![0xfe; 3000];
    junk.push(b'\n');
    assert_eq!(raw(&mut other, &junk), "err bad characters");
    assert!(raw(&mut agent, b"status\n").starts_with("ok mode=serving"));

    serve_n(&mut client, 5, 13, &mut acked);
    let st = status_of(&mut agent);
    assert_eq!((st.mode, st.seq), (Mode::Serving, 10));
    assert_eq!(vm.shared("shared_requests"), 10);
}

#[test]
fn live_connections_move_to_a_restored_clone_and_go_on() {
    if !microvmm_tests::kvm_or_skip("live_connections_move_to_a_restored_clone_and_go_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut a = ServiceVm::start(dir.path(), "a", 3);
    let mut c1 = a.client();
    let mut acked = Vec::new();
    serve_n(&mut c1, 50, 20, &mut acked);
    let mut c2 = a.client().with_start(c1.acked().0, c1.acked().1);
    serve_n(&mut c2, 10, 21, &mut acked);
    let (seq, ck) = c2.acked();
    let mut a_agent = a.agent();

    let b_uds = dir.path().join("b.sock");
    let mut opts = CloneOptions::new(ServiceVmConfig::config(
        &dir.path().join("a").join("disk"),
        &b_uds,
        4,
        64,
    ));
    let b_serial = SharedBuffer::default();
    opts.console = Some(SerialOutput::Buffer(b_serial.clone()));
    opts.disk_dirs = vec![(dir.path().join("a-disk"), dir.path().join("b-disk"))];
    let (mut b_machine, _) = a.machine.clone_running(opts).unwrap();
    b_machine.start().unwrap();
    let mut b = ServiceVm {
        machine: b_machine,
        serial: b_serial,
        uds: b_uds,
    };
    let mut b_agent = b.agent();
    let end = Instant::now() + LIMIT;
    while status_of(&mut b_agent).mode != Mode::Standby {
        assert!(Instant::now() < end, "{}", b.serial_text());
        std::thread::sleep(Duration::from_millis(5));
    }

    // The cutover, as the orchestrator does it. c1 has half a request in the guest, and sends
    // the other half during the cutover.
    let v = value(seq + 1, 22);
    let mut req = (seq + 1).to_le_bytes().to_vec();
    req.extend_from_slice(&v.to_le_bytes());
    c1.send_bytes(&req[..8]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    a_agent.freeze().unwrap();
    let (state, fds) = a
        .machine
        .vsock()
        .unwrap()
        .export_ports(&[DEFAULT_SERVICE_PORT])
        .unwrap();
    c1.send_bytes(&req[8..]).unwrap();
    let image_bytes = a_agent.checkpoint().unwrap();
    let image = ServiceImage::decode(&image_bytes).unwrap();
    assert_eq!((image.seq, image.checksum), (seq, ck));
    assert_eq!((state.conns.len(), image.conns.len()), (2, 2));
    // A consistent cut: the guest holds exactly what the device sent it, and the device has
    // exactly what the guest sent.
    for c in &image.conns {
        let d = state
            .conns
            .iter()
            .find(|d| (d.guest_port, d.host_port) == (c.guest_port, c.host_port))
            .unwrap();
        assert_eq!(c.rx_cnt(), d.tx_cnt, "{c:?} vs {d:?}");
        assert_eq!(c.tx_cnt, d.rx_cnt, "{c:?} vs {d:?}");
    }
    assert_eq!(
        image.conns.iter().map(|c| c.pending.len()).sum::<usize>(),
        8
    );
    assert_eq!(b_agent.restore(&image_bytes).unwrap(), seq);
    b.machine.pause().unwrap();
    b.machine.vsock().unwrap().import(state, fds).unwrap();
    b.machine.resume().unwrap();

    // c1's request is answered by B.
    let r = c1.read_raw().unwrap();
    println!(
        "cutover: freeze to first answer from the clone {:?}",
        t.elapsed()
    );
    assert_eq!(
        (r.seq, r.checksum),
        (seq + 1, next_checksum(ck, seq + 1, v))
    );
    acked.push((seq + 1, v));
    a_agent.release().unwrap();
    // Both connections go on with B.
    c2.set_start(r.seq, r.checksum);
    serve_n(&mut c2, 10, 23, &mut acked);
    c1.set_start(c2.acked().0, c2.acked().1);
    serve_n(&mut c1, 10, 24, &mut acked);
    let st = status_of(&mut b_agent);
    assert_eq!(
        (st.mode, st.seq, st.checksum, st.conns),
        (Mode::Serving, seq + 21, c1.acked().1, 2)
    );
    assert_eq!(b.shared("shared_requests"), 21);
    let st = status_of(&mut a_agent);
    assert_eq!((st.mode, st.seq, st.conns), (Mode::Released, seq, 0));
    assert_eq!(a.shared("shared_mode"), Mode::Released.shared_value());

    // B's log continues A's: nothing was served between the clone and the freeze.
    b.machine.stop().unwrap();
    a.machine.stop().unwrap();
    let state = read_disk_state(b.machine.disks()[0].layer.as_ref()).unwrap();
    assert_eq!(state.records.len(), acked.len());
    check_log(&state.records, &acked).unwrap();
}
