/* The common read of a merged index in C (overlaybd.formats.lsmt.mapping.MergedIndex.rows): find the one record
 * a read lies in, with an interpolated first guess.
 *
 * A plain binary search over the ends of 65,000 records makes 16 probes, the last half of them cache misses once
 * the reads' data has gone through the caches; block addresses are spread fairly evenly over a disk, so a guess
 * in proportion lands near the answer and a gallop from there touches a line or two. The Python code beside it
 * (numpy's searchsorted) gives the same answers and runs where this extension is not built.
 *
 * read() serves a whole read of a stack's lower layers in one call: the records it meets, the zeros between and
 * in them, and a pread for each piece of data, into the caller's buffer with the GIL released
 * (mapping.read_direct is the same in Python).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define MOFFSET_BITS 40
#define MOFFSET_MASK ((UINT64_C(1) << MOFFSET_BITS) - 1) /* also the mark of a zeroed record */

typedef struct {
    const int64_t *ends;
    const uint64_t *packed; /* moffset (bits 0-39), length (40-55), source (56-63): mapping.MergedIndex */
    size_t n;
    PyObject *arrays; /* the tuple of the two arrays, kept alive while the handle is */
    Py_buffer views[2];
} Index;

static const char INDEX_NAME[] = "overlaybd.lsmt.Index";

static void index_free(PyObject *capsule) {
    Index *ix = PyCapsule_GetPointer(capsule, INDEX_NAME);
    if (!ix)
        return;
    for (int k = 0; k < 2; k++)
        PyBuffer_Release(&ix->views[k]);
    Py_XDECREF(ix->arrays);
    PyMem_Free(ix);
}

PyDoc_STRVAR(index_doc, "index(ends, packed) -> handle: int64 and uint64 arrays of one length, held (not copied)\n"
                        "for one_row.");

static PyObject *py_index(PyObject *self, PyObject *args) {
    PyObject *arrays[2];
    if (!PyArg_ParseTuple(args, "OO", &arrays[0], &arrays[1]))
        return NULL;
    Index *ix = PyMem_Calloc(1, sizeof(Index));
    if (!ix)
        return PyErr_NoMemory();
    int got = 0;
    for (; got < 2; got++) {
        if (PyObject_GetBuffer(arrays[got], &ix->views[got], PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        if (ix->views[got].itemsize != 8) {
            got++;
            PyErr_SetString(PyExc_ValueError, "index arrays must be int64 and uint64");
            goto fail;
        }
    }
    if (ix->views[0].len != ix->views[1].len) {
        PyErr_SetString(PyExc_ValueError, "index arrays must have one length");
        goto fail;
    }
    ix->ends = ix->views[0].buf;
    ix->packed = ix->views[1].buf;
    ix->n = (size_t)(ix->views[0].len / 8);
    ix->arrays = PyTuple_Pack(2, arrays[0], arrays[1]);
    if (!ix->arrays)
        goto fail;
    PyObject *capsule = PyCapsule_New(ix, INDEX_NAME, index_free);
    if (!capsule) {
        Py_DECREF(ix->arrays);
        goto fail;
    }
    return capsule;
fail:
    while (got-- > 0)
        PyBuffer_Release(&ix->views[got]);
    PyMem_Free(ix);
    return NULL;
}

/* The first i with ends[i] > key (ends sorted ascending). */
static size_t upper_bound(const int64_t *e, size_t n, int64_t key) {
    if (n == 0 || e[0] > key)
        return 0;
    if (e[n - 1] <= key)
        return n;
    /* e[0] <= key < e[n - 1]: guess in proportion, gallop to a bracket e[lo] <= key < e[hi], then halve it */
    size_t g = (size_t)((double)(key - e[0]) / (double)(e[n - 1] - e[0]) * (double)(n - 1));
    if (g > n - 1)
        g = n - 1;
    size_t lo, hi, step = 1;
    if (e[g] <= key) {
        lo = g;
        for (;;) {
            size_t h = lo + step;
            if (h >= n - 1) {
                hi = n - 1;
                break;
            }
            if (e[h] > key) {
                hi = h;
                break;
            }
            lo = h;
            step <<= 1;
        }
    } else {
        hi = g;
        for (;;) {
            if (hi < step) {
                lo = 0;
                break;
            }
            size_t l = hi - step;
            if (e[l] <= key) {
                lo = l;
                break;
            }
            hi = l;
            step <<= 1;
        }
    }
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (e[mid] <= key)
            lo = mid;
        else
            hi = mid;
    }
    return hi;
}

PyDoc_STRVAR(one_row_doc,
             "one_row(handle, start, end) -> 0, (offset, length, moffset, zeroed, source) or None\n\n"
             "Sectors [start, end): 0 when no record meets them, the record when they lie in one, None when more\n"
             "than one may meet them (the caller's general path answers).");

static PyObject *py_one_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "one_row(handle, start, end)");
        return NULL;
    }
    Index *ix = PyCapsule_GetPointer(args[0], INDEX_NAME);
    if (!ix)
        return NULL;
    long long start = PyLong_AsLongLong(args[1]);
    long long end = PyLong_AsLongLong(args[2]);
    if ((start == -1 || end == -1) && PyErr_Occurred())
        return NULL;
    size_t i = upper_bound(ix->ends, ix->n, start);
    if (i >= ix->n)
        return PyLong_FromLong(0);
    int64_t e = ix->ends[i];
    if (e < end)
        Py_RETURN_NONE;
    uint64_t p = ix->packed[i];
    int64_t ln = (int64_t)((p >> MOFFSET_BITS) & 0xFFFF);
    if (e - ln >= end)
        return PyLong_FromLong(0);
    uint64_t m = p & MOFFSET_MASK;
    int zeroed = m == MOFFSET_MASK;
    return Py_BuildValue("(LLLOi)", (long long)(e - ln), (long long)ln, zeroed ? -1LL : (long long)m,
                         zeroed ? Py_True : Py_False, (int)(p >> 56));
}

PyDoc_STRVAR(upper_bound_doc, "upper_bound(handle, key) -> the first i with ends[i] > key (for tests).");

static PyObject *py_upper_bound(PyObject *self, PyObject *args) {
    PyObject *capsule;
    long long key;
    if (!PyArg_ParseTuple(args, "OL", &capsule, &key))
        return NULL;
    Index *ix = PyCapsule_GetPointer(capsule, INDEX_NAME);
    if (!ix)
        return NULL;
    return PyLong_FromSize_t(upper_bound(ix->ends, ix->n, key));
}

#define SECTOR 512

/* Fill [buf, buf + n * SECTOR) from the layer files for sectors [start, start + n); 0, or -1 where anything is
 * amiss (a source without a file, a short read, an error): the caller reads the general way, which says why. */
static int read_pieces(const Index *ix, const int32_t *fds, size_t nfds, int64_t start, char *buf, int64_t n) {
    int64_t end = start + n, pos = start;
    size_t i = upper_bound(ix->ends, ix->n, start);
    while (pos < end) {
        int64_t o = end, e = end;
        uint64_t p = 0;
        if (i < ix->n) {
            p = ix->packed[i];
            e = ix->ends[i];
            o = e - (int64_t)((p >> MOFFSET_BITS) & 0xFFFF);
        }
        if (o > pos) { /* a hole up to the record (or to the end) */
            int64_t hi = o < end ? o : end;
            memset(buf + (pos - start) * SECTOR, 0, (size_t)(hi - pos) * SECTOR);
            pos = hi;
            continue;
        }
        int64_t hi = e < end ? e : end;
        uint64_t m = p & MOFFSET_MASK;
        char *dst = buf + (pos - start) * SECTOR;
        size_t len = (size_t)(hi - pos) * SECTOR;
        if (m == MOFFSET_MASK) {
            memset(dst, 0, len);
        } else {
            size_t src = (size_t)(p >> 56);
            if (src >= nfds || fds[src] < 0)
                return -1;
            off_t at = (off_t)(m + (uint64_t)(pos - o)) * SECTOR;
            size_t done = 0;
            while (done < len) {
                ssize_t got = pread(fds[src], dst + done, len - done, at + (off_t)done);
                if (got < 0 && errno == EINTR)
                    continue;
                if (got <= 0)
                    return -1;
                done += (size_t)got;
            }
        }
        pos = hi;
        i++;
    }
    return 0;
}

PyDoc_STRVAR(read_doc,
             "read(handle, fds, start, buf) -> bool\n\n"
             "Fill the writable buffer buf (a whole number of 512-byte sectors) with sectors from start on: the\n"
             "records of the index, zeros where there is none or a zeroed one, data read from fds (int32 file\n"
             "descriptors by source number; -1 for a source without one). False where that is not enough (a source\n"
             "without a file, a short read, an error): the buffer is then partly written, and the caller reads\n"
             "the general way.");

static PyObject *py_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "read(handle, fds, start, buf)");
        return NULL;
    }
    Index *ix = PyCapsule_GetPointer(args[0], INDEX_NAME);
    if (!ix)
        return NULL;
    long long start = PyLong_AsLongLong(args[2]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer fds, buf;
    if (PyObject_GetBuffer(args[1], &fds, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&fds);
        return NULL;
    }
    int rc = -1;
    if (start >= 0 && buf.len % SECTOR == 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = read_pieces(ix, fds.buf, (size_t)fds.len / sizeof(int32_t), start, buf.buf, buf.len / SECTOR);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&fds);
    return PyBool_FromLong(rc == 0);
}

/* The C API other extensions use (export.nbd._nbdread), by the capsule _C_API_1: the Index behind a handle (with
 * the GIL; NULL with an exception if it is not one), and read_pieces (without the GIL; the caller holds the
 * handle). */
static const void *index_of(PyObject *capsule) { return PyCapsule_GetPointer(capsule, INDEX_NAME); }

static int read_sectors(const void *ix, const int32_t *fds, size_t nfds, int64_t start, char *buf, int64_t n) {
    return read_pieces((const Index *)ix, fds, nfds, start, buf, n);
}

typedef struct {
    const void *(*index_of)(PyObject *capsule);
    int (*read)(const void *index, const int32_t *fds, size_t nfds, int64_t start, char *buf, int64_t n);
} LookupAPI;

static const LookupAPI c_api = {index_of, read_sectors};

static PyMethodDef methods[] = {
    {"read", (PyCFunction)(void (*)(void))py_read, METH_FASTCALL, read_doc},
    {"index", py_index, METH_VARARGS, index_doc},
    {"one_row", (PyCFunction)(void (*)(void))py_one_row, METH_FASTCALL, one_row_doc},
    {"upper_bound", py_upper_bound, METH_VARARGS, upper_bound_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lookup", "The common read of a merged index, in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lookup(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *api = PyCapsule_New((void *)&c_api, "overlaybd.formats.lsmt._lookup._C_API_1", NULL);
    if (!api || PyModule_AddObject(m, "_C_API_1", api) < 0) {
        Py_XDECREF(api);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
