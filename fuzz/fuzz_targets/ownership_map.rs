//! The ownership map parser (`disk merge --ownership`), and lookups on what it accepts.
#![no_main]

use block::merge::OwnershipMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = OwnershipMap::parse(text);
    }
});
