/* Python bindings of kernels.c, compiled with it into one extension module per vector width
 * (setup.py: model_store._kernels_baseline, _kernels_x86_64_v3, _kernels_x86_64_v4).
 *
 * Each binding parses its arguments by a format (a wrong count or type raises TypeError) and
 * calls the kernel through its prototype, so a binding that disagrees with kernels.c fails to
 * compile. Tensors arrive as addresses (`tensor.data_ptr()`, None for NULL). The calls keep the
 * GIL: they are short, and a thread that lets go of the GIL waits to get it back for as long as
 * another thread runs Python (a server's scheduler thread, stepping the batch while the event
 * loop handles requests, paid that wait at every call).
 *
 * The OpenMP pragmas compile to calls into libgomp that are left unresolved here: the module is
 * imported after torch, whose libgomp is then already loaded with global symbols, so the loops
 * run on torch's own thread pool, with the thread count torch.set_num_threads sets (a second
 * OpenMP runtime would keep a second pool of threads spinning on the same cores). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "kernels.c"

#ifndef MODULE_NAME
#define MODULE_NAME _kernels_baseline
#endif
#define TEXT(x) #x
#define NAME(x) TEXT(x)
#define INIT(x) PyInit_##x
#define PYINIT(x) INIT(x)

/* "O&" converter: an address (int) or None (NULL). */
static int address(PyObject *object, void **out) {
    if (object == Py_None) {
        *out = NULL;
        return 1;
    }
    *out = PyLong_AsVoidPtr(object);
    return !PyErr_Occurred();
}

#define A address

static PyObject *py_rnn_forward(PyObject *self, PyObject *args) {
    long rows, n;
    void *xg, *hg, *h_out;
    if (!PyArg_ParseTuple(args, "llO&O&O&", &rows, &n, A, &xg, A, &hg, A, &h_out)) return NULL;
    rnn_forward(rows, n, xg, hg, h_out);
    Py_RETURN_NONE;
}

static PyObject *py_rnn_backward(PyObject *self, PyObject *args) {
    long rows, n;
    void *dmm, *d_hs, *h, *dxg;
    if (!PyArg_ParseTuple(args, "llO&O&O&O&", &rows, &n, A, &dmm, A, &d_hs, A, &h, A, &dxg)) return NULL;
    rnn_backward(rows, n, dmm, d_hs, h, dxg);
    Py_RETURN_NONE;
}

static PyObject *py_gru_forward(PyObject *self, PyObject *args) {
    long rows, n;
    void *xg, *hg, *h_prev, *h_out, *saved;
    if (!PyArg_ParseTuple(args, "llO&O&O&O&O&", &rows, &n, A, &xg, A, &hg, A, &h_prev, A, &h_out, A, &saved))
        return NULL;
    gru_forward(rows, n, xg, hg, h_prev, h_out, saved);
    Py_RETURN_NONE;
}

static PyObject *py_gru_backward(PyObject *self, PyObject *args) {
    long rows, n;
    void *dmm, *d_direct, *d_hs, *h_prev, *saved, *dxg, *dhg, *d_direct_out;
    if (!PyArg_ParseTuple(args, "llO&O&O&O&O&O&O&O&", &rows, &n, A, &dmm, A, &d_direct, A, &d_hs, A, &h_prev,
                          A, &saved, A, &dxg, A, &dhg, A, &d_direct_out))
        return NULL;
    gru_backward(rows, n, dmm, d_direct, d_hs, h_prev, saved, dxg, dhg, d_direct_out);
    Py_RETURN_NONE;
}

static PyObject *py_lstm_forward(PyObject *self, PyObject *args) {
    long rows, n;
    void *xg, *hg, *c_prev, *h_out, *c_out, *saved;
    if (!PyArg_ParseTuple(args, "llO&O&O&O&O&O&", &rows, &n, A, &xg, A, &hg, A, &c_prev, A, &h_out, A, &c_out,
                          A, &saved))
        return NULL;
    lstm_forward(rows, n, xg, hg, c_prev, h_out, c_out, saved);
    Py_RETURN_NONE;
}

static PyObject *py_lstm_backward(PyObject *self, PyObject *args) {
    long rows, n;
    void *dmm, *d_hs, *d_c, *c_prev, *saved, *dxg, *d_c_out;
    if (!PyArg_ParseTuple(args, "llO&O&O&O&O&O&O&", &rows, &n, A, &dmm, A, &d_hs, A, &d_c, A, &c_prev, A, &saved,
                          A, &dxg, A, &d_c_out))
        return NULL;
    lstm_backward(rows, n, dmm, d_hs, d_c, c_prev, saved, dxg, d_c_out);
    Py_RETURN_NONE;
}

static PyObject *py_pack_panels(PyObject *self, PyObject *args) {
    long N, K, stride_n, stride_k;
    void *src, *out;
    if (!PyArg_ParseTuple(args, "llO&llO&", &N, &K, A, &src, &stride_n, &stride_k, A, &out)) return NULL;
    pack_panels(N, K, src, stride_n, stride_k, out);
    Py_RETURN_NONE;
}

static PyObject *py_recurrence_forward(PyObject *self, PyObject *args) {
    int cell, keep;
    long steps, rows, n;
    void *xg, *h0, *c0, *packed, *bias, *hg, *hs, *cs, *saved;
    if (!PyArg_ParseTuple(args, "illlO&O&O&O&O&O&O&O&O&i", &cell, &steps, &rows, &n, A, &xg, A, &h0, A, &c0,
                          A, &packed, A, &bias, A, &hg, A, &hs, A, &cs, A, &saved, &keep))
        return NULL;
    recurrence_forward(cell, steps, rows, n, xg, h0, c0, packed, bias, hg, hs, cs, saved, keep);
    Py_RETURN_NONE;
}

static PyObject *py_recurrence_backward(PyObject *self, PyObject *args) {
    int cell;
    long steps, rows, n;
    void *d_hs, *h0, *c0, *hs, *cs, *saved, *packed, *dxg, *dhg, *dmm, *ping, *pong;
    if (!PyArg_ParseTuple(args, "illlO&O&O&O&O&O&O&O&O&O&O&O&", &cell, &steps, &rows, &n, A, &d_hs, A, &h0,
                          A, &c0, A, &hs, A, &cs, A, &saved, A, &packed, A, &dxg, A, &dhg, A, &dmm, A, &ping,
                          A, &pong))
        return NULL;
    recurrence_backward(cell, steps, rows, n, d_hs, h0, c0, hs, cs, saved, packed, dxg, dhg, dmm, ping, pong);
    Py_RETURN_NONE;
}

static PyObject *py_cell_step(PyObject *self, PyObject *args) {
    int cell;
    long rows, n, table_rows;
    void *x, *ids, *hg, *h_prev, *c_prev, *h_out, *c_out;
    if (!PyArg_ParseTuple(args, "illO&O&lO&O&O&O&O&", &cell, &rows, &n, A, &x, A, &ids, &table_rows, A, &hg,
                          A, &h_prev, A, &c_prev, A, &h_out, A, &c_out))
        return NULL;
    return PyLong_FromLong(cell_step(cell, rows, n, x, ids, table_rows, hg, h_prev, c_prev, h_out, c_out));
}

static PyObject *py_mark_seen(PyObject *self, PyObject *args) {
    long rows, V;
    void *seen, *ids;
    if (!PyArg_ParseTuple(args, "llO&O&", &rows, &V, A, &seen, A, &ids)) return NULL;
    return PyLong_FromLong(mark_seen(rows, V, seen, ids));
}

static PyObject *py_cross_entropy(PyObject *self, PyObject *args) {
    long rows, V, count;
    float eps;
    void *logits, *targets, *nll, *mean_logp, *dlogits;
    if (!PyArg_ParseTuple(args, "llO&O&flO&O&O&", &rows, &V, A, &logits, A, &targets, &eps, &count, A, &nll,
                          A, &mean_logp, A, &dlogits))
        return NULL;
    cross_entropy(rows, V, logits, targets, eps, count, nll, mean_logp, dlogits);
    Py_RETURN_NONE;
}

static PyObject *py_onehot_gates(PyObject *self, PyObject *args) {
    long count, width, V;
    void *w, *bias, *ids, *out;
    if (!PyArg_ParseTuple(args, "lllO&O&O&O&", &count, &width, &V, A, &w, A, &bias, A, &ids, A, &out)) return NULL;
    return PyLong_FromLong(onehot_gates(count, width, V, w, bias, ids, out));
}

static PyObject *py_onehot_gates_backward(PyObject *self, PyObject *args) {
    long count, width, V;
    void *d, *ids, *dw, *db;
    if (!PyArg_ParseTuple(args, "lllO&O&O&O&", &count, &width, &V, A, &d, A, &ids, A, &dw, A, &db)) return NULL;
    onehot_gates_backward(count, width, V, d, ids, dw, db);
    Py_RETURN_NONE;
}

static PyObject *py_argmax_rows(PyObject *self, PyObject *args) {
    long rows, V;
    void *logits, *out;
    if (!PyArg_ParseTuple(args, "llO&O&", &rows, &V, A, &logits, A, &out)) return NULL;
    argmax_rows(rows, V, logits, out);
    Py_RETURN_NONE;
}

static PyObject *py_sample_rows(PyObject *self, PyObject *args) {
    long count, V;
    int fresh;
    void *index, *logits, *temperature, *top_k, *top_p, *uniforms, *weights, *cdf, *picks, *ok;
    if (!PyArg_ParseTuple(args, "llO&O&O&O&O&O&iO&O&O&O&", &count, &V, A, &index, A, &logits, A, &temperature,
                          A, &top_k, A, &top_p, A, &uniforms, &fresh, A, &weights, A, &cdf, A, &picks, A, &ok))
        return NULL;
    sample_rows(count, V, index, logits, temperature, top_k, top_p, uniforms, fresh, weights, cdf, picks, ok);
    Py_RETURN_NONE;
}

static PyObject *py_history_cache(PyObject *self, PyObject *args) {
    long rows, length, window, order, V;
    void *text, *p, *bucket;
    if (!PyArg_ParseTuple(args, "lllllO&O&O&", &rows, &length, &window, &order, &V, A, &text, A, &p, A, &bucket))
        return NULL;
    return PyLong_FromLong(history_cache(rows, length, window, order, V, text, p, bucket));
}

static PyObject *py_mix_log_probs(PyObject *self, PyObject *args) {
    long rows, V;
    void *logits, *weights, *ngram, *cache, *out;
    if (!PyArg_ParseTuple(args, "llO&O&O&O&O&", &rows, &V, A, &logits, A, &weights, A, &ngram, A, &cache, A, &out))
        return NULL;
    mix_log_probs(rows, V, logits, weights, ngram, cache, out);
    Py_RETURN_NONE;
}

static PyObject *py_ngram_distributions(PyObject *self, PyObject *args) {
    long rows, width, order, V;
    void *contexts, *ctx_ids, *ctx_start, *ctx_count, *ctx_first, *entry, *next, *value, *gamma, *out;
    if (!PyArg_ParseTuple(args, "llllO&O&O&O&O&O&O&O&O&O&", &rows, &width, &order, &V, A, &contexts, A, &ctx_ids,
                          A, &ctx_start, A, &ctx_count, A, &ctx_first, A, &entry, A, &next, A, &value, A, &gamma,
                          A, &out))
        return NULL;
    return PyLong_FromLong(ngram_distributions(rows, width, order, V, contexts, ctx_ids, ctx_start, ctx_count,
                                               ctx_first, entry, next, value, gamma, out));
}

/* The widest x86-64 level (1-4) this CPU runs, 0 elsewhere: which module kernels.py imports. */
static PyObject *py_cpu_level(PyObject *self, PyObject *unused) {
#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 12 || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return PyLong_FromLong(4);
    if (__builtin_cpu_supports("x86-64-v3")) return PyLong_FromLong(3);
    if (__builtin_cpu_supports("x86-64-v2")) return PyLong_FromLong(2);
    return PyLong_FromLong(1);
#else
    return PyLong_FromLong(0);
#endif
}

/* Whether this build's loops run on OpenMP threads (else serially). */
static PyObject *py_openmp(PyObject *self, PyObject *unused) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

#define BINDING(name) {#name, py_##name, METH_VARARGS, NULL}
static PyMethodDef methods[] = {
    BINDING(rnn_forward), BINDING(rnn_backward), BINDING(gru_forward), BINDING(gru_backward),
    BINDING(lstm_forward), BINDING(lstm_backward), BINDING(pack_panels), BINDING(recurrence_forward),
    BINDING(recurrence_backward), BINDING(cell_step), BINDING(mark_seen), BINDING(cross_entropy),
    BINDING(onehot_gates), BINDING(onehot_gates_backward), BINDING(argmax_rows), BINDING(sample_rows),
    BINDING(history_cache), BINDING(mix_log_probs), BINDING(ngram_distributions),
    {"cpu_level", py_cpu_level, METH_NOARGS, NULL},
    {"openmp", py_openmp, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, NAME(MODULE_NAME), "kernels.c's loops", -1, methods};

PyMODINIT_FUNC PYINIT(MODULE_NAME)(void) { return PyModule_Create(&module); }
