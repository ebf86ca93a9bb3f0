//! The guest's side of microvmm's `Shutdown`: when the agent runs as init, it watches the
//! input devices the ACPI button driver registers ("Power Button") and powers the guest off
//! on KEY_POWER: every process gets SIGTERM, then (after a grace period) the file systems are
//! synced and the machine powered off.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

/// `struct input_event` on x86_64: a timeval (16 bytes), type, code (u16 each), value (i32).
const EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// Whether one `struct input_event` is a press of the power key.
pub fn is_power_press(ev: &[u8; EVENT_SIZE]) -> bool {
    let ty = u16::from_ne_bytes([ev[16], ev[17]]);
    let code = u16::from_ne_bytes([ev[18], ev[19]]);
    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
    ty == EV_KEY && code == KEY_POWER && value == 1
}

/// Reads input events from `r` until a power key press (true) or the end of the stream
/// (false).
pub fn wait_for_power_press(mut r: impl Read) -> io::Result<bool> {
    let mut ev = [0u8; EVENT_SIZE];
    loop {
        match r.read_exact(&mut ev) {
            Ok(()) if is_power_press(&ev) => return Ok(true),
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// The event device nodes (`/dev/input/eventN`) whose input device is named `name`, from the
/// sysfs tree at `sys` (`/sys/class/input`).
pub fn event_devices(sys: &Path, name: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(sys) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device/name")).is_ok_and(|n| n.trim() == name)
        })
        .map(|e| Path::new("/dev/input").join(e.file_name()))
        .collect();
    v.sort();
    v
}

/// Starts watching the power buttons (a thread per device); on a press, `on_press` runs.
/// Returns how many devices are watched (none without the ACPI button and evdev drivers).
pub fn watch(on_press: fn()) -> usize {
    let devs = event_devices(Path::new("/sys/class/input"), "Power Button");
    for d in &devs {
        let d = d.clone();
        thread::spawn(
            move || match File::open(&d).and_then(wait_for_power_press) {
                Ok(true) => on_press(),
                Ok(false) => {}
                Err(e) => eprintln!("guest-agent: power button {}: {e}", d.display()),
            },
        );
    }
    devs.len()
}

/// Shuts the guest down as init does: SIGTERM to every process, a grace period, sync, power
/// off.
pub fn power_off() {
    eprintln!("guest-agent: power button pressed; powering off");
    // SAFETY: kill(-1, SIGTERM) signals every process this one may signal (init is exempt
    // from it); no memory is involved.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    thread::sleep(Duration::from_secs(3));
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot(RB_POWER_OFF) ends the machine; init is allowed to, after the sync above.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    eprintln!(
        "guest-agent: power off failed: {}",
        io::Error::last_os_error()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut e = [0u8; EVENT_SIZE];
        e[16..18].copy_from_slice(&ty.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn a_power_key_press_among_other_events_is_found() {
        let mut stream = Vec::new();
        stream.extend(event(0, 0, 0)); // EV_SYN
        stream.extend(event(EV_KEY, 30, 1)); // KEY_A
        stream.extend(event(EV_KEY, KEY_POWER, 0)); // release
        assert!(!wait_for_power_press(&stream[..]).unwrap());
        stream.extend(event(EV_KEY, KEY_POWER, 1));
        assert!(wait_for_power_press(&stream[..]).unwrap());
        // A torn event at the end is the end of the stream.
        assert!(!wait_for_power_press(&stream[..30]).unwrap());
    }

    #[test]
    fn event_devices_are_found_by_name() {
        let d = tempfile::tempdir().unwrap();
        for (n, name) in [
            ("event0", "AT Keyboard"),
            ("event1", "Power Button"),
            ("mouse0", "Power Button"),
        ] {
            std::fs::create_dir_all(d.path().join(n).join("device")).unwrap();
            std::fs::write(d.path().join(n).join("device/name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            event_devices(d.path(), "Power Button"),
            vec![PathBuf::from("/dev/input/event1")]
        );
        assert!(event_devices(&d.path().join("nope"), "Power Button").is_empty());
    }
}
