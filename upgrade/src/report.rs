//! What one upgrade did: phases with their durations and figures, the clone pause, the merge
//! rounds, the cutover; printable as a table or JSON.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::phase::Phase;

/// One phase's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseTiming {
    /// The phase.
    pub phase: Phase,
    /// How long it took.
    #[serde(serialize_with = "ser_ms", deserialize_with = "de_ms")]
    pub duration: Duration,
    /// Guest pages copied (clone).
    pub pages: u64,
    /// Bytes moved (merge, checkpoint image, catch-up).
    pub bytes: u64,
    /// Conflicts seen (merge).
    pub conflicts: u64,
}

/// One merge or catch-up round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergeRound {
    /// Disk index.
    pub disk: usize,
    /// `merge`, `catch-up` or `final catch-up`.
    pub kind: String,
    /// Bytes written to the output.
    pub bytes: u64,
    /// Conflicts (resolved by the policy).
    pub conflicts: u64,
    /// Duration.
    #[serde(serialize_with = "ser_ms", deserialize_with = "de_ms")]
    pub duration: Duration,
}

impl MergeRound {
    /// Throughput in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        let s = self.duration.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e6
        } else {
            0.0
        }
    }
}

/// The report of a finished upgrade.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct UpgradeReport {
    /// Each phase, in order.
    pub phases: Vec<PhaseTiming>,
    /// The live clone's pause of the active VM.
    #[serde(serialize_with = "ser_ms", deserialize_with = "de_ms")]
    pub clone_pause: Duration,
    /// Pre-copy rounds of the clone (pages each).
    pub clone_rounds: Vec<u64>,
    /// Merge and catch-up rounds.
    pub merge_rounds: Vec<MergeRound>,
    /// From freezing the workload to resuming the backup.
    #[serde(serialize_with = "ser_ms", deserialize_with = "de_ms")]
    pub cutover: Duration,
    /// The commit record's durability after the resume (outside the cutover).
    #[serde(serialize_with = "ser_ms", deserialize_with = "de_ms")]
    pub commit: Duration,
    /// The whole upgrade.
    #[serde(serialize_with = "ser_ms", deserialize_with = "de_ms")]
    pub total: Duration,
    /// The VM's disks now (the merged layers).
    pub disks: Vec<PathBuf>,
    /// Bytes of the workload image moved.
    pub image_bytes: u64,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn de_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let ms = f64::deserialize(d)?;
    Duration::try_from_secs_f64(ms / 1e3).map_err(serde::de::Error::custom)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

impl UpgradeReport {
    /// The timeline table people read.
    pub fn table(&self) -> String {
        // `write!` into a String cannot fail: its results are dropped below.
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{:<16} {:>12} {:>9} {:>12} {:>9}",
            "phase", "duration", "pages", "bytes", "conflicts"
        );
        for p in &self.phases {
            let _ = writeln!(
                t,
                "{:<16} {:>12} {:>9} {:>12} {:>9}{}",
                p.phase.name(),
                ms(p.duration),
                p.pages,
                p.bytes,
                p.conflicts,
                if p.phase.in_cutover() {
                    "  (cutover)"
                } else {
                    ""
                }
            );
        }
        let rounds: Vec<String> = self.clone_rounds.iter().map(u64::to_string).collect();
        let _ = writeln!(
            t,
            "clone pause: {} (pre-copy rounds, pages: {})",
            ms(self.clone_pause),
            rounds.join(", ")
        );
        for r in &self.merge_rounds {
            let _ = writeln!(
                t,
                "disk {} {:<15} {:>10} bytes {:>9} {:>8.1} MB/s  {} conflict(s)",
                r.disk,
                r.kind,
                r.bytes,
                ms(r.duration),
                r.mb_per_s(),
                r.conflicts
            );
        }
        let _ = writeln!(
            t,
            "cutover: {} (freeze to resume); commit made durable {} after the resume; total {}",
            ms(self.cutover),
            ms(self.commit),
            ms(self.total)
        );
        t
    }
}
