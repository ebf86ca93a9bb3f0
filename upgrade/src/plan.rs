//! The upgrade plan ([`UpgradePlan`]): what to run in the backup, who owns which disk ranges,
//! the workload to move and the limits. Read from JSON; checked against the machine before
//! anything starts ([`UpgradePlan::validate`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use block::merge::{OwnershipMap, Policy, Side};
use serde::{Deserialize, Serialize};
use vmm::Machine;
use vmm::config::{ConsoleTarget, KernelSource};

/// A plan field that is wrong, and why.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read.
    #[error("cannot read plan {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The JSON or TOML does not parse or has an unknown/mistyped field (serde names it).
    #[error("plan {path}: {message}")]
    Parse {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// serde's message, with line and column.
        message: String,
    },
    /// A field has an invalid value.
    #[error("plan field `{field}`: {reason}")]
    Field {
        /// The field, e.g. `disks[0].ownership[1].len`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn field(field: impl Into<String>, reason: impl Into<String>) -> PlanError {
    PlanError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A byte count: a JSON number, or a string with an optional K/M/G/T suffix (`"1M"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "u64")]
pub struct Size(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Num(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for Size {
    type Error = String;
    fn try_from(r: SizeRepr) -> Result<Self, String> {
        match r {
            SizeRepr::Num(n) => Ok(Size(n)),
            SizeRepr::Text(t) => block::merge::parse_size(&t)
                .map(Size)
                .ok_or_else(|| format!("invalid size {t:?} (a number, or with K/M/G/T)")),
        }
    }
}

impl From<Size> for u64 {
    fn from(s: Size) -> u64 {
        s.0
    }
}

/// A command the backup runs (through its guest agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Longest run allowed, in milliseconds (default 10 minutes).
    #[serde(default = "default_command_timeout")]
    pub timeout_ms: u64,
}

fn default_command_timeout() -> u64 {
    600_000
}

/// Who owns a disk range at the merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// The active VM (its writes are kept; e.g. the application's data volume).
    Active,
    /// The upgrade (its writes are kept; e.g. the OS volume).
    Upgrade,
}

/// A byte range of a disk and its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnedRange {
    /// Start (4 KiB aligned; default 0).
    #[serde(default = "zero_size")]
    pub offset: Size,
    /// Length (4 KiB aligned); absent: to the end of the disk.
    #[serde(default)]
    pub len: Option<Size>,
    /// The owner.
    pub owner: Owner,
}

fn zero_size() -> Size {
    Size(0)
}

/// How conflicts of one disk are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergePolicy {
    /// Non-owner writes are resolved to the owner's side; conflicts in unowned ranges fail.
    #[default]
    OwnerWins,
    /// Any non-owner write (or differing write in an unowned range) fails the upgrade.
    Ownership,
    /// Any block both sides wrote differently fails the upgrade.
    Fail,
    /// Conflicts take the active VM's content.
    PreferActive,
    /// Conflicts take the upgrade's content.
    PreferUpgrade,
}

/// One disk of the machine, in attach order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DiskPlan {
    /// Owned ranges (may be empty: then only the policy decides).
    #[serde(default)]
    pub ownership: Vec<OwnedRange>,
    /// The conflict policy.
    #[serde(default)]
    pub policy: MergePolicy,
}

/// The application to move and the VMM resources it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Guest vsock port of the guest agent (the active's and the backup's).
    pub agent_port: u32,
    /// Guest vsock ports of the service: their host connections move to the backup at the
    /// cutover (and with them the host listener, so new clients reach the backup).
    #[serde(default)]
    pub vsock_ports: Vec<u32>,
    /// The service's address, for people (e.g. `vsock:5000` or `10.0.0.2:8080`).
    #[serde(default)]
    pub service: Option<String>,
    /// The guest agent's workload description (its `WorkloadSpec`), for agents that start and
    /// checkpoint processes (CRIU); passed through unchanged.
    #[serde(default)]
    pub spec: Option<serde_json::Value>,
}

/// Limits of the upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The longest cutover allowed (from freezing the workload to resuming the backup), ms.
    /// Exceeded: the upgrade rolls back before its commit point.
    #[serde(default = "default_cutover")]
    pub max_cutover_ms: u64,
    /// Longest wait for one guest agent answer (other than a backup command), ms.
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout_ms: u64,
    /// Longest merge phase (first merge and catch-up rounds), ms.
    #[serde(default = "default_merge_timeout")]
    pub merge_timeout_ms: u64,
    /// Catch-up has converged once a round copies at most this many bytes.
    #[serde(default = "default_converge")]
    pub converge_bytes: Size,
    /// At most this many catch-up rounds before the cutover.
    #[serde(default = "default_rounds")]
    pub max_catch_up_rounds: u32,
}

fn default_cutover() -> u64 {
    2_000
}
fn default_agent_timeout() -> u64 {
    10_000
}
fn default_merge_timeout() -> u64 {
    600_000
}
fn default_converge() -> Size {
    Size(1 << 20)
}
fn default_rounds() -> u32 {
    8
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_cutover_ms: default_cutover(),
            agent_timeout_ms: default_agent_timeout(),
            merge_timeout_ms: default_merge_timeout(),
            converge_bytes: default_converge(),
            max_catch_up_rounds: default_rounds(),
        }
    }
}

/// The backup VM's own devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BackupVm {
    /// Its vsock CID (default: the active's + 1).
    #[serde(default)]
    pub guest_cid: Option<u64>,
    /// Its vsock host socket (default: `<work_dir>/backup.vsock`).
    #[serde(default)]
    pub uds_path: Option<PathBuf>,
    /// Its serial console (default: the file `<work_dir>/backup.console`).
    #[serde(default)]
    pub console: Option<ConsoleTarget>,
}

/// A restart of the backup into another kernel on its upgraded disk, after the commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    /// The kernel (`{"file": PATH}`, or `{"test_guest": NAME}`).
    pub kernel: KernelSource,
    /// Its initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Its command line.
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// Everything one live upgrade needs to know. See the crate documentation for the phases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradePlan {
    /// Commands the backup runs first, right after the clone (its copy of the workload already
    /// stopped), before the upgrade: e.g. unmount what the active side owns, so the backup does
    /// not write it before the cutover. A non-zero exit or timeout rolls the upgrade back.
    #[serde(default)]
    pub prepare_commands: Vec<Command>,
    /// Commands the backup runs in order (the OS upgrade); any non-zero exit or timeout rolls
    /// the upgrade back.
    #[serde(default)]
    pub commands: Vec<Command>,
    /// Commands the backup runs in the cutover, once it has the merged disks and before the
    /// workload is restored there: e.g. mount the volume the active side owned. They count in
    /// the client gap. A non-zero exit or timeout rolls the upgrade back.
    #[serde(default)]
    pub cutover_commands: Vec<Command>,
    /// Restart the backup into a new kernel after the commands.
    #[serde(default)]
    pub restart: Option<Restart>,
    /// One entry per attached disk, in attach order.
    pub disks: Vec<DiskPlan>,
    /// The workload to move.
    pub workload: Workload,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// The backup VM's devices.
    #[serde(default)]
    pub backup: BackupVm,
    /// Where the upgrade journal and the new disk layers go (default: `<first disk>.upgrade`
    /// beside the first disk). Must not hold an unfinished upgrade.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
}

impl UpgradePlan {
    /// Reads a plan from a file: TOML if its name ends in `.toml`, JSON otherwise.
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.to_owned(),
            source,
        })?;
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
        {
            Self::from_toml(&text, path)
        } else {
            Self::from_json(&text, path)
        }
    }

    /// Parses a plan from TOML text (the same fields as the JSON form; `origin` names it in
    /// errors).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, PlanError> {
        toml::from_str(text).map_err(|e| PlanError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    /// Parses a plan from JSON text (`origin` names it in errors).
    pub fn from_json(text: &str, origin: &Path) -> Result<Self, PlanError> {
        serde_json::from_str(text).map_err(|e| PlanError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks the plan against the machine it is to upgrade: one disk plan per attached disk,
    /// ranges aligned and inside their disk, commands non-empty, limits positive, the agent
    /// and service ports on a vsock device the machine has.
    pub fn validate(&self, machine: &Machine) -> Result<(), PlanError> {
        let disks = machine.disks();
        if self.disks.len() != disks.len() {
            return Err(field(
                "disks",
                format!(
                    "{} entries, but the machine has {} disk(s)",
                    self.disks.len(),
                    disks.len()
                ),
            ));
        }
        for (i, (d, attached)) in self.disks.iter().zip(disks).enumerate() {
            d.policy_for(attached.layer.size())
                .map_err(|(f, r)| field(format!("disks[{i}].{f}"), r))?;
        }
        for (name, list) in [
            ("prepare_commands", &self.prepare_commands),
            ("commands", &self.commands),
            ("cutover_commands", &self.cutover_commands),
        ] {
            for (i, c) in list.iter().enumerate() {
                if c.argv.is_empty() || c.argv[0].is_empty() {
                    return Err(field(format!("{name}[{i}].argv"), "empty command"));
                }
                if c.timeout_ms == 0 {
                    return Err(field(format!("{name}[{i}].timeout_ms"), "must be > 0"));
                }
            }
        }
        if let Some(r) = &self.restart {
            if let KernelSource::File(p) = &r.kernel
                && !p.is_file()
            {
                return Err(field(
                    "restart.kernel",
                    format!("{} is not a file", p.display()),
                ));
            }
            if let Some(p) = &r.initrd
                && !p.is_file()
            {
                return Err(field(
                    "restart.initrd",
                    format!("{} is not a file", p.display()),
                ));
            }
        }
        let vsock = machine.config().vsock.as_ref();
        if vsock.is_none() {
            return Err(field(
                "workload.agent_port",
                "the machine has no vsock device to reach a guest agent",
            ));
        }
        if self.workload.agent_port == 0 {
            return Err(field("workload.agent_port", "must be > 0"));
        }
        if self
            .workload
            .vsock_ports
            .contains(&self.workload.agent_port)
        {
            return Err(field(
                "workload.vsock_ports",
                "must not include the agent port (the agent connection stays)",
            ));
        }
        let l = &self.limits;
        for (name, v) in [
            ("limits.max_cutover_ms", l.max_cutover_ms),
            ("limits.agent_timeout_ms", l.agent_timeout_ms),
            ("limits.merge_timeout_ms", l.merge_timeout_ms),
        ] {
            if v == 0 {
                return Err(field(name, "must be > 0"));
            }
        }
        if let (Some(cid), Some(v)) = (self.backup.guest_cid, vsock)
            && (cid == v.guest_cid || cid <= 2)
        {
            return Err(field(
                "backup.guest_cid",
                "must be 3 or above and differ from the active VM's",
            ));
        }
        Ok(())
    }

    /// The agent answer timeout.
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.agent_timeout_ms)
    }
}

impl DiskPlan {
    /// The merge policy of this disk (of `size` bytes), or the failing field and reason.
    pub fn policy_for(&self, size: u64) -> Result<Policy, (String, String)> {
        let mut ranges = Vec::with_capacity(self.ownership.len());
        for (j, r) in self.ownership.iter().enumerate() {
            let off = r.offset.0;
            let len = r.len.map_or(size.saturating_sub(off), |l| l.0);
            let bad = |f: &str, why: String| (format!("ownership[{j}].{f}"), why);
            if off % block::BLOCK_SIZE != 0 {
                return Err(bad("offset", format!("{off} is not 4 KiB aligned")));
            }
            if len == 0 || len % block::BLOCK_SIZE != 0 {
                return Err(bad(
                    "len",
                    format!("{len} is not a positive multiple of 4 KiB"),
                ));
            }
            if off.checked_add(len).is_none_or(|e| e > size) {
                return Err(bad(
                    "len",
                    format!("range {off}+{len} ends past the disk ({size} bytes)"),
                ));
            }
            let side = match r.owner {
                Owner::Active => Side::Active,
                Owner::Upgrade => Side::Upgrade,
            };
            ranges.push((off, len, side));
        }
        let map = || {
            OwnershipMap::new(ranges.clone()).map_err(|e| ("ownership".to_string(), format!("{e}")))
        };
        Ok(match self.policy {
            MergePolicy::OwnerWins => Policy::OwnerWins(map()?),
            MergePolicy::Ownership => Policy::Ownership(map()?),
            MergePolicy::Fail => Policy::Fail,
            MergePolicy::PreferActive => Policy::PreferActive,
            MergePolicy::PreferUpgrade => Policy::PreferUpgrade,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_plan_reads_like_its_json_form_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let plan = crate::demo::plan(&dir.path().join("work"));
        let toml_text = toml::to_string(&plan).unwrap();
        let p = dir.path().join("plan.toml");
        std::fs::write(&p, &toml_text).unwrap();
        let back = UpgradePlan::load(&p).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&plan).unwrap()
        );
        // The same file under a .json name is read as JSON, and refused.
        let j = dir.path().join("plan.json");
        std::fs::write(&j, &toml_text).unwrap();
        assert!(matches!(
            UpgradePlan::load(&j),
            Err(PlanError::Parse { .. })
        ));
        // An unknown field is named, with where it is.
        let bad = format!("{toml_text}\n[limits2]\nmax_cutover_ms = 5\n");
        std::fs::write(&p, bad).unwrap();
        let e = UpgradePlan::load(&p).unwrap_err().to_string();
        assert!(e.contains("limits2") && e.contains("plan.toml"), "{e}");
    }
}
