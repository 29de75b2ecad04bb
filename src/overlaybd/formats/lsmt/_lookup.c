/* The common read of a merged index in C (overlaybd.formats.lsmt.mapping.MergedIndex.rows): find the one record
 * a read lies in, with an interpolated first guess.
 *
 * A plain binary search over the ends of 65,000 records makes 16 probes, the last half of them cache misses once
 * the reads' data has gone through the caches; block addresses are spread fairly evenly over a disk, so a guess
 * in proportion lands near the answer and a gallop from there touches a line or two. The Python code beside it
 * (numpy's searchsorted) gives the same answers and runs where this extension is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

typedef struct {
    const int64_t *ends;
    const uint16_t *lengths;
    const int64_t *moffsets;
    const uint8_t *sources;
    size_t n;
    PyObject *arrays; /* the tuple of the four arrays, kept alive while the handle is */
    Py_buffer views[4];
} Index;

static const char INDEX_NAME[] = "overlaybd.lsmt.Index";

static void index_free(PyObject *capsule) {
    Index *ix = PyCapsule_GetPointer(capsule, INDEX_NAME);
    if (!ix)
        return;
    for (int k = 0; k < 4; k++)
        PyBuffer_Release(&ix->views[k]);
    Py_XDECREF(ix->arrays);
    PyMem_Free(ix);
}

PyDoc_STRVAR(index_doc, "index(ends, lengths, moffsets, sources) -> handle: int64, uint16, int64 and uint8 arrays of\n"
                        "one length, held (not copied) for one_row.");

static PyObject *py_index(PyObject *self, PyObject *args) {
    PyObject *arrays[4];
    if (!PyArg_ParseTuple(args, "OOOO", &arrays[0], &arrays[1], &arrays[2], &arrays[3]))
        return NULL;
    Index *ix = PyMem_Calloc(1, sizeof(Index));
    if (!ix)
        return PyErr_NoMemory();
    static const Py_ssize_t itemsize[4] = {8, 2, 8, 1};
    int got = 0;
    for (; got < 4; got++) {
        if (PyObject_GetBuffer(arrays[got], &ix->views[got], PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        if (ix->views[got].itemsize != itemsize[got]) {
            got++;
            PyErr_SetString(PyExc_ValueError, "index arrays must be int64, uint16, int64 and uint8");
            goto fail;
        }
    }
    size_t n = (size_t)(ix->views[0].len / 8);
    for (int k = 1; k < 4; k++) {
        if ((size_t)(ix->views[k].len / itemsize[k]) != n) {
            PyErr_SetString(PyExc_ValueError, "index arrays must have one length");
            goto fail;
        }
    }
    ix->ends = ix->views[0].buf;
    ix->lengths = ix->views[1].buf;
    ix->moffsets = ix->views[2].buf;
    ix->sources = ix->views[3].buf;
    ix->n = n;
    ix->arrays = PyTuple_Pack(4, arrays[0], arrays[1], arrays[2], arrays[3]);
    if (!ix->arrays)
        goto fail;
    PyObject *capsule = PyCapsule_New(ix, INDEX_NAME, index_free);
    if (!capsule) {
        Py_DECREF(ix->arrays);
        got = 4;
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
    int64_t ln = ix->lengths[i];
    if (e - ln >= end)
        return PyLong_FromLong(0);
    int64_t m = ix->moffsets[i];
    return Py_BuildValue("(LLLOi)", (long long)(e - ln), (long long)ln, (long long)m, m < 0 ? Py_True : Py_False,
                         (int)ix->sources[i]);
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

static PyMethodDef methods[] = {
    {"index", py_index, METH_VARARGS, index_doc},
    {"one_row", (PyCFunction)(void (*)(void))py_one_row, METH_FASTCALL, one_row_doc},
    {"upper_bound", py_upper_bound, METH_VARARGS, upper_bound_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lookup", "The common read of a merged index, in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lookup(void) { return PyModule_Create(&module); }
