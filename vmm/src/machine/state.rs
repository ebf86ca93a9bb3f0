//! A machine's state as a whole: capturing it (vCPUs, the VM's in-kernel devices, the VMM's
//! devices), snapshot files, restoring into a new machine, and what moves between two quiet
//! machines of one process (a disk layer, the network, the vsock listener).

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use block::Layer;
use devices::legacy::SerialOutput;
use devices::persist::{Persist, SavedState, StateList};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::tap::Tap;
use devices::virtio::vsock::muxer::MuxerState;

use super::builder::Origin;
use super::device_manager::QueueGuards;
use super::{Machine, MachineError, VmState};
use crate::config::MachineConfig;
use crate::handover::VsockHandover;
use crate::memory::GuestRam;
use crate::snapshot::{self, MachineState, SnapshotError, SnapshotMeta, VcpuState, names};
use crate::vcpu::Vcpu;

impl Machine {
    /// Reads the whole state of every vCPU. The vCPUs must not be in `KVM_RUN`: paused, or not
    /// started.
    fn save_vcpus(&self) -> Result<Vec<VcpuState>, MachineError> {
        snapshot::check_xsave_size(self.vm.kvm())?;
        let out: Arc<Mutex<Vec<Result<VcpuState, SnapshotError>>>> = Arc::default();
        let o = out.clone();
        self.on_each_vcpu(Arc::new(move |v: &Vcpu| {
            let r = v.save();
            o.lock().unwrap_or_else(|p| p.into_inner()).push(r);
        }))?;
        let mut states = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|s| s.id);
        Ok(states)
    }

    /// Captures the machine's state with its device queues locked by `guards` (one entry per
    /// transport), so no device worker touches memory or rings meanwhile.
    pub(super) fn capture_locked(
        &self,
        transports: &[MutexGuard<'_, MmioTransport>],
        guards: &[QueueGuards<'_>],
    ) -> Result<MachineState, MachineError> {
        let vcpus = self.save_vcpus()?;
        let vm = self.vm.save()?;
        let devices = self.devices.save_locked(transports, guards)?;
        Ok(MachineState {
            vcpus,
            vm,
            devices,
            virtio_types: transports.iter().map(|t| t.device_type()).collect(),
        })
    }

    /// Runs `f` with every transport and every device queue locked: no MMIO register access
    /// and no device worker touching guest memory meanwhile.
    pub(super) fn with_devices_held<R>(
        &self,
        f: impl FnOnce(&[MutexGuard<'_, MmioTransport>], &[QueueGuards<'_>]) -> R,
    ) -> R {
        self.devices.held(f)
    }

    pub(super) fn check_quiet(&self) -> Result<(), MachineError> {
        match self.state {
            VmState::Paused | VmState::Booted => Ok(()),
            from => Err(MachineError::InvalidTransition {
                from,
                to: VmState::Paused,
            }),
        }
    }

    /// Makes the running virtio-blk device of disk `index` serve `layer` from now on (same
    /// size and writability), with its worker held off the queue, so no request is split
    /// between the two; the machine's [`Machine::disks`] follow, so a later clone forks the
    /// new layer. The machine must be paused (or booted, not started). Returns the layer it
    /// served before.
    pub fn replace_disk(
        &mut self,
        index: usize,
        layer: Arc<Layer>,
    ) -> Result<Arc<Layer>, MachineError> {
        self.check_quiet()?;
        let count = self.devices.disks.len();
        let disk = self
            .devices
            .disks
            .get(index)
            .ok_or(MachineError::NoSuchDisk { index, count })?;
        let swapped = self.with_devices_held(|_, _| disk.slot.swap(layer.clone()));
        if swapped.is_err() {
            return Err(MachineError::DiskReplace {
                index,
                path: layer.path().to_owned(),
            });
        }
        let old = self.set_disk_layer(index, layer);
        tracing::debug!(index, from = %old.path().display(), to = %self.devices.disks[index].layer.path().display(), "disk replaced");
        Ok(old)
    }

    /// Makes `layer` the layer of attached disk `index` (which must exist) and returns the one
    /// it had; the configuration's disk names it too, so [`Machine::config`] stays true.
    pub(crate) fn set_disk_layer(&mut self, index: usize, layer: Arc<Layer>) -> Arc<Layer> {
        self.sync_disk_config(index, &layer);
        std::mem::replace(&mut self.devices.disks[index].layer, layer)
    }

    /// Makes the configuration's disk `index` name `layer` (a clone's own layers, a fork's
    /// child, a replacement).
    pub(crate) fn sync_disk_config(&mut self, index: usize, layer: &Layer) {
        if let Some(c) = self.cfg.disks.get_mut(index) {
            layer.path().clone_into(&mut c.path);
        }
    }

    /// Takes over `donor`'s network: each of its NICs' TAP moves to this machine's NIC of the
    /// same position (the open fd moves; nothing is reopened), with its MAC address (the
    /// configuration change is signalled to this guest). The upgrade's cutover uses it so the
    /// backup answers on the active VM's links with the active VM's addresses. Both machines
    /// must be quiet (paused, or booted and not started) and have the same number of NICs, each
    /// of `donor`'s with its TAP. Returns this machine's previous TAPs, for the caller to close
    /// or give back.
    pub fn take_over_net(&mut self, donor: &Machine) -> Result<Vec<Option<Tap>>, MachineError> {
        self.check_quiet()?;
        donor.check_quiet()?;
        if self.devices.nets.len() != donor.devices.nets.len() {
            return Err(MachineError::NetTakeover(format!(
                "{} NICs here, {} on the donor",
                self.devices.nets.len(),
                donor.devices.nets.len()
            )));
        }
        if let Some(n) = donor
            .devices
            .nets
            .iter()
            .find(|n| n.handle.tap_name().is_none())
        {
            return Err(MachineError::NetTakeover(format!(
                "the donor's {} has no TAP",
                n.iface_id
            )));
        }
        let mut previous = Vec::with_capacity(self.devices.nets.len());
        for (mine, theirs) in self.devices.nets.iter().zip(&donor.devices.nets) {
            let mac = theirs.handle.mac();
            // Checked above, and both machines are quiet: every donor NIC still has its TAP.
            let Some(tap) = theirs.handle.take_tap() else {
                previous.push(None);
                continue;
            };
            tracing::info!(iface = %mine.iface_id, tap = %tap.name(), %mac, "TAP taken over");
            let name = tap.name().to_string();
            previous.push(mine.handle.attach_tap(tap));
            mine.handle.set_mac(mac);
            // Keep the configuration true (a restart or a later clone reads it).
            if let Some(c) = self
                .cfg
                .net
                .iter_mut()
                .find(|c| c.iface_id == mine.iface_id)
            {
                c.host_dev_name = name;
                c.guest_mac = Some(mac);
            }
        }
        Ok(previous)
    }

    /// The host socket the VM's vsock device answers on: the one it adopted from another VM
    /// (an upgrade moves the active VM's listener to the backup), else its configured one.
    pub fn vsock_uds_path(&self) -> Option<std::path::PathBuf> {
        let configured = self.cfg.vsock.as_ref().map(|v| v.uds_path.clone());
        self.devices
            .vsock
            .as_ref()
            .and_then(devices::virtio::vsock::VsockHandle::uds_path)
            .or(configured)
    }

    /// The vsock device's host side (to move its connections and listener), if there is one.
    pub fn vsock(&self) -> Option<&devices::virtio::vsock::VsockHandle> {
        self.devices.vsock.as_ref()
    }

    /// The whole state (vCPUs, in-kernel devices, VMM devices) of a paused (or booted, not yet
    /// started) machine. Memory is not included: it is [`Machine::memory`].
    pub fn capture_state(&self) -> Result<MachineState, MachineError> {
        self.check_quiet()?;
        self.with_devices_held(|t, g| self.capture_locked(t, g))
    }

    /// Writes a snapshot of a paused machine into directory `dir` (see [`crate::snapshot`] for
    /// the format).
    /// The devices stay held while memory is written, so no device worker writes guest RAM
    /// after its state was captured. Vsock connections are not in it: a restore resets them.
    pub fn save_snapshot(&self, dir: &Path) -> Result<SnapshotMeta, MachineError> {
        self.check_quiet()?;
        self.with_devices_held(|t, g| {
            let state = self.capture_locked(t, g)?;
            Ok(snapshot::write_snapshot(dir, &state, self.vm.ram())?)
        })
    }

    /// Like [`Machine::save_snapshot`], but also takes the vsock connections out of this
    /// machine, their states into the snapshot and their host sockets into the returned
    /// [`VsockHandover`] (send it to the restoring process). This machine's guest loses them
    /// (it would get RST if it went on): stop it. If writing the snapshot fails, the
    /// connections are given back and nothing changes.
    pub fn save_snapshot_handover(
        &self,
        dir: &Path,
    ) -> Result<(SnapshotMeta, VsockHandover), MachineError> {
        self.check_quiet()?;
        self.with_devices_held(|t, g| {
            let mut state = self.capture_locked(t, g)?;
            let Some((conns, fds)) = self.devices.vsock.as_ref().and_then(|h| h.export()) else {
                let meta = snapshot::write_snapshot(dir, &state, self.vm.ram())?;
                return Ok((meta, VsockHandover::default()));
            };
            let entry = SavedState::encode(names::VSOCK_CONNECTIONS, &conns);
            let written = entry.map_err(SnapshotError::from).and_then(|e| {
                state.devices.push(e);
                snapshot::write_snapshot(dir, &state, self.vm.ram())
            });
            match written {
                Ok(meta) => {
                    if let Some(h) = &self.devices.vsock {
                        h.stop_listening();
                    }
                    Ok((meta, VsockHandover { fds }))
                }
                Err(e) => {
                    if let Some(h) = &self.devices.vsock {
                        // Cannot fail: the same connections, just taken out.
                        let _ = h.import(conns, fds);
                    }
                    Err(e.into())
                }
            }
        })
    }

    /// Builds a machine from a snapshot written by [`Machine::save_snapshot_handover`] with
    /// the vsock sockets received from the saving process; the connections go on (no
    /// transport reset). A handover whose socket count differs from the snapshot's connection
    /// list is `HandoverError::Mismatch`.
    pub fn restore_snapshot_handover(
        cfg: MachineConfig,
        console: Option<SerialOutput>,
        dir: &Path,
        handover: VsockHandover,
    ) -> Result<Self, MachineError> {
        let (_, state, ram) = snapshot::read_snapshot(dir)?;
        let mismatch =
            |m: String| -> MachineError { crate::handover::HandoverError::Mismatch(m).into() };
        let conns = state
            .devices
            .state_of::<MuxerState>(names::VSOCK_CONNECTIONS)
            .map_err(SnapshotError::from)?;
        match &conns {
            None if !handover.is_empty() => {
                return Err(mismatch(format!(
                    "{} sockets for a snapshot without vsock connections",
                    handover.len()
                )));
            }
            Some(_) if cfg.vsock.is_none() => {
                return Err(mismatch(
                    "the snapshot has vsock connections, the config no vsock device".into(),
                ));
            }
            Some(conns) => conns
                .validate(handover.len())
                .map_err(|e| mismatch(e.to_string()))?,
            None => {}
        }
        let origin = Origin::Restore {
            ram,
            devices: &state.devices,
            handover: Some(handover),
        };
        Self::restore_from(cfg, console, &state, origin)
    }

    /// Builds a machine from a snapshot directory written by [`Machine::save_snapshot`]. `cfg`
    /// gives the devices (the same kinds, in the same order, as the saved machine) and the
    /// console; its memory size and vCPU count come from the snapshot. The machine is left
    /// `Booted`: add host-side devices, then [`Machine::start`].
    pub fn restore_snapshot(
        cfg: MachineConfig,
        console: Option<SerialOutput>,
        dir: &Path,
    ) -> Result<Self, MachineError> {
        let (_, state, ram) = snapshot::read_snapshot(dir)?;
        let origin = Origin::Restore {
            ram,
            devices: &state.devices,
            handover: None,
        };
        Self::restore_from(cfg, console, &state, origin)
    }

    /// Builds a machine on `ram` in saved `state`: a clone on `layers` (the fork children of
    /// the source's disks) when given, else a restore that opens the configuration's disks.
    pub fn from_state(
        cfg: MachineConfig,
        console: Option<SerialOutput>,
        ram: GuestRam,
        layers: Option<Vec<Arc<Layer>>>,
        state: &MachineState,
    ) -> Result<Self, MachineError> {
        let devices = &state.devices;
        let origin = match layers {
            Some(layers) => Origin::Clone {
                ram,
                devices,
                layers,
            },
            None => Origin::Restore {
                ram,
                devices,
                handover: None,
            },
        };
        Self::restore_from(cfg, console, state, origin)
    }

    /// Builds the machine `origin` describes in the saved `state`: devices, VM, vCPUs and
    /// transports written with their saved states; left `Booted`.
    fn restore_from(
        mut cfg: MachineConfig,
        console: Option<SerialOutput>,
        state: &MachineState,
        origin: Origin<'_>,
    ) -> Result<Self, MachineError> {
        cfg.vcpus = u8::try_from(state.vcpus.len())
            .map_err(|_| SnapshotError::Mismatch(format!("{} vCPUs", state.vcpus.len())))?;
        let mut m = Self::build(cfg, console, origin)?;
        let types = m.devices.virtio_types();
        if types != state.virtio_types {
            return Err(SnapshotError::Mismatch(format!(
                "virtio devices {types:?}, the snapshot has {:?}",
                state.virtio_types
            ))
            .into());
        }
        snapshot::check_xsave_size(m.vm.kvm())?;
        m.vm.restore(&state.vm)?;
        let io = m.vcpu_io();
        for (i, s) in state.vcpus.iter().enumerate() {
            if usize::from(s.id) != i {
                return Err(SnapshotError::Mismatch(format!("vCPU {i} has id {}", s.id)).into());
            }
            let mut vcpu = Vcpu::new(m.vm.fd(), s.id, io.clone())?;
            vcpu.restore(s)?;
            m.cpus.push(vcpu);
        }
        m.devices.restore_transports(&state.devices)?;
        m.transition(VmState::Booted)?;
        Ok(m)
    }
}
