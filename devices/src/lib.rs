//! Device models: legacy (serial, i8042), virtio-mmio, virtio-blk, virtio-vsock.
