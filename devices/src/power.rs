//! Power control shared by the devices that end the VM (ACPI sleep control, i8042 reset) and the
//! vCPU exit loop that acts on it.

use std::sync::Mutex;
use std::time::Instant;

/// What the guest asked the platform to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PowerEvent {
    /// Power off (ACPI S5, or the test guests' power-off write).
    PowerOff,
    /// Reset (i8042 pulse-reset line, ACPI reset register).
    Reset,
}

/// Records the first power event the guest requests; later ones are ignored.
#[derive(Debug, Default)]
pub struct PowerControl {
    event: Mutex<Option<(PowerEvent, Instant)>>,
}

impl PowerControl {
    /// No event requested yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `event` unless one is already recorded.
    pub fn request(&self, event: PowerEvent) {
        let mut slot = self.event.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::debug!(?event, "guest power event");
            *slot = Some((event, Instant::now()));
        }
    }

    /// The recorded event, if any.
    pub fn requested(&self) -> Option<PowerEvent> {
        self.event
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(e, _)| e)
    }

    /// When the recorded event was requested.
    pub fn requested_at(&self) -> Option<Instant> {
        self.event
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(_, t)| t)
    }

    /// Forgets the recorded event (for a VM that is restarted or restored).
    pub fn clear(&self) {
        *self.event.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_event_wins() {
        let p = PowerControl::new();
        assert_eq!(p.requested(), None);
        p.request(PowerEvent::Reset);
        p.request(PowerEvent::PowerOff);
        assert_eq!(p.requested(), Some(PowerEvent::Reset));
        p.clear();
        assert_eq!(p.requested(), None);
    }
}
