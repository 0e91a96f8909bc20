"""Student and teacher prompts: render, tokenize, truncate, pad.

The student sees the question; the teacher sees the recipe's teacher template (question +
demonstration). With a chat template both are rendered by the same template with the same
kwargs; for chat data the system message(s) are kept and only the last user turn is rewritten.
When the teacher prompt is too long the demonstration is truncated, never the question or the
template's generation header.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DataConfig


class PromptError(Exception):
    """User-facing prompt problem (the message names the key to change)."""


@dataclass
class EncodedExample:
    row: int
    student_ids: list[int]
    teacher_ids: list[int]
    prompt_text: str  # the question as the user wrote it (for samples and the app)
    demonstration: str
    answer: str | None
    demo_truncated: bool = False


def fill_template(template: str, prompt: str, demonstration: str) -> str:
    # str.replace, not str.format: user text may contain braces.
    return template.replace("{prompt}", prompt).replace("{demonstration}", demonstration)


def question_text(prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


class PromptEncoder:
    """Turns data.Example rows into token ids for both sides."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tok = tokenizer
        self.cfg = cfg
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if cfg.chat_template == "always" and not has_template:
            raise PromptError(
                "data.chat_template is 'always' but the tokenizer has no chat template: set data.chat_template: never"
            )
        self.use_chat = cfg.chat_template == "always" or (cfg.chat_template == "auto" and has_template)
        self._end_of_turn: dict[tuple[int, ...], int] = {}  # per EOS set: rendering it costs a template pass

    # ------------------------------------------------------------------ rendering
    def _messages(self, prompt: str | list[dict], user_text: str) -> list[dict]:
        if isinstance(prompt, str):
            system = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
            return [*system, {"role": "user", "content": user_text}]
        last_user = max(i for i, m in enumerate(prompt) if m["role"] == "user")
        messages = [dict(m) for m in prompt[: last_user + 1]]
        messages[last_user]["content"] = user_text
        return messages

    def _ids(self, prompt: str | list[dict], user_text: str) -> list[int]:
        if self.use_chat:
            messages = self._messages(prompt, user_text)
            text = self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **self.cfg.chat_template_kwargs
            )
            return self.tok(text, add_special_tokens=False)["input_ids"]
        if not isinstance(prompt, str):
            raise PromptError(
                "chat-message prompts need a tokenizer with a chat template: use string prompts or a chat model"
            )
        return self.tok(user_text)["input_ids"]

    def student_ids(self, prompt: str | list[dict]) -> list[int]:
        return self._ids(prompt, question_text(prompt))

    def teacher_ids(self, prompt: str | list[dict], demonstration: str) -> tuple[list[int], bool]:
        """Teacher prompt ids; the demonstration is cut (token-wise) until the prompt fits."""
        question = question_text(prompt)
        limit = self.cfg.max_teacher_prompt_tokens
        ids = self._ids(prompt, fill_template(self.cfg.teacher_template, question, demonstration))
        if len(ids) <= limit:
            return ids, False
        demo_ids = self.tok(demonstration, add_special_tokens=False)["input_ids"]
        for _ in range(8):  # re-tokenising can shift by a few tokens at the cut; converge in a few rounds
            keep = max(0, len(demo_ids) - (len(ids) - limit))
            demo_ids = demo_ids[:keep]
            cut = self.tok.decode(demo_ids, skip_special_tokens=True)
            ids = self._ids(prompt, fill_template(self.cfg.teacher_template, question, cut))
            if len(ids) <= limit or keep == 0:
                break
        return ids, True

    def end_of_turn_id(self, eos_ids: list[int]) -> int:
        """The token that ends an assistant answer: the first token of the EOS set that the chat
        template writes after an assistant message (`<|im_end|>` for ChatML, `<|eot_id|>` for
        Llama 3), else the tokenizer's eos token, else the first id of the EOS set."""
        key = tuple(eos_ids)
        if key not in self._end_of_turn:
            self._end_of_turn[key] = self._find_end_of_turn(eos_ids)
        return self._end_of_turn[key]

    def _find_end_of_turn(self, eos_ids: list[int]) -> int:
        if self.use_chat:
            marker = "\u2063sdft-answer\u2063"  # text no template rewrites
            try:
                text = self.tok.apply_chat_template(
                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                    tokenize=False,
                    **self.cfg.chat_template_kwargs,
                )
            except Exception:  # templates that refuse this conversation shape: fall back below
                text = ""
            if marker in text:
                after = self.tok(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
                found = [i for i in after if i in eos_ids]
                if found:
                    return found[0]
        if self.tok.eos_token_id is not None:
            return self.tok.eos_token_id
        return eos_ids[0]

    def completion_ids(self, demonstration: str, eos_ids: list[int]) -> list[int]:
        """The demonstration as the model should produce it after the generation prompt: its
        tokens then the end-of-turn token (SFT's targets)."""
        return self.tok(demonstration, add_special_tokens=False)["input_ids"] + [self.end_of_turn_id(eos_ids)]

    # ------------------------------------------------------------------ examples
    def encode(self, examples: list) -> tuple[list[EncodedExample], list[tuple[int, str]]]:
        """Encode data.Example rows. Returns (encoded, bad) where bad = [(row, reason)]."""
        encoded, bad = [], []
        for ex in examples:
            s_ids = self.student_ids(ex.prompt)
            if len(s_ids) > self.cfg.max_prompt_tokens:
                bad.append(
                    (
                        ex.row,
                        f"prompt is {len(s_ids)} tokens, over data.max_prompt_tokens={self.cfg.max_prompt_tokens}",
                    )
                )
                continue
            t_ids, truncated = self.teacher_ids(ex.prompt, ex.demonstration)
            if len(t_ids) > self.cfg.max_teacher_prompt_tokens:
                bad.append(
                    (
                        ex.row,
                        "teacher prompt does not fit data.max_teacher_prompt_tokens even without the demonstration",
                    )
                )
                continue
            encoded.append(
                EncodedExample(
                    ex.row, s_ids, t_ids, question_text(ex.prompt), ex.demonstration, ex.answer, truncated
                )
            )
        return encoded, bad


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so every completion starts at the same column. Returns ids, mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
