/* The cache's hit path in C (overlaybd.cache.store.CachedSource), without locks and without the GIL.
 *
 * Readers take no lock. Whoever drops cached bytes (eviction, invalidation, a reset) holds the cache's
 * generation lock and moves the generation counter (CACHE/generation, mapped shared by every process) to an odd
 * value before it changes anything and to the next even value after. A reader notes the generation, checks that
 * every chunk of its read is present in the map, copies the bytes, and notes the generation again: if it was odd
 * or has moved, bytes may have been dropped under it and the read goes the locked way (store.py, which holds the
 * whole protocol and runs it alone where this extension is not built). Fetching only adds bytes (data written
 * before the map says so), so it needs no generation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_CHUNKS 4096 /* a read over more chunks than this goes the Python way */

enum { MISS = 0, HIT = 1, SHORT = 2, MOVED = 3 };

static int pread_all(int fd, char *buf, size_t len, off_t offset, size_t *done) {
    *done = 0;
    while (*done < len) {
        ssize_t got = pread(fd, buf + *done, len - *done, offset + (off_t)*done);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return -1;
        if (got == 0)
            break;
        *done += (size_t)got;
    }
    return 0;
}

/* MISS, HIT, SHORT (the data file ends before the read does) or MOVED (the generation was odd or moved); -1 with
 * errno on an OS error. */
static int read_present(const uint64_t *generation, int map_fd, int data_fd, off_t first, size_t chunks, char *buf,
                        size_t len, off_t offset) {
    unsigned char present[MAX_CHUNKS];
    uint64_t before = __atomic_load_n(generation, __ATOMIC_ACQUIRE);
    if (before & 1)
        return MOVED;
    size_t got;
    if (pread_all(map_fd, (char *)present, chunks, first, &got) < 0)
        return -1;
    if (got != chunks || memchr(present, 0, chunks))
        return MISS;
    if (pread_all(data_fd, buf, len, offset, &got) < 0)
        return -1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the copy is done before the generation is looked at again */
    if (__atomic_load_n(generation, __ATOMIC_ACQUIRE) != before)
        return MOVED;
    return got == len ? HIT : SHORT;
}

static uint64_t *generation_of(Py_buffer *view) {
    if (view->len < 8 || ((uintptr_t)view->buf & 7)) {
        PyErr_SetString(PyExc_ValueError, "the generation must be an 8-byte aligned buffer of at least 8 bytes");
        return NULL;
    }
    return (uint64_t *)view->buf;
}

PyDoc_STRVAR(read_present_doc,
             "read_present(generation, map_fd, data_fd, first_chunk, chunks, buf, offset) -> MISS, HIT, SHORT or MOVED"
             "\n\nIf map bytes [first_chunk, first_chunk + chunks) are all non-zero, fill buf from data_fd at offset;"
             "\nHIT only if the generation (a writable shared buffer) was even and did not move meanwhile.");

static PyObject *py_read_present(PyObject *self, PyObject *args) {
    int map_fd, data_fd;
    long long first, offset;
    Py_ssize_t chunks;
    Py_buffer gen, buf;
    if (!PyArg_ParseTuple(args, "w*iiLnw*L", &gen, &map_fd, &data_fd, &first, &chunks, &buf, &offset))
        return NULL;
    PyObject *out = NULL;
    uint64_t *generation = generation_of(&gen);
    if (generation) {
        if (chunks <= 0 || chunks > MAX_CHUNKS || first < 0 || offset < 0) {
            out = PyLong_FromLong(MISS);
        } else {
            int result;
            Py_BEGIN_ALLOW_THREADS
            result = read_present(generation, map_fd, data_fd, (off_t)first, (size_t)chunks, buf.buf,
                                  (size_t)buf.len, (off_t)offset);
            Py_END_ALLOW_THREADS
            out = result < 0 ? PyErr_SetFromErrno(PyExc_OSError) : PyLong_FromLong(result);
        }
    }
    PyBuffer_Release(&gen);
    PyBuffer_Release(&buf);
    return out;
}

PyDoc_STRVAR(bump_doc, "bump(generation) -> int: add one to the generation, atomically; returns the new value.");

static PyObject *py_bump(PyObject *self, PyObject *args) {
    Py_buffer gen;
    if (!PyArg_ParseTuple(args, "w*", &gen))
        return NULL;
    uint64_t *generation = generation_of(&gen);
    PyObject *out = generation ? PyLong_FromUnsignedLongLong(__atomic_add_fetch(generation, 1, __ATOMIC_SEQ_CST))
                               : NULL;
    PyBuffer_Release(&gen);
    return out;
}

static PyMethodDef methods[] = {
    {"read_present", py_read_present, METH_VARARGS, read_present_doc},
    {"bump", py_bump, METH_VARARGS, bump_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hits", "The cache's lock-free hit path in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hits(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "MISS", MISS) < 0 || PyModule_AddIntConstant(m, "HIT", HIT) < 0 ||
        PyModule_AddIntConstant(m, "SHORT", SHORT) < 0 || PyModule_AddIntConstant(m, "MOVED", MOVED) < 0 ||
        PyModule_AddIntConstant(m, "MAX_CHUNKS", MAX_CHUNKS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
