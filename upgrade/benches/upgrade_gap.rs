//! The client gap of the live upgrade against a stop-and-copy cutover of the same VM, in the
//! same run. A bench binary (`cargo bench -p upgrade --bench upgrade_gap`): each run boots
//! the `service` guest with a client sending requests without pause; `UPGRADE_BENCH_RUNS`
//! (default 10) runs of each. Prints the median and worst client gap of each, the ratio of
//! the medians, the upgrade's total and each phase's share of it. Targets: median gap
//! <= 10 ms and <= 0.1x the stop-and-copy gap.

use std::time::Duration;

use upgrade::demo;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if !vmm_test_guests::kvm_or_skip("upgrade_gap bench") {
        return;
    }
    // `cargo bench` passes `--bench`; nothing else is taken.
    let runs: usize = std::env::var("UPGRADE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let (mut live, mut sac, mut sac_cut, mut totals) = (vec![], vec![], vec![], vec![]);
    let mut shares: std::collections::BTreeMap<&'static str, Duration> = Default::default();
    for i in 0..runs {
        // Alternate which goes first.
        for first in [i % 2 == 0, i % 2 != 0] {
            let dir = tempfile::tempdir().expect("tempdir");
            if first {
                let o = demo::run(dir.path(), |_, _| {}).expect("live upgrade");
                live.push(o.client.gap);
                totals.push(o.report.total);
                for p in &o.report.phases {
                    *shares.entry(p.phase.name()).or_default() += p.duration;
                }
            } else {
                let (st, cut) = demo::stop_and_copy(dir.path()).expect("stop-and-copy");
                sac.push(st.gap);
                sac_cut.push(cut);
            }
        }
    }
    let (lm, lw) = (median(&mut live), live[live.len() - 1]);
    let (sm, sw) = (median(&mut sac), sac[sac.len() - 1]);
    let total = median(&mut totals);
    println!("runs: {runs} of each, alternating");
    println!(
        "live upgrade  client gap: median {:.2} ms, worst {:.2} ms",
        ms(lm),
        ms(lw)
    );
    println!(
        "stop-and-copy client gap: median {:.2} ms, worst {:.2} ms (cutover median {:.2} ms)",
        ms(sm),
        ms(sw),
        ms(median(&mut sac_cut))
    );
    println!(
        "ratio live / stop-and-copy (medians): {:.3}  [target <= 0.1; median gap target <= 10 ms]",
        lm.as_secs_f64() / sm.as_secs_f64()
    );
    println!(
        "live upgrade total: median {:.1} ms; share of each phase:",
        ms(total)
    );
    let all: Duration = shares.values().sum();
    for (name, d) in shares {
        println!(
            "  {name:<16} {:5.1} %",
            100.0 * d.as_secs_f64() / all.as_secs_f64()
        );
    }
}
