// The host Communicator's per-call fast path, in C++ (part of ccl._C_torch).
//
// A decode step issues ~150 host collectives per token, and on the host transport the
// Python checks of the tensor arguments (dtype, device, contiguity, shapes: ~20 attribute
// reads) cost as much as a small all-reduce itself. Here the same checks read the tensors'
// metadata directly (nanoseconds), then call ccl._C's op through its C entry point (see
// host/entry.h) with the GIL released.
//
// Every function returns the op's status (0 ok, > 0 the mailbox error, which the caller
// raises), or -1 when the call is not the plain case: then nothing has been communicated
// and the caller takes its Python path, which validates everything and words every error.
// Only exact torch.Tensor / nn.Parameter arguments are taken; subclasses go the Python way.
#include <Python.h>

#include <cstdint>

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include "host/entry.h"

namespace py = pybind11;

namespace ccl_torch {
namespace {

constexpr const char* kCapsuleName = "ccl._C_torch.HostFastPath";

struct FastState {
  PyObject* mailbox_obj = nullptr;  // strong reference: keeps the HostMailbox alive
  void* mailbox = nullptr;
  ccl::HostAllReduceFn all_reduce = nullptr;
  ccl::HostAddRmsNormFn add_rms_norm = nullptr;
  ccl::HostQkRmsNormFn qk_rms_norm = nullptr;
  int64_t max_bytes = 0;
  int64_t two_shot_above = 0;
};

void destroy_state(PyObject* capsule) {
  auto* s = static_cast<FastState*>(PyCapsule_GetPointer(capsule, kCapsuleName));
  if (s == nullptr) return;
  Py_XDECREF(s->mailbox_obj);
  delete s;
}

inline FastState* state_of(PyObject* self) {
  return static_cast<FastState*>(PyCapsule_GetPointer(self, kCapsuleName));
}

// The tensor behind `o`, or nullptr for anything but an exact Tensor / Parameter.
inline const at::Tensor* tensor_of(PyObject* o) {
  if (!THPVariable_CheckExact(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  return t.defined() ? &t : nullptr;
}

inline int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      return -1;
  }
}

// A strided CPU tensor with storage (what data_ptr() can be taken of).
inline bool host_strided(const at::Tensor& t) {
  return t.layout() == c10::kStrided && t.device().is_cpu() && t.has_storage();
}

inline bool host_dense(const at::Tensor& t) { return host_strided(t) && t.is_contiguous(); }

// `t` has ref's dtype and shape, dense on the host.
inline bool same_layout(const at::Tensor& t, const at::Tensor& ref) {
  return t.scalar_type() == ref.scalar_type() && host_dense(t) && t.sizes() == ref.sizes();
}

// 2-D [tokens, dim] with unit stride in dim and dim > 0 (rows may be strided).
inline bool host_rows(const at::Tensor& t) {
  return host_strided(t) && t.dim() == 2 && t.stride(1) == 1 && t.size(1) != 0;
}

inline bool as_double(PyObject* o, double* v) {
  if (PyFloat_CheckExact(o)) {
    *v = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (PyLong_CheckExact(o)) {
    *v = PyLong_AsDouble(o);
    if (*v == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

inline uintptr_t in_ptr(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr());
}
inline uintptr_t out_ptr(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.mutable_data_ptr());
}

PyObject* status(int st) { return PyLong_FromLong(st); }

// The answer to an exception: before the op started, -1 (nothing was communicated; the Python
// path checks the input and words the error); after, a raised RuntimeError, never -1, so the
// Python path cannot run the same collective a second time.
PyObject* failed(bool started, const std::exception& e) {
  if (!started) return status(-1);
  PyErr_Format(PyExc_RuntimeError, "ccl host op failed after it started: %s", e.what());
  return nullptr;
}

// all_reduce(tensor, out_or_None) -> status | -1. SUM; out=None means in place.
PyObject* fast_all_reduce(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  FastState* s = state_of(self);
  if (s == nullptr) return nullptr;
  if (nargs != 2) return status(-1);
  int st = -1;
  bool started = false;
  try {
    const at::Tensor* t = tensor_of(args[0]);
    if (t == nullptr) return status(-1);
    const int code = dtype_code(*t);
    if (code < 0 || !host_dense(*t)) return status(-1);
    const at::Tensor* out = t;
    if (args[1] != Py_None) {
      out = tensor_of(args[1]);
      if (out == nullptr || !same_layout(*out, *t)) return status(-1);
    }
    const int64_t numel = t->numel();
    const int64_t nbytes = numel * static_cast<int64_t>(t->element_size());
    if (nbytes > s->max_bytes) return status(-1);
    // Outputs first: taking a mutable pointer may materialise a copy-on-write storage.
    const uintptr_t o = out_ptr(*out);
    const uintptr_t in = out == t ? o : in_ptr(*t);
    const int algo = nbytes > s->two_shot_above ? 1 : 0;
    started = true;
    py::gil_scoped_release nogil;  // RAII: the GIL is back before any catch below runs
    st = s->all_reduce(s->mailbox, in, o, numel, code, algo);
  } catch (const std::exception& e) {
    return failed(started, e);
  }
  return status(st);
}

// add_rms_norm(x, residual_or_None, weight, eps, out, residual_out) -> status | -1.
// Standard norm, caller-owned outputs, automatic algorithm.
PyObject* fast_add_rms_norm(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  FastState* s = state_of(self);
  if (s == nullptr) return nullptr;
  if (nargs != 6) return status(-1);
  int st = -1;
  bool started = false;
  try {
    const at::Tensor* x = tensor_of(args[0]);
    const at::Tensor* w = tensor_of(args[2]);
    const at::Tensor* out = tensor_of(args[4]);
    const at::Tensor* rout = tensor_of(args[5]);
    const at::Tensor* res = nullptr;
    if (args[1] != Py_None && (res = tensor_of(args[1])) == nullptr) return status(-1);
    double eps = 0.0;
    if (x == nullptr || w == nullptr || out == nullptr || rout == nullptr ||
        !as_double(args[3], &eps))
      return status(-1);
    const int code = dtype_code(*x);
    if (code < 0 || !host_dense(*x) || x->dim() < 1) return status(-1);
    const int64_t cols = x->size(-1);
    const int64_t numel = x->numel();
    const int64_t nbytes = numel * static_cast<int64_t>(x->element_size());
    if (cols <= 0 || nbytes > s->max_bytes) return status(-1);
    if (!same_layout(*out, *x) || !same_layout(*rout, *x)) return status(-1);
    if (res != nullptr && !same_layout(*res, *x)) return status(-1);
    if (w->scalar_type() != x->scalar_type() || !host_dense(*w) || w->dim() != 1 ||
        w->size(0) != cols)
      return status(-1);
    const uintptr_t op = out_ptr(*out), rop = out_ptr(*rout);  // outputs first, see above
    const uintptr_t xp = in_ptr(*x), rp = res ? in_ptr(*res) : 0, wp = in_ptr(*w);
    const int algo = nbytes > s->two_shot_above ? 1 : 0;
    const float feps = static_cast<float>(eps);
    started = true;
    py::gil_scoped_release nogil;
    st = s->add_rms_norm(s->mailbox, xp, rp, wp, op, rop, numel / cols, cols, code, feps, 0,
                         algo);
  } catch (const std::exception& e) {
    return failed(started, e);
  }
  return status(st);
}

// qk_rms_norm(q, k, q_weight, k_weight, eps, q_out, k_out) -> status | -1. Caller-owned
// outputs.
PyObject* fast_qk_rms_norm(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  FastState* s = state_of(self);
  if (s == nullptr) return nullptr;
  if (nargs != 7) return status(-1);
  int st = -1;
  bool started = false;
  try {
    const at::Tensor* q = tensor_of(args[0]);
    const at::Tensor* k = tensor_of(args[1]);
    const at::Tensor* qw = tensor_of(args[2]);
    const at::Tensor* kw = tensor_of(args[3]);
    const at::Tensor* qo = tensor_of(args[5]);
    const at::Tensor* ko = tensor_of(args[6]);
    double eps = 0.0;
    if (!q || !k || !qw || !kw || !qo || !ko || !as_double(args[4], &eps)) return status(-1);
    const int code = dtype_code(*q);
    if (code < 0 || k->scalar_type() != q->scalar_type() || !host_rows(*q) || !host_rows(*k))
      return status(-1);
    const int64_t rows = q->size(0);
    if (k->size(0) != rows || 8 * rows > s->max_bytes) return status(-1);
    if (qw->scalar_type() != q->scalar_type() || !host_dense(*qw) || qw->dim() != 1 ||
        qw->size(0) != q->size(1))
      return status(-1);
    if (kw->scalar_type() != q->scalar_type() || !host_dense(*kw) || kw->dim() != 1 ||
        kw->size(0) != k->size(1))
      return status(-1);
    if (qo->scalar_type() != q->scalar_type() || !host_rows(*qo) || qo->sizes() != q->sizes())
      return status(-1);
    if (ko->scalar_type() != q->scalar_type() || !host_rows(*ko) || ko->sizes() != k->sizes())
      return status(-1);
    const uintptr_t qop = out_ptr(*qo), kop = out_ptr(*ko);  // outputs first, see above
    const uintptr_t qp = in_ptr(*q), kp = in_ptr(*k), qwp = in_ptr(*qw), kwp = in_ptr(*kw);
    const int64_t qs = q->stride(0), ks = k->stride(0), qos = qo->stride(0),
                  kos = ko->stride(0), qc = q->size(1), kc = k->size(1);
    const float feps = static_cast<float>(eps);
    started = true;
    py::gil_scoped_release nogil;
    st = s->qk_rms_norm(s->mailbox, qp, qs, kp, ks, qwp, kwp, qop, kop, qos, kos, rows, qc, kc,
                        code, feps);
  } catch (const std::exception& e) {
    return failed(started, e);
  }
  return status(st);
}

PyMethodDef kFastDefs[] = {
    {"all_reduce", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_all_reduce)),
     METH_FASTCALL, "all_reduce(tensor, out_or_None) -> status, -1: take the Python path"},
    {"add_rms_norm",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_add_rms_norm)),
     METH_FASTCALL,
     "add_rms_norm(x, residual, weight, eps, out, residual_out) -> status, -1: Python path"},
    {"qk_rms_norm",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_qk_rms_norm)),
     METH_FASTCALL,
     "qk_rms_norm(q, k, q_weight, k_weight, eps, q_out, k_out) -> status, -1: Python path"},
};

}  // namespace

void register_fastpath(py::module_& m) {
  // host_fast_path(mailbox, max_bytes, two_shot_above) -> (all_reduce, add_rms_norm,
  // qk_rms_norm), or None when ccl._C's entry points are not the ones this module knows.
  // The sizes are the Communicator's (fixed for its lifetime).
  m.def(
      "host_fast_path",
      [](py::object mailbox, int64_t max_bytes, int64_t two_shot_above) -> py::object {
        py::tuple entry = py::module_::import("ccl._C").attr("host").attr("ENTRY_POINTS");
        if (entry.size() != 4 || entry[0].cast<int>() != ccl::kHostEntryAbi) return py::none();
        auto* s = new FastState;
        s->mailbox = reinterpret_cast<void*>(mailbox.attr("address").cast<uintptr_t>());
        s->all_reduce = reinterpret_cast<ccl::HostAllReduceFn>(entry[1].cast<uintptr_t>());
        s->add_rms_norm = reinterpret_cast<ccl::HostAddRmsNormFn>(entry[2].cast<uintptr_t>());
        s->qk_rms_norm = reinterpret_cast<ccl::HostQkRmsNormFn>(entry[3].cast<uintptr_t>());
        s->max_bytes = max_bytes;
        s->two_shot_above = two_shot_above;
        s->mailbox_obj = mailbox.inc_ref().ptr();
        py::object capsule =
            py::reinterpret_steal<py::object>(PyCapsule_New(s, kCapsuleName, &destroy_state));
        if (!capsule) {
          Py_DECREF(s->mailbox_obj);
          delete s;
          throw py::error_already_set();
        }
        py::list fns;
        for (PyMethodDef& def : kFastDefs) {
          PyObject* f = PyCFunction_NewEx(&def, capsule.ptr(), nullptr);
          if (f == nullptr) throw py::error_already_set();
          fns.append(py::reinterpret_steal<py::object>(f));
        }
        return py::tuple(fns);
      },
      py::arg("mailbox"), py::arg("max_bytes"), py::arg("two_shot_above"));
}

}  // namespace ccl_torch
