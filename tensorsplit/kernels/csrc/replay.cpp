// A recorded step, replayed from C++: the CPU counterpart of a CUDA graph (model/step_program.py).
//
// A program is the flat list of operator calls that one step of the Python model made (aten ops and
// this library's ops, the all-reduce included), as the dispatcher saw them. Each argument is a
// constant (a weight, a cache, an int, a dtype ...) or the slot of a tensor the step made or was
// given (its inputs: token ids, positions, slots, logit rows). Running it calls each operator
// through the dispatcher with the same arguments, from C++, so no Python runs between them.
//
// torch ops (namespace tensorsplit):
//   replay_new(n_inputs) -> handle
//   replay_op(handle, name, overload, kinds, ints, floats, strs, consts, outs)   append one call
//   replay_run(handle, inputs, out_slot, timed) -> Tensor                         run; the slot's tensor
//   replay_times(handle) -> Tensor          ns per call summed over timed runs since the last read (float64)
//   replay_free(handle)
//
// Arguments, one entry of `kinds` per argument of the operator's schema, in order; each takes its
// values from the next entries of ints / floats / strs / consts:
//   SLOT i | CONST tensor | INT v | FLOAT v | BOOL v | NONE | INTS n v... | STR s | DEVICE s |
//   TENSORS n (slot or -1 - const index)...
// Outputs, per return of the schema: -1 then a slot (a tensor), or n then n slots (a tensor list).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <time.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace ts {
namespace {

enum Kind : int64_t { SLOT = 0, CONST = 1, INT = 2, FLOAT = 3, BOOL = 4, NONE = 5, INTS = 6, STR = 7, DEVICE = 8,
                      TENSORS = 9 };

struct Arg {
  Kind kind;
  int64_t slot = -1;                   // SLOT
  c10::IValue value;                   // every constant, made once
  std::vector<int64_t> list;           // TENSORS: slot >= 0, or -1 - index into consts
};

struct Call {
  c10::OperatorHandle op;
  std::vector<Arg> args;
  std::vector<std::vector<int64_t>> outs;   // per return: {slot} for a tensor, {slots...} for a list
  std::vector<bool> is_list;
  std::vector<at::Tensor> consts;           // the TENSORS lists' constants
};

struct Program {
  int64_t n_inputs = 0, n_slots = 0;
  std::vector<Call> calls;
  std::vector<double> ns;                    // per call, summed over timed runs
  std::vector<int64_t> last_use;             // per slot, the last call that reads it
  std::vector<std::vector<int64_t>> dead;    // per call, the slots no later call reads (made at the first run)
  int64_t dead_for = -1;                     // the output slot `dead` was made for
};

// Which slots each call is the last reader of: they are dropped right after it, so a step holds only its
// live tensors and the allocator hands the freed (cache-warm) blocks to the next calls. The output slot
// lives to the end.
void plan_frees(Program& p, int64_t out_slot) {
  p.dead.assign(p.calls.size(), {});
  for (int64_t s = p.n_inputs; s < p.n_slots; ++s) {
    if (s == out_slot) continue;
    int64_t last = p.last_use[s];
    if (last < 0) {                          // made and never read: drop it after the call that made it
      for (size_t ci = 0; ci < p.calls.size() && last < 0; ++ci)
        for (const auto& slots : p.calls[ci].outs)
          for (int64_t o : slots) if (o == s) last = (int64_t)ci;
    }
    if (last >= 0) p.dead[last].push_back(s);
  }
  p.dead_for = out_slot;
}

std::mutex registry_mutex;
std::vector<std::unique_ptr<Program>> registry;

Program& get(int64_t h) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  TORCH_CHECK(h >= 0 && h < (int64_t)registry.size() && registry[h], "replay: no program ", h);
  return *registry[h];
}

int64_t replay_new(int64_t n_inputs) {
  auto p = std::make_unique<Program>();
  p->n_inputs = p->n_slots = n_inputs;
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.push_back(std::move(p));
  return (int64_t)registry.size() - 1;
}

void replay_free(int64_t h) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  if (h >= 0 && h < (int64_t)registry.size()) registry[h].reset();
}

void replay_op(int64_t h, const std::string& name, const std::string& overload, at::IntArrayRef kinds,
               at::IntArrayRef ints, at::ArrayRef<double> floats, const std::vector<std::string>& strs,
               const std::vector<at::Tensor>& consts, at::IntArrayRef outs) {
  Program& p = get(h);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
  const auto& schema = op.schema();
  TORCH_CHECK(kinds.size() == schema.arguments().size(), "replay_op: ", name, ".", overload, " takes ",
              schema.arguments().size(), " arguments, ", kinds.size(), " given");
  Call c{op, {}, {}, {}, {}};
  size_t ii = 0, fi = 0, si = 0, ci = 0;
  auto next_int = [&]() { TORCH_CHECK(ii < ints.size(), "replay_op: ints run out"); return ints[ii++]; };
  for (int64_t k : kinds) {
    Arg a{(Kind)k};
    switch ((Kind)k) {
      case SLOT:
        a.slot = next_int();
        TORCH_CHECK(a.slot >= 0 && a.slot < p.n_slots, "replay_op: slot ", a.slot, " not made yet");
        break;
      case CONST: TORCH_CHECK(ci < consts.size(), "replay_op: consts run out"); a.value = consts[ci++]; break;
      case INT: a.value = next_int(); break;
      case FLOAT: TORCH_CHECK(fi < floats.size(), "replay_op: floats run out"); a.value = floats[fi++]; break;
      case BOOL: a.value = (bool)next_int(); break;
      case NONE: a.value = c10::IValue(); break;
      case INTS: {
        const int64_t n = next_int();
        std::vector<int64_t> v;
        for (int64_t i = 0; i < n; ++i) v.push_back(next_int());
        a.value = v;
        break;
      }
      case STR: TORCH_CHECK(si < strs.size(), "replay_op: strs run out"); a.value = strs[si++]; break;
      case DEVICE: TORCH_CHECK(si < strs.size(), "replay_op: strs run out"); a.value = c10::Device(strs[si++]); break;
      case TENSORS: {
        const int64_t n = next_int();
        for (int64_t i = 0; i < n; ++i) {
          const int64_t e = next_int();
          if (e < 0) {
            TORCH_CHECK(ci < consts.size(), "replay_op: consts run out");
            c.consts.push_back(consts[ci++]);
            a.list.push_back(-(int64_t)c.consts.size());      // -1 - index
          } else {
            TORCH_CHECK(e < p.n_slots, "replay_op: slot ", e, " not made yet");
            a.list.push_back(e);
          }
        }
        break;
      }
      default: TORCH_CHECK(false, "replay_op: argument kind ", k);
    }
    // a Python number where the schema takes a Tensor (x - 5): the 0-dim "wrapped number" tensor that
    // torch's argument parser makes of it, so that type promotion treats it as a number again
    const auto& type = schema.arguments()[c.args.size()].type();
    if ((a.kind == INT || a.kind == FLOAT) && type->kind() == c10::TypeKind::TensorType) {
      at::Tensor t = a.kind == INT ? at::scalar_tensor(a.value.toInt(), at::kLong)
                                   : at::scalar_tensor(a.value.toDouble(), at::kDouble);
      t.unsafeGetTensorImpl()->set_wrapped_number(true);
      a.kind = CONST;
      a.value = t;
    }
    c.args.push_back(std::move(a));
  }
  TORCH_CHECK(ii == ints.size() && fi == floats.size() && si == strs.size() && ci == consts.size(),
              "replay_op: ", name, ": unused argument values");
  for (size_t i = 0; i < outs.size();) {
    const int64_t n = outs[i++];
    std::vector<int64_t> slots;
    const int64_t count = n < 0 ? 1 : n;
    for (int64_t j = 0; j < count; ++j) {
      TORCH_CHECK(i < outs.size() && outs[i] == p.n_slots, "replay_op: outputs must take the next slots");
      slots.push_back(outs[i++]);
      ++p.n_slots;
    }
    c.outs.push_back(slots);
    c.is_list.push_back(n >= 0);
  }
  p.last_use.resize(p.n_slots, -1);
  for (const Arg& a : c.args) {
    if (a.kind == SLOT) p.last_use[a.slot] = (int64_t)p.calls.size();
    for (int64_t e : a.list) if (e >= 0) p.last_use[e] = (int64_t)p.calls.size();
  }
  TORCH_CHECK(c.outs.size() == schema.returns().size(), "replay_op: ", name, " returns ", schema.returns().size(),
              " values, ", c.outs.size(), " given");
  p.calls.push_back(std::move(c));
  p.ns.push_back(0.0);
}

inline int64_t now_ns() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

at::Tensor replay_run(int64_t h, const std::vector<at::Tensor>& inputs, int64_t out_slot, bool timed) {
  Program& p = get(h);
  TORCH_CHECK((int64_t)inputs.size() == p.n_inputs, "replay_run: ", p.n_inputs, " inputs, ", inputs.size(), " given");
  TORCH_CHECK(out_slot >= 0 && out_slot < p.n_slots, "replay_run: no slot ", out_slot);
  c10::InferenceMode guard;
  if (p.dead_for != out_slot) plan_frees(p, out_slot);
  std::vector<at::Tensor> env(p.n_slots);
  for (size_t i = 0; i < inputs.size(); ++i) env[i] = inputs[i];
  torch::jit::Stack stack;
  for (size_t ci = 0; ci < p.calls.size(); ++ci) {
    const Call& c = p.calls[ci];
    const int64_t t0 = timed ? now_ns() : 0;
    stack.clear();
    for (const Arg& a : c.args) {
      if (a.kind == SLOT) {
        stack.emplace_back(env[a.slot]);
      } else if (a.kind == TENSORS) {
        std::vector<at::Tensor> v;
        v.reserve(a.list.size());
        for (int64_t e : a.list) v.push_back(e >= 0 ? env[e] : c.consts[-e - 1]);
        stack.emplace_back(v);
      } else {
        stack.push_back(a.value);
      }
    }
    c.op.callBoxed(&stack);
    TORCH_CHECK(stack.size() == c.outs.size(), "replay_run: ", c.op.schema().name(), " returned ", stack.size(),
                " values");
    for (size_t r = 0; r < c.outs.size(); ++r) {
      if (c.is_list[r]) {
        auto v = stack[r].toTensorVector();
        TORCH_CHECK(v.size() == c.outs[r].size(), "replay_run: ", c.op.schema().name(), " returned ", v.size(),
                    " tensors, recorded ", c.outs[r].size());
        for (size_t j = 0; j < v.size(); ++j) env[c.outs[r][j]] = std::move(v[j]);
      } else {
        env[c.outs[r][0]] = stack[r].toTensor();
      }
    }
    for (int64_t s : p.dead[ci]) env[s].reset();
    if (timed) p.ns[ci] += (double)(now_ns() - t0);
  }
  return env[out_slot];
}

at::Tensor replay_times(int64_t h) {
  Program& p = get(h);
  at::Tensor out = at::empty({(int64_t)p.ns.size()}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (size_t i = 0; i < p.ns.size(); ++i) { o[i] = p.ns[i]; p.ns[i] = 0.0; }
  return out;
}

}  // namespace
}  // namespace ts

TORCH_LIBRARY_FRAGMENT(tensorsplit, m) {
  m.def("replay_new(int n_inputs) -> int", &ts::replay_new);
  m.def("replay_op(int handle, str name, str overload, int[] kinds, int[] ints, float[] floats, str[] strs, "
        "Tensor[] consts, int[] outs) -> ()", &ts::replay_op);
  m.def("replay_run(int handle, Tensor[] inputs, int out_slot, bool timed) -> Tensor", &ts::replay_run);
  m.def("replay_times(int handle) -> Tensor", &ts::replay_times);
  m.def("replay_free(int handle) -> ()", &ts::replay_free);
}
