// ccl._C_torch: the torch.distributed backend "mbx" as a c10d::Backend subclass.
//
// Small CPU all-reduces (SUM / AVG of fp32, bf16, fp16) run through the host mailboxes
// (csrc/host/mailbox.h, compiled into this module too); every other collective, every larger
// payload and every non-CPU tensor go to the wrapped backend of the tensor's device (gloo,
// nccl, xccl). Jobs spanning several nodes reduce hierarchically: mailbox all-reduce inside the
// node (fp32), all-reduce among one leader per node over the wrapped backend, mailbox
// broadcast inside the node. Python (ccl/backend.py) sets everything up (regions, fd exchange,
// the wrapped backends) and hands this class the mapped region addresses; the mappings are
// owned here from then on and unmapped in the destructor.
//
// Being a C++ Backend (not a Python ProcessGroup subclass) is what lets device-mapped forms
// ("cpu:mbx", "cpu:gloo,cuda:mbx") and the functional collectives
// (torch.ops._c10d_functional.*, torch.compile) reach it like any built-in backend.
//
// Built only against the torch it is compiled with (the c10d C++ ABI is not stable across
// torch releases); ccl.backend falls back to a pure-Python process group when this module
// does not import.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/csrc/utils/pybind.h>  // torch's pybind11 + the intrusive_ptr holder

#include <pybind11/stl.h>

#include "host/mailbox.h"

namespace ccl_torch {

using c10d::Backend;
using c10d::OpType;
using c10d::ReduceOp;
using c10d::Work;

// A Work that finished before it was returned: the mailbox path runs synchronously (its
// latency is a few microseconds, a worker thread would only add to it).
class CompletedWork : public Work {
 public:
  CompletedWork(OpType type, const char* title, std::vector<at::Tensor> result)
      : Work(-1, type, title),
        result_(std::move(result)),
        future_(c10::make_intrusive<c10::ivalue::Future>(
            c10::ListType::create(c10::TensorType::get()))) {
    future_->markCompleted(c10::IValue(result_));
    finish();
  }
  bool isCompleted() override { return true; }
  bool isSuccess() const override { return true; }
  bool wait(std::chrono::milliseconds /*timeout*/) override { return true; }
  std::vector<at::Tensor> result() override { return result_; }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }

 private:
  std::vector<at::Tensor> result_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

// What ccl/backend.py set up for this rank (all ranks agree on enabled / capacity / n_nodes).
struct Topology {
  bool enabled = false;            // small all-reduces take the mailbox path (global decision)
  int n_nodes = 1;                 // > 1: hierarchical (leader all-reduce between nodes)
  std::vector<int> node_ranks;     // global ranks of this node, in local-rank order
  int local_rank = 0;
  std::vector<uintptr_t> bases;    // mapped regions of this node's ranks (empty: no mailbox)
  size_t capacity_bytes = 0;
  size_t region_bytes = 0;
  int fd = -1;                     // this rank's region fd (closed in the destructor)
  double timeout_s = 0;
  int64_t two_shot_above = 0;
};

class MailboxBackend : public Backend {
 public:
  MailboxBackend(int rank, int size, std::map<std::string, c10::intrusive_ptr<Backend>> wrapped,
                 c10::intrusive_ptr<Backend> leaders, Topology topo)
      : Backend(rank, size),
        wrapped_(std::move(wrapped)),
        leaders_(std::move(leaders)),
        topo_(std::move(topo)) {
    TORCH_CHECK(wrapped_.count("cpu"), "mbx: the wrapped CPU backend is required");
    if (!topo_.bases.empty()) {
      mailbox_ = std::make_unique<ccl::HostMailbox>(
          topo_.local_rank, static_cast<int>(topo_.bases.size()), topo_.bases,
          topo_.capacity_bytes, topo_.timeout_s);
    }
    init();
  }

  ~MailboxBackend() override {
    mailbox_.reset();
    for (uintptr_t b : topo_.bases) {
      if (b) munmap(reinterpret_cast<void*>(b), topo_.region_bytes);
    }
    if (topo_.fd >= 0) close(topo_.fd);
  }

  const std::string getBackendName() const override { return "mbx"; }

  c10::intrusive_ptr<Options> getBackendOptions() override {
    return c10::make_intrusive<Options>("mbx", std::chrono::milliseconds(static_cast<int64_t>(
                                                   topo_.timeout_s * 1000)));
  }

  void setGroupUid(const std::string& uid) override {
    Backend::setGroupUid(uid);
    for (auto& kv : wrapped_) kv.second->setGroupUid(uid);
  }

  void setTimeout(std::chrono::milliseconds timeout) override {
    for (auto& kv : wrapped_) kv.second->setTimeout(timeout);
  }

  // ------------------------------------------------------------------ all-reduce
  c10::intrusive_ptr<Work> allreduce(std::vector<at::Tensor>& tensors,
                                     const c10d::AllreduceOptions& opts) override {
    TORCH_CHECK(!tensors.empty(), "mbx: allreduce needs a tensor");
    const at::Tensor& t = tensors[0];
    if (!t.device().is_cpu()) {
      // Hook for the GPU mailbox paths (ccl/transport/cuda.py, level_zero): until they land,
      // device tensors go to the wrapped device backend (nccl / xccl) unchanged.
      ++delegated_allreduce_;
      return wrapped_for(t.device()).allreduce(tensors, opts);
    }
    const bool avg = opts.reduceOp == ReduceOp::AVG;
    const int code = dtype_code(t.scalar_type());
    const bool eligible = topo_.enabled && tensors.size() == 1 && code >= 0 &&
                          (opts.reduceOp == ReduceOp::SUM || avg) && t.layout() == at::kStrided &&
                          t.is_contiguous() && t.numel() > 0;
    if (!eligible) {
      ++delegated_allreduce_;
      return cpu_allreduce_delegated(tensors, opts, avg && code >= 0);
    }
    std::lock_guard<std::mutex> lock(mu_);
    check_usable();
    const int64_t numel = t.numel();
    // Hierarchical jobs carry fp32 partial sums between the steps (rounded once at the end).
    const size_t bytes = static_cast<size_t>(numel) *
                         (topo_.n_nodes > 1 ? 4 : static_cast<size_t>(t.element_size()));
    if (bytes > topo_.capacity_bytes) {
      if (mailbox_) {
        // Proves every rank of the node makes the same call before the slow path.
        check(mailbox_->handshake(static_cast<int>(ccl::OpCode::kAllReduce), code, numel, 0, 0.f),
              "all_reduce");
      }
      ++delegated_allreduce_;
      return cpu_allreduce_delegated(tensors, opts, avg);
    }
    if (topo_.n_nodes > 1) {
      hierarchical_allreduce(t);
      ++hierarchical_allreduce_;
    } else {
      TORCH_INTERNAL_ASSERT(mailbox_, "mbx: single-node mailbox path without a mailbox");
      const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
      const int algo = static_cast<int64_t>(bytes) > topo_.two_shot_above ? 1 : 0;
      check(mailbox_->all_reduce(p, p, numel, code, algo), "all_reduce");
      ++mailbox_allreduce_;
    }
    if (avg) t.div_(size_);
    return c10::make_intrusive<CompletedWork>(OpType::ALLREDUCE, "mbx:all_reduce", tensors);
  }

  // ------------------------------------------------------------------ delegated collectives
  c10::intrusive_ptr<Work> allreduce_sparse(std::vector<at::Tensor>& tensors,
                                            const c10d::AllreduceOptions& opts) override {
    return other(tensors[0]).allreduce_sparse(tensors, opts);
  }
  c10::intrusive_ptr<Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override {
    return other(tensors[0]).allreduce_coalesced(tensors, opts);
  }
  c10::intrusive_ptr<Work> broadcast(std::vector<at::Tensor>& tensors,
                                     const c10d::BroadcastOptions& opts) override {
    return other(tensors[0]).broadcast(tensors, opts);
  }
  c10::intrusive_ptr<Work> reduce(std::vector<at::Tensor>& tensors,
                                  const c10d::ReduceOptions& opts) override {
    return other(tensors[0]).reduce(tensors, opts);
  }
  c10::intrusive_ptr<Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                     std::vector<at::Tensor>& inputs,
                                     const c10d::AllgatherOptions& opts) override {
    return other(inputs[0]).allgather(outputs, inputs, opts);
  }
  c10::intrusive_ptr<Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                           const c10d::AllgatherOptions& opts) override {
    return other(input)._allgather_base(output, input, opts);
  }
  c10::intrusive_ptr<Work> allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                               std::vector<at::Tensor>& inputs,
                                               const c10d::AllgatherOptions& opts) override {
    return other(inputs[0]).allgather_coalesced(outputs, inputs, opts);
  }
  c10::intrusive_ptr<Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override {
    return other(inputs[0]).allgather_into_tensor_coalesced(outputs, inputs, opts);
  }
  c10::intrusive_ptr<Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                  std::vector<at::Tensor>& inputs,
                                  const c10d::GatherOptions& opts) override {
    return other(inputs[0]).gather(outputs, inputs, opts);
  }
  c10::intrusive_ptr<Work> scatter(std::vector<at::Tensor>& outputs,
                                   std::vector<std::vector<at::Tensor>>& inputs,
                                   const c10d::ScatterOptions& opts) override {
    return other(outputs[0]).scatter(outputs, inputs, opts);
  }
  c10::intrusive_ptr<Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                          std::vector<std::vector<at::Tensor>>& inputs,
                                          const c10d::ReduceScatterOptions& opts) override {
    return other(outputs[0]).reduce_scatter(outputs, inputs, opts);
  }
  c10::intrusive_ptr<Work> _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                const c10d::ReduceScatterOptions& opts) override {
    return other(output)._reduce_scatter_base(output, input, opts);
  }
  c10::intrusive_ptr<Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override {
    return other(outputs[0]).reduce_scatter_tensor_coalesced(outputs, inputs, opts);
  }
  c10::intrusive_ptr<Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                         std::vector<int64_t>& output_split_sizes,
                                         std::vector<int64_t>& input_split_sizes,
                                         const c10d::AllToAllOptions& opts) override {
    return other(output).alltoall_base(output, input, output_split_sizes, input_split_sizes,
                                       opts);
  }
  c10::intrusive_ptr<Work> alltoall(std::vector<at::Tensor>& outputs,
                                    std::vector<at::Tensor>& inputs,
                                    const c10d::AllToAllOptions& opts) override {
    return other(outputs[0]).alltoall(outputs, inputs, opts);
  }
  c10::intrusive_ptr<Work> send(std::vector<at::Tensor>& tensors, int dst, int tag) override {
    return other(tensors[0]).send(tensors, dst, tag);
  }
  c10::intrusive_ptr<Work> recv(std::vector<at::Tensor>& tensors, int src, int tag) override {
    return other(tensors[0]).recv(tensors, src, tag);
  }
  c10::intrusive_ptr<Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override {
    return other(tensors[0]).recvAnysource(tensors, tag);
  }
  c10::intrusive_ptr<Work> barrier(const c10d::BarrierOptions& opts) override {
    ++delegated_other_;
    return wrapped_for(opts.device.value_or(at::Device(at::kCPU))).barrier(opts);
  }
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks) override {
    ++delegated_other_;
    wrapped_for(at::Device(at::kCPU)).monitoredBarrier(opts, wait_all_ranks);
  }
  void setSequenceNumberForGroup() override {
    wrapped_for(at::Device(at::kCPU)).setSequenceNumberForGroup();
  }
  uint64_t getSequenceNumberForGroup() override {
    return wrapped_for(at::Device(at::kCPU)).getSequenceNumberForGroup();
  }
  void eagerConnectSingleDevice(at::Device device) override {
    auto it = wrapped_.find(device_key(device));
    if (it != wrapped_.end()) it->second->eagerConnectSingleDevice(device);
  }
  void abort() override {
    for (auto& kv : wrapped_) kv.second->abort();
    if (leaders_) leaders_->abort();
  }
  void shutdown() override {
    for (auto& kv : wrapped_) kv.second->shutdown();
    if (leaders_) leaders_->shutdown();
  }

  std::map<std::string, int64_t> stats() const {
    return {{"mailbox_all_reduce", mailbox_allreduce_.load()},
            {"hierarchical_all_reduce", hierarchical_allreduce_.load()},
            {"delegated_all_reduce", delegated_allreduce_.load()},
            {"delegated_other", delegated_other_.load()}};
  }

 private:
  static int dtype_code(at::ScalarType st) {
    switch (st) {
      case at::kFloat: return static_cast<int>(ccl::DType::kFloat32);
      case at::kBFloat16: return static_cast<int>(ccl::DType::kBFloat16);
      case at::kHalf: return static_cast<int>(ccl::DType::kFloat16);
      default: return -1;
    }
  }

  static std::string device_key(const at::Device& d) { return c10::DeviceTypeName(d.type(), true); }

  Backend& wrapped_for(const at::Device& d) {
    auto it = wrapped_.find(device_key(d));
    TORCH_CHECK(it != wrapped_.end(), "mbx: no wrapped backend for device ", d,
                " in this process group (available here: ", available(), ")");
    return *it->second;
  }

  Backend& other(const at::Tensor& t) {
    ++delegated_other_;
    return wrapped_for(t.device());
  }

  std::string available() const {
    std::string s;
    for (auto& kv : wrapped_) s += (s.empty() ? "" : ", ") + kv.first;
    return s;
  }

  // gloo has no AVG: sum there and divide here (the call then completes before returning).
  c10::intrusive_ptr<Work> cpu_allreduce_delegated(std::vector<at::Tensor>& tensors,
                                                   const c10d::AllreduceOptions& opts,
                                                   bool avg_as_sum) {
    Backend& cpu = wrapped_for(at::Device(at::kCPU));
    if (!avg_as_sum) return cpu.allreduce(tensors, opts);
    c10d::AllreduceOptions sum = opts;
    sum.reduceOp = ReduceOp::SUM;
    cpu.allreduce(tensors, sum)->wait();
    for (auto& t : tensors) t.div_(size_);
    return c10::make_intrusive<CompletedWork>(OpType::ALLREDUCE, "mbx:all_reduce", tensors);
  }

  // Node sums (mailbox, fp32) -> sum over one leader per node (wrapped backend) -> the leader
  // hands the total to its node (mailbox all-reduce to which the others contribute zeros, so
  // every rank of the node receives the leader's bits).
  void hierarchical_allreduce(const at::Tensor& t) {
    at::Tensor acc = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
    const uintptr_t p = reinterpret_cast<uintptr_t>(acc.data_ptr());
    const int64_t n = acc.numel();
    const int fp32 = static_cast<int>(ccl::DType::kFloat32);
    const int algo = 4 * n > topo_.two_shot_above ? 1 : 0;
    if (mailbox_) check(mailbox_->all_reduce(p, p, n, fp32, algo), "all_reduce (node sum)");
    if (leaders_) {
      std::vector<at::Tensor> v{acc};
      leaders_->allreduce(v, c10d::AllreduceOptions())->wait();
    }
    if (mailbox_) {
      if (topo_.local_rank != 0) acc.zero_();
      check(mailbox_->all_reduce(p, p, n, fp32, algo), "all_reduce (node broadcast)");
    }
    if (!acc.is_same(t)) t.copy_(acc);
  }

  void check_usable() const {
    if (!broken_.empty()) C10_THROW_ERROR(DistBackendError, broken_);
  }

  int global(int local) const {
    return local >= 0 && local < static_cast<int>(topo_.node_ranks.size())
               ? topo_.node_ranks[local]
               : local;
  }

  static std::string describe(const ccl::OpHeader& h) {
    static const char* kOps[] = {"?", "all_reduce", "all_reduce_add_rms_norm", "qk_rms_norm",
                                 "handshake"};
    static const char* kTypes[] = {"float32", "bfloat16", "float16"};
    const unsigned op = h.op_dtype_flags >> 24, dt = (h.op_dtype_flags >> 16) & 0xFF;
    std::string s = op < 5 ? kOps[op] : std::to_string(op);
    s += "(";
    s += dt < 3 ? kTypes[dt] : std::to_string(dt);
    s += ", numel=" + std::to_string(h.numel);
    if (h.op_dtype_flags & 0x80) s += ", via the wrapped backend";
    return s + ")";
  }

  void check(int status, const char* what) {
    if (status == ccl::kOk) return;
    const ccl::LastError& e = mailbox_->last_error();
    if (status == ccl::kTimeout) {
      std::string missing;
      for (size_t r = 0; r < topo_.node_ranks.size(); ++r) {
        if (e.missing_mask >> r & 1) {
          missing += (missing.empty() ? "" : ", ") + std::to_string(global(static_cast<int>(r)));
        }
      }
      broken_ = "mbx: rank " + std::to_string(rank_) + ": " + what + " #" +
                std::to_string(mailbox_->seq()) + " timed out after " +
                std::to_string(static_cast<int>(topo_.timeout_s)) + " s waiting for rank(s) [" +
                missing + "]; this process group is unusable now (destroy it and create a new one)";
      C10_THROW_ERROR(DistBackendError, broken_);
    }
    if (status == ccl::kMismatch) {
      TORCH_CHECK_VALUE(false, "mbx: rank ", global(e.mismatch_rank), " called ",
                        describe(e.theirs), " but rank ", rank_, " called ", describe(e.mine),
                        "; every rank must make the same call");
    }
    C10_THROW_ERROR(DistBackendError, "mbx: rank " + std::to_string(rank_) + ": " + what +
                                          " failed with status " + std::to_string(status) +
                                          ": " + e.message);
  }

  std::map<std::string, c10::intrusive_ptr<Backend>> wrapped_;
  c10::intrusive_ptr<Backend> leaders_;  // set on node leaders of multi-node jobs only
  Topology topo_;
  std::unique_ptr<ccl::HostMailbox> mailbox_;
  std::mutex mu_;
  std::string broken_;
  std::atomic<int64_t> mailbox_allreduce_{0}, hierarchical_allreduce_{0},
      delegated_allreduce_{0}, delegated_other_{0};
};

}  // namespace ccl_torch

namespace py = pybind11;

namespace ccl_torch {
void register_fastpath(py::module_& m);  // fastpath.cpp: the host Communicator's fast path
}

PYBIND11_MODULE(_C_torch, m) {
  m.doc() = "mailbox-ccl torch.distributed backend 'mbx' (c10d::Backend)";
  // torch.__version__ at build time: the c10d C++ ABI is only stable within one release.
  m.attr("TORCH_VERSION") = CCL_TORCH_VERSION;
  ccl_torch::register_fastpath(m);

  // create(...) -> torch.distributed Backend. Takes ownership of the mappings in `bases` and
  // of `fd` (unmapped / closed when the backend is destroyed).
  m.def(
      "create",
      [](int rank, int size, std::map<std::string, c10::intrusive_ptr<c10d::Backend>> wrapped,
         std::optional<c10::intrusive_ptr<c10d::Backend>> leaders, bool enabled, int n_nodes,
         std::vector<int> node_ranks, int local_rank, std::vector<uintptr_t> bases,
         size_t capacity_bytes, size_t region_bytes, int fd, double timeout_s,
         int64_t two_shot_above) -> c10::intrusive_ptr<c10d::Backend> {
        ccl_torch::Topology topo;
        topo.enabled = enabled;
        topo.n_nodes = n_nodes;
        topo.node_ranks = std::move(node_ranks);
        topo.local_rank = local_rank;
        topo.bases = std::move(bases);
        topo.capacity_bytes = capacity_bytes;
        topo.region_bytes = region_bytes;
        topo.fd = fd;
        topo.timeout_s = timeout_s;
        topo.two_shot_above = two_shot_above;
        return c10::make_intrusive<ccl_torch::MailboxBackend>(
            rank, size, std::move(wrapped), leaders.value_or(nullptr), std::move(topo));
      },
      py::arg("rank"), py::arg("size"), py::arg("wrapped"), py::arg("leaders"),
      py::arg("enabled"), py::arg("n_nodes"), py::arg("node_ranks"), py::arg("local_rank"),
      py::arg("bases"), py::arg("capacity_bytes"), py::arg("region_bytes"), py::arg("fd"),
      py::arg("timeout_s"), py::arg("two_shot_above"));

  // stats(backend) -> dict, or None when `backend` is not an mbx backend.
  m.def("stats", [](const c10::intrusive_ptr<c10d::Backend>& b) -> py::object {
    auto* mb = dynamic_cast<ccl_torch::MailboxBackend*>(b.get());
    if (mb == nullptr) return py::none();
    return py::cast(mb->stats());
  });
}
