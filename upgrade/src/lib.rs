//! The upgrade orchestrator: the seven steps of a live guest-OS upgrade.
