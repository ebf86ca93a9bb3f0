//! Which instructions this host's KVM executes at CPL0 (the `insn_probe` test guest, one VM per
//! failure). Prints the table; asserts that plain integer code runs, that the deliberate `ud2`
//! faults, and that on an emulating host the instructions the CPUID policy hides (popcnt,
//! cmpxchg16b) are indeed ones its emulator cannot run.

use microvmm_tests::kvm_or_skip;
use microvmm_tests::probes::{ProbeOutcome, run_insn_probes};
use vmm::cpuid::HostKvm;

#[test]
fn cpl0_instruction_table() {
    if !kvm_or_skip("cpl0_instruction_table") {
        return;
    }
    let results = run_insn_probes().unwrap();
    for (name, outcome) in &results {
        println!("insn_probe: {name:12} {outcome:?}");
    }
    let get = |n: &str| {
        results
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, o)| o.clone())
            .unwrap_or_else(|| panic!("no result for {n}"))
    };
    assert_eq!(results.len(), 38, "every probe has a result");
    for n in [
        "mov_add",
        "imul_div",
        "rep_movsb",
        "cpuid",
        "rdmsr_efer",
        "mov_cr0",
    ] {
        assert_eq!(get(n), ProbeOutcome::Ran, "{n}");
    }
    assert!(
        matches!(
            get("ud2"),
            ProbeOutcome::Fault | ProbeOutcome::EmulationFailure(_)
        ),
        "ud2 must not run"
    );
    if HostKvm::detect() == HostKvm::Emulating {
        match get("popcnt") {
            ProbeOutcome::EmulationFailure(b) => assert_eq!(&b[..4], &[0xf3, 0x48, 0x0f, 0xb8]),
            other => panic!("popcnt: {other:?}"),
        }
        assert!(matches!(
            get("cmpxchg16b"),
            ProbeOutcome::EmulationFailure(_)
        ));
    }
}
