//! 8250/16550 UART on COM1 (`vm-superio`), writing the guest's output to stdout, a file or a
//! shared buffer; its interrupt is an eventfd the VMM wires to the irqchip (irqfd).

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Creating or cloning the interrupt eventfd failed.
    #[error("cannot create serial interrupt eventfd")]
    EventFd(#[source] io::Error),
    /// Queueing input bytes failed.
    #[error("cannot queue serial input: {0}")]
    Input(String),
    /// A saved state cannot be restored (e.g. an oversized receive FIFO).
    #[error("cannot restore serial state: {0}")]
    Restore(String),
}

/// Saved registers and receive FIFO of the UART.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// An interrupt line as an eventfd (registered by the VMM as an irqfd).
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl IrqTrigger {
    /// A new non-blocking eventfd trigger.
    pub fn new() -> Result<Self, SerialError> {
        EventFd::new(libc::EFD_NONBLOCK)
            .map(Self)
            .map_err(SerialError::EventFd)
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Bytes captured from the guest (tests read them).
pub type SharedBuffer = Arc<Mutex<Vec<u8>>>;

/// Where the guest's serial output goes.
#[derive(Debug)]
pub enum SerialOutput {
    /// The VMM's stdout.
    Stdout,
    /// A file.
    File(File),
    /// An in-memory buffer.
    Buffer(SharedBuffer),
    /// Dropped.
    Sink,
}

/// Counters of a serial output, shared with whoever wants to watch it.
#[derive(Debug, Default)]
pub struct SerialSinkStats {
    first_byte: OnceLock<Instant>,
}

impl SerialSinkStats {
    /// When the guest wrote its first byte, if it has.
    pub fn first_byte_at(&self) -> Option<Instant> {
        self.first_byte.get().copied()
    }
}

struct Sink {
    out: SerialOutput,
    stats: Arc<SerialSinkStats>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            let _ = self.stats.first_byte.set(Instant::now());
        }
        match &mut self.out {
            SerialOutput::Stdout => {
                let mut s = io::stdout().lock();
                s.write_all(buf)?;
                s.flush()?;
            }
            SerialOutput::File(f) => f.write_all(buf)?,
            SerialOutput::Buffer(b) => b
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf),
            SerialOutput::Sink => {}
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            SerialOutput::Stdout => io::stdout().flush(),
            SerialOutput::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

/// COM1: an 8250 UART on the port I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, Sink>,
    stats: Arc<SerialSinkStats>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART writing to `out` and raising `irq` on interrupts.
    pub fn new(irq: IrqTrigger, out: SerialOutput) -> Self {
        let stats = Arc::new(SerialSinkStats::default());
        let sink = Sink {
            out,
            stats: Arc::clone(&stats),
        };
        Self {
            serial: Serial::new(irq, sink),
            stats,
        }
    }

    /// The eventfd that signals the UART's interrupt.
    pub fn irq_evt(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }

    /// Output statistics (first byte time).
    pub fn stats(&self) -> Arc<SerialSinkStats> {
        Arc::clone(&self.stats)
    }

    /// Queues bytes for the guest to read (console input); returns how many fit in the
    /// 64-byte receive FIFO (0 while it is full: retry once the guest has read some).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => Ok(n),
            Err(vm_superio::serial::Error::FullFifo) => Ok(0),
            Err(e) => Err(SerialError::Input(format!("{e:?}"))),
        }
    }
}

impl crate::persist::Versioned for SerialDeviceState {
    const KIND: &'static str = "serial";
    const VERSION: u32 = 1;
}

impl crate::persist::Persist for SerialDevice {
    type State = SerialDeviceState;
    type Error = SerialError;

    /// The UART's registers and receive FIFO.
    fn save(&self) -> Result<SerialDeviceState, SerialError> {
        let s = self.serial.state();
        Ok(SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    /// Puts the saved registers and FIFO into this UART, which keeps its output and interrupt
    /// line (the interrupt is raised at once if the state has one pending). A state the UART
    /// cannot take (a FIFO over its size) is refused and changes nothing.
    fn restore(&mut self, state: &SerialDeviceState) -> Result<(), SerialError> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let irq = |evt: &EventFd| {
            evt.try_clone()
                .map(IrqTrigger)
                .map_err(SerialError::EventFd)
        };
        // Checked on a scratch UART first, so a refused state leaves this one as it was.
        let scratch = Sink {
            out: SerialOutput::Sink,
            stats: Arc::default(),
        };
        // Its own eventfd: a pending interrupt in the state must not reach the live line twice.
        let scratch_irq = IrqTrigger::new()?;
        Serial::from_state(&s, scratch_irq, NoEvents, scratch)
            .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        let trigger = irq(&self.serial.interrupt_evt().0)?;
        let out = std::mem::replace(&mut self.serial.writer_mut().out, SerialOutput::Sink);
        let sink = Sink {
            out,
            stats: Arc::clone(&self.stats),
        };
        self.serial = Serial::from_state(&s, trigger, NoEvents, sink)
            .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn name(&self) -> &str {
        "serial"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset))
            && let Err(e) = self.serial.write(off, value)
        {
            tracing::warn!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;

    #[test]
    fn transmits_to_buffer_and_records_first_byte() {
        let buf = SharedBuffer::default();
        let mut dev = SerialDevice::new(
            IrqTrigger::new().unwrap(),
            SerialOutput::Buffer(buf.clone()),
        );
        assert!(dev.stats().first_byte_at().is_none());
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*buf.lock().unwrap(), b"hi\n");
        assert!(dev.stats().first_byte_at().is_some());
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn save_and_restore_keep_registers_and_pending_input() {
        let mut dev = SerialDevice::new(IrqTrigger::new().unwrap(), SerialOutput::Sink);
        dev.write(7, &[0x5a]); // scratch
        dev.write(3, &[0x1b]); // LCR: 8 data bits, 2 stop bits, even parity
        dev.enqueue_input(b"ab").unwrap();
        let state = dev.save().unwrap();
        assert_eq!(state.in_buffer, b"ab");
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        let mut restored = SerialDevice::new(IrqTrigger::new().unwrap(), SerialOutput::Sink);
        restored.restore(&back).unwrap();
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(3, &mut b);
        assert_eq!(b[0], 0x1b);
        restored.read(0, &mut b);
        assert_eq!(b[0], b'a');
        let too_big = SerialDeviceState {
            in_buffer: vec![0; 4096],
            ..state
        };
        assert!(matches!(
            restored.restore(&too_big),
            Err(SerialError::Restore(_))
        ));
        // The refused state changed nothing.
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
    }

    /// The Linux 8250 driver transmits from its interrupt handler: it enables the THRE
    /// interrupt and waits for it, so enabling it with the transmitter empty must raise it at
    /// once (and again after each byte while it stays enabled).
    #[test]
    fn enabling_thre_interrupt_raises_it_when_transmitter_is_empty() {
        let mut dev = SerialDevice::new(IrqTrigger::new().unwrap(), SerialOutput::Sink);
        let pending = |dev: &SerialDevice| dev.irq_evt().read().is_ok();
        assert!(!pending(&dev));
        dev.write(1, &[0x02]); // IER: THRI
        assert!(pending(&dev), "THRE interrupt on enable");
        let mut iir = [0u8];
        dev.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR: THR empty");
        dev.read(2, &mut iir);
        assert_eq!(iir[0] & 0x01, 0x01, "read IIR acknowledges it");
        dev.write(0, b"a");
        assert!(pending(&dev), "THRE interrupt after a byte");
        dev.write(1, &[0x00]);
        dev.write(0, b"b");
        assert!(!pending(&dev), "none while disabled");
    }

    #[test]
    fn full_receive_fifo_takes_nothing() {
        let mut dev = SerialDevice::new(IrqTrigger::new().unwrap(), SerialOutput::Sink);
        let line = [b'x'; 100];
        assert_eq!(dev.enqueue_input(&line).unwrap(), 64);
        assert_eq!(dev.enqueue_input(&line).unwrap(), 0, "full: retry later");
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(dev.enqueue_input(&line).unwrap(), 1);
    }

    #[test]
    fn input_reaches_receive_register() {
        let mut dev = SerialDevice::new(IrqTrigger::new().unwrap(), SerialOutput::Sink);
        assert_eq!(dev.enqueue_input(b"x").unwrap(), 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }
}
