//! Cloning a running [`Machine`] in-process: pre-copy of its RAM over KVM dirty logging, a short
//! pause for the last pages, the state and the disk forks, then the clone built from them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{ForkCommit, Layer, PreparedFork};
use devices::legacy::SerialOutput;
use devices::virtio::blk::DEVICE_TYPE_BLOCK;
use devices::virtio::net::DEVICE_TYPE_NET;
use devices::virtio::vsock::DEVICE_TYPE_VSOCK;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::{Machine, MachineError, VmState};
use crate::config::MachineConfig;
use crate::memory::{GuestMemoryMmap, GuestRam};
use crate::snapshot::MachineState;

const PAGE: u64 = 4096;

/// Why a live clone was refused before anything was copied or forked (or, for
/// `ChildRefused`, when a disk's fork child could not be swapped in).
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// `CloneOptions::disk_dirs` does not give one pair per attached disk.
    #[error("{pairs} disk directory pairs for {disks} disks")]
    DiskDirs {
        /// Pairs given.
        pairs: usize,
        /// Disks attached.
        disks: usize,
    },
    /// The clone's config would not give it the source's virtio devices (types in order).
    #[error("the clone would have virtio devices {clone:?}, the source has {have:?}")]
    Devices {
        /// The clone's.
        clone: Vec<u32>,
        /// The source's.
        have: Vec<u32>,
    },
    /// A disk is attached read-only: only writable deltas are forked.
    #[error("disk {0} is attached read-only: only writable deltas are forked for a clone")]
    ReadOnlyDisk(PathBuf),
    /// The running device refused a fork child (size or writability differs).
    #[error("the fork child of {0} differs in size or writability")]
    ChildRefused(PathBuf),
}

/// How to clone a running machine.
#[derive(Debug)]
pub struct CloneOptions {
    /// The clone's configuration: its console target and vsock device (give it its own CID and
    /// socket). Its `disks` are ignored: the clone gets fork children of the source's disks.
    pub config: MachineConfig,
    /// The clone's serial output, overriding `config.console` (tests pass a buffer).
    pub console: Option<SerialOutput>,
    /// Per attached disk of the source: the new directory for the source's own child delta and
    /// the one for the clone's child delta.
    pub disk_dirs: Vec<(PathBuf, PathBuf)>,
    /// At most this many pre-copy rounds after the first full copy.
    pub max_rounds: usize,
    /// Stop pre-copying once a round finds at most this many dirty pages.
    pub converge_pages: u64,
}

impl CloneOptions {
    /// Defaults: 8 rounds at most, converged at 256 dirty pages (1 MiB), no disks.
    pub fn new(config: MachineConfig) -> Self {
        Self {
            config,
            console: None,
            disk_dirs: Vec::new(),
            max_rounds: 8,
            converge_pages: 256,
        }
    }
}

/// One copy round of a live clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneRound {
    /// Pages copied.
    pub pages: u64,
    /// How long the round took.
    pub duration: Duration,
}

/// What a live clone did and how long each phase took.
#[derive(Debug, Clone, Default)]
pub struct CloneTimeline {
    /// Rounds while the source ran: the first copies all of RAM, the others the pages dirtied
    /// since the round before.
    pub rounds: Vec<CloneRound>,
    /// Pages copied with the source paused.
    pub final_pages: u64,
    /// Creating the disk fork children's files, before the pre-copy (the source runs).
    pub disk_prepare: Duration,
    /// The final pause: from the pause request until the source runs again (last copy, vCPU
    /// and device state, disk fork cuts).
    pub pause: Duration,
    /// Of which: copying the last dirty pages.
    pub final_copy: Duration,
    /// Of which: reading vCPU, VM and device state.
    pub capture: Duration,
    /// Of which: cutting the disk forks (freezing each layer in memory) and swapping this
    /// machine's devices onto their new children. No disk I/O.
    pub disk_fork: Duration,
    /// Making the disk forks durable after the pause (parent freeze, children's meta; the
    /// source runs, and its disk flushes wait for this).
    pub disk_commit: Duration,
    /// Building the clone machine from the captured state (the source runs meanwhile).
    pub build: Duration,
    /// The whole clone.
    pub total: Duration,
}

/// Copies every page whose bit is set in `bits` (one bit per page, from `start` in `region`).
fn copy_bits(
    src: &crate::memory::GuestRegionMmap,
    dst: &crate::memory::GuestRegionMmap,
    bits: &[u64],
) -> u64 {
    let pages = src.len() / PAGE;
    let mut copied = 0;
    let mut p = 0u64;
    while p < pages {
        let word = bits.get((p / 64) as usize).copied().unwrap_or(0);
        if word == 0 && p.is_multiple_of(64) {
            p += 64;
            continue;
        }
        if word & (1 << (p % 64)) == 0 {
            p += 1;
            continue;
        }
        // A run of set bits.
        let first = p;
        while p < pages && bits.get((p / 64) as usize).copied().unwrap_or(0) & (1 << (p % 64)) != 0
        {
            p += 1;
        }
        copy_range(src, dst, first * PAGE, (p - first) * PAGE);
        copied += p - first;
    }
    copied
}

fn copy_range(
    src: &crate::memory::GuestRegionMmap,
    dst: &crate::memory::GuestRegionMmap,
    off: u64,
    len: u64,
) {
    // u64 to usize is lossless on x86_64, the only target.
    #[allow(clippy::cast_possible_truncation)]
    let len = len as usize;
    let (Ok(s), Ok(d)) = (
        src.get_slice(MemoryRegionAddress(off), len),
        dst.get_slice(MemoryRegionAddress(off), len),
    ) else {
        // Both regions have the same layout, so in-range slices always exist.
        return;
    };
    s.copy_to_volatile_slice(d);
}

fn bitmap(region: &crate::memory::GuestRegionMmap) -> &AtomicBitmap {
    let m: &MmapRegion<AtomicBitmap> = region;
    m.bitmap()
}

/// Copies the pages dirtied since the last call (KVM's log for vCPU writes, the regions'
/// `AtomicBitmap` for the VMM's own writes) from `src` to `dst`.
fn copy_dirty(m: &Machine, dst: &GuestMemoryMmap) -> Result<u64, MachineError> {
    let log = m.vm.dirty_log()?;
    let mut copied = 0;
    for ((slot, kvm_bits), (s, d)) in log.iter().zip(m.memory().iter().zip(dst.iter())) {
        debug_assert_eq!(slot.guest_addr, s.start_addr().0);
        let mut bits = bitmap(s).get_and_reset();
        bits.resize(kvm_bits.len().max(bits.len()), 0);
        for (b, k) in bits.iter_mut().zip(kvm_bits) {
            *b |= k;
        }
        copied += copy_bits(s, d, &bits);
    }
    Ok(copied)
}

/// Removes a fork child of a clone that never ran (it holds nothing), first taking it out of
/// its fork's commit so that the source's child still commits.
fn drop_clone_child(layer: Arc<Layer>, commit: &ForkCommit) {
    let dir = layer.path().to_owned();
    commit.abandon(&dir);
    drop(layer);
    let _ = std::fs::remove_dir_all(dir);
}

/// Per disk, in order: this machine's child, the clone's child, and the commit of their fork.
type ForkedDisks = Vec<(Arc<Layer>, Arc<Layer>, Arc<ForkCommit>)>;

impl Machine {
    /// Clones this running machine in-process. Guest RAM is copied into a new memfd while the
    /// guest runs (a full copy, then rounds of the pages KVM and the VMM's bitmap saw dirtied,
    /// until a round is small or `max_rounds` is reached); then the vCPUs are paused, device
    /// workers held off their queues, the last dirty pages copied, vCPU/VM/device state read,
    /// and each disk forked (the current layer frozen; this machine's device swapped onto its
    /// own new child); then this machine resumes. The clone is built from the captured state
    /// and returned `Booted` (start it with [`Machine::start`]), with the timeline.
    pub fn clone_running(
        &mut self,
        opts: CloneOptions,
    ) -> Result<(Machine, CloneTimeline), MachineError> {
        if self.state != VmState::Running {
            return Err(MachineError::InvalidTransition {
                from: self.state,
                to: VmState::Paused,
            });
        }
        if opts.disk_dirs.len() != self.devices.disks.len() {
            return Err(CloneError::DiskDirs {
                pairs: opts.disk_dirs.len(),
                disks: self.devices.disks.len(),
            }
            .into());
        }
        // The clone gets the source's disks (forked), the config's NICs (its own TAPs; the
        // source's addresses unless the config gives others) and the config's vsock: check up
        // front that
        // this gives the source's virtio devices, before any copying or forking.
        let want: Vec<u32> = std::iter::repeat_n(DEVICE_TYPE_BLOCK, self.devices.disks.len())
            .chain(std::iter::repeat_n(DEVICE_TYPE_NET, opts.config.net.len()))
            .chain(opts.config.vsock.as_ref().map(|_| DEVICE_TYPE_VSOCK))
            .collect();
        let have: Vec<u32> = self.devices.virtio_types();
        if want != have {
            return Err(CloneError::Devices { clone: want, have }.into());
        }
        if let Some(d) = self
            .devices
            .disks
            .iter()
            .find(|d| block::Disk::is_read_only(d.layer.as_ref()))
        {
            return Err(CloneError::ReadOnlyDisk(d.layer.path().to_owned()).into());
        }
        let t0 = Instant::now();
        let mut tl = CloneTimeline::default();
        // The slow part of each disk fork (creating the children's files) happens now, while
        // the source runs; a failure here changes nothing.
        let tp = Instant::now();
        let mut prepared = Vec::with_capacity(self.devices.disks.len());
        for (disk, (dir_mine, dir_theirs)) in self.devices.disks.iter().zip(&opts.disk_dirs) {
            let p = block::prepare_fork(disk.layer.clone(), dir_mine, dir_theirs).map_err(
                |source| MachineError::Disk {
                    path: disk.layer.path().to_owned(),
                    source,
                },
            )?;
            prepared.push(p);
        }
        tl.disk_prepare = tp.elapsed();
        let ram = GuestRam::new(self.vm.ram().size())?;
        let dst = ram.memory().clone();

        let was_logging = self.vm.dirty_logging();
        self.vm.set_dirty_logging(true)?;
        let result = self.precopy_and_capture(&dst, &opts, prepared, &mut tl);
        let logging_off = if was_logging {
            Ok(())
        } else {
            self.vm.set_dirty_logging(false)
        };
        let (state, forked) = result?;
        // The forks are cut: make them durable while the source runs (its disk flushes wait
        // for this, so nothing it writes is reported durable before its fork is).
        let tc = Instant::now();
        let mut theirs = Vec::with_capacity(forked.len());
        let mut commits = Vec::with_capacity(forked.len());
        let mut committed = Ok(());
        for (mine, clone_child, commit) in forked {
            if committed.is_ok() {
                committed = commit.commit().map_err(|source| MachineError::Disk {
                    path: mine.path().to_owned(),
                    source,
                });
            }
            theirs.push(clone_child);
            commits.push(commit);
        }
        tl.disk_commit = tc.elapsed();
        let cleanup = |theirs: Vec<Arc<Layer>>| {
            for (layer, commit) in theirs.into_iter().zip(&commits) {
                drop_clone_child(layer, commit);
            }
        };
        if let Err(e) = committed.and(logging_off.map_err(MachineError::from)) {
            // The source keeps its children (a later flush of theirs retries the commit).
            cleanup(theirs);
            return Err(e);
        }

        let tb = Instant::now();
        let CloneOptions {
            config, console, ..
        } = opts;
        let clone = match Machine::from_state(config, console, ram, Some(theirs.clone()), &state) {
            Ok(c) => c,
            Err(e) => {
                cleanup(theirs);
                return Err(e);
            }
        };
        tl.build = tb.elapsed();
        tl.total = t0.elapsed();
        Ok((clone, tl))
    }

    fn precopy_and_capture(
        &mut self,
        dst: &GuestMemoryMmap,
        opts: &CloneOptions,
        prepared: Vec<PreparedFork>,
        tl: &mut CloneTimeline,
    ) -> Result<(MachineState, ForkedDisks), MachineError> {
        // Round 0: clear both logs, then copy everything.
        let r0 = Instant::now();
        self.vm.dirty_log()?;
        for s in self.memory().iter() {
            bitmap(s).reset();
        }
        let mut pages = 0;
        for (s, d) in self.memory().iter().zip(dst.iter()) {
            copy_range(s, d, 0, s.len());
            pages += s.len() / PAGE;
        }
        tl.rounds.push(CloneRound {
            pages,
            duration: r0.elapsed(),
        });
        for _ in 0..opts.max_rounds {
            let r = Instant::now();
            let pages = copy_dirty(self, dst)?;
            tl.rounds.push(CloneRound {
                pages,
                duration: r.elapsed(),
            });
            if pages <= opts.converge_pages {
                break;
            }
        }

        let p0 = Instant::now();
        self.pause()?;
        let mut forked = Vec::with_capacity(prepared.len());
        let captured = self.final_phase(dst, prepared, &mut forked, tl);
        let resumed = self.resume();
        tl.pause = p0.elapsed();
        // Whatever was cut is this machine's disk now, even if a later step failed.
        for (i, (mine, _, _)) in forked.iter().enumerate() {
            self.set_disk_layer(i, mine.clone());
        }
        match captured.and_then(|state| resumed.map(|()| state)) {
            Ok(state) => Ok((state, forked)),
            Err(e) => {
                for (_, theirs, commit) in forked {
                    // Drop the clone's child; keep the source's consistent on disk (if this
                    // commit fails, the source's next flush retries it).
                    drop_clone_child(theirs, &commit);
                    let _ = commit.commit();
                }
                Err(e)
            }
        }
    }

    /// With the vCPUs paused: hold the device workers, copy the last pages, capture state and
    /// cut the disk forks.
    fn final_phase(
        &self,
        dst: &GuestMemoryMmap,
        prepared: Vec<PreparedFork>,
        forked: &mut ForkedDisks,
        tl: &mut CloneTimeline,
    ) -> Result<MachineState, MachineError> {
        self.with_devices_held(|transports, guards| {
            let c = Instant::now();
            tl.final_pages = copy_dirty(self, dst)?;
            tl.final_copy = c.elapsed();
            let k = Instant::now();
            let state = self.capture_locked(transports, guards)?;
            tl.capture = k.elapsed();
            let f = Instant::now();
            self.cut_disks(prepared, forked)?;
            tl.disk_fork = f.elapsed();
            Ok(state)
        })
    }

    /// Cuts every prepared disk fork (no I/O) into `forked`; this machine's devices move to
    /// their first child. After a failure part-way, the disks already cut stay on their new
    /// children (their parents are frozen) and are in `forked`; the others are not forked.
    fn cut_disks(
        &self,
        prepared: Vec<PreparedFork>,
        forked: &mut ForkedDisks,
    ) -> Result<(), MachineError> {
        for (disk, p) in self.devices.disks.iter().zip(prepared) {
            let err = |source| MachineError::Disk {
                path: disk.layer.path().to_owned(),
                source,
            };
            let (a, b, commit) = p.cut().map_err(err)?;
            let a = Arc::new(Layer::Delta(a));
            if disk.slot.swap(a.clone()).is_err() {
                return Err(CloneError::ChildRefused(disk.layer.path().to_owned()).into());
            }
            forked.push((a, Arc::new(Layer::Delta(b)), commit));
        }
        Ok(())
    }
}
