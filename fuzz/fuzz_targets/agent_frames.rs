//! The agent protocol: a stream of frames read until it fails, message frames decoded as the
//! agent's requests and the host's responses.
#![no_main]

use guest_agent::protocol::{self, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(frame) = protocol::read_frame(&mut r) {
        let _ = protocol::decode_message::<Request>(&frame);
        let _ = protocol::decode_message::<Response>(&frame);
    }
});
