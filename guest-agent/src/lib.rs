//! The guest agent: runs inside the guest and checkpoints/restores the application.
