//! Machine configuration, and its Firecracker-style JSON file form.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelSource {
    /// A guest of the test-guest kit, by name (all vCPUs start at its entry point).
    TestGuest(String),
    /// A kernel image file: bzImage, or ELF (PVH entry used when present).
    File(PathBuf),
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleTarget {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Discarded.
    Null,
}

/// A disk to attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Image path.
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// The default command line for Linux guests.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd";

/// A machine to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// vCPU count.
    pub vcpus: u8,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// What to boot.
    pub kernel: KernelSource,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (defaults to [`DEFAULT_CMDLINE`]).
    pub cmdline: Option<String>,
    /// Serial console target.
    pub console: ConsoleTarget,
    /// Disks.
    pub disks: Vec<DiskConfig>,
    /// Also describe virtio-mmio devices with `virtio_mmio.device=` on the command line (for
    /// kernels without ACPI device discovery); they are always in the DSDT.
    pub virtio_mmio_cmdline: bool,
    /// A virtio-vsock device (for the guest agent).
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-net devices, each on an existing TAP interface, in this order.
    #[serde(default)]
    pub net: Vec<NetConfig>,
}

/// A virtio-net device on a TAP (Firecracker's `network-interfaces` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// A name for the interface (for the API and logs), unique in the machine.
    pub iface_id: String,
    /// The host's TAP interface (it must exist: `ip tuntap add NAME mode tap`). Empty: a TAP of
    /// the device's own, attached to nothing, removed with the VM (a VM cut off from every
    /// network, such as an upgrade's backup until it takes over the active VM's TAP).
    pub host_dev_name: String,
    /// The guest's MAC address; a random locally administered one if not given (a restored
    /// or cloned machine keeps the saved one unless this is given).
    #[serde(default)]
    pub guest_mac: Option<devices::virtio::net::MacAddr>,
}

/// A virtio-vsock device: the guest's context ID and the host-side Unix socket
/// (Firecracker's convention: host connections via `CONNECT <port>`, guest connections to
/// port P reach `<uds_path>_<P>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest CID (3 or above).
    pub guest_cid: u64,
    /// Host-side Unix socket path.
    pub uds_path: PathBuf,
}

impl MachineConfig {
    /// One vCPU, 64 MiB, booting test guest `name`, console to stdout.
    pub fn test_guest(name: &str) -> Self {
        Self {
            vcpus: 1,
            mem_mib: 64,
            kernel: KernelSource::TestGuest(name.to_string()),
            initrd: None,
            cmdline: None,
            console: ConsoleTarget::Stdout,
            disks: Vec::new(),
            virtio_mmio_cmdline: false,
            vsock: None,
            net: Vec::new(),
        }
    }
}

/// Errors of reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file failed.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The JSON is malformed or has unknown fields.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// Neither a kernel nor a test guest is given.
    #[error("config file {0} names neither boot-source.kernel_image_path nor test_guest")]
    NoKernel(PathBuf),
}

/// `boot-source` of the JSON file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image.
    pub kernel_image_path: Option<PathBuf>,
    /// Initrd.
    pub initrd_path: Option<PathBuf>,
    /// Command line.
    pub boot_args: Option<String>,
}

/// `machine-config` of the JSON file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSection {
    /// vCPUs.
    #[serde(default = "one")]
    pub vcpu_count: u8,
    /// RAM in MiB.
    #[serde(default = "default_mem")]
    pub mem_size_mib: u64,
}

impl Default for MachineSection {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: default_mem(),
        }
    }
}

fn one() -> u8 {
    1
}

fn default_mem() -> u64 {
    128
}

/// A `drives` entry of the JSON file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Name.
    pub drive_id: String,
    /// Image path.
    pub path_on_host: PathBuf,
    /// Root device (informational).
    #[serde(default)]
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default)]
    pub is_read_only: bool,
}

/// The JSON config file (Firecracker's layout plus `console`, `test_guest` and
/// `virtio_mmio_cmdline`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Kernel, initrd, command line.
    #[serde(rename = "boot-source", default)]
    pub boot_source: BootSource,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineSection,
    /// Disks.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Console target.
    #[serde(default)]
    pub console: ConsoleTarget,
    /// Boot a test guest instead of a kernel.
    #[serde(default)]
    pub test_guest: Option<String>,
    /// See [`MachineConfig::virtio_mmio_cmdline`].
    #[serde(default)]
    pub virtio_mmio_cmdline: bool,
    /// See [`MachineConfig::vsock`].
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// See [`MachineConfig::net`].
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetConfig>,
}

impl FileConfig {
    /// Parses a JSON config file.
    pub fn load(path: &Path) -> Result<MachineConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let fc: FileConfig = serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        fc.into_machine_config()
            .ok_or_else(|| ConfigError::NoKernel(path.to_path_buf()))
    }

    /// The machine this file describes (`None` if it names nothing to boot).
    pub fn into_machine_config(self) -> Option<MachineConfig> {
        let kernel = match (self.boot_source.kernel_image_path, self.test_guest) {
            (Some(p), _) => KernelSource::File(p),
            (None, Some(g)) => KernelSource::TestGuest(g),
            (None, None) => return None,
        };
        Some(MachineConfig {
            vcpus: self.machine_config.vcpu_count,
            mem_mib: self.machine_config.mem_size_mib,
            kernel,
            initrd: self.boot_source.initrd_path,
            cmdline: self.boot_source.boot_args,
            console: self.console,
            disks: self
                .drives
                .into_iter()
                .map(|d| DiskConfig {
                    path: d.path_on_host,
                    read_only: d.is_read_only,
                })
                .collect(),
            virtio_mmio_cmdline: self.virtio_mmio_cmdline,
            vsock: self.vsock,
            net: self.network_interfaces,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firecracker_style_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        std::fs::write(
            &p,
            r#"{
              "boot-source": {"kernel_image_path": "/k/vmlinuz", "initrd_path": "/k/initrd",
                              "boot_args": "console=ttyS0"},
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
              "drives": [{"drive_id": "rootfs", "path_on_host": "/d.img",
                          "is_root_device": true, "is_read_only": true}],
              "console": {"file": "/tmp/out.log"},
              "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                      "guest_mac": "06:00:AC:10:00:02"},
                                     {"iface_id": "eth1", "host_dev_name": "tap1"}]
            }"#,
        )
        .unwrap();
        let c = FileConfig::load(&p).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.mem_mib, 256);
        assert_eq!(c.kernel, KernelSource::File("/k/vmlinuz".into()));
        assert_eq!(c.initrd, Some("/k/initrd".into()));
        assert_eq!(c.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(
            c.disks,
            vec![DiskConfig {
                path: "/d.img".into(),
                read_only: true
            }]
        );
        assert_eq!(c.console, ConsoleTarget::File("/tmp/out.log".into()));
        assert_eq!(c.net.len(), 2);
        assert_eq!(c.net[0].host_dev_name, "tap0");
        assert_eq!(
            c.net[0].guest_mac.map(|m| m.to_string()).as_deref(),
            Some("06:00:ac:10:00:02")
        );
        assert_eq!(
            (c.net[1].iface_id.as_str(), c.net[1].guest_mac),
            ("eth1", None)
        );
        // A malformed MAC is refused when the file is read, with the value in the message.
        std::fs::write(
            &p,
            r#"{"test_guest": "hello", "network-interfaces":
                [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:zz"}]}"#,
        )
        .unwrap();
        let e = FileConfig::load(&p).unwrap_err();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(chain.contains("06:00:zz"), "{chain}");
    }

    #[test]
    fn test_guest_form_and_errors() {
        let fc: FileConfig = serde_json::from_str(r#"{"test_guest": "counter"}"#).unwrap();
        let c = fc.into_machine_config().unwrap();
        assert_eq!(c.kernel, KernelSource::TestGuest("counter".into()));
        assert_eq!((c.vcpus, c.mem_mib), (1, 128));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        std::fs::write(&p, r#"{"machine-config": {"vcpus": 2}}"#).unwrap();
        assert!(matches!(
            FileConfig::load(&p),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&p, "{}").unwrap();
        assert!(matches!(
            FileConfig::load(&p),
            Err(ConfigError::NoKernel(_))
        ));
        assert!(matches!(
            FileConfig::load(&dir.path().join("missing.json")),
            Err(ConfigError::Read { .. })
        ));
    }
}
