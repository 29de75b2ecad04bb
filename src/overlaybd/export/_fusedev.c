/* The hot loop of the /dev/fuse export (overlaybd.export.fusedev) in C: take a request from the device and, when
 * it is a READ that the merged index of local, uncompressed layer files answers, serve it and write the reply,
 * all without the GIL; every other request goes back to Python, which serves it as the pure-Python loop does.
 *
 * A read is served here only if no byte of it was ever mapped by the writable upper layer: Python marks the
 * granules of every range it writes, trims or zero-writes (mark) before it changes the upper, and the granules
 * the upper mapped when the device opened. A read that meets a marked granule, a layer that is not a plain file,
 * or a failed or short pread goes back to Python, which reads it through the volume (and raises the typed error).
 *
 * With a log-structured upper (set_writer), WRITEs of whole sectors that one record covers and FSYNCs are served
 * here too, through the upper's appender (formats.lsmt._appender, by its capsule): a write's data goes, through the
 * appender, into space it reserves at the data file's end, then its record is appended; an fsync is the appender's
 * sync (data file, then index file). None of it takes the GIL; the upper's index takes the records before its next
 * lookup, and Python is entered only once set_writer's catch_up_at records wait for it. The appender holds the
 * upper's files: once it is detached no write here reaches them. Reads use the lower layers' descriptors, so the
 * threads in serve() must all have returned before the volume closes (fusedev stops the connection, then joins
 * them).
 *
 * The merged index is mapping.MergedIndex: ``ends`` (int64, record end sectors, sorted) and ``packed`` (uint64:
 * moffset bits 0-39, all ones for a zeroed record; length bits 40-55; source bits 56-63).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define MOFFSET_BITS 40
#define MOFFSET_MASK ((UINT64_C(1) << MOFFSET_BITS) - 1)
#define LENGTH_MASK UINT64_C(0xFFFF)
#define SECTOR 512

/* linux/fuse.h */
#define FUSE_READ 15
#define FUSE_WRITE 16
#define FUSE_FSYNC 20
#define WRITE_IN_SIZE 40
#define IN_HEADER_SIZE 40
#define OUT_HEADER_SIZE 16
#define READ_IN_SIZE 40
#define DISK_ID 2

/* overlaybd.formats.lsmt._appender's capsule (its name carries the version); each call returns 0 or -errno */
#define APPENDER_API "overlaybd.formats.lsmt._appender._C_API_2"
typedef struct {
    int (*reserve)(PyObject *appender, uint64_t length, uint64_t *at);
    int (*write)(PyObject *appender, const char *data, size_t n, uint64_t at);
    int (*append)(PyObject *appender, const char *records, size_t n, uint64_t data_end, size_t *pending);
    int (*sync)(PyObject *appender, int *which);
} AppenderAPI;

typedef struct {
    PyObject_HEAD
    int fd;                /* /dev/fuse */
    uint64_t size;         /* the device's size in bytes */
    Py_buffer ends_view, packed_view;
    const int64_t *ends;
    const uint64_t *packed;
    size_t n;
    int *fds;              /* per source: a plain file's descriptor, or -1 (reads of it go to Python) */
    int nfds;
    uint8_t *marked;       /* one byte per granule of the upper: nonzero once the upper may map some of it */
    uint64_t granules;
    int shift;             /* a granule is 1 << shift sectors */
    int fast;              /* serve reads here at all */
    uint64_t served;       /* requests answered here (for tests and figures) */
    /* writes of one record, and fsyncs, to a log-structured upper (set_writer) */
    int writer;            /* set_writer was called; else every write and fsync goes to Python */
    int index_full;        /* the upper's index file holds all the records it may (an append said ENOSPC): every
                            * later write goes to Python, which refuses it before it takes any space */
    uint64_t max_write;    /* bytes one record covers at most */
    PyObject *appender;    /* the upper's appender (overlaybd.formats.lsmt._appender.Appender): it holds the
                            * files, and once it is detached every call fails, so no write outlives them */
    char *hold;            /* tests only (set_writer's hold): a folder where writes wait, see hold_write */
    const AppenderAPI *api;
    PyObject *catch_up;    /* catch_up(): the upper's index takes the records appended (called when many wait) */
    uint64_t catch_up_at;  /* how many */
} Disk;

static void disk_dealloc(Disk *self) {
    if (self->ends_view.obj)
        PyBuffer_Release(&self->ends_view);
    if (self->packed_view.obj)
        PyBuffer_Release(&self->packed_view);
    PyMem_Free(self->fds);
    PyMem_Free(self->marked);
    PyMem_Free(self->hold);
    Py_XDECREF(self->appender);
    Py_XDECREF(self->catch_up);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int disk_init(Disk *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", "size", "ends", "packed", "fds", "shift", "fast", NULL};
    int fd, shift, fast;
    unsigned long long size;
    PyObject *ends, *packed, *fds;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKOOOip", kwlist, &fd, &size, &ends, &packed, &fds, &shift,
                                     &fast))
        return -1;
    if (self->ends_view.obj || self->marked) {
        PyErr_SetString(PyExc_RuntimeError, "Disk is already initialised");
        return -1;
    }
    if (shift < 0 || shift > 40) {
        PyErr_SetString(PyExc_ValueError, "shift out of range");
        return -1;
    }
    if (PyObject_GetBuffer(ends, &self->ends_view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (PyObject_GetBuffer(packed, &self->packed_view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (self->ends_view.itemsize != 8 || self->packed_view.itemsize != 8 ||
        self->ends_view.len != self->packed_view.len) {
        PyErr_SetString(PyExc_ValueError, "ends and packed must be 8-byte arrays of one length");
        return -1;
    }
    PyObject *seq = PySequence_Fast(fds, "fds must be a sequence of ints");
    if (!seq)
        return -1;
    Py_ssize_t nf = PySequence_Fast_GET_SIZE(seq);
    self->fds = PyMem_Calloc(nf ? nf : 1, sizeof(int));
    if (!self->fds) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < nf; k++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, k));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        self->fds[k] = (int)v;
    }
    Py_DECREF(seq);
    self->nfds = (int)nf;
    self->fd = fd;
    self->size = size;
    self->ends = self->ends_view.buf;
    self->packed = self->packed_view.buf;
    self->n = (size_t)(self->ends_view.len / 8);
    self->shift = shift;
    uint64_t sectors = (size + SECTOR - 1) / SECTOR;
    self->granules = (sectors >> shift) + 1;
    self->marked = PyMem_Calloc(self->granules, 1);
    if (!self->marked) {
        PyErr_NoMemory();
        return -1;
    }
    self->fast = fast;
    return 0;
}

PyDoc_STRVAR(set_writer_doc,
             "set_writer(max_write, appender, catch_up, catch_up_at, hold=None): serve WRITEs of whole sectors, up\n"
             "to max_write bytes, and FSYNCs here, through the upper's _appender.Appender (space, data, records,\n"
             "sync); catch_up() is called once catch_up_at records wait for its index. A failure sends the request\n"
             "to Python, which serves it again and answers the error. hold (tests only): a folder; while\n"
             "HOLD/hold exists, a write creates HOLD/held-UNIQUE once its space is reserved and waits until\n"
             "HOLD/hold is gone before it writes its data.");

static PyObject *disk_set_writer(Disk *self, PyObject *args) {
    unsigned long long max_write, catch_up_at;
    PyObject *appender, *catch_up;
    const char *hold = NULL;
    if (!PyArg_ParseTuple(args, "KOOK|z", &max_write, &appender, &catch_up, &catch_up_at, &hold))
        return NULL;
    if (!PyCallable_Check(catch_up)) {
        PyErr_SetString(PyExc_TypeError, "catch_up must be callable");
        return NULL;
    }
    const AppenderAPI *api = PyCapsule_Import(APPENDER_API, 0);
    if (!api)
        return NULL;
    PyObject *module = PyImport_AddModule("overlaybd.formats.lsmt._appender"); /* imported by the capsule */
    PyObject *type = module ? PyObject_GetAttrString(module, "Appender") : NULL;
    if (!type)
        return NULL;
    int ok = PyObject_TypeCheck(appender, (PyTypeObject *)type);
    Py_DECREF(type);
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "appender must be an _appender.Appender");
        return NULL;
    }
    char *held = NULL;
    if (hold) {
        size_t n = strlen(hold) + 1;
        held = PyMem_Malloc(n);
        if (!held)
            return PyErr_NoMemory();
        memcpy(held, hold, n);
    }
    PyMem_Free(self->hold);
    self->hold = held;
    Py_INCREF(appender);
    Py_INCREF(catch_up);
    Py_XSETREF(self->appender, appender);
    Py_XSETREF(self->catch_up, catch_up);
    self->api = api;
    self->catch_up_at = catch_up_at;
    self->max_write = max_write;
    self->writer = 1;
    Py_RETURN_NONE;
}

static void mark_range(Disk *self, uint64_t offset, uint64_t length) {
    if (!length || offset >= self->size)
        return;
    uint64_t end = offset + length < self->size ? offset + length : self->size;
    uint64_t g0 = (offset / SECTOR) >> self->shift;
    uint64_t g1 = ((end + SECTOR - 1) / SECTOR - 1) >> self->shift;
    for (uint64_t g = g0; g <= g1 && g < self->granules; g++)
        __atomic_store_n(&self->marked[g], 1, __ATOMIC_RELEASE);
}

PyDoc_STRVAR(mark_doc, "mark(offset, length): bytes [offset, offset+length) may be mapped by the upper from now on:\n"
                       "reads that meet them go to Python.");

static PyObject *disk_mark(Disk *self, PyObject *args) {
    unsigned long long offset, length;
    if (!PyArg_ParseTuple(args, "KK", &offset, &length))
        return NULL;
    mark_range(self, offset, length);
    Py_RETURN_NONE;
}

static int is_marked(const Disk *self, uint64_t s0, uint64_t s1) {
    for (uint64_t g = s0 >> self->shift, last = (s1 - 1) >> self->shift; g <= last; g++)
        if (g >= self->granules || __atomic_load_n(&self->marked[g], __ATOMIC_ACQUIRE))
            return 1;
    return 0;
}

static int pread_all(int fd, char *buf, size_t len, uint64_t at) {
    while (len) {
        ssize_t got = pread(fd, buf, len, (off_t)at);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        buf += got;
        len -= (size_t)got;
        at += (uint64_t)got;
    }
    return 0;
}

/* Fill out[0, n) with the bytes of the device at ``offset``; -1 where Python must serve the read. */
static int read_lower(const Disk *self, uint64_t offset, size_t n, char *out) {
    uint64_t s0 = offset / SECTOR, s1 = (offset + n + SECTOR - 1) / SECTOR;
    if (is_marked(self, s0, s1))
        return -1;
    const int64_t *ends = self->ends;
    size_t lo = 0, hi = self->n; /* the first record ending after s0 */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if ((uint64_t)ends[mid] <= s0)
            lo = mid + 1;
        else
            hi = mid;
    }
    uint64_t cur = offset, end = offset + n;
    for (size_t i = lo; i < self->n && cur < end; i++) {
        uint64_t p = self->packed[i];
        uint64_t rend = (uint64_t)ends[i] * SECTOR;
        uint64_t rstart = rend - ((p >> MOFFSET_BITS) & LENGTH_MASK) * SECTOR;
        if (rstart >= end)
            break;
        if (rstart > cur) { /* a hole below every layer */
            memset(out + (cur - offset), 0, rstart - cur);
            cur = rstart;
        }
        uint64_t stop = rend < end ? rend : end;
        uint64_t m = p & MOFFSET_MASK;
        if (m == MOFFSET_MASK) {
            memset(out + (cur - offset), 0, stop - cur);
        } else {
            unsigned src = (unsigned)(p >> 56);
            if (src >= (unsigned)self->nfds || self->fds[src] < 0)
                return -1;
            if (pread_all(self->fds[src], out + (cur - offset), stop - cur, m * SECTOR + (cur - rstart)) < 0)
                return -1;
        }
        cur = stop;
    }
    if (cur < end)
        memset(out + (cur - offset), 0, end - cur);
    return 0;
}

/* Send the reply to request ``unique``: a header, then ``n`` bytes of ``data``. */
static void reply(Disk *self, uint64_t unique, const char *data, size_t n) {
    struct {
        uint32_t len;
        int32_t error;
        uint64_t unique;
    } hdr = {(uint32_t)(OUT_HEADER_SIZE + n), 0, unique};
    struct iovec iov[2] = {{&hdr, OUT_HEADER_SIZE}, {(void *)data, n}};
    ssize_t put;
    /* counted before the reply goes: whoever has the reply finds it counted */
    __atomic_fetch_add(&self->served, 1, __ATOMIC_RELAXED);
    do {
        put = writev(self->fd, iov, n ? 2 : 1);
    } while (put < 0 && errno == EINTR);
    /* ENOENT: the request was interrupted meanwhile, nobody waits for the reply (the Python loop ignores it too);
     * the replies built here are well-formed, so nothing else is expected: it would be dropped */
}

/* Serve the READ in ``in`` (``len`` bytes) into ``out``; 1 if answered, 0 if Python must serve it. */
static int serve_read(Disk *self, const char *in, size_t len, char *out, size_t outlen) {
    uint64_t unique, nodeid, offset;
    uint32_t size;
    if (len < IN_HEADER_SIZE + READ_IN_SIZE)
        return 0;
    memcpy(&unique, in + 8, 8);
    memcpy(&nodeid, in + 16, 8);
    if (nodeid != DISK_ID)
        return 0;
    memcpy(&offset, in + IN_HEADER_SIZE + 8, 8);
    memcpy(&size, in + IN_HEADER_SIZE + 16, 4);
    size_t n = 0;
    if (offset < self->size) {
        uint64_t left = self->size - offset;
        n = size < left ? size : (size_t)left;
        if (n > outlen)
            n = outlen;
    }
    if (n && read_lower(self, offset, n, out) < 0)
        return 0;
    reply(self, unique, out, n);
    return 1;
}

/* Tests only (set_writer's hold): while HOLD/hold exists, say that write ``unique`` waits (HOLD/held-UNIQUE), then
 * wait until HOLD/hold is gone: a test can thus stop the daemon while a write is under way. */
static void hold_write(const Disk *self, uint64_t unique) {
    char gate[4096], held[4096];
    if (snprintf(gate, sizeof gate, "%s/hold", self->hold) >= (int)sizeof gate || access(gate, F_OK) != 0)
        return;
    if (snprintf(held, sizeof held, "%s/held-%llu", self->hold, (unsigned long long)unique) < (int)sizeof held) {
        int fd = open(held, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0)
            close(fd);
    }
    while (access(gate, F_OK) == 0)
        usleep(1000);
}

/* Call fn() with the GIL taken back for it; what it raises is cleared (its work is only ever brought forward). */
static void call_python(PyThreadState **ts, PyObject *fn) {
    PyEval_RestoreThread(*ts);
    PyObject *res = PyObject_CallNoArgs(fn);
    if (res)
        Py_DECREF(res);
    else
        PyErr_Clear();
    *ts = PyEval_SaveThread();
}

/* Serve the WRITE in ``in`` (``len`` bytes): 1 if answered, 0 if Python must serve it. Called without the GIL
 * (``*ts`` is this thread's state, taken back only to have the upper's index catch up once catch_up_at records
 * wait for it). */
static int serve_write(Disk *self, PyThreadState **ts, const char *in, size_t len) {
    uint64_t unique, nodeid, offset;
    uint32_t size;
    if (!self->writer || __atomic_load_n(&self->index_full, __ATOMIC_RELAXED) || len < IN_HEADER_SIZE + WRITE_IN_SIZE)
        return 0;
    memcpy(&unique, in + 8, 8);
    memcpy(&nodeid, in + 16, 8);
    memcpy(&offset, in + IN_HEADER_SIZE + 8, 8);
    memcpy(&size, in + IN_HEADER_SIZE + 16, 4);
    if (nodeid != DISK_ID || !size || size % SECTOR || offset % SECTOR || size > self->max_write ||
        offset > self->size || size > self->size - offset || len < IN_HEADER_SIZE + WRITE_IN_SIZE + (size_t)size)
        return 0;
    mark_range(self, offset, size); /* before the upper maps it */
    uint64_t at;
    int rc = self->api->reserve(self->appender, size, &at);
    if (rc < 0) {
        if (rc == -ENOSPC) /* the index takes no record more: it never shrinks while the layer is open */
            __atomic_store_n(&self->index_full, 1, __ATOMIC_RELAXED);
        return 0; /* Python writes it again and answers the error */
    }
    if (self->hold)
        hold_write(self, unique);
    if (self->api->write(self->appender, in + IN_HEADER_SIZE + WRITE_IN_SIZE, size, at) < 0)
        return 0; /* the space reserved stays unused: nothing points at it */
    /* the record: offset | length << 50, moffset (zeroed bit 55 clear), in sectors, little-endian */
    uint64_t rec[2] = {htole64(offset / SECTOR | (uint64_t)(size / SECTOR) << 50), htole64(at / SECTOR)};
    size_t pending;
    rc = self->api->append(self->appender, (const char *)rec, sizeof rec, at + size, &pending);
    if (rc < 0) {
        if (rc == -ENOSPC) /* the index never shrinks while the layer is open */
            __atomic_store_n(&self->index_full, 1, __ATOMIC_RELAXED);
        return 0; /* Python writes it again and answers the error */
    }
    if (pending >= self->catch_up_at)
        call_python(ts, self->catch_up);
    uint32_t write_out[2] = {size, 0};
    reply(self, unique, (const char *)write_out, sizeof write_out);
    return 1;
}

/* Serve the FSYNC in ``in``: the appender's sync (every write answered before it is then durable, data before
 * records). 1 if answered, 0 if Python must serve it (it syncs again and answers the error). */
static int serve_fsync(Disk *self, const char *in, size_t len) {
    uint64_t unique, nodeid;
    if (!self->writer || len < IN_HEADER_SIZE)
        return 0;
    memcpy(&unique, in + 8, 8);
    memcpy(&nodeid, in + 16, 8);
    int which;
    if (nodeid != DISK_ID || self->api->sync(self->appender, &which) < 0)
        return 0;
    reply(self, unique, NULL, 0);
    return 1;
}

PyDoc_STRVAR(serve_doc,
             "serve(inbuf, out) -> int: take requests from the device, answering the reads it can, until one that\n"
             "Python must serve: its length (the request is in inbuf); -1 once the device is unmounted. Other\n"
             "errors of the device raise OSError.");

static PyObject *disk_serve(Disk *self, PyObject *args) {
    Py_buffer in, out;
    if (!PyArg_ParseTuple(args, "w*w*", &in, &out))
        return NULL;
    ssize_t got;
    int err = 0;
    PyThreadState *ts = PyEval_SaveThread();
    for (;;) {
        got = read(self->fd, in.buf, (size_t)in.len);
        if (got < 0) {
            if (errno == EINTR || errno == ENOENT) /* ENOENT: interrupted before we took it */
                continue;
            if (errno == ENODEV) /* unmounted */
                break;
            err = errno;
            break;
        }
        if (got == 0)
            break;
        uint32_t opcode;
        if (got >= IN_HEADER_SIZE) {
            memcpy(&opcode, (char *)in.buf + 4, 4);
            if (opcode == FUSE_READ && self->fast &&
                serve_read(self, in.buf, (size_t)got, out.buf, (size_t)out.len))
                continue;
            if (opcode == FUSE_WRITE && serve_write(self, &ts, in.buf, (size_t)got))
                continue;
            if (opcode == FUSE_FSYNC && serve_fsync(self, in.buf, (size_t)got))
                continue;
        }
        break;
    }
    PyEval_RestoreThread(ts);
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(got > 0 ? got : -1);
}

static PyObject *disk_get_served(Disk *self, void *closure) {
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->served, __ATOMIC_RELAXED));
}

static PyMethodDef disk_methods[] = {
    {"mark", (PyCFunction)disk_mark, METH_VARARGS, mark_doc},
    {"set_writer", (PyCFunction)disk_set_writer, METH_VARARGS, set_writer_doc},
    {"serve", (PyCFunction)disk_serve, METH_VARARGS, serve_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef disk_getset[] = {
    {"served", (getter)disk_get_served, NULL, "requests answered in C", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DiskType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "overlaybd.export._fusedev.Disk",
    .tp_basicsize = sizeof(Disk),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("Disk(fd, size, ends, packed, fds, shift, fast): the C side of one /dev/fuse connection"),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)disk_init,
    .tp_dealloc = (destructor)disk_dealloc,
    .tp_methods = disk_methods,
    .tp_getset = disk_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fusedev",
    .m_doc = "Reads of a /dev/fuse export served without the GIL (see overlaybd.export.fusedev).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fusedev(void) {
    if (PyType_Ready(&DiskType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&DiskType);
    if (PyModule_AddObject(m, "Disk", (PyObject *)&DiskType) < 0) {
        Py_DECREF(&DiskType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
