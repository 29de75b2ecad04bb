/* Plain NBD writes to a log-structured writable upper (overlaybd.export.nbd.writes), in C: the WRITE requests at
 * the front of the bytes a client sent are served in one call, the GIL let go. Each write's data goes into space
 * the upper's appender (formats.lsmt._appender, by its capsule) reserves at the data file's end and writes there
 * (the appender holds the data file: once the layer detaches it, every call fails), then its index
 * record is appended, as WritableLayer does; the replies (simple or structured) come back together for one send.
 *
 * A request is served here only if it is a WRITE with no flag, of whole sectors, inside the device, of at most
 * max_write bytes, with all its payload in the bytes given. Serving stops at the first other one, and at the first
 * that fails (reserve, write or append): that one is left to Python, which serves it again and answers the error.
 * A failed write leaves its reserved space unused (nothing points at it); a failed append appends nothing.
 * Given the _nbdread.Reader of the same source (marks), each write marks its range there before anything else, so
 * that reads of it go to Python, which sees the upper.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "_nbdwire.h"

/* overlaybd.formats.lsmt._appender's capsule (its name carries the version); each call returns 0 or -errno */
#define APPENDER_API "overlaybd.formats.lsmt._appender._C_API_2"
typedef struct {
    int (*reserve)(PyObject *appender, uint64_t length, uint64_t *at);
    int (*write)(PyObject *appender, const char *data, size_t n, uint64_t at);
    int (*append)(PyObject *appender, const char *records, size_t n, uint64_t data_end, size_t *pending);
    int (*sync)(PyObject *appender, int *which);
} AppenderAPI;

/* overlaybd.export.nbd._nbdread's capsule: a write marks its range in the Reader of the same source first */
#define READER_API "overlaybd.export.nbd._nbdread._C_API_1"
typedef struct {
    int (*is_reader)(PyObject *obj);
    void (*mark)(PyObject *reader, uint64_t offset, uint64_t length);
} ReaderAPI;

typedef struct {
    PyObject_HEAD
    PyObject *marks;    /* the _nbdread.Reader whose granules each write marks before it maps them (NULL: none) */
    const ReaderAPI *marks_api;
    PyObject *appender; /* the upper's _appender.Appender (NULL: not initialised, nothing is served) */
    const AppenderAPI *api;
    int index_full;     /* an append said ENOSPC (the index never shrinks while the layer is open): from then on no
                         * write is served here, so none takes data space for a record that will be refused */
    uint64_t size;      /* the device's size in bytes */
    uint64_t max_write; /* bytes one record covers at most */
    uint64_t served;    /* writes served here (for tests and figures) */
} Writer;

typedef struct {
    uint64_t handle, offset;
    uint32_t length;
    size_t payload; /* where the data starts in the bytes */
} Write;

static void writer_dealloc(Writer *self) {
    Py_XDECREF(self->marks);
    Py_XDECREF(self->appender);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int writer_init(Writer *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"appender", "size", "max_write", "marks", NULL};
    PyObject *appender, *marks = Py_None;
    unsigned long long size, max_write;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKK|O", kwlist, &appender, &size, &max_write, &marks))
        return -1;
    if (self->appender) {
        PyErr_SetString(PyExc_RuntimeError, "Writer is already initialised");
        return -1;
    }
    const AppenderAPI *api = PyCapsule_Import(APPENDER_API, 0);
    if (!api)
        return -1;
    PyObject *module = PyImport_AddModule("overlaybd.formats.lsmt._appender"); /* imported by the capsule */
    PyObject *type = module ? PyObject_GetAttrString(module, "Appender") : NULL;
    if (!type)
        return -1;
    int ok = PyObject_TypeCheck(appender, (PyTypeObject *)type);
    Py_DECREF(type);
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "appender must be an _appender.Appender");
        return -1;
    }
    if (max_write < SECTOR) {
        PyErr_SetString(PyExc_ValueError, "max_write must be at least one sector");
        return -1;
    }
    if (marks != Py_None) {
        const ReaderAPI *marks_api = PyCapsule_Import(READER_API, 0);
        if (!marks_api)
            return -1;
        if (!marks_api->is_reader(marks)) {
            PyErr_SetString(PyExc_TypeError, "marks must be an _nbdread.Reader or None");
            return -1;
        }
        Py_INCREF(marks);
        self->marks = marks;
        self->marks_api = marks_api;
    }
    Py_INCREF(appender);
    self->appender = appender;
    self->api = api;
    self->size = size;
    self->max_write = max_write;
    return 0;
}

/* Whether [offset, offset+length) is a write served here. */
static int eligible(const Writer *self, uint64_t offset, uint64_t length) {
    return length && length % SECTOR == 0 && offset % SECTOR == 0 && length <= self->max_write &&
           offset <= self->size && length <= self->size - offset;
}

/* The request at ``p`` (``left`` bytes from there) if it is a whole write served here: 1, with *w filled. */
static int parse(const Writer *self, const unsigned char *p, size_t left, size_t at, Write *w) {
    NbdRequest r;
    if (!nbd_parse_request(p, left, &r))
        return 0;
    w->handle = r.handle;
    w->offset = r.offset;
    w->length = r.length;
    w->payload = at + REQUEST_SIZE;
    return r.command == CMD_WRITE && r.flags == 0 && eligible(self, w->offset, w->length) &&
           left - REQUEST_SIZE >= w->length;
}

/* One write, without the GIL: space, data, record. 0, or -1 (Python serves it again). */
static int do_write(Writer *self, const char *data, uint64_t offset, uint32_t length, size_t *pending) {
    uint64_t at;
    if (__atomic_load_n(&self->index_full, __ATOMIC_RELAXED))
        return -1;
    if (self->marks)
        self->marks_api->mark(self->marks, offset, length); /* before the upper maps it */
    int rc = self->api->reserve(self->appender, length, &at);
    if (rc < 0) {
        if (rc == -ENOSPC) /* the index takes no record more: it never shrinks while the layer is open */
            __atomic_store_n(&self->index_full, 1, __ATOMIC_RELAXED);
        return -1;
    }
    if (self->api->write(self->appender, data, length, at) < 0)
        return -1; /* the space reserved stays unused: nothing points at it */
    /* the record: offset | length << 50, moffset (zeroed bit 55 clear), in sectors, little-endian */
    uint64_t rec[2] = {htole64(offset / SECTOR | (uint64_t)(length / SECTOR) << 50), htole64(at / SECTOR)};
    rc = self->api->append(self->appender, (const char *)rec, sizeof rec, at + length, pending);
    if (rc == -ENOSPC)
        __atomic_store_n(&self->index_full, 1, __ATOMIC_RELAXED);
    return rc < 0 ? -1 : 0;
}

#define BATCH 256 /* writes parsed, then served without the GIL, at a time */

PyDoc_STRVAR(serve_doc,
             "serve(data, pos, structured) -> (pos, replies, count, pending): serve the writes at the front of\n"
             "data[pos:] (see the module); pos is where the first request not served starts, replies the replies\n"
             "of the count writes served, in order (structured: NBD_REPLY_TYPE_NONE chunks; else simple replies),\n"
             "pending the records the appender holds for the index after the last one (0 if none was served).");

static PyObject *writer_serve(Writer *self, PyObject *args) {
    Py_buffer in;
    Py_ssize_t pos;
    int structured;
    if (!PyArg_ParseTuple(args, "y*np", &in, &pos, &structured))
        return NULL;
    if (!self->appender || pos < 0 || pos > in.len) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, self->appender ? "pos out of range" : "Writer is not initialised");
        return NULL;
    }
    const unsigned char *base = in.buf;
    size_t at = (size_t)pos, end = (size_t)in.len, count = 0, pending = 0, cap = 0;
    size_t each = structured ? CHUNK_SIZE : SIMPLE_SIZE;
    unsigned char *replies = NULL;
    Write batch[BATCH];
    int failed = 0;
    while (!failed) {
        size_t k = 0, scan = at;
        while (k < BATCH && parse(self, base + scan, end - scan, scan, &batch[k])) {
            scan = batch[k].payload + batch[k].length;
            k++;
        }
        if (!k)
            break;
        if (count + k > cap) {
            size_t want = cap ? cap * 2 : 16;
            while (want < count + k)
                want *= 2;
            unsigned char *grown = PyMem_Realloc(replies, want * each);
            if (!grown) { /* those served are answered; the rest is Python's (MemoryError if none was served) */
                if (!count) {
                    PyErr_NoMemory();
                    failed = -1;
                }
                break;
            }
            replies = grown;
            cap = want;
        }
        size_t done = 0;
        Py_BEGIN_ALLOW_THREADS
        for (; done < k; done++) {
            const Write *w = &batch[done];
            if (do_write(self, (const char *)base + w->payload, w->offset, w->length, &pending) < 0)
                break;
            nbd_put_done(replies + (count + done) * each, w->handle, structured);
            __atomic_fetch_add(&self->served, 1, __ATOMIC_RELAXED);
        }
        Py_END_ALLOW_THREADS
        count += done;
        at = done ? batch[done - 1].payload + batch[done - 1].length : at;
        if (done < k)
            failed = 1; /* the one that failed is Python's */
        else if (k < BATCH)
            break; /* the next is not ours */
    }
    PyBuffer_Release(&in);
    PyObject *out = NULL;
    if (failed >= 0) {
        PyObject *bytes = PyBytes_FromStringAndSize((const char *)replies, (Py_ssize_t)(count * each));
        if (bytes)
            out = Py_BuildValue("nNnn", (Py_ssize_t)at, bytes, (Py_ssize_t)count, (Py_ssize_t)pending);
    }
    PyMem_Free(replies);
    return out;
}

PyDoc_STRVAR(write_doc,
             "write(offset, data) -> int: one write served as serve() serves each: the records the appender holds\n"
             "for the index after it, or -1 if it is not served here (not whole sectors, too large, outside the\n"
             "device, or it failed: Python serves it again and raises the error).");

static PyObject *writer_write(Writer *self, PyObject *args) {
    unsigned long long offset;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Ky*", &offset, &data))
        return NULL;
    if (!self->appender) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "Writer is not initialised");
        return NULL;
    }
    int rc = -1;
    size_t pending = 0;
    if (data.len <= UINT32_MAX && eligible(self, offset, (uint64_t)data.len)) {
        Py_BEGIN_ALLOW_THREADS
        rc = do_write(self, data.buf, offset, (uint32_t)data.len, &pending);
        Py_END_ALLOW_THREADS
        if (rc == 0)
            __atomic_fetch_add(&self->served, 1, __ATOMIC_RELAXED);
    }
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t(rc < 0 ? -1 : (Py_ssize_t)pending);
}

static PyObject *writer_get_served(Writer *self, void *closure) {
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->served, __ATOMIC_RELAXED));
}

static PyMethodDef writer_methods[] = {
    {"serve", (PyCFunction)writer_serve, METH_VARARGS, serve_doc},
    {"write", (PyCFunction)writer_write, METH_VARARGS, write_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef writer_getset[] = {
    {"served", (getter)writer_get_served, NULL, "writes served here", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "overlaybd.export.nbd._nbdwrite.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("Writer(appender, size, max_write, marks=None): plain NBD writes to one log-structured upper\n"
                        "(each marks its range in marks, the _nbdread.Reader of the same source, first)"),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)writer_init,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_methods = writer_methods,
    .tp_getset = writer_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_nbdwrite",
    .m_doc = "Plain NBD writes to a log-structured upper, served without the GIL (see overlaybd.export.nbd.writes).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__nbdwrite(void) {
    if (PyType_Ready(&WriterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&WriterType);
    if (PyModule_AddObject(m, "Writer", (PyObject *)&WriterType) < 0) {
        Py_DECREF(&WriterType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
