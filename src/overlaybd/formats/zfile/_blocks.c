/* Runs of ZFile blocks compressed or decompressed in one call, with the GIL released.
 *
 * The Python path pays an interpreter round trip, a fresh bytes object and a copy per block; at 4 KiB blocks
 * that costs as much as LZ4 itself. Here one call handles a whole run: decompress straight into the caller's
 * buffer, check each block's CRC32C, or compress a batch into one output buffer with the CRCs appended.
 *
 * Codecs are the system liblz4 and libzstd; zstd calls go through a table of functions so that a newer libzstd
 * already in the process's reach (the one inside the zstandard wheel, often faster) can replace it. CRC32C is
 * the "raw" form of the reference (register starts at the seed, no final inversion): SSE4.2 with three
 * interleaved streams where the CPU has it, a table otherwise.
 *
 * The Python module overlaybd.formats.zfile.blocks holds the same contract in pure Python and picks this one
 * when it is built; tests run both and compare them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <lz4.h>
#include <zstd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <nmmintrin.h>
#define HAVE_X86_CRC 1
#endif

enum { ALGO_LZ4 = 1, ALGO_ZSTD = 2 };
enum { ST_OK = 0, ST_CRC = 1, ST_CODEC = 2, ST_LENGTH = 3, ST_BOUNDS = 4, ST_TOO_BIG = 5 };
#define CRC_SIZE 4

/* ---- CRC32C, raw form ------------------------------------------------------------------------------------ */

#define POLY 0x82f63b78u /* Castagnoli, reflected */
#define SHORT_RUN 256
#define LONG_RUN 8192

static uint32_t crc_table[8][256];     /* slicing-by-8, the portable path */
static uint32_t short_shift[4][256];   /* "append SHORT_RUN zero bytes" as four byte tables */
static uint32_t long_shift[4][256];    /* "append LONG_RUN zero bytes" */
static int have_hw_crc;

static uint32_t gf2_times(const uint32_t *mat, uint32_t vec) {
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat) {
    for (int n = 0; n < 32; n++)
        square[n] = gf2_times(mat, mat[n]);
}

/* The operator that feeds ``len`` zero bytes (a power of two, at least 1) through the register. */
static void zeros_operator(uint32_t *op, size_t len) {
    uint32_t odd[32], even[32];
    odd[0] = POLY; /* one zero bit */
    for (int n = 1; n < 32; n++)
        odd[n] = 1u << (n - 1);
    gf2_square(even, odd); /* two bits */
    gf2_square(odd, even); /* four bits */
    gf2_square(even, odd); /* one byte */
    uint32_t *cur = even, *next = odd;
    for (; len > 1; len >>= 1) {
        gf2_square(next, cur);
        uint32_t *t = cur;
        cur = next;
        next = t;
    }
    memcpy(op, cur, sizeof(uint32_t) * 32);
}

static void shift_tables(uint32_t table[4][256], size_t len) {
    uint32_t op[32];
    zeros_operator(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        table[0][n] = gf2_times(op, n);
        table[1][n] = gf2_times(op, n << 8);
        table[2][n] = gf2_times(op, n << 16);
        table[3][n] = gf2_times(op, n << 24);
    }
}

static inline uint32_t shift(uint32_t table[4][256], uint32_t crc) {
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? (crc >> 1) ^ POLY : crc >> 1;
        crc_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            crc_table[k][n] = (crc_table[k - 1][n] >> 8) ^ crc_table[0][crc_table[k - 1][n] & 0xff];
    shift_tables(short_shift, SHORT_RUN);
    shift_tables(long_shift, LONG_RUN);
#ifdef HAVE_X86_CRC
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d))
        have_hw_crc = (c & bit_SSE4_2) != 0;
#endif
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc; /* little-endian */
        crc = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^ crc_table[5][(w >> 16) & 0xff] ^
              crc_table[4][(w >> 24) & 0xff] ^ crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
              crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#ifdef HAVE_X86_CRC
/* Three streams side by side hide the instruction's latency; their registers are then joined by shifting. */
__attribute__((target("sse4.2"))) static uint64_t crc_hw_streams(uint64_t c0, const uint8_t **pp, size_t *np,
                                                                   size_t run, uint32_t table[4][256]) {
    const uint8_t *p = *pp;
    size_t n = *np;
    while (n >= 3 * run) {
        uint64_t c1 = 0, c2 = 0;
        const uint8_t *end = p + run;
        do {
            uint64_t w0, w1, w2;
            memcpy(&w0, p, 8);
            memcpy(&w1, p + run, 8);
            memcpy(&w2, p + 2 * run, 8);
            c0 = _mm_crc32_u64(c0, w0);
            c1 = _mm_crc32_u64(c1, w1);
            c2 = _mm_crc32_u64(c2, w2);
            p += 8;
        } while (p < end);
        c0 = shift(table, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift(table, (uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * run;
        n -= 3 * run;
    }
    *pp = p;
    *np = n;
    return c0;
}

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    c = crc_hw_streams(c, &p, &n, LONG_RUN, long_shift);
    c = crc_hw_streams(c, &p, &n, SHORT_RUN, short_shift);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

static uint32_t crc_raw(uint32_t seed, const uint8_t *p, size_t n) {
#ifdef HAVE_X86_CRC
    if (have_hw_crc)
        return crc_hw(seed, p, n);
#endif
    return crc_sw(seed, p, n);
}

static inline uint32_t load_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void store_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* ---- zstd, through a table -------------------------------------------------------------------------- */

typedef struct {
    ZSTD_CCtx *(*createCCtx)(void);
    size_t (*freeCCtx)(ZSTD_CCtx *);
    ZSTD_DCtx *(*createDCtx)(void);
    size_t (*freeDCtx)(ZSTD_DCtx *);
    size_t (*compressCCtx)(ZSTD_CCtx *, void *, size_t, const void *, size_t, int);
    size_t (*decompressDCtx)(ZSTD_DCtx *, void *, size_t, const void *, size_t);
    unsigned (*isError)(size_t);
    const char *(*getErrorName)(size_t);
    size_t (*compressBound)(size_t);
    unsigned (*versionNumber)(void);
    const char *(*versionString)(void);
} ZstdApi;

static ZstdApi zstd = {ZSTD_createCCtx,      ZSTD_freeCCtx, ZSTD_createDCtx,    ZSTD_freeDCtx,
                       ZSTD_compressCCtx,    ZSTD_decompressDCtx, ZSTD_isError, ZSTD_getErrorName,
                       ZSTD_compressBound,   ZSTD_versionNumber,  ZSTD_versionString};
static long zstd_states; /* zstd contexts alive; the table may only change while there are none */

PyDoc_STRVAR(use_zstd_doc,
             "use_zstd(path) -> version: take the zstd functions from the shared object at path instead of the\n"
             "linked libzstd, if it exports them all and is not older. Returns the version in use afterwards.");

static PyObject *use_zstd(PyObject *self, PyObject *args) {
    PyObject *path_obj;
    if (!PyArg_ParseTuple(args, "O&", PyUnicode_FSConverter, &path_obj))
        return NULL;
    void *lib = dlopen(PyBytes_AS_STRING(path_obj), RTLD_NOW | RTLD_LOCAL);
    Py_DECREF(path_obj);
    if (!lib) {
        PyErr_Format(PyExc_OSError, "cannot load %s", dlerror());
        return NULL;
    }
    static const char *const names[] = {"ZSTD_createCCtx",     "ZSTD_freeCCtx",       "ZSTD_createDCtx",
                                        "ZSTD_freeDCtx",       "ZSTD_compressCCtx",   "ZSTD_decompressDCtx",
                                        "ZSTD_isError",        "ZSTD_getErrorName",   "ZSTD_compressBound",
                                        "ZSTD_versionNumber",  "ZSTD_versionString"};
    void *syms[sizeof(names) / sizeof(names[0])];
    _Static_assert(sizeof(syms) == sizeof(ZstdApi), "one symbol per slot");
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (!(syms[i] = dlsym(lib, names[i]))) {
            dlclose(lib);
            PyErr_Format(PyExc_OSError, "the library does not export %s", names[i]);
            return NULL;
        }
    }
    if (zstd_states) {
        dlclose(lib);
        PyErr_SetString(PyExc_RuntimeError, "zstd contexts exist; choose the library before using it");
        return NULL;
    }
    ZstdApi api;
    memcpy(&api, syms, sizeof(api));
    if (api.versionNumber() >= zstd.versionNumber())
        zstd = api; /* the handle stays open for as long as the process runs */
    else
        dlclose(lib);
    return PyUnicode_FromString(zstd.versionString());
}

/* ---- codec contexts ------------------------------------------------------------------------------------ */

/* One per thread (the Python side keeps it thread-local); ``busy`` turns accidental sharing into an error. */
typedef struct {
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    int busy;
} Context;

static const char CONTEXT_NAME[] = "overlaybd.zfile.Context";

static void context_free(PyObject *capsule) {
    Context *ctx = PyCapsule_GetPointer(capsule, CONTEXT_NAME);
    if (!ctx)
        return;
    if (ctx->cctx) {
        zstd.freeCCtx(ctx->cctx);
        zstd_states--;
    }
    if (ctx->dctx) {
        zstd.freeDCtx(ctx->dctx);
        zstd_states--;
    }
    PyMem_RawFree(ctx);
}

static PyObject *new_context(PyObject *self, PyObject *noargs) {
    Context *ctx = PyMem_RawCalloc(1, sizeof(Context));
    if (!ctx)
        return PyErr_NoMemory();
    PyObject *capsule = PyCapsule_New(ctx, CONTEXT_NAME, context_free);
    if (!capsule)
        PyMem_RawFree(ctx);
    return capsule;
}

static Context *take_context(PyObject *capsule) {
    Context *ctx = PyCapsule_GetPointer(capsule, CONTEXT_NAME);
    if (!ctx)
        return NULL;
    if (ctx->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a codec context is in use by another thread");
        return NULL;
    }
    ctx->busy = 1;
    return ctx;
}

/* The context's zstd compressor (or decompressor), made on first use; on failure the context is let go. */
static int zstd_state(Context *ctx, int compress) {
    if (compress ? ctx->cctx != NULL : ctx->dctx != NULL)
        return 0;
    if (compress)
        ctx->cctx = zstd.createCCtx();
    else
        ctx->dctx = zstd.createDCtx();
    if (compress ? ctx->cctx == NULL : ctx->dctx == NULL) {
        ctx->busy = 0;
        PyErr_NoMemory();
        return -1;
    }
    zstd_states++;
    return 0;
}

static int check_algo(int algo) {
    if (algo == ALGO_LZ4 || algo == ALGO_ZSTD)
        return 0;
    PyErr_Format(PyExc_ValueError, "unsupported compression algorithm %d", algo);
    return -1;
}

/* ---- decompress ---------------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *stored;
    size_t stored_len;
    const int64_t *starts;
    Py_ssize_t first, count;
    int64_t base;
    uint8_t *out;
    size_t out_len;
    size_t block_size, last_len;
    int verify, algo;
    ZSTD_DCtx *dctx;
    /* results */
    Py_ssize_t done;
    long long detail;
    const char *message;
} DecompressJob;

static int decompress_run(DecompressJob *j) {
    uint8_t *dst = j->out;
    for (Py_ssize_t i = 0; i < j->count; i++) {
        j->done = i;
        int64_t a = j->starts[j->first + i] - j->base;
        int64_t b = j->starts[j->first + i + 1] - j->base;
        size_t want = i == j->count - 1 ? j->last_len : j->block_size;
        if (a < 0 || b < a || (uint64_t)b > j->stored_len || b - a <= (j->verify ? CRC_SIZE : 0) ||
            (size_t)(dst - j->out) + want > j->out_len)
            return ST_BOUNDS;
        const uint8_t *src = j->stored + a;
        size_t n = (size_t)(b - a);
        if (j->verify) {
            n -= CRC_SIZE;
            uint32_t got = crc_raw(100007u, src, n); /* the seed every ZFile block CRC starts from */
            if (got != load_le32(src + n)) {
                j->detail = got;
                return ST_CRC;
            }
        }
        size_t made;
        if (j->algo == ALGO_LZ4) {
            if (n > INT32_MAX || want > INT32_MAX)
                return ST_BOUNDS;
            int r = LZ4_decompress_safe((const char *)src, (char *)dst, (int)n, (int)want);
            if (r < 0) {
                j->detail = r;
                j->message = "malformed LZ4 block";
                return ST_CODEC;
            }
            made = (size_t)r;
        } else {
            size_t r = zstd.decompressDCtx(j->dctx, dst, want, src, n);
            if (zstd.isError(r)) {
                j->message = zstd.getErrorName(r);
                return ST_CODEC;
            }
            made = r;
        }
        if (made != want) {
            j->detail = (long long)made;
            return ST_LENGTH;
        }
        dst += want;
    }
    j->done = j->count;
    return ST_OK;
}

/* Three contiguous buffers (the last two writable when asked), all or none. */
static int get_buffers(PyObject *const objs[3], Py_buffer views[3], const int writable[3],
                       const char *const names[3]) {
    for (int i = 0; i < 3; i++) {
        if (PyObject_GetBuffer(objs[i], &views[i], PyBUF_C_CONTIGUOUS | (writable[i] ? PyBUF_WRITABLE : 0)) < 0) {
            PyErr_Format(PyExc_TypeError, "%s must be a contiguous%s buffer", names[i],
                         writable[i] ? " writable" : "");
            while (i--)
                PyBuffer_Release(&views[i]);
            return -1;
        }
    }
    return 0;
}

static void release_buffers(Py_buffer views[3]) {
    for (int i = 0; i < 3; i++)
        PyBuffer_Release(&views[i]);
}

PyDoc_STRVAR(decompress_blocks_doc,
             "decompress_blocks(ctx, algo, stored, starts, first, count, base, out, block_size, last_len, verify)"
             " -> (done, status, detail, message)\n\n"
             "Blocks first..first+count-1: block k is stored[starts[k]-base : starts[k+1]-base] (its CRC32C last\n"
             "when verify) and decompresses into out, block_size bytes each, last_len for the last one. Stops at\n"
             "the first failing block: done is how many came out whole, status says why it stopped.");

static PyObject *decompress_blocks(PyObject *self, PyObject *args) {
    PyObject *capsule, *stored_obj, *starts_obj, *out_obj;
    int algo, verify;
    Py_ssize_t first, count, block_size, last_len;
    long long base;
    if (!PyArg_ParseTuple(args, "OiOOnnLOnnp", &capsule, &algo, &stored_obj, &starts_obj, &first, &count, &base,
                          &out_obj, &block_size, &last_len, &verify))
        return NULL;
    if (check_algo(algo) < 0)
        return NULL;
    if (count < 0 || first < 0 || block_size <= 0 || last_len <= 0 || last_len > block_size) {
        PyErr_SetString(PyExc_ValueError, "bad block run");
        return NULL;
    }
    Py_buffer views[3];
    if (get_buffers((PyObject *const[]){stored_obj, starts_obj, out_obj}, views, (const int[]){0, 0, 1},
                    (const char *const[]){"stored", "starts", "out"}) < 0)
        return NULL;
    Py_buffer stored = views[0], starts = views[1], out = views[2];
    PyObject *result = NULL;
    if (starts.itemsize != 8 || starts.len / 8 < first + count + 1) {
        PyErr_SetString(PyExc_ValueError, "starts must be 64-bit integers covering the run and one past it");
        goto done;
    }
    Context *ctx = take_context(capsule);
    if (!ctx)
        goto done;
    if (algo == ALGO_ZSTD && zstd_state(ctx, 0) < 0)
        goto done;
    DecompressJob j = {.stored = stored.buf, .stored_len = (size_t)stored.len, .starts = starts.buf,
                       .first = first, .count = count, .base = base, .out = out.buf, .out_len = (size_t)out.len,
                       .block_size = (size_t)block_size, .last_len = (size_t)last_len, .verify = verify,
                       .algo = algo, .dctx = ctx->dctx};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = decompress_run(&j);
    Py_END_ALLOW_THREADS
    ctx->busy = 0;
    if (status == ST_BOUNDS) {
        PyErr_Format(PyExc_ValueError, "block %zd lies outside the stored or output buffer", first + j.done);
        goto done;
    }
    result = Py_BuildValue("(niLz)", j.done, status, j.detail, j.message);
done:
    release_buffers(views);
    return result;
}

/* ---- compress ------------------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *src;
    size_t src_len, block_size;
    uint8_t *out;
    size_t out_len;
    uint32_t *lengths;
    size_t max_stored;
    int verify, algo, level;
    ZSTD_CCtx *cctx;
    /* results */
    Py_ssize_t done;
    size_t total;
    const char *message;
} CompressJob;

static int compress_run(CompressJob *j) {
    size_t pos = 0, crc = j->verify ? CRC_SIZE : 0;
    Py_ssize_t i = 0;
    for (size_t off = 0; off < j->src_len; off += j->block_size, i++) {
        j->done = i;
        j->total = pos;
        size_t n = j->src_len - off < j->block_size ? j->src_len - off : j->block_size;
        if (j->out_len - pos < crc + 1)
            return ST_BOUNDS;
        size_t cap = j->out_len - pos - crc, made;
        uint8_t *dst = j->out + pos;
        if (j->algo == ALGO_LZ4) {
            if ((size_t)LZ4_compressBound((int)n) > cap)
                return ST_BOUNDS;
            int r = LZ4_compress_default((const char *)j->src + off, (char *)dst, (int)n, (int)cap);
            if (r <= 0) {
                j->message = "LZ4 compression failed";
                return ST_CODEC;
            }
            made = (size_t)r;
        } else {
            if (zstd.compressBound(n) > cap)
                return ST_BOUNDS;
            size_t r = zstd.compressCCtx(j->cctx, dst, cap, j->src + off, n, j->level);
            if (zstd.isError(r)) {
                j->message = zstd.getErrorName(r);
                return ST_CODEC;
            }
            made = r;
        }
        if (j->verify)
            store_le32(dst + made, crc_raw(100007u, dst, made));
        made += crc;
        if (made > j->max_stored)
            return ST_TOO_BIG;
        j->lengths[i] = (uint32_t)made;
        pos += made;
    }
    j->done = i;
    j->total = pos;
    return ST_OK;
}

PyDoc_STRVAR(compress_blocks_doc,
             "compress_blocks(ctx, algo, level, src, block_size, verify, out, lengths, max_stored)"
             " -> (done, total, status, message)\n\n"
             "Compress src in blocks of block_size into out, one after another, each followed by its CRC32C when\n"
             "verify; lengths (32-bit) gets each block's stored length. Stops at a block whose stored length\n"
             "would pass max_stored (status 5). total is the bytes of out used by the first done blocks.");

static PyObject *compress_blocks(PyObject *self, PyObject *args) {
    PyObject *capsule, *src_obj, *out_obj, *lengths_obj;
    int algo, level, verify;
    Py_ssize_t block_size, max_stored;
    if (!PyArg_ParseTuple(args, "OiiOnpOOn", &capsule, &algo, &level, &src_obj, &block_size, &verify, &out_obj,
                          &lengths_obj, &max_stored))
        return NULL;
    if (check_algo(algo) < 0)
        return NULL;
    if (block_size <= 0 || block_size > INT32_MAX / 2 || max_stored <= 0) {
        PyErr_SetString(PyExc_ValueError, "bad block size");
        return NULL;
    }
    Py_buffer views[3];
    if (get_buffers((PyObject *const[]){src_obj, out_obj, lengths_obj}, views, (const int[]){0, 1, 1},
                    (const char *const[]){"src", "out", "lengths"}) < 0)
        return NULL;
    Py_buffer src = views[0], out = views[1], lengths = views[2];
    PyObject *result = NULL;
    Py_ssize_t nblocks = (src.len + block_size - 1) / block_size;
    if (lengths.itemsize != 4 || lengths.len / 4 < nblocks) {
        PyErr_SetString(PyExc_ValueError, "lengths must be 32-bit integers, one per block");
        goto done;
    }
    Context *ctx = take_context(capsule);
    if (!ctx)
        goto done;
    if (algo == ALGO_ZSTD && zstd_state(ctx, 1) < 0)
        goto done;
    CompressJob j = {.src = src.buf, .src_len = (size_t)src.len, .block_size = (size_t)block_size,
                     .out = out.buf, .out_len = (size_t)out.len, .lengths = lengths.buf,
                     .max_stored = (size_t)max_stored, .verify = verify, .algo = algo, .level = level,
                     .cctx = ctx->cctx};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = compress_run(&j);
    Py_END_ALLOW_THREADS
    ctx->busy = 0;
    if (status == ST_BOUNDS) {
        PyErr_Format(PyExc_ValueError, "out has no room for block %zd", j.done);
        goto done;
    }
    result = Py_BuildValue("(nniz)", j.done, (Py_ssize_t)j.total, status, j.message);
done:
    release_buffers(views);
    return result;
}

/* ---- screening: will every block fit? ----------------------------------------------------------------- */

/* c * log2(c) for every count a 64 KiB block can give, so that a block's entropy costs 256 lookups. */
#define ENTROPY_TABLE (64 * 1024 + 1)
static double clog2c[ENTROPY_TABLE];
static pthread_once_t clog2c_once = PTHREAD_ONCE_INIT;

static void clog2c_init(void) {
    for (size_t c = 1; c < ENTROPY_TABLE; c++)
        clog2c[c] = (double)c * log2((double)c);
}

/* zstd's own tests before it codes literals with Huffman (lib/compress/huf_compress.c, 1.5.x): with few matches
 * it counts the first and the last 4 KiB of the literals and gives up when the commonest byte of each, added,
 * occurs at most (2 * 4096 >> 7) + 4 times; it gives up too when the commonest byte of all the literals occurs at
 * most (n >> 7) + 4 times; and it keeps the Huffman literals only when they save (n >> 6) + 2 bytes. A block
 * that does not compress this way is stored raw, one byte a byte: it does not fit. */
#define ZSTD_SAMPLE 4096
#define ZSTD_EDGE_TOP (2 * ((ZSTD_SAMPLE >> 7) + 4)) /* each edge on its own, as if zstd took it for a block */
#define ZSTD_FRAME_OVERHEAD 32 /* frame header, block header, literals header, jump table: at most */
#define ZSTD_TABLE_BYTES 256   /* a Huffman table description of 256 weights: at most */
#define HUFFMAN_REDUNDANCY 0.0861 /* Gallager: Huffman codes at most p_max + this many bits a byte over entropy */

static void count_bytes(const uint8_t *p, size_t n, uint32_t counts[256]) {
    uint32_t part[4][256];
    memset(part, 0, sizeof(part)); /* four tables: consecutive equal bytes do not wait on one counter */
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        part[0][(uint8_t)w]++;
        part[1][(uint8_t)(w >> 8)]++;
        part[2][(uint8_t)(w >> 16)]++;
        part[3][(uint8_t)(w >> 24)]++;
        part[0][(uint8_t)(w >> 32)]++;
        part[1][(uint8_t)(w >> 40)]++;
        part[2][(uint8_t)(w >> 48)]++;
        part[3][(uint8_t)(w >> 56)]++;
    }
    for (; i < n; i++)
        part[0][p[i]]++;
    for (int b = 0; b < 256; b++)
        counts[b] = part[0][b] + part[1][b] + part[2][b] + part[3][b];
}

static uint32_t largest(const uint32_t counts[256]) {
    uint32_t m = 0;
    for (int b = 0; b < 256; b++)
        m = counts[b] > m ? counts[b] : m;
    return m;
}

/* A block that zstd surely codes with Huffman literals, even if it finds no match at all: every byte counted
 * (a sample could be fooled: bytes at the sampled places low in entropy, the rest not), each of zstd's tests
 * passed with twice what it asks, and Gallager's bound on the Huffman code of the whole block below what zstd
 * keeps, with ``margin`` bytes to spare. Blocks shorter than two samples are compressed exactly. */
static int zstd_surely_fits(const uint8_t *p, size_t n, size_t room, size_t margin) {
    if (n < 2 * ZSTD_SAMPLE || n >= ENTROPY_TABLE)
        return 0;
    uint32_t head[256], tail[256], mid[256];
    count_bytes(p, ZSTD_SAMPLE, head);
    count_bytes(p + n - ZSTD_SAMPLE, ZSTD_SAMPLE, tail);
    if (largest(head) <= ZSTD_EDGE_TOP || largest(tail) <= ZSTD_EDGE_TOP)
        return 0;
    count_bytes(p + ZSTD_SAMPLE, n - 2 * ZSTD_SAMPLE, mid);
    double sum = 0.0;
    uint32_t top = 0;
    for (int b = 0; b < 256; b++) {
        uint32_t c = head[b] + mid[b] + tail[b];
        top = c > top ? c : top;
        sum += clog2c[c];
    }
    if (top <= 2 * ((n >> 7) + 4))
        return 0;
    double bits = clog2c[n] - sum; /* n times the entropy */
    double extra = (double)top / (double)n + HUFFMAN_REDUNDANCY;
    bits += (double)n * (extra < 1.0 ? extra : 1.0);
    double need = bits / 8.0 + ZSTD_TABLE_BYTES + (double)margin;
    size_t keep = n - (n >> 6) - 2;
    return need < (double)keep && need + ZSTD_FRAME_OVERHEAD <= (double)room;
}

typedef struct {
    const uint8_t *src;
    size_t src_len, block_size;
    uint8_t *scratch;
    size_t scratch_len, max_stored;
    int verify, algo, level;
    size_t margin, prefix;
    ZSTD_CCtx *cctx;
    /* results */
    Py_ssize_t found, tested;
    const char *message;
} ScreenJob;

/* Compress one block into scratch the way the writer will: ST_OK when it fits, ST_TOO_BIG when not. */
static int exact_fit(ScreenJob *j, const uint8_t *block, size_t n) {
    uint32_t length;
    CompressJob c = {.src = block, .src_len = n, .block_size = j->block_size, .out = j->scratch,
                     .out_len = j->scratch_len, .lengths = &length, .max_stored = j->max_stored,
                     .verify = j->verify, .algo = j->algo, .level = j->level, .cctx = j->cctx};
    j->tested++;
    int status = compress_run(&c);
    if (status == ST_CODEC)
        j->message = c.message;
    return status;
}

/* A block that surely fits, without compressing it as written. zstd: see zstd_surely_fits. LZ4 has no entropy
 * coder; it parses a block from the start, and a match never costs more than the literals it replaces, so the
 * block costs at most what its first ``prefix`` bytes compress to (as written: the same parse) plus the worst
 * case of the rest, which must leave ``margin`` bytes to spare. (LZ4 at a higher acceleration is no bound: it
 * skips positions, so its hash table keeps older entries, and it can find a repeat that the default misses.) */
static int surely_fits(ScreenJob *j, const uint8_t *block, size_t n) {
    size_t crc = j->verify ? CRC_SIZE : 0;
    if (j->max_stored < crc + j->margin)
        return 0;
    size_t room = j->max_stored - crc; /* bytes a block may compress to */
    if (j->algo == ALGO_ZSTD)
        return zstd_surely_fits(block, n, room, j->margin);
    if (!j->prefix || j->prefix >= n || (size_t)LZ4_compressBound((int)n) > j->scratch_len)
        return 0;
    int head = LZ4_compress_default((const char *)block, (char *)j->scratch, (int)j->prefix, (int)j->scratch_len);
    return head > 0 && (size_t)head + (size_t)LZ4_compressBound((int)(n - j->prefix)) + j->margin <= room;
}

static int screen_run(ScreenJob *j) {
    j->found = -1;
    Py_ssize_t i = 0;
    for (size_t off = 0; off < j->src_len; off += j->block_size, i++) {
        size_t n = j->src_len - off < j->block_size ? j->src_len - off : j->block_size;
        if (surely_fits(j, j->src + off, n))
            continue;
        int status = exact_fit(j, j->src + off, n);
        if (status == ST_TOO_BIG) {
            j->found = i;
            return ST_OK;
        }
        if (status != ST_OK) {
            j->found = i;
            return status;
        }
    }
    return ST_OK;
}

PyDoc_STRVAR(screen_blocks_doc,
             "screen_blocks(ctx, algo, level, src, block_size, verify, scratch, max_stored, margin, prefix)"
             " -> (found, tested, status, message)\n\n"
             "The first block of src (in blocks of block_size, at most 65,536) whose stored length, compressed as\n"
             "compress_blocks would, passes max_stored; found is -1 when every block fits. A block is compressed\n"
             "exactly (tested counts them) only when a cheap look does not show that it fits with margin bytes to\n"
             "spare: for zstd, every byte counted against zstd's own tests and Gallager's bound on its Huffman\n"
             "code; for LZ4, the first prefix bytes compressed plus the worst case of the rest. scratch must hold\n"
             "compress_bound(algo, block_size) + 4 bytes.");

static PyObject *screen_blocks(PyObject *self, PyObject *args) {
    PyObject *capsule, *src_obj, *scratch_obj;
    int algo, level, verify;
    Py_ssize_t block_size, max_stored, margin, prefix;
    if (!PyArg_ParseTuple(args, "OiiOnpOnnn", &capsule, &algo, &level, &src_obj, &block_size, &verify,
                          &scratch_obj, &max_stored, &margin, &prefix))
        return NULL;
    if (check_algo(algo) < 0)
        return NULL;
    if (block_size <= 0 || block_size >= ENTROPY_TABLE || max_stored <= 0 || max_stored > INT32_MAX ||
        margin < 0 || margin > INT32_MAX || prefix < 0) {
        PyErr_SetString(PyExc_ValueError, "bad block size, max_stored, margin or prefix");
        return NULL;
    }
    Py_buffer src, scratch;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(scratch_obj, &scratch, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    PyObject *result = NULL;
    size_t bound = algo == ALGO_LZ4 ? (size_t)LZ4_compressBound((int)block_size) : zstd.compressBound(block_size);
    if ((size_t)scratch.len < bound + CRC_SIZE) {
        PyErr_SetString(PyExc_ValueError, "scratch is smaller than a block's worst case");
        goto done;
    }
    Context *ctx = take_context(capsule);
    if (!ctx)
        goto done;
    if (algo == ALGO_ZSTD && zstd_state(ctx, 1) < 0)
        goto done;
    pthread_once(&clog2c_once, clog2c_init);
    ScreenJob j = {.src = src.buf, .src_len = (size_t)src.len, .block_size = (size_t)block_size,
                   .scratch = scratch.buf, .scratch_len = (size_t)scratch.len, .max_stored = (size_t)max_stored,
                   .verify = verify, .algo = algo, .level = level, .margin = (size_t)margin,
                   .prefix = (size_t)prefix, .cctx = ctx->cctx};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = screen_run(&j);
    Py_END_ALLOW_THREADS
    ctx->busy = 0;
    if (status == ST_BOUNDS) {
        PyErr_Format(PyExc_ValueError, "scratch has no room for block %zd", j.found);
        goto done;
    }
    result = Py_BuildValue("(nniz)", j.found, j.tested, status, j.message);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&scratch);
    return result;
}

/* ---- small helpers ------------------------------------------------------------------------------------- */

static PyObject *compress_bound(PyObject *self, PyObject *args) {
    int algo;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "in", &algo, &n) || check_algo(algo) < 0)
        return NULL;
    if (n < 0 || n > INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "bad length");
        return NULL;
    }
    size_t bound = algo == ALGO_LZ4 ? (size_t)LZ4_compressBound((int)n) : zstd.compressBound((size_t)n);
    return PyLong_FromSize_t(bound);
}

PyDoc_STRVAR(block_starts_doc,
             "block_starts(lengths, first, floor, ceiling, out) -> bad: a ZFile's jump table (lengths: one\n"
             "little-endian u32 stored length a block) as where each block starts, from first, and last where the\n"
             "final one ends, into out (n + 1 64-bit integers). Returns the first block whose length is not above\n"
             "floor and at most ceiling (out then holds nothing useful), or -1.");

static PyObject *block_starts(PyObject *self, PyObject *args) {
    Py_buffer lengths, out;
    long long first, floor, ceiling;
    if (!PyArg_ParseTuple(args, "y*LLLw*", &lengths, &first, &floor, &ceiling, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = lengths.len / 4;
    if (lengths.len % 4 || out.itemsize != 8 || out.len / 8 < n + 1 || first < 0) {
        PyErr_SetString(PyExc_ValueError, "lengths must be u32s and out one 64-bit integer more");
        goto done;
    }
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *p = lengths.buf;
    int64_t *o = out.buf, at = first;
    o[0] = at;
    for (Py_ssize_t k = 0; k < n; k++) {
        int64_t len = (int64_t)load_le32(p + 4 * k);
        if (len <= floor || len > ceiling) {
            bad = k;
            break;
        }
        at += len;
        o[k + 1] = at;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
done:
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *crc32c_raw(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned int seed = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &data, &seed))
        return NULL;
    uint32_t crc;
    Py_BEGIN_ALLOW_THREADS
    crc = crc_raw(seed, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

/* ---- output files: the calls the writers make that ``os`` has no binding for -------------------------------- */

PyDoc_STRVAR(start_writeback_doc,
             "start_writeback(fd, offset, length) -> errno: sync_file_range(SYNC_FILE_RANGE_WRITE) with the GIL\n"
             "released: the writeback of these dirty pages started, not waited for. 0, or the call's errno.");

static PyObject *start_writeback(PyObject *self, PyObject *args) {
    int fd, r;
    long long offset, length;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &offset, &length))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE) == 0 ? 0 : errno;
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(r);
}

PyDoc_STRVAR(fallocate_doc, "fallocate(fd, mode, offset, length) -> errno: fallocate(2) with the GIL released; 0, or\n"
                            "the call's errno (EOPNOTSUPP where the file system cannot).");

static PyObject *fallocate_(PyObject *self, PyObject *args) {
    int fd, mode, r;
    long long offset, length;
    if (!PyArg_ParseTuple(args, "iiLL", &fd, &mode, &offset, &length))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = fallocate(fd, mode, (off_t)offset, (off_t)length) == 0 ? 0 : errno;
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(r);
}

static PyObject *zstd_version(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(zstd.versionString());
}

static PyMethodDef methods[] = {
    {"new_context", new_context, METH_NOARGS, "A codec context for one thread."},
    {"decompress_blocks", decompress_blocks, METH_VARARGS, decompress_blocks_doc},
    {"compress_blocks", compress_blocks, METH_VARARGS, compress_blocks_doc},
    {"compress_bound", compress_bound, METH_VARARGS, "compress_bound(algo, n): worst-case compressed size."},
    {"use_zstd", use_zstd, METH_VARARGS, use_zstd_doc},
    {"screen_blocks", screen_blocks, METH_VARARGS, screen_blocks_doc},
    {"zstd_version", zstd_version, METH_NOARGS, "The version of the zstd library in use."},
    {"block_starts", block_starts, METH_VARARGS, block_starts_doc},
    {"crc32c_raw", crc32c_raw, METH_VARARGS, "crc32c_raw(data, seed=0): CRC32C, register from seed, no final XOR."},
    {"start_writeback", start_writeback, METH_VARARGS, start_writeback_doc},
    {"fallocate", fallocate_, METH_VARARGS, fallocate_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blocks", "Runs of ZFile blocks in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blocks(void) {
    crc_init();
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "OK", ST_OK) < 0 || PyModule_AddIntConstant(m, "CRC", ST_CRC) < 0 ||
        PyModule_AddIntConstant(m, "CODEC", ST_CODEC) < 0 || PyModule_AddIntConstant(m, "LENGTH", ST_LENGTH) < 0 ||
        PyModule_AddIntConstant(m, "TOO_BIG", ST_TOO_BIG) < 0 ||
        PyModule_AddIntConstant(m, "HW_CRC", have_hw_crc) < 0 ||
        PyModule_AddStringConstant(m, "LZ4_VERSION", LZ4_versionString()) < 0 ||
        PyModule_AddStringConstant(m, "ZSTD_LINKED_VERSION", ZSTD_versionString()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
