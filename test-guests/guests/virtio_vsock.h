/*
 * virtio-vsock packet header and operations (virtio 1.2 section 5.10), shared by the kit's
 * vsock guests.
 */
#ifndef MICROVMM_VIRTIO_VSOCK_H
#define MICROVMM_VIRTIO_VSOCK_H

#include "kit.h"

#define HOST_CID 2
#define HDR_LEN 44
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define EVENT_TRANSPORT_RESET 0

struct hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct hdr) == HDR_LEN, "vsock header is 44 bytes");

#endif
