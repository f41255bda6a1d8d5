"""Render the GGUF's `tokenizer.chat_template` (untrusted Jinja) into prompt text, safely.

This module owns the chat template: it turns a list of messages into the prompt text the
caller then tokenizes. It knows nothing of tokens, devices or sampling. The template comes
from the model file (or from `--chat-template FILE`) and is treated as hostile code:

* **Sandbox.** It runs in `jinja2.sandbox.ImmutableSandboxedEnvironment` (no `_` attributes,
  no function internals, no mutation of lists and dicts; `|attr` goes through the same check),
  with jinja2 >= 3.1.6 required at import (3.1.5 and older let `|attr('format')` escape the
  sandbox, CVE-2025-27516). A plain `jinja2.Environment` here was remote code execution in
  llama-cpp-python (CVE-2024-34359) and SGLang (CVE-2026-5760). The environment matches
  transformers': `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception(msg)`,
  `strftime_now(fmt)`, the `tojson` filter with transformers' arguments, and HF's
  `{% generation %}` tag as a no-op; variables `messages`, `bos_token`, `eos_token`,
  `add_generation_prompt` and the caller's extras (`tools`, ...).

* **Time bound.** The sandbox does not bound CPU time, so every render (and the compile) runs
  under a deadline (`timeout_s`, default 2 s) enforced with `sys.settrace` on the rendering
  thread only: the trace function checks the clock on every Python call made while rendering
  and on every line of the compiled template, so any loop written in the template (nested
  `for` over ranges, strings or lists, recursive macros, `loop` helpers, filters with Python
  callbacks) is interrupted at the deadline by an exception that template code cannot catch
  (a BaseException; jinja's runtime catches only Exception). This is cheap enough to leave on:
  SmolLM2's template renders in well under a millisecond. No thread or process is started.
  The previous trace function (a debugger, coverage) is put back afterwards; it does not see
  the render.
  Limits: one C-level operation (a `str.replace`, a `join`, a `%` format) cannot be
  interrupted. Template-chosen sizes are therefore bounded *before* such operations run:
  integer arguments of calls and filters at most `MAX_INT_ARG` (the sandbox's own range limit),
  numbers written in format strings likewise, `*` on sequences and `+` on sized values at most
  the size limit, integers in `*`, `**`, `+`, `-` at most `MAX_INT_BITS` bits; and the size of
  every value made by a call, a filter, `~`, `+` or `%` is checked after it, so amplification
  does not chain. A single step can still multiply a large value by a bounded factor (say
  `indent` with a wide width over a long string); that fails with MemoryError or finishes
  within seconds and is then rejected by the size check: a bounded cost, not a hang. A caller
  that needs a hard memory bound must render in a separate process with an rlimit (not done
  here: the coordinator process holds torch, and a fork per request would cost more than the
  render).

* **Size bound.** The output (and every intermediate value) is at most `max_chars` characters
  plus the size of the messages and extras passed in.

* **Messages are data.** The caller tokenizes template text with parse_special=True, so
  `<|im_end|>` typed by a user must not reach it. `render_segments` returns the prompt as
  (text, is_message_data) pieces: the template is rendered once with the real messages and
  once with every string inside the messages (except `role` and `type` values, which are
  structure and must be short identifiers) replaced by a random placeholder (equal strings
  share one, so comparisons of ids still hold). The placeholder render is split at the
  placeholders; its template pieces must match the real render exactly, and each placeholder
  must match the real string or what templates commonly make of it (`trim`, `tojson`), else
  the split is refused. A template that transforms message text some other way (slices it,
  branches on its content) cannot be split: its render is returned as one template piece if
  no message contains the text of a CONTROL or UNKNOWN token (the ones only parse_special
  turns into tokens), and is an error otherwise. Tokenize template pieces with
  parse_special=True, message pieces with parse_special=False, and concatenate the ids. That
  gives the ids of the whole text, except where a message starts or ends with whitespace
  that would merge with the template's (a trailing "\n" before Gemma's "\n\n"): there one
  token can come out as two. Extras (tools) are template text: they are the application's,
  not the end user's.

* **BOS/EOS.** Like llama.cpp (common/chat.cpp), a leading `bos_token` is cut from the
  render when the tokenizer adds BOS itself (`add_bos`), and a trailing `eos_token` when it
  adds EOS, so the prompt does not start with two BOS tokens.

Every failure (syntax error, undefined misuse, sandbox SecurityError, `raise_exception`,
deadline, size) is a `ChatTemplateError` (a TensorsplitError) whose message is one line naming
the template and, where known, the template line.
"""
from __future__ import annotations

import functools
import json
import re
import secrets
import sys
import time
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping

import jinja2

from ..errors import TensorsplitError

MIN_JINJA_VERSION = (3, 1, 6)  # CVE-2025-27516: |attr('format') escaped the sandbox before 3.1.6


def _check_jinja_version(version: str) -> None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    found = tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0)
    if found < MIN_JINJA_VERSION:
        need = ".".join(map(str, MIN_JINJA_VERSION))
        raise ImportError(f"tensorsplit renders chat templates with jinja2 >= {need} (older versions have "
                          f"sandbox escapes, CVE-2025-27516); found jinja2 {version}: pip install 'jinja2>={need}'")


_check_jinja_version(jinja2.__version__)

import jinja2.ext  # noqa: E402  (after the version check, on purpose)
from jinja2.compiler import CodeGenerator  # noqa: E402
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, SecurityError  # noqa: E402

__all__ = ["ChatTemplate", "ChatTemplateError", "ChatTemplateRaised", "ChatTemplateTimeout",
           "DEFAULT_TIMEOUT_S", "DEFAULT_MAX_CHARS"]

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_CHARS = 1 << 24        # template-made text, on top of the messages' own size
MAX_TEMPLATE_CHARS = 1 << 20       # real templates are a few KiB; compiling is not free
MAX_INT_ARG = MAX_RANGE            # 100_000: largest integer argument of a call or filter
MAX_INT_BITS = 1 << 16             # largest integer `*` and `**` may produce
_TEMPLATE_FILENAME = "<template>"  # co_filename of jinja's compiled code (traced line by line)
_STRUCTURAL_KEYS = ("role", "type")  # message fields templates branch on: not placeholdered
_DATA_KEY = "arguments"              # tool call arguments: data, even their "type" keys
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_BIG_NUMBER = re.compile(r"\d{%d,}" % len(str(MAX_INT_ARG)))
_SPECIAL_TOKEN_TYPES = (2, 3)     # UNKNOWN, CONTROL: what only parse_special=True matches
                                   # (llama.cpp matches USER_DEFINED tokens either way)

# The size limit of the render in progress (per thread / task, so renders may run concurrently).
_size_limit: ContextVar[int] = ContextVar("chat_template_size_limit", default=DEFAULT_MAX_CHARS)


class ChatTemplateError(TensorsplitError):
    """The chat template cannot be compiled or rendered. One line: template, line, problem."""


class ChatTemplateRaised(ChatTemplateError):
    """The template itself refused the messages (`raise_exception(...)`), e.g. roles out of order."""


class ChatTemplateTimeout(ChatTemplateError):
    """The render ran past its deadline."""


class _Limit(Exception):
    """A size or argument limit was hit inside the template (converted by ChatTemplate)."""


class _Raised(Exception):
    """`raise_exception(msg)` was called by the template (converted by ChatTemplate)."""


class _Deadline(BaseException):
    """Raised by the trace function. A BaseException, so no `except Exception` in jinja's runtime
    can swallow it (a trace function that raises is also removed, so it must not be swallowed)."""


# --- the sandbox -----------------------------------------------------------------------------

def _check_size(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) and len(value) > _size_limit.get():
        raise _Limit(f"a value of {len(value)} items exceeds the limit of {_size_limit.get()}")
    return value


def _check_int(x: Any) -> None:
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_INT_ARG:
        raise _Limit(f"integer argument {x} exceeds the limit of {MAX_INT_ARG}")


def _check_format_string(fmt: str) -> None:
    for m in _BIG_NUMBER.finditer(fmt):
        _check_int(int(m.group()))


def _check_args(args: tuple, kwargs: Mapping[str, Any]) -> None:
    for x in args:
        _check_int(x)
    for x in kwargs.values():
        _check_int(x)


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, with the result of every `~` concatenation size-checked."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.checked_concat(")
        super().visit_Concat(node, frame)
        self.write(")")


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}` (marks assistant text for training): a no-op."""

    tags = {"generation"}

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: Any) -> None:
    raise _Raised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson (no HTML escaping, unlike jinja's own); the indent is kept small."""
    if indent is not None and (len(indent) if isinstance(indent, str) else abs(indent)) > 64:
        raise _Limit(f"tojson indent {indent!r} is too wide")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _wrap_filter(name: str, f):
    """Check a filter's arguments (not its input value) before, and its result's size after."""
    skip = 2 if getattr(f, "jinja_pass_arg", None) is not None else 1  # (context/env,) value

    @functools.wraps(f)  # keeps jinja_pass_arg
    def checked(*args, **kwargs):
        _check_args(args[skip:], kwargs)
        if name == "format" and len(args) >= skip and isinstance(args[skip - 1], str):
            _check_format_string(args[skip - 1])
        return _check_size(f(*args, **kwargs))
    return checked


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "-", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        self.filters["tojson"] = _tojson
        self.filters = {name: _wrap_filter(name, f) for name, f in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        """Jinja returns an Undefined that prints as '' (so `x|attr('__class__')` renders
        nothing); an attempt to reach an unsafe attribute is an error here instead."""
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
            bits = (left.bit_length() + right.bit_length() if operator == "*"
                    else right * max(abs(left).bit_length() - 1, 0))
            if bits > MAX_INT_BITS:
                raise _Limit(f"integer {operator} result of about {bits} bits exceeds the limit of {MAX_INT_BITS}")
        elif operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _size_limit.get():
                raise _Limit(f"repeating {len(seq)} items {n} times exceeds the limit of {_size_limit.get()}")
        elif operator in ("+", "-") and isinstance(left, int) and isinstance(right, int):
            if max(left.bit_length(), right.bit_length()) >= MAX_INT_BITS:
                raise _Limit(f"integer {operator} operand exceeds the limit of {MAX_INT_BITS} bits")
        elif operator == "+":
            if (isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple))
                    and len(left) + len(right) > _size_limit.get()):
                raise _Limit(f"a value of {len(left) + len(right)} items exceeds the limit of {_size_limit.get()}")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left)
            if "*" in left:  # '%*d' takes the width from the arguments
                for x in right if isinstance(right, tuple) else (right,):
                    _check_int(x)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_args(args, kwargs)
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        if isinstance(getattr(target, "__self__", None), str) and getattr(target, "__name__", "") in (
                "format", "format_map"):
            _check_format_string(target.__self__)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def checked_concat(self, value: str) -> str:
        return _check_size(value)


# --- the deadline ----------------------------------------------------------------------------

class _DeadlineTrace:
    """Context manager: while active, this thread raises _Deadline once `timeout_s` has passed
    (see the module docstring); on exit the previous trace function is restored and _Deadline
    becomes ChatTemplateTimeout(`message`)."""

    def __init__(self, timeout_s: float, message: str):
        self.deadline = time.monotonic() + timeout_s
        self.message = message

    def _local(self, frame, event, arg):
        if time.monotonic() > self.deadline:
            raise _Deadline
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code is _DeadlineTrace.__exit__.__code__:
            return None  # __exit__ must run, to put the previous trace function back
        if time.monotonic() > self.deadline:
            raise _Deadline
        return self._local if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    def __enter__(self) -> "_DeadlineTrace":
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        sys.settrace(self._previous)
        if exc_type is _Deadline:
            raise ChatTemplateTimeout(self.message) from None
        return False


# --- placeholders ----------------------------------------------------------------------------

def _placeholdered(x: Any, index: dict[str, int], token: str, key: Any = None, data: bool = False) -> Any:
    """A copy of `x` with each non-empty string replaced by f"{token}{n}Z", n its position in
    `index` (equal strings get the same placeholder, so that templates comparing ids, e.g.
    tool_call.id == message.tool_call_id, still branch alike). Role and type values are kept,
    except under a tool call's "arguments" (`data`), which are data throughout."""
    if isinstance(x, str):
        if not x or (key in _STRUCTURAL_KEYS and not data):
            return x
        return f"{token}{index.setdefault(x, len(index))}Z"
    if isinstance(x, Mapping):
        return {k: _placeholdered(v, index, token, k, data or k == _DATA_KEY) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_placeholdered(v, index, token, None, data) for v in x]
    return x


def _candidates(value: str) -> list[str]:
    """What a template may have made of a message string, longest first."""
    forms = {value, value.strip(), value.lstrip(), value.rstrip(),
             json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1]}
    return sorted(forms, key=len, reverse=True)


def _align(parts: list[str], values: list[str], real: str) -> list[tuple[str, bool]] | None:
    """Match the placeholder render (split into text, index, text, ...) against the real render.
    Returns the segments, or None where they disagree."""
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if not real.startswith(part, pos):
                return None
            segments.append((part, False))
            pos += len(part)
            continue
        index = int(part)
        if index >= len(values):
            return None
        after = parts[i + 1]
        for text in _candidates(values[index]):
            if real.startswith(text, pos) and real.startswith(after, pos + len(text)):
                break
        else:
            return None
        segments.append((text, True))
        pos += len(text)
    return segments if pos == len(real) else None


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for text, is_data in segments:
        if not text:
            continue
        if out and out[-1][1] == is_data:
            out[-1] = (out[-1][0] + text, is_data)
        else:
            out.append((text, is_data))
    return out


def _trie_regex(words: Collection[str]) -> re.Pattern:
    """One regex matching any of `words` (longest first), built as a trie so that a search costs
    about one step per character of the text, not one per word (models have thousands)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        alternatives = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not alternatives:
            return ""
        body = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
        return f"(?:{body})?" if "" in node else body
    return re.compile(pattern(trie)) if trie else re.compile(r"(?!)")


def _payload_chars(x: Any) -> int:
    if isinstance(x, str):
        return len(x)
    if isinstance(x, Mapping):
        return sum(_payload_chars(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_payload_chars(v) for v in x)
    return 0


def _template_line(exc: BaseException) -> int | None:
    """The template line of the innermost template frame in `exc`'s traceback (jinja rewrites
    tracebacks to template lines), if any."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# --- the template ----------------------------------------------------------------------------

class ChatTemplate:
    """A compiled chat template and the token strings it needs. Build with `from_gguf_kv`."""

    def __init__(self, text: str, *, name: str = "chat template", bos_token: str = "", eos_token: str = "",
                 add_bos: bool = False, add_eos: bool = False, special_tokens: Collection[str] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_chars: int = DEFAULT_MAX_CHARS):
        """`name` starts every error message; `add_bos`/`add_eos`: whether the tokenizer adds
        them (then a leading bos_token / trailing eos_token is cut from the render);
        `special_tokens`: texts that parse_special would turn into special tokens (used when a
        render cannot be split into template and message pieces; None: unknown, refuse)."""
        self.name, self.text = name, text
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos, self.add_eos = add_bos, add_eos
        self.special_tokens = None if special_tokens is None else frozenset(t for t in special_tokens if t)
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self._special_re: re.Pattern | None = None  # built on first use
        if not isinstance(text, str):
            raise ChatTemplateError(f"{name}: expected a string, found {type(text).__name__}")
        if len(text) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"{name}: {len(text)} characters, more than the limit of {MAX_TEMPLATE_CHARS}")
        self._env = _Sandbox()
        token = _size_limit.set(max_chars)
        try:
            with _DeadlineTrace(timeout_s, f"{name}: compiling took longer than {timeout_s:g} s"):
                self._template = self._env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{name}: line {e.lineno}: syntax error: {e.message}") from None
        except RecursionError:
            raise ChatTemplateError(f"{name}: nested too deeply to compile") from None
        except Exception as e:  # anything else the parser or constant folding raises
            raise ChatTemplateError(f"{name}: cannot compile: {type(e).__name__}: {e}") from None
        finally:
            _size_limit.reset(token)

    @classmethod
    def from_gguf_kv(cls, kv: Mapping[str, object], override_path: str | Path | None = None, *,
                     source: str = "model", add_bos: bool | None = None, add_eos: bool | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S, max_chars: int = DEFAULT_MAX_CHARS) -> "ChatTemplate":
        """The template of a GGUF file's metadata `kv`, or the one in `override_path`
        (--chat-template FILE). `source` names the model in messages (its path). `add_bos`,
        `add_eos`: what the tokenizer does (pass Tokenizer.add_bos/add_eos); None reads
        tokenizer.ggml.add_bos_token / add_eos_token (absent: False)."""
        if override_path is not None:
            path = Path(override_path)
            try:
                if path.stat().st_size > 4 * MAX_TEMPLATE_CHARS:
                    raise ChatTemplateError(f"--chat-template {path}: larger than {4 * MAX_TEMPLATE_CHARS} bytes")
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                raise ChatTemplateError(f"--chat-template {path}: {e.strerror or e}") from None
            except UnicodeDecodeError as e:
                raise ChatTemplateError(f"--chat-template {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
            name = str(path)
        else:
            text = kv.get("tokenizer.chat_template")
            if text is None or (isinstance(text, str) and not text.strip()):
                raise ChatTemplateError(f"{source} has no chat template (tokenizer.chat_template); "
                                        "pass --chat-template FILE")
            name = f"{source}: tokenizer.chat_template"
        tokens = kv.get("tokenizer.ggml.tokens")
        tokens = tokens if isinstance(tokens, (list, tuple)) else []

        def token_text(key: str) -> str:
            i = kv.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

        types = kv.get("tokenizer.ggml.token_type")
        special = [] if types is None else [t for t, ty in zip(tokens, types) if int(ty) in _SPECIAL_TOKEN_TYPES]
        return cls(text, name=name, bos_token=token_text("tokenizer.ggml.bos_token_id"),
                   eos_token=token_text("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(kv.get("tokenizer.ggml.add_bos_token", False)) if add_bos is None else add_bos,
                   add_eos=bool(kv.get("tokenizer.ggml.add_eos_token", False)) if add_eos is None else add_eos,
                   special_tokens=special, timeout_s=timeout_s, max_chars=max_chars)

    # -- rendering --

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text. Message contents end up in it verbatim: to keep special-token text
        typed by users out of the special tokens, tokenize `render_segments` instead."""
        with self._deadline():
            return self._strip(self._render(messages, add_generation_prompt, extra))

    def render_segments(self, messages: list[dict], add_generation_prompt: bool = True,
                        **extra: Any) -> list[tuple[str, bool]]:
        """The prompt as [(text, is_message_data)]; their texts joined equal `render(...)`.
        Tokenize is_message_data pieces with parse_special=False, the others with True."""
        with self._deadline():  # one deadline for both renders
            real = self._render(messages, add_generation_prompt, extra)
            index: dict[str, int] = {}
            token = f"TSph{secrets.token_hex(8)}n"
            masked = self._render(_placeholdered(messages, index, token), add_generation_prompt, extra)
        values = list(index)
        if not values:
            return _merge([(self._strip(real), False)])
        parts = re.split(re.escape(token) + r"(\d+)Z", masked)
        segments = _align(parts, values, real)
        if segments is None:
            found = self._special_in(values)
            if found is not None:
                raise ChatTemplateError(
                    f"{self.name}: the template rewrites message text, so it cannot be kept apart from "
                    f"template text, and a message contains the special token text {found!r}")
            segments = [(real, False)]
        segments = _merge(segments)
        if segments and not segments[0][1]:
            segments[0] = (self._strip(segments[0][0], end=False), False)
        if segments and not segments[-1][1]:
            segments[-1] = (self._strip(segments[-1][0], start=False), False)
        return _merge(segments)

    def _special_in(self, values: list[str]) -> str | None:
        """The first special-token text found in `values` (None: none; a note if unknown)."""
        if self.special_tokens is None:
            return "(special tokens unknown)"
        if self._special_re is None:
            self._special_re = _trie_regex(self.special_tokens)
        for v in values:
            if m := self._special_re.search(v):
                return m.group()
        return None

    def _strip(self, text: str, start: bool = True, end: bool = True) -> str:
        if start and self.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        if end and self.add_eos and self.eos_token and text.endswith(self.eos_token):
            text = text[:-len(self.eos_token)]
        return text

    def _deadline(self) -> _DeadlineTrace:
        return _DeadlineTrace(self.timeout_s, f"{self.name}: rendering took longer than {self.timeout_s:g} s")

    def _render(self, messages: list[dict], add_generation_prompt: bool, extra: dict) -> str:
        self._check_messages(messages)
        limit = self.max_chars + _payload_chars(messages) + _payload_chars(extra)
        variables = {**extra, "messages": messages, "bos_token": self.bos_token, "eos_token": self.eos_token,
                     "add_generation_prompt": add_generation_prompt}
        token = _size_limit.set(limit)
        try:
            return "".join(self._chunks(self._template.generate(variables), limit))
        except ChatTemplateError:
            raise
        except Exception as e:  # untrusted code: anything it raises is its error (not _Deadline)
            raise self._error(e) from None
        finally:
            _size_limit.reset(token)

    def _chunks(self, chunks: Iterator[str], limit: int) -> Iterator[str]:
        total = 0
        for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise ChatTemplateError(f"{self.name}: output exceeds the limit of {limit} characters")
            yield chunk

    def _error(self, e: BaseException) -> ChatTemplateError:
        line = _template_line(e)
        where = f"{self.name}: line {line}" if line is not None else self.name
        if isinstance(e, _Raised):
            return ChatTemplateRaised(f"{where}: template raised: {e}")
        if isinstance(e, SecurityError):
            return ChatTemplateError(f"{where}: blocked by the sandbox: {e}")
        if isinstance(e, _Limit):
            return ChatTemplateError(f"{where}: {e}")
        if isinstance(e, jinja2.UndefinedError):
            return ChatTemplateError(f"{where}: undefined value: {e}")
        if isinstance(e, RecursionError):
            return ChatTemplateError(f"{where}: recursion too deep")
        if isinstance(e, MemoryError):
            return ChatTemplateError(f"{where}: out of memory")
        return ChatTemplateError(f"{where}: {type(e).__name__}: {e}")

    def _check_messages(self, messages: Any) -> None:
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError(f"{self.name}: messages must be a list of objects")
        for i, m in enumerate(messages):
            self._check_structure(m, f"message {i}")

    def _check_structure(self, x: Any, where: str) -> None:
        """role and type values (at any depth outside tool call arguments) are rendered as
        template text, not placeholdered: they must be plain names."""
        if isinstance(x, Mapping):
            for k, v in x.items():
                if k in _STRUCTURAL_KEYS and not (isinstance(v, str) and _IDENTIFIER.fullmatch(v)):
                    raise ChatTemplateError(f"{self.name}: {where} {k} {str(v)[:40]!r} is not a plain name")
                if k != _DATA_KEY:
                    self._check_structure(v, where)
        elif isinstance(x, (list, tuple)):
            for v in x:
                self._check_structure(v, where)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, {len(self.text)} chars, bos={self.bos_token!r}, eos={self.eos_token!r})"
