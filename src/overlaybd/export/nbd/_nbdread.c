/* Plain NBD reads of a stack's merged index (overlaybd.export.nbd.reads), in C: the READ requests at the front of
 * the bytes a client sent are served in one call, their replies (header, then data) built in one bytes object for
 * one send. The data comes from the merged index's own read (formats.lsmt._lookup, by its capsule): zeros where
 * no record or a zeroed one is, pread from the layer files elsewhere, the GIL let go.
 *
 * A request is served here only if it is a READ with no flag but DF, of whole sectors, inside the device, of at
 * most max_read bytes, meeting no marked granule, and its reply fits in what is left of the limit. Serving stops at
 * the first other one, and at the first whose read fails (a source without a file, a short read, an error): that
 * one is left to Python, which reads it the general way and answers the error.
 *
 * Granules mark what a writable upper above the index may map: the caller marks what it maps when the Reader is
 * made, and every write, trim or zero-write marks its range (mark(), or the C API below that _nbdwrite's Writer
 * calls) before it changes the upper. A read that meets no marked granule reads the merged index alone. One that
 * meets a marked granule asks the upper, if the Reader was given its rows(start, end) (the upper's records that
 * meet those sectors, as a list of (offset, length, moffset, zeroed, source) in sectors, caught up and taken under
 * the upper's lock, with the GIL): its pieces are read from the upper's file (or are zeros), the gaps between them
 * through the merged index. The records are taken when the request is planned; the data they point to stays where
 * it is (an append-only upper writes elsewhere; a sparse one in place, as a disk would). Without rows, or where
 * they cannot be used (a failed call, a source without a file, records out of order), the read goes to Python.
 * Granules are at least 4 KiB, at most 4 Mi of them (one byte each, calloc'ed: pages never marked take no memory).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "_nbdwire.h"

#define LOOKUP_API "overlaybd.formats.lsmt._lookup._C_API_1"
typedef struct {
    const void *(*index_of)(PyObject *capsule);
    int (*read)(const void *index, const int32_t *fds, size_t nfds, int64_t start, char *buf, int64_t n);
} LookupAPI;

typedef struct {
    PyObject_HEAD
    const LookupAPI *api;
    PyObject *handle;  /* the merged index's _lookup handle (NULL: not initialised, nothing is served) */
    const void *index; /* what the handle holds */
    Py_buffer fds;     /* int32 descriptors by source number (-1: a source without a file), held, not copied */
    uint64_t size;     /* the device's size in bytes */
    uint64_t served;   /* reads served here (for tests and figures) */
    uint64_t asked;    /* of those, how many asked the upper for its records */
    PyObject *upper;   /* the upper's rows(start, end), or NULL: reads meeting a marked granule go to Python */
    uint8_t *marked;   /* one byte per granule: nonzero once the upper may map some of it */
    uint64_t granules;
    int shift;         /* a granule is 1 << shift sectors */
} Reader;

#define MAX_GRANULES (UINT64_C(1) << 22)

static void mark_range(Reader *self, uint64_t offset, uint64_t length) {
    if (!self->marked || !length || offset >= self->size)
        return;
    uint64_t end = length < self->size - offset ? offset + length : self->size;
    uint64_t g1 = ((end + SECTOR - 1) / SECTOR - 1) >> self->shift;
    for (uint64_t g = (offset / SECTOR) >> self->shift; g <= g1 && g < self->granules; g++)
        __atomic_store_n(&self->marked[g], 1, __ATOMIC_RELEASE);
}

/* Whether sectors [s0, s1) meet a marked granule. */
static int is_marked(const Reader *self, uint64_t s0, uint64_t s1) {
    for (uint64_t g = s0 >> self->shift, last = (s1 - 1) >> self->shift; g <= last; g++)
        if (g >= self->granules || __atomic_load_n(&self->marked[g], __ATOMIC_ACQUIRE))
            return 1;
    return 0;
}

static void reader_dealloc(Reader *self) {
    if (self->handle) {
        PyBuffer_Release(&self->fds);
        Py_DECREF(self->handle);
    }
    Py_XDECREF(self->upper);
    free(self->marked);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int reader_init(Reader *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"index", "fds", "size", "upper", NULL};
    PyObject *handle, *fds, *upper = Py_None;
    long long size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOL|O", kwlist, &handle, &fds, &size, &upper))
        return -1;
    if (upper != Py_None && !PyCallable_Check(upper)) {
        PyErr_SetString(PyExc_TypeError, "upper must be callable (the upper's rows) or None");
        return -1;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must not be negative");
        return -1;
    }
    if (self->handle) {
        PyErr_SetString(PyExc_RuntimeError, "Reader is already initialised");
        return -1;
    }
    const LookupAPI *api = PyCapsule_Import(LOOKUP_API, 0);
    if (!api)
        return -1;
    const void *index = api->index_of(handle);
    if (!index)
        return -1;
    if (PyObject_GetBuffer(fds, &self->fds, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (self->fds.itemsize != (Py_ssize_t)sizeof(int32_t) || !self->fds.format || !strchr("il", self->fds.format[0])) {
        PyBuffer_Release(&self->fds);
        PyErr_SetString(PyExc_TypeError, "fds must be an array of int32 descriptors");
        return -1;
    }
    uint64_t sectors = (size + SECTOR - 1) / SECTOR;
    int shift = 3;
    while ((sectors >> shift) >= MAX_GRANULES)
        shift++;
    self->granules = (sectors >> shift) + 1;
    self->marked = calloc(self->granules, 1);
    if (!self->marked) {
        PyBuffer_Release(&self->fds);
        PyErr_NoMemory();
        return -1;
    }
    self->shift = shift;
    if (upper != Py_None) {
        Py_INCREF(upper);
        self->upper = upper;
    }
    Py_INCREF(handle);
    self->handle = handle;
    self->index = index;
    self->api = api;
    self->size = (uint64_t)size;
    return 0;
}

/* Whether the request r is a read this reader may serve whose reply (head bytes, then its data) fits in room
 * (marks aside). */
static int plain_read(const Reader *self, const NbdRequest *r, size_t head, Py_ssize_t max_read, size_t room) {
    return r->command == CMD_READ && !(r->flags & ~CMD_FLAG_DF) && r->length && r->length % SECTOR == 0 &&
           r->offset % SECTOR == 0 && (Py_ssize_t)r->length <= max_read && r->offset <= self->size &&
           r->length <= self->size - r->offset && head + r->length <= room;
}

/* A record of the upper, clipped to the request it was taken for (sectors). */
typedef struct {
    int64_t start, end, moffset; /* moffset: where start's data is in the source */
    int32_t fd;                  /* -1: zeroed */
} Piece;

/* A read planned with the GIL: the request, and its upper pieces (pieces[first, first + count)). */
typedef struct {
    NbdRequest r;
    size_t first, count;
} Planned;

typedef struct {
    Planned *reads;
    size_t nreads, capreads;
    Piece *pieces;
    size_t npieces, cappieces;
} Plan;

static int grow(void **items, size_t *cap, size_t need, size_t size) {
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 16;
    while (n < need)
        n *= 2;
    void *p = realloc(*items, n * size);
    if (!p)
        return -1;
    *items = p;
    *cap = n;
    return 0;
}

static int64_t as_i64(PyObject *o, int *bad) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred())
        *bad = 1;
    return (int64_t)v;
}

/* Append to plan the upper's pieces within sectors [s0, s1), asked of self->upper (with the GIL). 1 done; 0 if
 * they cannot be used here (the read goes to Python, which asks again and says what is wrong; an Exception from
 * the call is dropped for that reason); -1 with an error set (no memory, or what is not an Exception). */
static int upper_pieces(Reader *self, Plan *plan, int64_t s0, int64_t s1) {
    const int32_t *fds = self->fds.buf;
    size_t nfds = (size_t)self->fds.len / sizeof(int32_t);
    PyObject *rows = PyObject_CallFunction(self->upper, "LL", (long long)s0, (long long)s1);
    self->asked++;
    if (!rows || !PyList_Check(rows)) {
        Py_XDECREF(rows);
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyErr_Clear();
        return 0;
    }
    Py_ssize_t n = PyList_GET_SIZE(rows);
    size_t at = plan->npieces;
    int ok = grow((void **)&plan->pieces, &plan->cappieces, at + (size_t)n, sizeof(Piece)) == 0;
    if (!ok) {
        Py_DECREF(rows);
        PyErr_NoMemory();
        return -1;
    }
    int64_t pos = s0;
    for (Py_ssize_t k = 0; k < n && ok; k++) {
        PyObject *row = PyList_GET_ITEM(rows, k);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 5) {
            ok = 0;
            break;
        }
        int bad = 0;
        int64_t o = as_i64(PyTuple_GET_ITEM(row, 0), &bad), len = as_i64(PyTuple_GET_ITEM(row, 1), &bad);
        int64_t m = as_i64(PyTuple_GET_ITEM(row, 2), &bad), src = as_i64(PyTuple_GET_ITEM(row, 4), &bad);
        int zeroed = PyObject_IsTrue(PyTuple_GET_ITEM(row, 3));
        if (bad || zeroed < 0 || len <= 0 || o < 0 || o > INT64_MAX - len || m < 0) {
            ok = 0;
            break;
        }
        int64_t lo = o > s0 ? o : s0, hi = o + len < s1 ? o + len : s1;
        if (hi <= lo)
            continue; /* does not meet the request */
        if (lo < pos || (!zeroed && (src < 0 || (size_t)src >= nfds || fds[src] < 0)) ||
            (!zeroed && m > INT64_MAX / SECTOR - (lo - o) - (hi - lo))) {
            ok = 0; /* out of order or overlapping, a source without a file, or past what a file can hold */
            break;
        }
        Piece *p = &plan->pieces[plan->npieces++];
        p->start = lo;
        p->end = hi;
        p->moffset = zeroed ? 0 : m + (lo - o);
        p->fd = zeroed ? -1 : fds[src];
        pos = hi;
    }
    Py_DECREF(rows);
    if (!ok) {
        plan->npieces = at;
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static int pread_all(int fd, char *dst, size_t len, off_t at) {
    size_t done = 0;
    while (done < len) {
        ssize_t got = pread(fd, dst + done, len - done, at + (off_t)done);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        done += (size_t)got;
    }
    return 0;
}

/* The data of a planned read into out (without the GIL): the upper's pieces, the merged index between them. */
static int read_planned(const Reader *self, const Plan *plan, const Planned *p, char *out) {
    const int32_t *fds = self->fds.buf;
    size_t nfds = (size_t)self->fds.len / sizeof(int32_t);
    int64_t s0 = (int64_t)(p->r.offset / SECTOR), s1 = s0 + (int64_t)(p->r.length / SECTOR), pos = s0;
    for (size_t k = p->first; k < p->first + p->count; k++) {
        const Piece *q = &plan->pieces[k];
        if (q->start > pos && self->api->read(self->index, fds, nfds, pos, out + (pos - s0) * SECTOR,
                                              q->start - pos) < 0)
            return -1;
        char *dst = out + (q->start - s0) * SECTOR;
        size_t len = (size_t)(q->end - q->start) * SECTOR;
        if (q->fd < 0)
            memset(dst, 0, len);
        else if (pread_all(q->fd, dst, len, (off_t)q->moffset * SECTOR) < 0)
            return -1;
        pos = q->end;
    }
    return pos < s1 ? self->api->read(self->index, fds, nfds, pos, out + (pos - s0) * SECTOR, s1 - pos) : 0;
}

PyDoc_STRVAR(serve_doc,
             "serve(data, pos, structured, max_read, limit) -> (pos, replies, count): serve the reads at the front\n"
             "of data[pos:] (see the module) whose replies fit in limit bytes together; pos is where the first\n"
             "request not served starts, replies the replies of the count reads served, in order, each its header\n"
             "(structured: one NBD_REPLY_TYPE_OFFSET_DATA chunk; else a simple reply) and its data.");

static PyObject *reader_serve(Reader *self, PyObject *args) {
    Py_buffer in;
    Py_ssize_t pos, max_read, limit;
    int structured;
    if (!PyArg_ParseTuple(args, "y*npnn", &in, &pos, &structured, &max_read, &limit))
        return NULL;
    if (!self->handle || pos < 0 || pos > in.len) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, self->handle ? "pos out of range" : "Reader is not initialised");
        return NULL;
    }
    const unsigned char *base = in.buf;
    size_t at = (size_t)pos, end = (size_t)in.len, head = nbd_read_head_size(structured), total = 0;
    size_t room = limit > 0 ? (size_t)limit : 0;
    Plan plan = {0};
    NbdRequest r;
    int failed = 0;
    /* first (with the GIL) the reads served, the upper's pieces of those that meet a mark and the size of their
     * replies; then (without it) the replies. The requests are copied here: what the buffer holds later (a
     * bytearray another thread writes to) changes nothing. */
    while (nbd_parse_request(base + at, end - at, &r) && plain_read(self, &r, head, max_read, room - total)) {
        size_t first = plan.npieces;
        int64_t s0 = (int64_t)(r.offset / SECTOR), s1 = s0 + (int64_t)(r.length / SECTOR);
        if (is_marked(self, (uint64_t)s0, (uint64_t)s1)) {
            int got = self->upper ? upper_pieces(self, &plan, s0, s1) : 0;
            if (got < 0)
                failed = 1;
            if (got <= 0)
                break;
        }
        if (grow((void **)&plan.reads, &plan.capreads, plan.nreads + 1, sizeof(Planned)) < 0) {
            PyErr_NoMemory();
            failed = 1;
            break;
        }
        plan.reads[plan.nreads++] = (Planned){r, first, plan.npieces - first};
        total += head + r.length;
        at += REQUEST_SIZE;
    }
    PyObject *replies = failed ? NULL : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!replies) {
        free(plan.reads);
        free(plan.pieces);
        PyBuffer_Release(&in);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(replies);
    size_t done = 0, used = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; done < plan.nreads; done++) {
        const Planned *p = &plan.reads[done];
        nbd_put_read_head(out + used, p->r.handle, p->r.offset, p->r.length, structured);
        if (read_planned(self, &plan, p, (char *)out + used + head) < 0)
            break; /* that one is Python's */
        used += head + p->r.length;
    }
    Py_END_ALLOW_THREADS
    free(plan.reads);
    free(plan.pieces);
    PyBuffer_Release(&in);
    self->served += done;
    if (used < total && _PyBytes_Resize(&replies, (Py_ssize_t)used) < 0)
        return NULL;
    return Py_BuildValue("nNn", pos + (Py_ssize_t)(done * REQUEST_SIZE), replies, (Py_ssize_t)done);
}

static PyObject *reader_get_served(Reader *self, void *closure) { return PyLong_FromUnsignedLongLong(self->served); }

static PyObject *reader_get_asked(Reader *self, void *closure) { return PyLong_FromUnsignedLongLong(self->asked); }

PyDoc_STRVAR(mark_doc, "mark(offset, length): bytes [offset, offset+length) may be mapped by the upper from now on:\n"
                       "reads that meet them go to Python. Call it before the upper changes there.");

static PyObject *reader_mark(Reader *self, PyObject *args) {
    unsigned long long offset, length;
    if (!PyArg_ParseTuple(args, "KK", &offset, &length))
        return NULL;
    mark_range(self, offset, length);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(mark_records_doc,
             "mark_records(offsets, lengths): mark() for each record: int64 arrays of one length, in sectors (what\n"
             "an upper maps when the Reader is made).");

static PyObject *reader_mark_records(Reader *self, PyObject *args) {
    PyObject *objs[2];
    if (!PyArg_ParseTuple(args, "OO", &objs[0], &objs[1]))
        return NULL;
    Py_buffer views[2];
    int got = 0;
    for (; got < 2; got++) {
        if (PyObject_GetBuffer(objs[got], &views[got], PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
            break;
        if (views[got].itemsize != 8 || !views[got].format || !strchr("qlL", views[got].format[0])) {
            PyBuffer_Release(&views[got]);
            PyErr_SetString(PyExc_TypeError, "offsets and lengths must be int64 arrays");
            break;
        }
    }
    PyObject *out = NULL;
    if (got == 2) {
        if (views[0].len != views[1].len) {
            PyErr_SetString(PyExc_ValueError, "offsets and lengths must have one length");
        } else {
            const int64_t *o = views[0].buf, *n = views[1].buf;
            uint64_t sectors = self->size / SECTOR + 1; /* past the end: no product below overflows */
            for (Py_ssize_t k = 0; k < views[0].len / 8; k++)
                if (o[k] >= 0 && n[k] > 0 && (uint64_t)o[k] < sectors)
                    mark_range(self, (uint64_t)o[k] * SECTOR,
                               ((uint64_t)n[k] < sectors ? (uint64_t)n[k] : sectors) * SECTOR);
            out = Py_None;
            Py_INCREF(out);
        }
    }
    while (got-- > 0)
        PyBuffer_Release(&views[got]);
    return out;
}

PyDoc_STRVAR(marked_doc, "marked(offset, length) -> bool: whether a read of [offset, offset+length) meets a mark\n"
                         "(for tests).");

static PyObject *reader_marked(Reader *self, PyObject *args) {
    unsigned long long offset, length;
    if (!PyArg_ParseTuple(args, "KK", &offset, &length))
        return NULL;
    if (!self->marked || !length || offset >= self->size || length > self->size - offset)
        Py_RETURN_FALSE;
    return PyBool_FromLong(is_marked(self, offset / SECTOR, (offset + length + SECTOR - 1) / SECTOR));
}

static PyMethodDef reader_methods[] = {
    {"serve", (PyCFunction)reader_serve, METH_VARARGS, serve_doc},
    {"mark", (PyCFunction)reader_mark, METH_VARARGS, mark_doc},
    {"mark_records", (PyCFunction)reader_mark_records, METH_VARARGS, mark_records_doc},
    {"marked", (PyCFunction)reader_marked, METH_VARARGS, marked_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef reader_getset[] = {
    {"served", (getter)reader_get_served, NULL, "reads served here", NULL},
    {"asked", (getter)reader_get_asked, NULL, "how many times reads asked the upper for its records", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "overlaybd.export.nbd._nbdread.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("Reader(index, fds, size, upper=None): plain NBD reads of one merged index (a _lookup handle)\n"
                        "over the layer files fds (int32 array by source number), and of the upper above it through\n"
                        "its rows(start, end) where given"),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_methods = reader_methods,
    .tp_getset = reader_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_nbdread",
    .m_doc = "Plain NBD reads of a merged index, served without the GIL (see overlaybd.export.nbd.reads).",
    .m_size = -1,
};

/* The C API _nbdwrite's Writer uses, by the capsule _C_API_1: mark(reader, offset, length) (no GIL needed; 0, or
 * -1 if reader is not a Reader: checked with the GIL when the writer takes it, by is_reader). */
static int api_is_reader(PyObject *obj) { return PyObject_TypeCheck(obj, &ReaderType); }

static void api_mark(PyObject *reader, uint64_t offset, uint64_t length) {
    mark_range((Reader *)reader, offset, length);
}

typedef struct {
    int (*is_reader)(PyObject *obj);
    void (*mark)(PyObject *reader, uint64_t offset, uint64_t length);
} ReaderAPI;

static const ReaderAPI c_api = {api_is_reader, api_mark};

PyMODINIT_FUNC PyInit__nbdread(void) {
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *api = PyCapsule_New((void *)&c_api, "overlaybd.export.nbd._nbdread._C_API_1", NULL);
    if (!api || PyModule_AddObject(m, "_C_API_1", api) < 0) {
        Py_XDECREF(api);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
