//! virtio-net under KVM with the kit's CPL3 driver (`virtio_net`), on TAPs in private network
//! namespaces (the host's own network is never touched): ping and UDP echo through the TAP,
//! two NICs, a live clone on its own TAP with its own MAC, and a TAP taken over by another
//! in-process VM while the host keeps pinging. As root only (SKIP otherwise).
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use devices::virtio::net::MacAddr;
use devices::virtio::testing::{NetNs, net_or_skip};
use microvmm_tests::{TestVm, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};
use vmm::StopReason;
use vmm::config::{ConsoleTarget, MachineConfig, NetConfig};
use vmm::machine::{CloneOptions, Machine};
use vmm_test_guests::VIRTIO_NET;

const LIMIT: Duration = Duration::from_secs(60);
const MAC0: &str = "06:00:0a:00:00:02";
const MAC1: &str = "06:00:0a:00:01:02";

fn skip(test: &str) -> bool {
    !(kvm_or_skip(test) && net_or_skip(test))
}

fn sym(name: &'static str) -> u64 {
    VIRTIO_NET.symbol(name).unwrap()
}

fn peek(m: &Machine, name: &'static str) -> u64 {
    m.memory().read_obj(GuestAddress(sym(name))).unwrap()
}

fn poke(m: &Machine, name: &'static str, v: u64) {
    m.memory().write_obj(v, GuestAddress(sym(name))).unwrap();
}

fn nic(id: &str, tap: &str, mac: &str) -> NetConfig {
    NetConfig {
        iface_id: id.into(),
        host_dev_name: tap.into(),
        guest_mac: Some(mac.parse().unwrap()),
    }
}

/// Boots (does not start) the `virtio_net` guest with `nics`; call with the thread in the
/// namespace that holds the TAPs.
fn net_vm(nics: Vec<NetConfig>) -> TestVm {
    let mut cfg = MachineConfig::test_guest("virtio_net");
    let n = nics.len() as u64;
    cfg.net = nics;
    let vm = TestVm::boot(cfg).unwrap();
    poke(&vm.machine, "shared_nics", n);
    vm
}

fn parse_ping(text: &str) -> (u32, u32) {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {text:?}"));
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse().unwrap())
        .collect();
    (nums[0], nums[1])
}

/// The MAC the namespace learned for `ip` by ARP.
fn neigh_mac(ns: &NetNs, ip: &str) -> Option<MacAddr> {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "neigh", "show", ip])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next()?.parse().ok()
}

fn stop(vm: &mut TestVm) {
    poke(&vm.machine, "shared_stop", 1);
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    assert_eq!(vm.serial_text(), "virtio-net: ok\n");
}

#[test]
fn the_host_pings_the_guest_and_gets_1_mib_of_udp_echoed() {
    let name = "the_host_pings_the_guest_and_gets_1_mib_of_udp_echoed";
    if skip(name) {
        return;
    }
    let ns = NetNs::new("ping").unwrap();
    ns.add_tap("tap0", Some("10.0.0.1/24")).unwrap();
    let _in_ns = ns.enter().unwrap();
    let mut vm = net_vm(vec![nic("eth0", "tap0", MAC0)]);
    vm.machine.start().unwrap();
    ns.wait_up("tap0").unwrap();

    assert_eq!(
        ns.ping("10.0.0.2", 100, "0.01"),
        100,
        "every echo request answered"
    );
    assert_eq!(neigh_mac(&ns, "10.0.0.2"), Some(MAC0.parse().unwrap()));
    assert!(peek(&vm.machine, "shared_icmp") >= 100);

    // 1 MiB over UDP, stop-and-wait with retransmission: echoed byte for byte, in order.
    let sock = UdpSocket::bind("10.0.0.1:0").unwrap();
    sock.connect("10.0.0.2:7").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut echoed = Vec::with_capacity(data.len());
    let mut retries = 0;
    let t = Instant::now();
    for (seq, chunk) in data.chunks(1468).enumerate() {
        let mut msg = (seq as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(chunk);
        let mut buf = [0u8; 2048];
        loop {
            sock.send(&msg).unwrap();
            match sock.recv(&mut buf) {
                Ok(n) if buf[..n] == msg[..] => break,
                // A late echo of an earlier retransmission: read on.
                Ok(n)
                    if n >= 4 && u32::from_be_bytes(buf[..4].try_into().unwrap()) < seq as u32 => {}
                Ok(n) => panic!("datagram {seq}: echo of {n} bytes differs"),
                Err(_) => {
                    retries += 1;
                    assert!(retries < 50, "too many lost datagrams");
                }
            }
        }
        echoed.extend_from_slice(chunk);
    }
    assert_eq!(echoed, data);
    println!(
        "1 MiB echoed in {:?} with {retries} retransmissions",
        t.elapsed()
    );
    stop(&mut vm);
    assert_eq!(peek(&vm.machine, "shared_dropped"), 0);
}

#[test]
fn two_nics_answer_each_on_their_own_tap() {
    let name = "two_nics_answer_each_on_their_own_tap";
    if skip(name) {
        return;
    }
    let ns = NetNs::new("twonic").unwrap();
    ns.add_tap("tap0", Some("10.0.0.1/24")).unwrap();
    ns.add_tap("tap1", Some("10.0.1.1/24")).unwrap();
    let _in_ns = ns.enter().unwrap();
    let mut vm = net_vm(vec![nic("eth0", "tap0", MAC0), nic("eth1", "tap1", MAC1)]);
    vm.machine.start().unwrap();
    ns.wait_up("tap0").unwrap();
    ns.wait_up("tap1").unwrap();
    assert_eq!(ns.ping("10.0.0.2", 20, "0.01"), 20);
    assert_eq!(ns.ping("10.0.1.2", 20, "0.01"), 20);
    assert_eq!(neigh_mac(&ns, "10.0.0.2"), Some(MAC0.parse().unwrap()));
    assert_eq!(neigh_mac(&ns, "10.0.1.2"), Some(MAC1.parse().unwrap()));
    // Each NIC saw its own traffic.
    let rx0: u64 = vm
        .machine
        .memory()
        .read_obj(GuestAddress(sym("shared_rx")))
        .unwrap();
    let rx1: u64 = vm
        .machine
        .memory()
        .read_obj(GuestAddress(sym("shared_rx") + 8))
        .unwrap();
    assert!(rx0 >= 21 && rx1 >= 21, "rx {rx0} {rx1}");
    stop(&mut vm);
}

#[test]
fn a_missing_tap_is_an_error_before_the_vm_exists() {
    let name = "a_missing_tap_is_an_error_before_the_vm_exists";
    if skip(name) {
        return;
    }
    let ns = NetNs::new("missing").unwrap();
    let _in_ns = ns.enter().unwrap();
    let mut cfg = MachineConfig::test_guest("virtio_net");
    cfg.net = vec![nic("eth0", "nosuchtap0", MAC0)];
    let e = Machine::new(cfg, None).unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        chain.contains("nosuchtap0") && chain.contains("does not exist"),
        "{chain}"
    );
}

#[test]
fn a_clone_answers_on_its_own_tap_with_its_own_mac() {
    let name = "a_clone_answers_on_its_own_tap_with_its_own_mac";
    if skip(name) {
        return;
    }
    let a = NetNs::new("clonea").unwrap();
    a.add_tap("tap0", Some("10.0.0.1/24")).unwrap();
    let b = NetNs::new("cloneb").unwrap();
    b.add_tap("tap0", Some("10.0.0.1/24")).unwrap();
    let in_a = a.enter().unwrap();
    let mut vm = net_vm(vec![nic("eth0", "tap0", MAC0)]);
    vm.machine.start().unwrap();
    a.wait_up("tap0").unwrap();
    assert_eq!(a.ping("10.0.0.2", 10, "0.01"), 10);
    drop(in_a);

    // The clone's TAP is namespace B's tap0: open it from there.
    let in_b = b.enter().unwrap();
    let mut cfg = MachineConfig::test_guest("virtio_net");
    cfg.net = vec![nic("eth0", "tap0", MAC1)];
    cfg.console = ConsoleTarget::Null;
    let (mut clone, _) = vm.machine.clone_running(CloneOptions::new(cfg)).unwrap();
    drop(in_b);
    clone.start().unwrap();
    b.wait_up("tap0").unwrap();
    assert_eq!(clone.nets()[0].handle.mac(), MAC1.parse().unwrap());

    assert_eq!(b.ping("10.0.0.2", 20, "0.01"), 20);
    assert_eq!(a.ping("10.0.0.2", 20, "0.01"), 20);
    assert_eq!(neigh_mac(&b, "10.0.0.2"), Some(MAC1.parse().unwrap()));
    assert_eq!(neigh_mac(&a, "10.0.0.2"), Some(MAC0.parse().unwrap()));
    poke(&clone, "shared_stop", 1);
    assert_eq!(clone.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    stop(&mut vm);
}

#[test]
fn a_vm_takes_over_anothers_tap_and_the_pings_go_on() {
    let name = "a_vm_takes_over_anothers_tap_and_the_pings_go_on";
    if skip(name) {
        return;
    }
    let ns = NetNs::new("takeover").unwrap();
    ns.add_tap("tap0", Some("10.0.0.1/24")).unwrap();
    // The second VM's own link, unaddressed: nobody talks to it there.
    ns.add_tap("tap1", None).unwrap();
    let _in_ns = ns.enter().unwrap();
    let mut active = net_vm(vec![nic("eth0", "tap0", MAC0)]);
    active.machine.start().unwrap();
    ns.wait_up("tap0").unwrap();
    assert_eq!(ns.ping("10.0.0.2", 10, "0.01"), 10);
    let mut cfg = MachineConfig::test_guest("virtio_net");
    cfg.net = vec![nic("eth0", "tap1", MAC1)];
    cfg.console = ConsoleTarget::Null;
    let (mut backup, _) = active
        .machine
        .clone_running(CloneOptions::new(cfg))
        .unwrap();
    backup.start().unwrap();
    let before = peek(&backup, "shared_icmp");

    // Ping every 10 ms for 3 s; take the TAP over after 1 s.
    let pinger = ns
        .command("ping")
        .args(["-q", "-n", "-c", "300", "-i", "0.01", "-W", "1", "10.0.0.2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    backup.pause().unwrap();
    active.machine.pause().unwrap();
    let old = backup.take_over_net(&active.machine).unwrap();
    backup.resume().unwrap();
    let pause = t.elapsed();
    assert_eq!(old.len(), 1);
    assert_eq!(
        old[0].as_ref().map(|t| t.name().to_owned()).as_deref(),
        Some("tap1")
    );
    assert_eq!(backup.nets()[0].handle.mac(), MAC0.parse().unwrap());
    assert_eq!(backup.nets()[0].handle.tap_name().as_deref(), Some("tap0"));
    assert_eq!(active.machine.nets()[0].handle.tap_name(), None);

    let out = pinger.wait_with_output().unwrap();
    let (sent, got) = parse_ping(&String::from_utf8_lossy(&out.stdout));
    let lost = sent - got;
    let allowed = (pause.as_millis() / 10) as u32 + 3;
    println!("takeover pause {pause:?}: {sent} sent, {got} answered, {lost} lost");
    assert!(lost <= allowed, "{lost} lost with a {pause:?} pause");
    let answered_by_backup = peek(&backup, "shared_icmp") - before;
    assert!(
        answered_by_backup >= 150,
        "the backup answered {answered_by_backup}"
    );
    // The backup answers ARP with the address it took over (re-read on the config interrupt).
    ns.ip(&["neigh", "flush", "dev", "tap0"]).unwrap();
    assert_eq!(ns.ping("10.0.0.2", 5, "0.01"), 5);
    assert_eq!(neigh_mac(&ns, "10.0.0.2"), Some(MAC0.parse().unwrap()));

    poke(&backup, "shared_stop", 1);
    assert_eq!(backup.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    active.machine.stop().unwrap();
}
