//! A TAP device opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: every frame read or written
//! carries a 12-byte `virtio_net_hdr_v1` in front, so guest offload metadata passes through.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::queue_io::TxBuffers;

/// Length of the virtio-net header on every frame (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// The TUN/TAP control device.
const TUN_PATH: &str = "/dev/net/tun";

/// Errors opening or configuring a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long, or has a NUL byte.
    #[error("invalid TAP name {0:?} (1 to 15 bytes)")]
    BadName(String),
    /// No interface of that name exists in this network namespace (create it first, e.g.
    /// `ip tuntap add NAME mode tap`).
    #[error("TAP device {0} does not exist (create it with `ip tuntap add {0} mode tap`)")]
    Missing(String),
    /// `/dev/net/tun` is missing or may not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// The kernel refused to attach to the interface (another owner, or no permission).
    #[error("may not attach to TAP device {name}")]
    Permission {
        /// The interface.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The interface exists but is not a TAP device this process can attach to (a TUN device,
    /// a multi-queue TAP, or a non-tun interface).
    #[error("{name} is not a single-queue TAP device")]
    NotATap {
        /// The interface.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A configuration ioctl failed.
    #[error("{op} on TAP device {name} failed")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The interface.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// An open TAP device (the file descriptor; the interface itself is the host's).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_for(name: &str, flags: i32) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers and pointers);
    // all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // The TUN flags are a 16-bit field.
    req.ifr_ifru.ifru_flags = (flags & 0xffff) as libc::c_short;
    req
}

/// `ioctl(fd, op, arg)` with a pointer argument.
fn ioctl_ptr<T>(fd: RawFd, op: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes an ioctl whose argument is a pointer to a `T` the kernel reads
    // or writes within its size; `arg` is a valid, exclusive reference for the call.
    let r = unsafe { libc::ioctl(fd, op, std::ptr::from_mut(arg)) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(fd, op, value)` with an integer argument.
fn ioctl_val(fd: RawFd, op: libc::Ioctl, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every caller passes an ioctl that takes its argument by value; no memory is
    // passed to the kernel.
    let r = unsafe { libc::ioctl(fd, op, value) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens `/dev/net/tun` (non-blocking) and attaches it to TAP `name` (an empty name: a new
/// interface the kernel names) with a virtio-net header on every frame; the fd and the name
/// the kernel attached to. `refused` makes the error of a refused attach.
fn attach(
    name: &str,
    refused: impl FnOnce(io::Error) -> TapError,
) -> Result<(File, String), TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)?;
    let mut req = ifreq_for(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
    ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &mut req).map_err(refused)?;
    let got = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| char::from(u8::from_ne_bytes(c.to_ne_bytes())))
        .collect();
    Ok((file, got))
}

/// The index of interface `name` in the calling thread's network namespace, if it exists.
fn if_index(name: &CString) -> Option<u32> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

impl Tap {
    /// Attaches to the existing TAP interface `name` (in the calling thread's network
    /// namespace), non-blocking, with a 12-byte virtio-net header on every frame. A missing
    /// interface is an error: this never creates one.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::BadName(name.to_owned()));
        }
        let cname = CString::new(name).map_err(|_| TapError::BadName(name.to_owned()))?;
        if if_index(&cname).is_none() {
            return Err(TapError::Missing(name.to_owned()));
        }
        let (file, _) = attach(name, |source| {
            let name = name.to_owned();
            match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES | libc::EBUSY) => {
                    TapError::Permission { name, source }
                }
                _ => TapError::NotATap { name, source },
            }
        })?;
        let tap = Self {
            file,
            name: name.to_owned(),
        };
        tap.set_hdr_len()?;
        // No offloads until the guest negotiates them: the kernel checksums and segments.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Creates a TAP of its own, attached to nothing: the kernel names it (`tapN`), it stays
    /// down, and it vanishes when this fd closes. A device on it is cut off from every network
    /// (an upgrade's backup VM until it takes over the active VM's TAP).
    pub fn open_detached() -> Result<Self, TapError> {
        let (file, name) = attach("", |source| TapError::Permission {
            name: "(a new detached TAP)".into(),
            source,
        })?;
        let tap = Self { file, name };
        tap.set_hdr_len()?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn set_hdr_len(&self) -> Result<(), TapError> {
        #[allow(clippy::cast_possible_truncation)] // 12
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &mut hdr_len).map_err(|source| {
            TapError::Ioctl {
                op: "TUNSETVNETHDRSZ",
                name: self.name.clone(),
                source,
            }
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads the reader accepts (`TUN_F_*`): what the kernel may hand over
    /// without computing checksums or segmenting (what the guest negotiated to receive).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        ioctl_val(
            self.file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
        .map_err(|source| TapError::Ioctl {
            op: "TUNSETOFFLOAD",
            name: self.name.clone(),
            source,
        })
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.file, buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &self.file, frame)
    }

    /// Writes one frame (header included) straight from the guest buffers of a validated
    /// transmit chain, without copying it first.
    pub fn write_buffers(&self, bufs: &TxBuffers<'_, '_>) -> io::Result<usize> {
        let iov = bufs.iov();
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let n = if let [one] = iov {
            // SAFETY: the iovec points into guest memory that `bufs` keeps borrowed (mapped)
            // for this call; write only reads that memory.
            unsafe { libc::write(self.file.as_raw_fd(), one.iov_base, one.iov_len) }
        } else {
            // SAFETY: as above, for every iovec; writev only reads that memory.
            unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) }
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The `TUN_F_*` offloads matching the virtio-net features a guest accepted for receiving.
pub fn offload_for_features(acked: u64) -> u32 {
    use virtio_bindings::virtio_net as vn;
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(vn::VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(vn::VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(vn::VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(vn::VIRTIO_NET_F_GUEST_ECN) {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        assert!(matches!(Tap::open(""), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("a-name-longer-than-15"),
            Err(TapError::BadName(_))
        ));
        assert!(matches!(Tap::open("a\0b"), Err(TapError::BadName(_))));
    }

    #[test]
    fn a_missing_interface_is_named_in_the_error() {
        let e = Tap::open("mvmm-nope0").unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
        assert!(e.to_string().contains("mvmm-nope0"));
    }

    #[test]
    fn a_detached_tap_gets_a_kernel_name_and_vanishes_with_its_fd() {
        if crate::virtio::testing::net_skip_reason().is_some() {
            println!("SKIP: a_detached_tap_gets_a_kernel_name_and_vanishes_with_its_fd: no TAPs");
            return;
        }
        let ns = crate::virtio::testing::NetNs::new("detached").unwrap();
        let guard = ns.enter().unwrap();
        let tap = Tap::open_detached().unwrap();
        let name = CString::new(tap.name()).unwrap();
        assert!(tap.name().starts_with("tap"), "{}", tap.name());
        assert!(if_index(&name).is_some());
        // Nothing arrives on it.
        let mut buf = [0u8; 2048];
        assert_eq!(
            tap.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(tap);
        // A process another test forks at this moment holds a copy of the fd until its exec
        // closes it: the interface goes with the last copy.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while if_index(&name).is_some() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(if_index(&name).is_none(), "removed with its fd");
        drop(guard);
    }

    #[test]
    fn offloads_follow_the_guest_features_and_need_checksums() {
        use virtio_bindings::virtio_net as vn;
        let f = |bits: &[u32]| bits.iter().fold(0u64, |a, b| a | (1 << b));
        assert_eq!(offload_for_features(0), 0);
        // TSO without checksum offload is not a valid TAP setting: nothing is enabled.
        assert_eq!(offload_for_features(f(&[vn::VIRTIO_NET_F_GUEST_TSO4])), 0);
        assert_eq!(
            offload_for_features(f(&[
                vn::VIRTIO_NET_F_GUEST_CSUM,
                vn::VIRTIO_NET_F_GUEST_TSO4,
                vn::VIRTIO_NET_F_GUEST_TSO6
            ])),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
