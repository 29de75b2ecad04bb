/* The NBD wire formats the C request paths use (_nbdwrite.c, _nbdread.c): one request header, and the reply
 * headers they send. overlaybd.export.nbd.protocol declares the same for Python. All fields are big-endian. */
#ifndef OVERLAYBD_NBDWIRE_H
#define OVERLAYBD_NBDWIRE_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

#define SECTOR 512
#define REQUEST_SIZE 28 /* magic 4, flags 2, command 2, handle 8, offset 8, length 4 */
#define REQUEST_MAGIC 0x25609513u
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_FLAG_DF (1 << 2)
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define SIMPLE_SIZE 16 /* magic 4, error 4, handle 8 */
#define STRUCTURED_REPLY_MAGIC 0x668E33EFu
#define CHUNK_SIZE 20 /* magic 4, flags 2, type 2, handle 8, length 4 */
#define OFFSET_DATA_SIZE (CHUNK_SIZE + 8) /* a chunk header, then the offset of the data that follows */
#define REPLY_FLAG_DONE 1
#define REPLY_TYPE_NONE 0
#define REPLY_TYPE_OFFSET_DATA 1

typedef struct {
    uint16_t flags, command;
    uint64_t handle, offset;
    uint32_t length;
} NbdRequest;

static inline uint32_t nbd_be32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return be32toh(v);
}

static inline uint64_t nbd_be64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

/* The request header at p (left bytes from there): 1 with *r filled, 0 if it is not whole or not a request. */
static inline int nbd_parse_request(const unsigned char *p, size_t left, NbdRequest *r) {
    if (left < REQUEST_SIZE || nbd_be32(p) != REQUEST_MAGIC)
        return 0;
    r->flags = (uint16_t)(p[4] << 8 | p[5]);
    r->command = (uint16_t)(p[6] << 8 | p[7]);
    r->handle = nbd_be64(p + 8);
    r->offset = nbd_be64(p + 16);
    r->length = nbd_be32(p + 24);
    return 1;
}

/* A structured reply chunk's header (CHUNK_SIZE bytes at out). */
static inline void nbd_put_chunk(unsigned char *out, uint64_t handle, uint16_t flags, uint16_t type, uint32_t length) {
    uint32_t magic = htobe32(STRUCTURED_REPLY_MAGIC), len = htobe32(length);
    uint16_t f = htobe16(flags), t = htobe16(type);
    uint64_t h = htobe64(handle);
    memcpy(out, &magic, 4);
    memcpy(out + 4, &f, 2);
    memcpy(out + 6, &t, 2);
    memcpy(out + 8, &h, 8);
    memcpy(out + 16, &len, 4);
}

/* A simple reply without error (SIMPLE_SIZE bytes at out). */
static inline void nbd_put_simple(unsigned char *out, uint64_t handle) {
    uint32_t magic = htobe32(SIMPLE_REPLY_MAGIC), error = 0;
    uint64_t h = htobe64(handle);
    memcpy(out, &magic, 4);
    memcpy(out + 4, &error, 4);
    memcpy(out + 8, &h, 8);
}

/* The reply that a request succeeded without data: a simple reply, or a structured NONE chunk with DONE. Its size. */
static inline size_t nbd_put_done(unsigned char *out, uint64_t handle, int structured) {
    if (structured) {
        nbd_put_chunk(out, handle, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        return CHUNK_SIZE;
    }
    nbd_put_simple(out, handle);
    return SIMPLE_SIZE;
}

/* What goes before a read's data: a simple reply, or one OFFSET_DATA chunk with DONE (the whole read in one). */
static inline size_t nbd_read_head_size(int structured) { return structured ? OFFSET_DATA_SIZE : SIMPLE_SIZE; }

static inline void nbd_put_read_head(unsigned char *out, uint64_t handle, uint64_t offset, uint32_t length,
                                     int structured) {
    if (structured) {
        nbd_put_chunk(out, handle, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + length);
        uint64_t o = htobe64(offset);
        memcpy(out + CHUNK_SIZE, &o, 8);
    } else {
        nbd_put_simple(out, handle);
    }
}

#endif
