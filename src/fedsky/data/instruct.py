"""Instruction data: turn an example's turns into token ids and labels that take the loss on
the responses only (the prompt's labels are IGNORE), as supervised fine-tuning does.

prompt/response examples are the prompt's text followed by the response's and EOS: the file
carries its own formatting (an Alpaca-style "### Response:" line belongs in the prompt). Chats
go through the tokenizer's chat template when it has one (Llama, Qwen, Mistral do), rendered
one message at a time so each message's span is known; without a template a plain
"<|role|>" header precedes each message. Assistant messages are trained, their headers and
every other message are not.
"""

from __future__ import annotations

from fedsky.data.sequences import IGNORE
from fedsky.data.tokenizer import AnyTokenizer, encode_texts, eos_id
from fedsky.errors import FedskyError

Part = tuple[str, bool]  # (text, trained?)


def render(tok: AnyTokenizer, turns: tuple[tuple[str, str], ...]) -> list[Part]:
    """The example as consecutive text spans, each marked trained or not."""
    if turns and turns[0][0] == "prompt":
        return [(turns[0][1], False), (turns[1][1], True)]
    if getattr(tok, "chat_template", None):
        return _templated(tok, turns)
    parts: list[Part] = []
    for role, content in turns:
        parts += [(f"<|{role}|>\n", False), (content + "\n", role == "assistant")]
    return parts


def _templated(tok: AnyTokenizer, turns: tuple[tuple[str, str], ...]) -> list[Part]:
    """Spans from the chat template: each is what rendering one more message adds."""
    msgs = [{"role": r, "content": c} for r, c in turns]

    def text(n: int, prompt: bool = False) -> str:
        if n == 0 and not prompt:
            return ""
        return tok.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=prompt)

    parts: list[Part] = []
    before = ""
    for i, (role, _) in enumerate(turns):
        if role == "assistant":  # the template's assistant header is not trained
            header = text(i, prompt=True)
            parts.append((_added(header, before), False))
            before = header
        upto = text(i + 1)
        parts.append((_added(upto, before), role == "assistant"))
        before = upto
    return parts


def _added(longer: str, shorter: str) -> str:
    if not longer.startswith(shorter):
        raise FedskyError("the tokenizer's chat template renders a conversation differently "
                          "from its first messages, so the responses cannot be located; use "
                          "prompt/response examples instead")
    return longer[len(shorter):]


def encode_example(tok: AnyTokenizer, turns: tuple[tuple[str, str], ...]
                   ) -> tuple[list[int], list[int]]:
    """(ids, labels) of one example; labels are the ids on trained spans, IGNORE elsewhere.
    Without a chat template the example ends with EOS, trained: the model learns to stop."""
    parts = render(tok, turns)
    texts = [t for t, _ in parts]
    ids: list[int] = []
    labels: list[int] = []
    for span, (_, trained) in zip(encode_texts(tok, texts), parts, strict=True):
        ids += span
        labels += span if trained else [IGNORE] * len(span)
    templated = turns[0][0] != "prompt" and getattr(tok, "chat_template", None)
    if not templated:
        ids.append(eos_id(tok))
        labels.append(ids[-1])
    return ids, labels
