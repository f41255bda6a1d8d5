"""Chat prompts: the model's template rendered in the sandbox, then tokenized so that template
text may hold special tokens while message text never does (a user typing "<|im_end|>" gets
plain-text tokens)."""
from __future__ import annotations

from pathlib import Path

from .chat_template import ChatTemplate
from .tokenizer import Tokenizer


class ChatFormatter:
    def __init__(self, tok: Tokenizer, gf, template_path: Path | None = None):
        self.tok = tok
        self.template = ChatTemplate.from_gguf_kv(gf.kv, template_path, source=str(gf.path),
                                                  add_bos=tok.add_bos, add_eos=tok.add_eos)

    def encode(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids = [self.tok.bos_id] if self.tok.add_bos and self.tok.bos_id is not None else []
        for text, is_message in self.template.render_segments(messages, add_generation_prompt):
            ids += self.tok.encode(text, add_special=False, parse_special=not is_message)
        return ids
