#!/usr/bin/env bash
# The test command: sets the machine up, then runs format, lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== release builds carry no test hooks; vmm builds without the test-guest kit"
if cargo tree -p microvmm -e normal,build -f '{p} {f}' | grep -E 'fault-injection|test-hooks'; then
    echo "a release build of microvmm enables a test-only feature" >&2
    exit 1
fi
if cargo tree -p vmm -e normal,build | grep -q vmm-test-guests; then
    echo "vmm depends on the test-guest kit by default" >&2
    exit 1
fi
cargo check -q -p vmm -p guest-agent --lib --bins
echo "== cargo test"
# The tests that need hardware KVM run in the nested harness (scripts/nested.sh: a QEMU TCG level 1
# with AMD-V, one L1 vCPU): `require` makes a harness that cannot run a failure, not a SKIP. The
# real-Linux upgrade runs there too, its guest on one vCPU (about 8 minutes). Each can be overridden
# from the environment (MICROVMM_NESTED=0 skips them).
export MICROVMM_NESTED=${MICROVMM_NESTED:-require}
export MICROVMM_NESTED_UPGRADE=${MICROVMM_NESTED_UPGRADE:-1}
export MICROVMM_TEST_LINUX_VCPUS=${MICROVMM_TEST_LINUX_VCPUS:-1}
cargo test --workspace --no-fail-fast
