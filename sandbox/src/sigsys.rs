//! The SIGSYS handler: a filtered thread made a system call its filter does not allow. It
//! writes one line to stderr (the thread kind, the call's number and name), then makes the
//! process end with SIGSYS: the handler is installed with `SA_RESETHAND`, so the disposition is
//! back to the default (terminate with a core dump) when it runs, and it returns to the
//! system-call instruction again (rip moved back over `syscall`, rax still the call's number, as
//! the kernel leaves it for SECCOMP_RET_TRAP), which traps once more, now fatally. The handler
//! itself only calls `write`, which every filter allows.

use crate::filters;

/// Length of the x86_64 `syscall` instruction.
const SYSCALL_INSN_LEN: i64 = 2;

/// Installs the handler for the process.
pub(crate) fn install() -> std::io::Result<()> {
    // SAFETY: `sigaction` is plain data; zeroed is a valid initial value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: `act` is fully initialized; the handler is async-signal-safe (see on_sigsys).
    let rc = unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A fixed buffer the line is formatted into (no allocation in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for an SA_SIGINFO handler, owned by this
    // handler's frame until it returns.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let nr = uc.uc_mcontext.gregs[libc::REG_RAX as usize];
    let kind = crate::KIND.with(std::cell::Cell::get);
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"microvmm: seccomp: ");
    match kind {
        Some(k) => {
            // "an api", "an upgrade", "a vcpu".
            let vowel = k.name().starts_with(['a', 'e', 'i', 'o', 'u']);
            line.push(if vowel { &b"an "[..] } else { &b"a "[..] });
            line.push(k.name().as_bytes());
            line.push(b" thread");
        }
        // A thread started by a filtered one without `sandbox::spawn` (tiny_http's, an
        // upgrade's): its creator's filter.
        None => line.push(b"a thread with an inherited filter"),
    }
    line.push(b" made system call ");
    line.push_num(u64::from_ne_bytes(nr.to_ne_bytes())); // same bits as `as`
    if let Some(name) = filters::name_of(nr) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    line.push(b", which its filter forbids: ending the process with SIGSYS\n");
    // SAFETY: write(2) on stderr from a buffer of `len` initialized bytes (async-signal-safe).
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    // Run the call again: it traps again, with SIGSYS at its default action now.
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] -= SYSCALL_INSN_LEN;
}
