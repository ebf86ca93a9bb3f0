//! Boot and exit latency of the test guests on this host (a comparison script, not a test):
//! `cargo run --release -p vmm --example boot_time [runs]`.
//!
//! Prints, for the `hello` guest, KVM_CREATE_VM -> vCPUs started (VMM setup) and -> first serial
//! byte (adds the guest's CPL0 stub), and guest power-off request
//! -> vCPU threads joined; for the `counter` guest, the host request -> port-I/O report round
//! trip, and pause / resume times.

use std::time::{Duration, Instant};

use devices::legacy::SerialOutput;
use vmm::config::{ConsoleTarget, MachineConfig};
use vmm::{Machine, StopReason};
use vmm_test_guests::{CounterProbe, REPORT_PORT, REPORT_PORT_LEN, ReportDevice};

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let pct = |p: usize| v[(v.len() - 1) * p / 100];
    println!(
        "{name:44} n={:4} min={:>10.1?} median={:>10.1?} p90={:>10.1?} max={:>10.1?}",
        v.len(),
        v[0],
        pct(50),
        pct(90),
        v[v.len() - 1]
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20);
    let (mut boot, mut exit, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut setup = Vec::new();
    for _ in 0..runs {
        let mut cfg = MachineConfig::test_guest("hello");
        cfg.console = ConsoleTarget::Null;
        let mut m = Machine::new(cfg, Some(SerialOutput::Sink))?;
        m.boot()?;
        m.start()?;
        assert_eq!(m.wait(Some(Duration::from_secs(30)))?, StopReason::PowerOff);
        let t = m.timeline();
        let stopped = t.stopped.ok_or("no stop time")?;
        setup.push(t.started.ok_or("not started")? - t.created);
        boot.push(m.serial_stats().first_byte_at().ok_or("no output")? - t.created);
        exit.push(stopped - m.power().requested_at().ok_or("no power event")?);
        total.push(stopped - t.created);
    }
    summary("hello: KVM_CREATE_VM -> vCPU threads started", setup);
    summary("hello: KVM_CREATE_VM -> first serial byte", boot);
    summary("hello: power-off request -> vCPUs joined", exit);
    summary("hello: KVM_CREATE_VM -> vCPUs joined", total);

    let mut cfg = MachineConfig::test_guest("counter");
    cfg.console = ConsoleTarget::Null;
    let mut m = Machine::new(cfg, Some(SerialOutput::Sink))?;
    let (dev, rx) = ReportDevice::new();
    m.pio_bus().insert(REPORT_PORT, REPORT_PORT_LEN, dev)?;
    m.boot()?;
    m.start()?;
    let probe = CounterProbe::new(m.memory().clone(), rx)?;
    probe.request(Duration::from_secs(30))?;
    let (mut rtt, mut pause, mut resume) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..(runs * 20) {
        let t = Instant::now();
        probe.request(Duration::from_secs(5))?;
        rtt.push(t.elapsed());
    }
    for _ in 0..(runs * 5) {
        let t = Instant::now();
        m.pause()?;
        pause.push(t.elapsed());
        let t = Instant::now();
        m.resume()?;
        resume.push(t.elapsed());
    }
    summary("counter: request -> report (2 port exits)", rtt);
    summary("counter: pause (1 vCPU)", pause);
    summary("counter: resume (1 vCPU)", resume);
    probe.stop(Duration::from_secs(5))?;
    m.wait(Some(Duration::from_secs(5)))?;
    Ok(())
}
