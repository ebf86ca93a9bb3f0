//! An NBD server exporting layers: any NBD client (QEMU, nbd-client, libnbd tools) can read a
//! layer or write a delta, with writes going through the dirty-extent journal.
//!
//! Fixed newstyle handshake with `NBD_OPT_GO`/`INFO`/`LIST`/`EXPORT_NAME`, simple replies;
//! READ, WRITE (with FUA), FLUSH, TRIM and WRITE_ZEROES.

pub mod proto;
mod server;

pub use server::{
    CONNECTION_BUFFER_BOUND, DEFAULT_MAX_CONNECTIONS, IO_CHUNK, Listener, NbdError, NbdLimits,
    NbdServer,
};
