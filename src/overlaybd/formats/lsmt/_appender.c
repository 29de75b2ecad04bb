/* Where a log-structured writable LSMT layer appends (overlaybd.formats.lsmt.appender), in C: space at the end of
 * the data file (reserve), the data written there (write), and 16-byte index records at the end of the index file
 * (append), which it keeps until the layer's in-memory index takes them (take). Python calls it with the GIL let
 * go; C threads call it without the GIL through the capsule ``_C_API_2`` (overlaybd.export._fusedev serves FUSE
 * writes and fsyncs with it, never entering Python). sync() makes every record appended so far durable after the
 * data it points at: fdatasync of the data file, then of the index file, with no append in between.
 *
 * The appender is the one holder of the files' descriptors for writers: detach() waits for the writes in flight,
 * and from then on every call fails (EBADF), so once it returns the layer may close its files without a write
 * landing on a descriptor number the process has reused. An append past index_limit (the index file's end may not
 * pass it) fails with ENOSPC and changes nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RECORD 16
#define KEEP_CAP (1 << 20) /* bytes of the pending records' buffer kept across a take */

typedef struct {
    PyObject_HEAD
    int ready;
    pthread_rwlock_t write_rw; /* writes of data hold it shared; detach takes it exclusively */
    pthread_mutex_t data_mu;  /* the data file's end */
    int data_fd;
    uint64_t data_end;        /* where the next reservation starts */
    uint64_t data_ahead;      /* allocated (fallocate KEEP_SIZE) up to here */
    uint64_t data_step;       /* allocated at a time */
    pthread_mutex_t index_mu; /* the index file's end; held across a sync */
    int index_fd;
    uint64_t index_end;
    uint64_t index_ahead;
    uint64_t index_step;
    uint64_t index_limit;     /* the index file's end may not pass it (ENOSPC) */
    pthread_mutex_t pending_mu; /* the records waiting for the index: held for an append's write at most, never across
                                 * a sync (take() waits for it holding the GIL) */
    char *pending;            /* records appended and not yet taken, in order */
    size_t npending;          /* bytes */
    size_t cap;
    uint64_t data_high;       /* the highest data-file end a record appended so far points at */
    int broken;               /* a failed append left records past the index file's end that it could not cut off:
                               * every later append fails (EIO), else one shorter would leave them to be replayed */
} Appender;

/* Fields read without their mutex (the getters, and whether anything is pending) are read and written atomically. */
#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_ACQUIRE)
#define STORE(field, v) __atomic_store_n(&(field), (v), __ATOMIC_RELEASE)

/* What other extensions call without the GIL; the capsule's name carries its version. Each returns 0 or -errno. */
typedef struct {
    int (*reserve)(PyObject *appender, uint64_t length, uint64_t *at);
    int (*write)(PyObject *appender, const char *data, size_t n, uint64_t at);
    int (*append)(PyObject *appender, const char *records, size_t n, uint64_t data_end, size_t *pending);
    int (*sync)(PyObject *appender, int *which);
} AppenderAPI;

static void allocate_ahead(int fd, uint64_t *ahead, uint64_t end, uint64_t need, uint64_t step) {
    if (end + need > *ahead) { /* a flush then finds the blocks allocated, and only marks them written */
        *ahead = end + need + step;
        (void)fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)end, (off_t)(*ahead - end)); /* else: as without it */
    }
}

/* ``length`` bytes at the data file's end are the caller's, from *at. */
static int do_reserve(PyObject *obj, uint64_t length, uint64_t *at) {
    Appender *self = (Appender *)obj;
    if (!LOAD(self->ready))
        return -EBADF; /* not initialised: no files, no mutexes */
    int rc = 0;
    pthread_mutex_lock(&self->data_mu);
    if (self->data_fd < 0) {
        rc = -EBADF;
    } else if (LOAD(self->index_end) + RECORD > self->index_limit) {
        rc = -ENOSPC; /* the index takes no record more: no data space for one (its append would be refused) */
    } else {
        *at = self->data_end;
        uint64_t ahead = self->data_ahead;
        allocate_ahead(self->data_fd, &ahead, self->data_end, length, self->data_step);
        STORE(self->data_ahead, ahead);
        STORE(self->data_end, self->data_end + length);
    }
    pthread_mutex_unlock(&self->data_mu);
    return rc;
}

static int pwrite_all(int fd, const char *buf, size_t len, uint64_t at) {
    while (len) {
        ssize_t put = pwrite(fd, buf, len, (off_t)at);
        if (put < 0 && errno == EINTR)
            continue;
        if (put < 0)
            return -errno;
        if (put == 0)
            return -EIO;
        buf += put;
        len -= (size_t)put;
        at += (uint64_t)put;
    }
    return 0;
}

/* Write ``n`` bytes of data at ``at`` in the data file (space the caller reserved). Writes run in parallel; detach
 * waits for them. */
static int do_write(PyObject *obj, const char *data, size_t n, uint64_t at) {
    Appender *self = (Appender *)obj;
    if (!LOAD(self->ready))
        return -EBADF; /* not initialised: no files, no locks */
    pthread_rwlock_rdlock(&self->write_rw);
    int fd = LOAD(self->data_fd);
    int rc = fd < 0 ? -EBADF : pwrite_all(fd, data, n, at);
    pthread_rwlock_unlock(&self->write_rw);
    return rc;
}

/* Append ``n`` bytes of records (a multiple of 16) whose data is written up to ``data_end``. On failure nothing is
 * appended: the index file is cut back to its end (whole records a short write left there would otherwise outlive
 * a shorter next append and be replayed on open, after records appended later). The records join the
 * pending ones in the same step as they join the file (pending_mu held across the write of a few bytes), so the
 * index never takes a record the file does not hold, nor misses one it does. */
static int do_append(PyObject *obj, const char *records, size_t n, uint64_t data_end, size_t *pending) {
    Appender *self = (Appender *)obj;
    if (!LOAD(self->ready))
        return -EBADF; /* not initialised: no files, no mutexes */
    int rc = 0;
    pthread_mutex_lock(&self->index_mu);
    pthread_mutex_lock(&self->pending_mu);
    if (self->index_fd < 0) {
        rc = -EBADF;
        goto out;
    }
    if (self->broken) {
        rc = -EIO;
        goto out;
    }
    if (self->index_end + n > self->index_limit) {
        rc = -ENOSPC;
        goto out;
    }
    if (self->npending + n > self->cap) {
        size_t cap = self->cap ? self->cap : 4096;
        while (cap < self->npending + n)
            cap *= 2;
        char *p = realloc(self->pending, cap);
        if (!p) {
            rc = -ENOMEM;
            goto out;
        }
        self->pending = p;
        self->cap = cap;
    }
    uint64_t ahead = self->index_ahead;
    allocate_ahead(self->index_fd, &ahead, self->index_end, n, self->index_step);
    STORE(self->index_ahead, ahead);
    rc = pwrite_all(self->index_fd, records, n, self->index_end);
    if (rc < 0) {
        if (ftruncate(self->index_fd, (off_t)self->index_end) == 0)
            STORE(self->index_ahead, self->index_end); /* what was allocated ahead went with it */
        else
            self->broken = 1;
        goto out;
    }
    STORE(self->index_end, self->index_end + n);
    memcpy(self->pending + self->npending, records, n);
    STORE(self->npending, self->npending + n);
    if (data_end > self->data_high)
        STORE(self->data_high, data_end);
out:
    if (pending)
        *pending = self->npending / RECORD;
    pthread_mutex_unlock(&self->pending_mu);
    pthread_mutex_unlock(&self->index_mu);
    return rc;
}

/* fdatasync data, then index, no append in between: 0, or -errno with *which 0 (data) or 1 (index). */
static int do_sync(PyObject *obj, int *which) {
    Appender *self = (Appender *)obj;
    if (!LOAD(self->ready)) {
        *which = 0;
        return -EBADF; /* not initialised: no files, no mutexes */
    }
    int rc = 0;
    pthread_mutex_lock(&self->index_mu);
    if (self->index_fd < 0 || self->data_fd < 0)
        rc = -EBADF, *which = 0;
    else if (fdatasync(self->data_fd) != 0)
        rc = -errno, *which = 0;
    else if (fdatasync(self->index_fd) != 0)
        rc = -errno, *which = 1;
    pthread_mutex_unlock(&self->index_mu);
    return rc;
}

static void app_dealloc(Appender *self) {
    if (self->ready) {
        pthread_rwlock_destroy(&self->write_rw);
        pthread_mutex_destroy(&self->data_mu);
        pthread_mutex_destroy(&self->index_mu);
        pthread_mutex_destroy(&self->pending_mu);
    }
    free(self->pending);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* An Appender not (yet) initialised has no files: every call fails (EBADF), none goes to descriptor 0. */
static PyObject *app_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Appender *self = (Appender *)PyType_GenericNew(type, args, kwds);
    if (self) {
        self->data_fd = -1;
        self->index_fd = -1;
    }
    return (PyObject *)self;
}

static int app_init(Appender *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"data_fd",   "data_end",   "data_step",   "index_fd",
                             "index_end", "index_step", "index_limit", NULL};
    int data_fd, index_fd;
    unsigned long long data_end, data_step, index_end, index_step, index_limit = UINT64_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKKiKK|K", kwlist, &data_fd, &data_end, &data_step, &index_fd,
                                     &index_end, &index_step, &index_limit))
        return -1;
    if (self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Appender is already initialised");
        return -1;
    }
    if (pthread_rwlock_init(&self->write_rw, NULL) != 0 || pthread_mutex_init(&self->data_mu, NULL) != 0 ||
        pthread_mutex_init(&self->index_mu, NULL) != 0 || pthread_mutex_init(&self->pending_mu, NULL) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot make a mutex");
        return -1;
    }
    self->ready = 1;
    self->data_fd = data_fd;
    self->data_end = data_end;
    self->data_step = data_step;
    self->index_fd = index_fd;
    self->index_end = index_end;
    self->index_step = index_step;
    self->index_limit = index_limit;
    return 0;
}

static PyObject *raise_errno(int rc, PyObject *filename) {
    errno = -rc;
    return filename ? PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, filename)
                    : PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *app_reserve(Appender *self, PyObject *args) {
    unsigned long long length;
    if (!PyArg_ParseTuple(args, "K", &length))
        return NULL;
    uint64_t at = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = do_reserve((PyObject *)self, length, &at);
    Py_END_ALLOW_THREADS
    return rc < 0 ? raise_errno(rc, NULL) : PyLong_FromUnsignedLongLong(at);
}

static PyObject *app_write(Appender *self, PyObject *args) {
    Py_buffer buf;
    unsigned long long at;
    if (!PyArg_ParseTuple(args, "y*K", &buf, &at))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = do_write((PyObject *)self, buf.buf, (size_t)buf.len, at);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (rc < 0)
        return raise_errno(rc, NULL);
    Py_RETURN_NONE;
}

static PyObject *app_append(Appender *self, PyObject *args) {
    Py_buffer buf;
    unsigned long long data_end;
    if (!PyArg_ParseTuple(args, "y*K", &buf, &data_end))
        return NULL;
    if (buf.len % RECORD) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "records are 16 bytes each");
        return NULL;
    }
    size_t pending = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = do_append((PyObject *)self, buf.buf, (size_t)buf.len, data_end, &pending);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return rc < 0 ? raise_errno(rc, NULL) : PyLong_FromSize_t(pending);
}

static PyObject *app_take(Appender *self, PyObject *unused) {
    if (!self->ready)
        return PyBytes_FromStringAndSize("", 0);
    /* The bytes are made with pending_mu held (no holder of it waits for the GIL): if that fails (MemoryError),
     * every record stays pending for the next take, not lost to the index while the file holds it. */
    pthread_mutex_lock(&self->pending_mu);
    PyObject *out = PyBytes_FromStringAndSize(self->pending ? self->pending : "", (Py_ssize_t)self->npending);
    if (out) {
        STORE(self->npending, 0);
        if (self->cap > KEEP_CAP) { /* a large one goes; a small one stays, for the next appends */
            free(self->pending);
            self->pending = NULL;
            self->cap = 0;
        }
    }
    pthread_mutex_unlock(&self->pending_mu);
    return out;
}

static PyObject *app_sync(Appender *self, PyObject *args) {
    PyObject *data_path, *index_path;
    if (!PyArg_ParseTuple(args, "OO", &data_path, &index_path))
        return NULL;
    int rc, which = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = do_sync((PyObject *)self, &which);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc, which ? index_path : data_path);
    Py_RETURN_NONE;
}

static PyObject *app_detach(Appender *self, PyObject *unused) {
    if (!self->ready)
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&self->write_rw); /* the writes in flight end first */
    pthread_mutex_lock(&self->data_mu);
    STORE(self->data_fd, -1);
    pthread_mutex_unlock(&self->data_mu);
    pthread_rwlock_unlock(&self->write_rw);
    pthread_mutex_lock(&self->index_mu);
    self->index_fd = -1;
    pthread_mutex_unlock(&self->index_mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#define GETTER(name, expr)                                                                                           \
    static PyObject *app_get_##name(Appender *self, void *closure) {                                                \
        return PyLong_FromUnsignedLongLong((unsigned long long)(expr));                                              \
    }
GETTER(data_end, LOAD(self->data_end))
GETTER(data_ahead, LOAD(self->data_ahead))
GETTER(index_end, LOAD(self->index_end))
GETTER(index_ahead, LOAD(self->index_ahead))
GETTER(pending, LOAD(self->npending) / RECORD)
GETTER(data_high, LOAD(self->data_high))

static PyMethodDef app_methods[] = {
    {"reserve", (PyCFunction)app_reserve, METH_VARARGS,
     "reserve(length) -> int: where length bytes of new data go in the data file (they are the caller's)."},
    {"write", (PyCFunction)app_write, METH_VARARGS,
     "write(data, at): write data at byte at of the data file (space reserved for it)."},
    {"append", (PyCFunction)app_append, METH_VARARGS,
     "append(records, data_end) -> int: write records (16 bytes each; their data written up to data_end) at the\n"
     "end of the index file; the records now pending."},
    {"take", (PyCFunction)app_take, METH_NOARGS, "take() -> bytes: the records appended since the last take, in order."},
    {"sync", (PyCFunction)app_sync, METH_VARARGS,
     "sync(data_path, index_path): fdatasync data, then index, no append in between (OSError names the file)."},
    {"detach", (PyCFunction)app_detach, METH_NOARGS,
     "detach(): wait for the writes in flight; every call fails (EBADF) from then on: the files close."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef app_getset[] = {
    {"data_end", (getter)app_get_data_end, NULL, "where the next reservation starts", NULL},
    {"data_ahead", (getter)app_get_data_ahead, NULL, "data file allocated ahead up to here (0: nothing yet)", NULL},
    {"index_end", (getter)app_get_index_end, NULL, "where the next record goes", NULL},
    {"index_ahead", (getter)app_get_index_ahead, NULL, "index file allocated ahead up to here (0: nothing yet)", NULL},
    {"pending", (getter)app_get_pending, NULL, "records appended and not yet taken", NULL},
    {"data_high", (getter)app_get_data_high, NULL, "the highest data end of a record appended", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "overlaybd.formats.lsmt._appender.Appender",
    .tp_basicsize = sizeof(Appender),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("Appender(data_fd, data_end, data_step, index_fd, index_end, index_step, index_limit)"),
    .tp_new = app_new,
    .tp_init = (initproc)app_init,
    .tp_dealloc = (destructor)app_dealloc,
    .tp_methods = app_methods,
    .tp_getset = app_getset,
};

static AppenderAPI api = {do_reserve, do_write, do_append, do_sync};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_appender",
    .m_doc = "Appends to a writable LSMT layer without the GIL (see overlaybd.formats.lsmt.appender).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__appender(void) {
    if (PyType_Ready(&AppenderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&AppenderType);
    if (PyModule_AddObject(m, "Appender", (PyObject *)&AppenderType) < 0) {
        Py_DECREF(&AppenderType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *cap = PyCapsule_New(&api, "overlaybd.formats.lsmt._appender._C_API_2", NULL);
    if (!cap || PyModule_AddObject(m, "_C_API_2", cap) < 0) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
