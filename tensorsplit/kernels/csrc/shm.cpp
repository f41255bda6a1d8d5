// Collectives between the CPU ranks of one host through one shared-memory segment (issue: a Gloo
// all-reduce over loopback costs ~0.5 ms; a layer makes two).
//
// Segment: a header, one cache line per rank holding the sequence number it last posted, the pids,
// and two buffers of one slot per rank. Every collective call is one or more numbered rounds:
//   1. each rank that has data copies its chunk into its slot of buffer (seq % 2),
//   2. posts seq (a release store after the copy),
//   3. spins (pause) until every rank has posted seq (acquire loads), then
//   4. reads what it needs: all-reduce sums every slot in rank order, so every rank gets the
//      same bits; broadcast copies the root's slot; gather copies every slot (root only).
// A rank writes buffer b again two rounds later, after it saw every rank post the round between,
// which each rank does only after reading: two buffers need no second barrier.
// A wait gives up after its timeout (one line naming the local ranks it waited for), and fails
// at once when a rank it waits for has exited. Idle waits (a worker waiting for the next step)
// spin briefly, then yield and sleep, and are not timed.
//
// torch ops (namespace tensorsplit):
//   shm_attach(name, create, rank, n_ranks, slot_bytes) -> handle
//   shm_unlink(name)
//   shm_all_reduce(x!, handle, timeout_s) -> x          float32 or float64, summed in place
//   shm_broadcast(x!, handle, root, timeout_s, idle) -> x
//   shm_gather(x, handle, root, timeout_s) -> (n_ranks, *x.shape) on the root, empty elsewhere
//   shm_wait_ns(handle) -> int                          nanoseconds this rank's all-reduces spent waiting
//                                                       for the other ranks to post (bench --profile)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace ts {
namespace {

constexpr uint64_t MAGIC = 0x74737368'6d763031ULL;   // "tsshmv01"
constexpr int64_t MAX_RANKS = 256;

struct alignas(64) Control {
  std::atomic<uint64_t> seq;
  int64_t pid;
  char pad[48];
};
static_assert(sizeof(Control) == 64, "one cache line per rank");

struct alignas(64) Header {
  uint64_t magic;
  int64_t n_ranks, slot_bytes;
};

struct Segment {
  uint8_t* base = nullptr;
  size_t size = 0;
  int64_t n = 0, slot = 0, rank = 0;
  uint64_t seq = 0;                       // rounds this rank has taken part in
  int64_t all_reduce_wait_ns = 0;         // time spent in the all-reduces' waits, since attach
  Control* ctl() const { return (Control*)(base + 64); }
  uint8_t* slot_ptr(uint64_t round, int64_t r) const {
    return base + 64 + 64 * n + ((round & 1) * n + r) * slot;
  }
};

std::mutex registry_mutex;
std::vector<Segment*> registry;

size_t segment_bytes(int64_t n, int64_t slot) { return (size_t)(64 + 64 * n + 2 * n * slot); }

int64_t now_ns() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + (int64_t)t.tv_nsec;
}
double now_s() { return 1e-9 * (double)now_ns(); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

Segment& get(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  TORCH_CHECK(handle >= 0 && handle < (int64_t)registry.size() && registry[handle], "shm: no segment ", handle);
  return *registry[handle];
}

int64_t shm_attach(const std::string& name, bool create, int64_t rank, int64_t n_ranks, int64_t slot_bytes) {
  TORCH_CHECK(n_ranks >= 1 && n_ranks <= MAX_RANKS && rank >= 0 && rank < n_ranks, "shm: rank ", rank, " of ", n_ranks);
  TORCH_CHECK(slot_bytes >= 4096 && slot_bytes % 64 == 0, "shm: slot of ", slot_bytes, " bytes");
  const size_t size = segment_bytes(n_ranks, slot_bytes);
  const int fd = create ? shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600) : shm_open(name.c_str(), O_RDWR, 0);
  TORCH_CHECK(fd >= 0, "shm: cannot ", create ? "create " : "open ", name, ": ", std::strerror(errno));
  if (create && ftruncate(fd, (off_t)size) != 0) {
    const int e = errno;
    close(fd);
    shm_unlink(name.c_str());
    TORCH_CHECK(false, "shm: cannot size ", name, " to ", size, " bytes: ", std::strerror(e));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || (size_t)st.st_size != size) {
    close(fd);
    TORCH_CHECK(false, "shm: ", name, " is not the segment of this world (", (long long)st.st_size, " bytes)");
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  TORCH_CHECK(p != MAP_FAILED, "shm: cannot map ", name, ": ", std::strerror(errno));
  auto* seg = new Segment();
  seg->base = (uint8_t*)p;
  seg->size = size;
  seg->n = n_ranks;
  seg->slot = slot_bytes;
  seg->rank = rank;
  auto* h = (Header*)p;
  if (create) {
    h->n_ranks = n_ranks;
    h->slot_bytes = slot_bytes;
    for (int64_t r = 0; r < n_ranks; ++r) seg->ctl()[r].seq.store(0, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    __atomic_store_n(&h->magic, MAGIC, __ATOMIC_RELEASE);
  } else {
    TORCH_CHECK(__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) == MAGIC && h->n_ranks == n_ranks &&
                    h->slot_bytes == slot_bytes,
                "shm: ", name, " does not hold a segment for ", n_ranks, " ranks");
  }
  seg->ctl()[rank].pid = (int64_t)getpid();
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.push_back(seg);
  return (int64_t)registry.size() - 1;
}

void shm_unlink_name(const std::string& name) { shm_unlink(name.c_str()); }

// Whether process `pid` is gone: no such process, or a zombie its parent has not reaped yet.
bool exited(int64_t pid) {
  if (pid <= 0) return false;
  if (kill((pid_t)pid, 0) != 0) return errno == ESRCH;
  char path[64], buf[256];
  snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
  const int fd = open(path, O_RDONLY);
  if (fd < 0) return false;
  const ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return false;
  buf[n] = 0;
  const char* paren = strrchr(buf, ')');          // "pid (comm) S ...": the state follows the name
  return paren && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X');
}

// Post `round` for this rank, then wait until every rank has posted it.
void post_and_wait(Segment& s, uint64_t round, double timeout_s, bool idle, const char* what) {
  Control* c = s.ctl();
  c[s.rank].seq.store(round, std::memory_order_release);
  const double start = now_s();
  double next_check = start + 0.05;
  uint64_t spins = 0;
  for (int64_t r = 0; r < s.n; ++r) {
    while (c[r].seq.load(std::memory_order_acquire) < round) {
      cpu_relax();
      if ((++spins & 1023) != 0) continue;
      const double t = now_s();
      if (t - start > 0.00005) {
        // more ranks than free cores: a spinning rank holds the core its peer needs, so yield; an
        // idle wait (no step in sight) sleeps instead, up to 0.5 ms
        if (idle && t - start > 0.05) {
          const timespec ts{0, 500000};
          nanosleep(&ts, nullptr);
        } else {
          sched_yield();
        }
      }
      if (t < next_check) continue;
      next_check = t + 0.05;
      if (exited(c[r].pid)) TORCH_CHECK(false, "shm: local rank ", r, " exited during ", what);
      if (!idle && t - start > timeout_s) {
        std::string missing;
        for (int64_t q = 0; q < s.n; ++q)
          if (c[q].seq.load(std::memory_order_acquire) < round) missing += (missing.empty() ? "" : ", ") + std::to_string(q);
        TORCH_CHECK(false, "shm: Timed out after ", timeout_s, " s in ", what, ", waiting for local rank(s) ", missing);
      }
    }
  }
}

void check_tensor(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), what, ": x must be a contiguous CPU tensor");
}

template <class T>
void all_reduce_typed(Segment& s, T* data, int64_t n, double timeout_s) {
  const int64_t per = s.slot / (int64_t)sizeof(T);
  for (int64_t off = 0; off < n || (n == 0 && off == 0); off += per) {
    const int64_t len = std::min<int64_t>(per, n - off);
    const uint64_t round = ++s.seq;
    if (len > 0) std::memcpy(s.slot_ptr(round, s.rank), data + off, (size_t)len * sizeof(T));
    const int64_t t0 = now_ns();
    post_and_wait(s, round, timeout_s, false, "an all-reduce");
    s.all_reduce_wait_ns += now_ns() - t0;
    if (len <= 0) break;
    // the sum in rank order, the same on every rank (the rank's own slot too, not its input)
    T* out = data + off;
    std::memcpy(out, s.slot_ptr(round, 0), (size_t)len * sizeof(T));
    for (int64_t r = 1; r < s.n; ++r) {
      const T* sr = (const T*)s.slot_ptr(round, r);
      for (int64_t i = 0; i < len; ++i) out[i] += sr[i];
    }
  }
}

at::Tensor shm_all_reduce(at::Tensor& x, int64_t handle, double timeout_s) {
  Segment& s = get(handle);
  check_tensor(x, "shm_all_reduce");
  if (x.scalar_type() == at::kFloat) all_reduce_typed(s, x.data_ptr<float>(), x.numel(), timeout_s);
  else if (x.scalar_type() == at::kDouble) all_reduce_typed(s, x.data_ptr<double>(), x.numel(), timeout_s);
  else TORCH_CHECK(false, "shm_all_reduce: float32 or float64 only");
  return x;
}

at::Tensor shm_broadcast(at::Tensor& x, int64_t handle, int64_t root, double timeout_s, bool idle) {
  Segment& s = get(handle);
  check_tensor(x, "shm_broadcast");
  TORCH_CHECK(root >= 0 && root < s.n, "shm_broadcast: root ", root);
  uint8_t* data = (uint8_t*)x.data_ptr();
  const int64_t n = x.numel() * x.element_size();
  for (int64_t off = 0; off < n || (n == 0 && off == 0); off += s.slot) {
    const int64_t len = std::min<int64_t>(s.slot, n - off);
    const uint64_t round = ++s.seq;
    if (s.rank == root && len > 0) std::memcpy(s.slot_ptr(round, root), data + off, (size_t)len);
    post_and_wait(s, round, timeout_s, idle && off == 0, "a broadcast");
    if (len <= 0) break;
    if (s.rank != root) std::memcpy(data + off, s.slot_ptr(round, root), (size_t)len);
  }
  return x;
}

at::Tensor shm_gather(const at::Tensor& x, int64_t handle, int64_t root, double timeout_s) {
  Segment& s = get(handle);
  check_tensor(x, "shm_gather");
  TORCH_CHECK(root >= 0 && root < s.n, "shm_gather: root ", root);
  std::vector<int64_t> shape{s.n};
  for (auto d : x.sizes()) shape.push_back(d);
  at::Tensor out = s.rank == root ? at::empty(shape, x.options()) : at::empty({0}, x.options());
  const uint8_t* data = (const uint8_t*)x.data_ptr();
  const int64_t n = x.numel() * x.element_size();
  for (int64_t off = 0; off < n || (n == 0 && off == 0); off += s.slot) {
    const int64_t len = std::min<int64_t>(s.slot, n - off);
    const uint64_t round = ++s.seq;
    if (len > 0) std::memcpy(s.slot_ptr(round, s.rank), data + off, (size_t)len);
    post_and_wait(s, round, timeout_s, false, "a gather");
    if (len <= 0) break;
    if (s.rank == root) {
      uint8_t* o = (uint8_t*)out.data_ptr();
      for (int64_t r = 0; r < s.n; ++r) std::memcpy(o + r * n + off, s.slot_ptr(round, r), (size_t)len);
    }
  }
  return out;
}

int64_t shm_wait_ns(int64_t handle) { return get(handle).all_reduce_wait_ns; }

}  // namespace
}  // namespace ts

TORCH_LIBRARY_FRAGMENT(tensorsplit, m) {
  m.def("shm_attach(str name, bool create, int rank, int n_ranks, int slot_bytes) -> int", &ts::shm_attach);
  m.def("shm_unlink(str name) -> ()", &ts::shm_unlink_name);
  m.def("shm_all_reduce(Tensor(a!) x, int handle, float timeout_s) -> Tensor(a!)");
  m.def("shm_broadcast(Tensor(a!) x, int handle, int root, float timeout_s, bool idle) -> Tensor(a!)");
  m.def("shm_gather(Tensor x, int handle, int root, float timeout_s) -> Tensor");
  m.def("shm_wait_ns(int handle) -> int", &ts::shm_wait_ns);
}

TORCH_LIBRARY_IMPL(tensorsplit, CPU, m) {
  m.impl("shm_all_reduce", &ts::shm_all_reduce);
  m.impl("shm_broadcast", &ts::shm_broadcast);
  m.impl("shm_gather", &ts::shm_gather);
}
