// The collectives of CPU ranks on one host through one shared-memory segment (the segment's
// layout and protocol: thrifty/shm_group.py). A collective is one or more rounds; in round n a
// rank writes its part into its slot of buffer n % 2, publishes n in its counter (a release
// store: its data is visible before the counter is), waits until every counter reached n
// (acquire loads) and reads the others' slots.
//
// In C++ because each torch call costs microseconds: an all-reduce of one token's hidden state
// made of torch calls took ~40 us here, as one call a few.
//
// Waiting spins briefly with the GIL held (ranks on their own cores meet within microseconds),
// then releases it and backs off to sched_yield and short sleeps, so an idle server's ranks wait
// for the next step without holding a core. While waiting it checks, every 0.1 s, for a signal
// (Ctrl-C raises as usual) and every second that its peers still run: a rank that died raises
// RuntimeError instead of a wait forever.
#pragma once

#include "torch_api.h"

#include <sched.h>
#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// Hidden, as pybind11's own types are (else gcc warns that the bound class is more visible).
#pragma GCC visibility push(hidden)
namespace thrifty_shm {

constexpr int64_t kLine = 64;  // each rank's counter on a cache line of its own

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Whether process `pid` still runs: a zombie (exited, not yet reaped) does not.
inline bool alive(int64_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (stat) {
    std::string s((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const auto close = s.rfind(')');
    if (close == std::string::npos || close + 2 >= s.size()) return true;
    const char state = s[close + 2];
    return state != 'Z' && state != 'X';
  }
  return !(kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH);
}

class Group {
 public:
  // seg: the whole mapped segment (uint8); header: bytes of the counters; capacity: bytes of
  // a slot; peers: each rank's process id (-1 for this rank, or one not to watch).
  Group(torch::Tensor seg, int64_t rank, int64_t world, int64_t header, int64_t capacity,
        std::vector<int64_t> peers)
      : seg_(seg), rank_(rank), world_(world), header_(header), capacity_(capacity),
        peers_(std::move(peers)) {
    TORCH_CHECK(seg.scalar_type() == torch::kByte && seg.is_contiguous(),
                "the segment must be a contiguous uint8 tensor");
    TORCH_CHECK(0 <= rank && rank < world && static_cast<int64_t>(peers_.size()) == world &&
                    world * kLine <= header && capacity % kLine == 0 &&
                    seg.numel() >= header + 2 * world * capacity,
                "the segment does not fit the group");
    base_ = seg.data_ptr<uint8_t>();
    TORCH_CHECK(reinterpret_cast<uintptr_t>(base_) % kLine == 0, "the segment must be aligned");
  }

  int64_t seq() const { return seq_; }
  int64_t offset(int64_t buffer, int64_t rank) const {
    return header_ + (buffer * world_ + rank) * capacity_;
  }

  // One round with this rank's slot already written (or nothing to write): returns the
  // buffer's index, whose slots hold every rank's part until the round after next.
  int64_t sync() {
    ++seq_;
    __atomic_store_n(counter(rank_), seq_, __ATOMIC_RELEASE);
    wait_all();
    return seq_ % 2;
  }

  // x (contiguous float32, bfloat16 or float16) summed over the ranks in place, in float32 in
  // rank order (every rank gets the same bits), in rounds of a slot's worth.
  void all_reduce(torch::Tensor x) {
    TORCH_CHECK(x.is_contiguous(), "all_reduce takes a contiguous tensor");
    if (x.scalar_type() == torch::kFloat) {
      reduce<float>(x.data_ptr<float>(), x.numel());
    } else if (x.scalar_type() == torch::kBFloat16) {
      reduce<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), x.numel());
    } else {
      TORCH_CHECK(x.scalar_type() == torch::kHalf, "all_reduce takes float32, bf16 or fp16");
      reduce<c10::Half>(x.data_ptr<c10::Half>(), x.numel());
    }
  }

  // Every rank's x (the same shape on each), stacked: (world, *x.shape).
  torch::Tensor all_gather(torch::Tensor x) {
    x = x.contiguous();
    std::vector<int64_t> shape{world_};
    shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
    auto out = torch::empty(shape, x.options());
    const int64_t bytes = x.numel() * x.element_size();
    const auto* src = static_cast<const uint8_t*>(x.data_ptr());
    auto* dst = static_cast<uint8_t*>(out.data_ptr());
    for (int64_t start = 0; start < bytes; start += capacity_) {
      const int64_t n = std::min(capacity_, bytes - start);
      std::memcpy(slot((seq_ + 1) % 2, rank_), src + start, n);
      const int64_t b = sync();
      for (int64_t r = 0; r < world_; ++r) std::memcpy(dst + r * bytes + start, slot(b, r), n);
    }
    return out;
  }

 private:
  int64_t* counter(int64_t rank) { return reinterpret_cast<int64_t*>(base_ + rank * kLine); }
  uint8_t* slot(int64_t buffer, int64_t rank) { return base_ + offset(buffer, rank); }

  template <typename T>
  void reduce(T* x, int64_t numel) {
    const int64_t per = capacity_ / static_cast<int64_t>(sizeof(T));
    for (int64_t start = 0; start < numel; start += per) {
      const int64_t n = std::min(per, numel - start);
      std::memcpy(slot((seq_ + 1) % 2, rank_), x + start, n * sizeof(T));
      const int64_t b = sync();
      std::vector<const T*> parts(world_);
      for (int64_t r = 0; r < world_; ++r) parts[r] = reinterpret_cast<const T*>(slot(b, r));
      T* out = x + start;
      for (int64_t i = 0; i < n; ++i) {
        float s = static_cast<float>(parts[0][i]);
        for (int64_t r = 1; r < world_; ++r) s += static_cast<float>(parts[r][i]);
        out[i] = static_cast<T>(s);
      }
    }
  }

  bool all_ready() {
    for (int64_t r = 0; r < world_; ++r)
      if (__atomic_load_n(counter(r), __ATOMIC_ACQUIRE) < seq_) return false;
    return true;
  }

  void wait_all() {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    auto waited = [&] { return std::chrono::duration<double>(clock::now() - start).count(); };
    for (int i = 0; !all_ready(); ++i) {
      cpu_relax();
      if (i % 256 == 255 && waited() > 50e-6) return wait_slowly(waited);
    }
  }

  template <typename Waited>
  void wait_slowly(Waited& waited) {
    pybind11::gil_scoped_release no_gil;
    double next_signal = 0.1, next_peers = 1.0;
    while (!all_ready()) {
      const double t = waited();
      // Mid-step waits are short: yield, then nap briefly. Past a second the server is idle:
      // 5 ms naps keep a waiting rank at about 1% of a core and add at most that to a step.
      if (t < 2e-3)
        sched_yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(t < 0.1 ? 50 : t < 1.0 ? 500 : 5000));
      if (t > next_signal) {
        next_signal = t + 0.1;
        pybind11::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
      }
      if (t > next_peers) {
        next_peers = t + 1.0;
        for (int64_t r = 0; r < world_; ++r)
          TORCH_CHECK(peers_[r] < 0 || alive(peers_[r]), "tensor-parallel rank ", r,
                      " (process ", peers_[r], ") is gone");
      }
    }
  }

  torch::Tensor seg_;  // keeps the mapping alive
  uint8_t* base_;
  int64_t rank_, world_, header_, capacity_, seq_ = 0;
  std::vector<int64_t> peers_;
};

inline void bind(pybind11::module& m) {
  pybind11::class_<Group>(m, "ShmGroup")
      .def(pybind11::init<torch::Tensor, int64_t, int64_t, int64_t, int64_t,
                          std::vector<int64_t>>())
      .def_property_readonly("seq", &Group::seq)
      .def("offset", &Group::offset, "byte offset of a rank's slot in buffer 0 or 1")
      .def("sync", &Group::sync, "one round: publish this rank's slot, wait for every rank's")
      .def("all_reduce", &Group::all_reduce, "sum over the ranks in place, in float32")
      .def("all_gather", &Group::all_gather, "every rank's tensor, stacked along a new dim 0");
}

}  // namespace thrifty_shm
#pragma GCC visibility pop
