// Collectives between the nodes of a world over one TCP connection per node pair, driven by the calling
// thread (issue 23: Gloo's all-reduce of a 16 KB hidden state takes 1-2 ms between two hosts whose
// round trip is 50 us; each of its messages passes through a worker thread and Gloo's I/O thread, and
// each thread wake-up costs tens of microseconds on a VM).
//
// The connections are made in Python (comm/wire.py, through the torch.distributed store) and handed
// over as file descriptors. Each collective is one round: every message it sends goes out at once on
// every connection it uses, without blocking, while the same loop takes in what the peers send. A
// message is a 32-byte frame (magic, kind, sequence number, byte count) and its payload; a frame that
// does not match what this node expects (another collective, another size, another round) fails the
// call naming the node. The wait spins (non-blocking reads: the peer's bytes are seen within a few
// microseconds), yields after 50 us, and blocks in poll() after 2 ms; it gives up after its timeout
// naming the nodes it waited for, and fails at once when a peer closes its connection. Idle waits
// (a worker waiting for the next step) are not timed.
//
// torch ops (namespace tensorsplit):
//   wire_attach(fds, node) -> handle                     fds[k]: the socket to node k (-1 at k == node)
//   wire_all_reduce(x!, handle, timeout_s, format) -> x  float32 or float64: every node's x, summed in
//                                                        node order, so every node gets the same bits;
//                                                        format 0 sends x as it is, 1 as bf16, 2 as q8_0
//                                                        blocks (each node's part, its own included, is
//                                                        summed as the wire carried it)
//   wire_broadcast(x!, handle, root, timeout_s, idle) -> x
//   wire_gather(x, handle, root, timeout_s) -> (n_nodes, *x.shape) on the root, empty elsewhere
//   wire_detach(handle)                                  closes the sockets
//   wire_wait_ns(handle) -> int                          nanoseconds the all-reduces spent waiting
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kv_cache.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace ts {
namespace {

constexpr uint64_t MAGIC = 0x74737769'72653031ULL;   // "tswire01"
enum Kind : uint64_t { ALL_REDUCE = 1, BROADCAST = 2, GATHER = 3 };
const char* kind_name(uint64_t k) {
  return k == ALL_REDUCE ? "an all-reduce" : k == BROADCAST ? "a broadcast" : k == GATHER ? "a gather" : "?";
}

struct Frame {
  uint64_t magic, kind, seq, bytes;
};
static_assert(sizeof(Frame) == 32, "frame");

struct Mesh {
  int64_t node = 0, n = 0;
  std::vector<int> fds;
  uint64_t seq = 0;                      // collectives this node has taken part in
  int64_t all_reduce_wait_ns = 0;
  std::vector<uint8_t> inbox;            // all-reduce: every peer's payload, node after node
  std::vector<uint8_t> outbox;           // all-reduce: this node's part as the wire format has it
  std::vector<uint8_t> sum;              // all-reduce: the parts' sum, before it replaces x
};

// What the all-reduce sends of a node's part: as it is, bf16 (2 bytes a value), or q8_0 blocks of 32
// (34 bytes: an f16 scale and 32 int8 codes, as the KV cache's q8_0), the last block zero-padded.
enum WireFormat : int64_t { WIRE_AS_IS = 0, WIRE_BF16 = 1, WIRE_Q8_0 = 2 };

int64_t wire_bytes(int64_t format, int64_t n, int64_t elem) {
  return format == WIRE_BF16 ? 2 * n : format == WIRE_Q8_0 ? (n + KV_QK - 1) / KV_QK * 34 : n * elem;
}

template <class T>
void wire_encode(const T* x, int64_t n, int64_t format, uint8_t* dst) {
  const int type = format == WIRE_BF16 ? KV_BF16 : KV_Q8_0;
  const int64_t block = format == WIRE_BF16 ? 1 : KV_QK, block_bytes = format == WIRE_BF16 ? 2 : 34;
  float f[KV_QK];
  for (int64_t i = 0; i < n; i += block, dst += block_bytes) {
    const int64_t len = std::min<int64_t>(block, n - i);
    for (int64_t j = 0; j < block; ++j) f[j] = j < len ? (float)x[i + j] : 0.0f;   // the value rounded to float32
    kv_encode_row(f, block, type, dst);
  }
}

template <class T>
void wire_decode_add(const uint8_t* src, int64_t n, int64_t format, T* acc, bool first) {
  const int type = format == WIRE_BF16 ? KV_BF16 : KV_Q8_0;
  const int64_t block = format == WIRE_BF16 ? 1 : KV_QK, block_bytes = format == WIRE_BF16 ? 2 : 34;
  float f[KV_QK];
  for (int64_t i = 0; i < n; i += block, src += block_bytes) {
    kv_decode_row(src, block, type, f);
    const int64_t len = std::min<int64_t>(block, n - i);
    for (int64_t j = 0; j < len; ++j) acc[i + j] = first ? (T)f[j] : acc[i + j] + (T)f[j];
  }
}

std::mutex registry_mutex;
std::vector<Mesh*> registry;

int64_t now_ns() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + (int64_t)t.tv_nsec;
}

Mesh& get(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  TORCH_CHECK(handle >= 0 && handle < (int64_t)registry.size() && registry[handle], "wire: no mesh ", handle);
  return *registry[handle];
}

// One message in flight to or from one peer: the frame, then the payload.
struct Transfer {
  int64_t peer;
  Frame frame;                // sent, or (receiving) what arrived
  uint8_t* payload;
  int64_t bytes;              // payload bytes
  int64_t done = 0;           // bytes of frame + payload moved so far
  bool finished() const { return done == (int64_t)sizeof(Frame) + bytes; }
};

[[noreturn]] void peer_failed(int64_t peer, const char* what, int err) {
  if (err == 0 || err == EPIPE || err == ECONNRESET)
    TORCH_CHECK(false, "wire: node ", peer, " closed its connection during ", what, " (its process ended?)");
  TORCH_CHECK(false, "wire: the connection to node ", peer, " failed during ", what, ": ", strerror(err));
}

// Move bytes of one send without blocking; returns whether any moved.
bool pump_send(Mesh& m, Transfer& t, const char* what) {
  if (t.finished()) return false;
  const int64_t head = (int64_t)sizeof(Frame);
  iovec iov[2];
  int n_iov = 0;
  if (t.done < head) iov[n_iov++] = {(uint8_t*)&t.frame + t.done, (size_t)(head - t.done)};
  const int64_t off = t.done < head ? 0 : t.done - head;
  if (t.bytes > off) iov[n_iov++] = {t.payload + off, (size_t)(t.bytes - off)};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = n_iov;
  const ssize_t sent = sendmsg(m.fds[t.peer], &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (sent < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return false;
    peer_failed(t.peer, what, errno);
  }
  t.done += sent;
  return sent > 0;
}

// Move bytes of one receive without blocking; checks the frame once it has arrived.
bool pump_recv(Mesh& m, Transfer& t, uint64_t kind, const char* what) {
  if (t.finished()) return false;
  const int64_t head = (int64_t)sizeof(Frame);
  uint8_t* dst = t.done < head ? (uint8_t*)&t.frame + t.done : t.payload + (t.done - head);
  const int64_t want = t.done < head ? head - t.done : t.bytes - (t.done - head);
  const ssize_t got = recv(m.fds[t.peer], dst, (size_t)want, MSG_DONTWAIT);
  if (got == 0) peer_failed(t.peer, what, 0);
  if (got < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return false;
    peer_failed(t.peer, what, errno);
  }
  const bool had_frame = t.done >= head;
  t.done += got;
  if (!had_frame && t.done >= head) {
    const Frame& f = t.frame;
    TORCH_CHECK(f.magic == MAGIC, "wire: node ", t.peer, " sent bytes that are not a tensorsplit frame");
    TORCH_CHECK(f.kind == kind && f.seq == m.seq && (int64_t)f.bytes == t.bytes, "wire: node ", t.peer,
                " is out of step: it sent ", kind_name(f.kind), " #", f.seq, " of ", f.bytes, " bytes where this node (",
                m.node, ") is in ", kind_name(kind), " #", m.seq, " of ", t.bytes, " bytes");
  }
  return got > 0;
}

// Drive every transfer to the end: spin, then yield, then block in poll().
void run(Mesh& m, std::vector<Transfer>& sends, std::vector<Transfer>& recvs, uint64_t kind, double timeout_s,
         bool idle) {
  const char* what = kind_name(kind);
  const int64_t start = now_ns();
  uint64_t spins = 0;
  for (;;) {
    bool moved = false, open = false;
    for (auto& t : sends) { moved |= pump_send(m, t, what); open |= !t.finished(); }
    for (auto& t : recvs) { moved |= pump_recv(m, t, kind, what); open |= !t.finished(); }
    if (!open) return;
    if (moved || (++spins & 63) != 0) continue;
    const int64_t t = now_ns();
    const int64_t waited = t - start;
    if (!idle && waited > (int64_t)(timeout_s * 1e9)) {
      std::string missing;
      for (auto* list : {&recvs, &sends})
        for (auto& x : *list)
          if (!x.finished()) missing += (missing.empty() ? "" : ", ") + std::to_string(x.peer);
      TORCH_CHECK(false, "wire: Timed out after ", timeout_s, " s in ", what, " between nodes, waiting for node(s) ",
                  missing);
    }
    if (waited < 50000) continue;
    if (waited < 2000000) {
      sched_yield();
      continue;
    }
    // a long wait: sleep in poll() until a socket is ready, for at most 10 ms, so that the timeout and a
    // closed peer are still seen
    std::vector<pollfd> fds;
    for (auto& x : sends)
      if (!x.finished()) fds.push_back({m.fds[x.peer], POLLOUT, 0});
    for (auto& x : recvs)
      if (!x.finished()) fds.push_back({m.fds[x.peer], POLLIN, 0});
    poll(fds.data(), fds.size(), 10);
  }
}

Transfer outgoing(Mesh& m, int64_t peer, uint64_t kind, const void* data, int64_t bytes) {
  return Transfer{peer, Frame{MAGIC, kind, m.seq, (uint64_t)bytes}, (uint8_t*)data, bytes};
}
Transfer incoming(int64_t peer, void* data, int64_t bytes) { return Transfer{peer, Frame{}, (uint8_t*)data, bytes}; }

void check_tensor(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), what, ": x must be a contiguous CPU tensor");
}

int64_t wire_attach(const std::vector<int64_t>& fds, int64_t node) {
  const int64_t n = (int64_t)fds.size();
  TORCH_CHECK(n >= 2 && node >= 0 && node < n, "wire_attach: node ", node, " of ", n);
  auto* m = new Mesh();
  m->node = node;
  m->n = n;
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK((k == node) == (fds[k] < 0), "wire_attach: fds[", k, "] = ", fds[k]);
    m->fds.push_back((int)fds[k]);
  }
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.push_back(m);
  return (int64_t)registry.size() - 1;
}

void wire_detach(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  if (handle < 0 || handle >= (int64_t)registry.size() || !registry[handle]) return;
  for (int fd : registry[handle]->fds)
    if (fd >= 0) close(fd);
  delete registry[handle];
  registry[handle] = nullptr;
}

template <class T>
void sum_in_node_order(Mesh& m, T* data, int64_t len, int64_t format, int64_t part_bytes) {
  // node 0's part, then node 1's added, and so on: the same order, so the same bits, on every node
  m.sum.resize((size_t)len * sizeof(T));          // kept between calls: no allocation per all-reduce
  T* acc = (T*)m.sum.data();
  auto part = [&](int64_t k) -> const uint8_t* {
    if (k == m.node) return format == WIRE_AS_IS ? (const uint8_t*)data : m.outbox.data();
    return m.inbox.data() + (k < m.node ? k : k - 1) * part_bytes;
  };
  for (int64_t k = 0; k < m.n; ++k) {
    if (format != WIRE_AS_IS) {
      wire_decode_add(part(k), len, format, acc, k == 0);
    } else if (k == 0) {
      std::memcpy(acc, part(0), (size_t)part_bytes);
    } else {
      const T* p = (const T*)part(k);
      for (int64_t i = 0; i < len; ++i) acc[i] += p[i];
    }
  }
  std::memcpy(data, acc, (size_t)len * sizeof(T));
}

at::Tensor wire_all_reduce(at::Tensor& x, int64_t handle, double timeout_s, int64_t format) {
  Mesh& m = get(handle);
  check_tensor(x, "wire_all_reduce");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "wire_all_reduce: float32 or float64 only");
  TORCH_CHECK(format >= WIRE_AS_IS && format <= WIRE_Q8_0, "wire_all_reduce: format ", format);
  const bool dbl = x.scalar_type() == at::kDouble;
  const int64_t n = x.numel(), bytes = wire_bytes(format, n, x.element_size());
  ++m.seq;
  m.inbox.resize((size_t)((m.n - 1) * bytes));
  const uint8_t* mine = (const uint8_t*)x.data_ptr();
  if (format != WIRE_AS_IS) {
    m.outbox.resize((size_t)bytes);
    if (dbl) wire_encode(x.data_ptr<double>(), n, format, m.outbox.data());
    else wire_encode(x.data_ptr<float>(), n, format, m.outbox.data());
    mine = m.outbox.data();
  }
  std::vector<Transfer> sends, recvs;
  for (int64_t k = 0; k < m.n; ++k) {
    if (k == m.node) continue;
    sends.push_back(outgoing(m, k, ALL_REDUCE, mine, bytes));
    recvs.push_back(incoming(k, m.inbox.data() + (k < m.node ? k : k - 1) * bytes, bytes));
  }
  const int64_t t0 = now_ns();
  run(m, sends, recvs, ALL_REDUCE, timeout_s, false);
  m.all_reduce_wait_ns += now_ns() - t0;
  if (dbl) sum_in_node_order(m, x.data_ptr<double>(), n, format, bytes);
  else sum_in_node_order(m, x.data_ptr<float>(), n, format, bytes);
  return x;
}

at::Tensor wire_broadcast(at::Tensor& x, int64_t handle, int64_t root, double timeout_s, bool idle) {
  Mesh& m = get(handle);
  check_tensor(x, "wire_broadcast");
  TORCH_CHECK(root >= 0 && root < m.n, "wire_broadcast: root ", root);
  const int64_t bytes = x.numel() * x.element_size();
  ++m.seq;
  std::vector<Transfer> sends, recvs;
  if (m.node == root) {
    for (int64_t k = 0; k < m.n; ++k)
      if (k != root) sends.push_back(outgoing(m, k, BROADCAST, x.data_ptr(), bytes));
  } else {
    recvs.push_back(incoming(root, x.data_ptr(), bytes));
  }
  run(m, sends, recvs, BROADCAST, timeout_s, idle);
  return x;
}

at::Tensor wire_gather(const at::Tensor& x, int64_t handle, int64_t root, double timeout_s) {
  Mesh& m = get(handle);
  check_tensor(x, "wire_gather");
  TORCH_CHECK(root >= 0 && root < m.n, "wire_gather: root ", root);
  const int64_t bytes = x.numel() * x.element_size();
  std::vector<int64_t> shape{m.n};
  for (auto d : x.sizes()) shape.push_back(d);
  at::Tensor out = m.node == root ? at::empty(shape, x.options()) : at::empty({0}, x.options());
  ++m.seq;
  std::vector<Transfer> sends, recvs;
  if (m.node == root) {
    uint8_t* o = (uint8_t*)out.data_ptr();
    std::memcpy(o + root * bytes, x.data_ptr(), (size_t)bytes);
    for (int64_t k = 0; k < m.n; ++k)
      if (k != root) recvs.push_back(incoming(k, o + k * bytes, bytes));
  } else {
    sends.push_back(outgoing(m, root, GATHER, x.data_ptr(), bytes));
  }
  run(m, sends, recvs, GATHER, timeout_s, false);
  return out;
}

int64_t wire_wait_ns(int64_t handle) { return get(handle).all_reduce_wait_ns; }

}  // namespace
}  // namespace ts

TORCH_LIBRARY_FRAGMENT(tensorsplit, m) {
  m.def("wire_attach(int[] fds, int node) -> int", &ts::wire_attach);
  m.def("wire_detach(int handle) -> ()", &ts::wire_detach);
  m.def("wire_all_reduce(Tensor(a!) x, int handle, float timeout_s, int format) -> Tensor(a!)");
  m.def("wire_broadcast(Tensor(a!) x, int handle, int root, float timeout_s, bool idle) -> Tensor(a!)");
  m.def("wire_gather(Tensor x, int handle, int root, float timeout_s) -> Tensor");
  m.def("wire_wait_ns(int handle) -> int", &ts::wire_wait_ns);
}

TORCH_LIBRARY_IMPL(tensorsplit, CPU, m) {
  m.impl("wire_all_reduce", &ts::wire_all_reduce);
  m.impl("wire_broadcast", &ts::wire_broadcast);
  m.impl("wire_gather", &ts::wire_gather);
}
