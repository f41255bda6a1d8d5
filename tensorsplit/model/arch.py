"""Per-architecture conventions: which tensors a layer has, their shapes, how each is split.

This table is the one source of truth for tensor names. The config checks the file against
it, the shard plan reads each tensor's `split` role from it, and the loader and the forward
pass follow the plan. An architecture not listed here is refused with the list of those that
are (never guessed).

Split roles (ggml shapes: ne0 is the input dim, ne1 the output dim of a weight):
  q_rows     output rows of the query projection, cut at whole query heads
  kv_rows    output rows of the key/value projections, cut at whole KV heads (replicated when
             ranks outnumber KV heads)
  ffn_rows   output rows of gate/up, cut on the FFN plan
  o_cols     input columns of the attention output projection, cut at the rank's query heads
  ffn_cols   input columns of ffn_down, cut on the FFN plan
  vocab_rows rows of token_embd / output, cut by vocabulary
  mirror     every rank holds all of it (norms, rope factors, biases of input-split weights)
For a 1-D bias the role's axis is its only axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UnsupportedError

SPLIT_ROLES = ("q_rows", "kv_rows", "ffn_rows", "o_cols", "ffn_cols", "vocab_rows", "mirror")


@dataclass(frozen=True)
class TensorRole:
    suffix: str                              # name after "blk.{i}."
    shape: Callable[[object], tuple]         # cfg -> ggml shape
    split: str                               # one of SPLIT_ROLES
    optional: bool = False                   # may be absent from the file (biases)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    rope_neox: bool          # NeoX layout rotates (x[i], x[i + d/2]); the normal layout rotates (x[2i], x[2i+1])
    layer_tensors: tuple[TensorRole, ...]

    def layer_shapes(self, cfg, i: int) -> dict[str, tuple[int, ...]]:
        return {f"blk.{i}.{r.suffix}": r.shape(cfg) for r in self.layer_tensors}

    def optional_tensors(self, cfg) -> set[str]:
        return {f"blk.{i}.{r.suffix}" for i in range(cfg.n_layers) for r in self.layer_tensors if r.optional}

    def role(self, suffix: str) -> TensorRole:
        return next(r for r in self.layer_tensors if r.suffix == suffix)


def _llama_layer() -> tuple[TensorRole, ...]:
    return (
        TensorRole("attn_norm.weight", lambda c: (c.n_embd,), "mirror"),
        TensorRole("attn_q.weight", lambda c: (c.n_embd, c.q_dim), "q_rows"),
        TensorRole("attn_k.weight", lambda c: (c.n_embd, c.kv_dim), "kv_rows"),
        TensorRole("attn_v.weight", lambda c: (c.n_embd, c.kv_dim), "kv_rows"),
        TensorRole("attn_q.bias", lambda c: (c.q_dim,), "q_rows", optional=True),
        TensorRole("attn_k.bias", lambda c: (c.kv_dim,), "kv_rows", optional=True),
        TensorRole("attn_v.bias", lambda c: (c.kv_dim,), "kv_rows", optional=True),
        TensorRole("attn_output.weight", lambda c: (c.q_dim, c.n_embd), "o_cols"),
        TensorRole("attn_output.bias", lambda c: (c.n_embd,), "mirror", optional=True),
        TensorRole("ffn_norm.weight", lambda c: (c.n_embd,), "mirror"),
        TensorRole("ffn_gate.weight", lambda c: (c.n_embd, c.n_ff), "ffn_rows"),
        TensorRole("ffn_up.weight", lambda c: (c.n_embd, c.n_ff), "ffn_rows"),
        TensorRole("ffn_down.weight", lambda c: (c.n_ff, c.n_embd), "ffn_cols"),
    )


ARCHS: dict[str, ArchSpec] = {
    # llama.cpp's LLM_ARCH_LLAMA uses the normal rope layout: the converter permutes q/k rows for it.
    "llama": ArchSpec("llama", rope_neox=False, layer_tensors=_llama_layer()),
}


def arch_spec(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise UnsupportedError(f"architecture '{name}' (general.architecture) is not supported; "
                               f"supported: {', '.join(sorted(ARCHS))}") from None
