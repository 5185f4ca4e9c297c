"""Causal-LM tasks as tokens: the prompt, the answer, labels on the answer only, truncation.

Every causal row becomes ``prompt tokens + answer tokens`` with ``labels`` equal to the ids on
the answer and ``-100`` (ignored by the loss) on the prompt, so the LM loss is the loss on the
answer alone.  The answer is the response of instruction data, or a label's verbaliser for a
GLUE task asked as a prompt (:data:`~dora_lab.run.tasks.PROMPT_TEMPLATES`).

The text around them (``task.prompt_format``):

- ``chat`` (what ``auto`` picks when the tokenizer has a chat template): the prompt is the user's
  turn, rendered with ``apply_chat_template(..., add_generation_prompt=True)``; a response is
  what the template writes for the assistant's turn after that (its end-of-turn tokens included,
  so the model learns to stop); a verbaliser is the assistant's first word, its leading space
  dropped (``"yes"``, not ``" yes"``), with nothing after it.
- ``plain`` (``auto`` without a chat template): instruction data is ``prompt + "\\n" + response``
  followed by the eos token; a prompt task is the filled template (ending in ``Answer:``)
  followed directly by the verbaliser (``" yes"``).  The tokenizer's bos token leads when its
  own encoding starts with one.

Prompt and answer are tokenised apart and joined, so an answer's tokens are the same whatever
the prompt.  A row longer than ``task.max_length`` loses tokens from the *left of the prompt*
(its start; with a chat template, the start of the template too), never from the answer; those
rows are counted (``prompts_cut``).  A row whose answer alone leaves no room for one prompt
token (``len(answer) >= max_length``) is dropped and counted (``answers_dropped``): its loss would
otherwise be computed on a cut answer.  A prompt task cuts each prompt to leave room for its
longest verbaliser, so every label is scored after the same prompt tokens.

Chat data (``task.name: chat``, :func:`encode_chat`): a row's ``messages`` (role/content turns,
multi-turn; a ``system`` text first when the row has one) are rendered with the tokenizer's chat
template turn by turn: each turn is what rendering the conversation up to it adds to rendering
the turns before it, and an assistant turn is split into its opening (what
``add_generation_prompt`` writes, not labelled) and its answer (content and end-of-turn tokens,
labelled).  So the loss is on every assistant turn and nothing else.  A long row loses tokens from
its left (its earliest turns); a row whose last answer leaves no room for one token before it is
dropped, as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.labels import IGNORE_INDEX
from .config_yaml import ConfigError
from .tasks import LABEL_COLUMN, TaskSpec

__all__ = ["PROMPT_FORMATS", "ROLES", "CausalEncoding", "chat_messages", "chat_segments", "encode_causal",
           "prompt_of", "uses_chat", "verbalizer_ids"]

#: Values of ``task.prompt_format``.
PROMPT_FORMATS = ("auto", "chat", "plain")
#: The roles of a chat row's turns.
ROLES = ("system", "user", "assistant")


@dataclass
class CausalEncoding:
    """Token rows of a causal task (see the module docstring).

    One row per example (``score_labels=False``, or instruction data), or one row per (example,
    label) for scoring a prompt task's labels.  ``example[i]`` is row ``i``'s position in the rows
    given, ``choice[i]`` its label (the gold label for training rows; -1 for instruction data),
    ``gold`` each kept example's gold label by its position (prompt tasks).  ``counts``: the
    examples given, ``prompts_cut`` and ``answers_dropped``.  ``label_tokens``: when scoring the
    labels of a prompt task whose verbalisers are one token each, their ids; the rows are then one
    per example (its gold verbaliser after the prompt), since one forward pass gives every label's
    log-probability at the answer's position.
    """

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    example: list[int] = field(default_factory=list)
    choice: list[int] = field(default_factory=list)
    gold: dict[int, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    label_tokens: list[int] | None = None


def uses_chat(tokenizer: Any, prompt_format: str) -> bool:
    """Whether rows are rendered with the tokenizer's chat template (``auto``: when it has one)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"task.prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise ConfigError("task.prompt_format is 'chat' but the tokenizer has no chat template; set "
                         "task.prompt_format to 'plain' (or 'auto'), or use a model whose tokenizer has one")
    return has_template if prompt_format == "auto" else prompt_format == "chat"


def prompt_of(spec: TaskSpec, row: dict[str, Any]) -> str:
    """The prompt text of one row: instruction data's ``prompt``, or the task's filled template."""
    if spec.is_instruction:
        return str(row[spec.text_fields[0]])
    return spec.prompt.format(**{f: row[f] for f in spec.text_fields})


def _ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _bos(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer's own encoding of a text starts with its bos token, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _chat_head(tokenizer: Any, prompt: str) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return str(text)


def _chat_tail(tokenizer: Any, prompt: str, head: str, response: str) -> str:
    full = str(tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False))
    if not full.startswith(head):
        raise ConfigError("the tokenizer's chat template does not render a conversation as its generation prompt "
                         "followed by the answer, so the answer cannot be separated from the prompt; "
                         "set task.prompt_format: plain")
    return full[len(head):]


def _prompts(spec: TaskSpec, rows: Sequence[dict[str, Any]], tokenizer: Any, chat: bool) -> list[list[int]]:
    prompts = [prompt_of(spec, row) for row in rows]
    if chat:
        return _ids(tokenizer, [_chat_head(tokenizer, p) for p in prompts])
    bos = _bos(tokenizer)
    suffix = "\n" if spec.is_instruction else ""
    return [bos + ids for ids in _ids(tokenizer, [p + suffix for p in prompts])]


def _responses(spec: TaskSpec, rows: Sequence[dict[str, Any]], tokenizer: Any, chat: bool) -> list[list[int]]:
    """Instruction data: each row's response ids, its end (eos, or the end of the assistant's turn) included."""
    responses = [str(row[spec.text_fields[1]]) for row in rows]
    if chat:
        prompts = [prompt_of(spec, row) for row in rows]
        return _ids(tokenizer, [_chat_tail(tokenizer, p, _chat_head(tokenizer, p), r)
                                for p, r in zip(prompts, responses, strict=True)])
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    return [ids + eos for ids in _ids(tokenizer, responses)]


def verbalizer_ids(spec: TaskSpec, tokenizer: Any, chat: bool) -> list[list[int]]:
    """A prompt task's answer ids, one list per label (chat: the verbaliser without its leading space)."""
    return _ids(tokenizer, [v.lstrip() if chat else v for v in spec.verbalizers])


def encode_causal(rows: Sequence[dict[str, Any]], spec: TaskSpec, tokenizer: Any, *, max_length: int,
                  prompt_format: str = "auto", score_labels: bool = False) -> CausalEncoding:
    """Token rows of ``rows`` (from :func:`dora_lab.run.data.load_splits`) for a causal task.

    ``score_labels`` (a prompt task's evaluation): one row per (example, label), the label's
    verbaliser as the answer, for :func:`dora_lab.run.evaluate.label_log_likelihoods`; otherwise one
    row per example with its gold verbaliser (or response) as the answer.
    """
    if not spec.is_causal:
        raise ValueError(f"{spec.name} is not a causal task")
    if spec.is_chat:
        return encode_chat(rows, spec, tokenizer, max_length=max_length, prompt_format=prompt_format)
    chat = uses_chat(tokenizer, prompt_format)
    prompt_ids = _prompts(spec, rows, tokenizer, chat)
    responses = _responses(spec, rows, tokenizer, chat) if spec.is_instruction else []
    verbalized = None if spec.is_instruction else verbalizer_ids(spec, tokenizer, chat)
    out = CausalEncoding(counts={"examples": len(rows), "prompts_cut": 0, "answers_dropped": 0})
    longest = max(len(v) for v in verbalized) if verbalized is not None else 0
    if score_labels and verbalized is not None and longest == 1:
        out.label_tokens = [v[0] for v in verbalized]
        score_labels = False  # one row per example scores every label
    if verbalized is not None and longest + 1 > max_length:
        raise ConfigError(f"task.max_length={max_length} leaves no room for a prompt before {spec.name}'s longest "
                         f"verbaliser ({longest} tokens); raise task.max_length")
    for position, ids in enumerate(prompt_ids):
        if verbalized is None:
            answer = responses[position]
            room = max_length - len(answer)
            if room < 1 or not answer:
                out.counts["answers_dropped"] += 1
                continue
            pairs = [(-1, answer)]
        else:
            room = max_length - longest
            gold = int(rows[position][LABEL_COLUMN])
            out.gold[position] = gold
            pairs = list(enumerate(verbalized)) if score_labels else [(gold, verbalized[gold])]
        if len(ids) > room:
            ids = ids[len(ids) - room:]
            out.counts["prompts_cut"] += 1
        for label, answer in pairs:
            out.input_ids.append(ids + answer)
            out.labels.append([IGNORE_INDEX] * len(ids) + answer)
            out.example.append(position)
            out.choice.append(label)
    if not out.input_ids:
        raise ConfigError(f"every one of the {len(rows)} rows has an answer of task.max_length={max_length} tokens "
                         f"or more, so all were dropped; raise task.max_length")
    return out


# -- chat data ---------------------------------------------------------------------------------------
def chat_messages(messages: Any, system: Any = None) -> list[dict[str, str]]:
    """A chat row's turns, checked: a list of ``{"role", "content"}`` with roles in :data:`ROLES`
    and text contents, at least one assistant turn; ``system`` (the row's own column, optional)
    becomes a first system turn.  Raises ValueError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of {{role, content}} turns, got {messages!r}")
    turns = [] if system is None or system == "" else [{"role": "system", "content": system}]
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"turn {i} of 'messages' must be {{role: {'|'.join(ROLES)}, content: text}}, got {turn!r}")
        turns.append({"role": str(turn["role"]), "content": str(turn["content"])})
    if not isinstance(turns[0]["content"], str):
        raise ValueError(f"'system' must be text, got {system!r}")
    if system not in (None, "") and messages[0].get("role") == "system":
        raise ValueError("the row has both a 'system' column and a system turn; keep one")
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError("'messages' has no assistant turn, so nothing would be trained on")
    return turns


def _render(tokenizer: Any, turns: list[dict[str, str]], opening: bool = False) -> str:
    if not turns:
        return ""
    return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=opening))


def chat_segments(tokenizer: Any, turns: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """``(text, labelled)`` pieces whose concatenation is the whole rendered conversation: each
    turn's addition to the rendering before it, an assistant turn split into its opening (not
    labelled) and its answer (labelled).  ConfigError when a rendering does not extend the one
    before it (a template that rewrites earlier turns: no turn boundaries to label by)."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, turn in enumerate(turns):
        steps = [(_render(tokenizer, turns[:k], opening=True), False)] if turn["role"] == "assistant" else []
        for text, labelled in [*steps, (_render(tokenizer, turns[:k + 1]), turn["role"] == "assistant")]:
            if not text.startswith(done):
                raise ConfigError("the tokenizer's chat template does not render a conversation turn by turn (a "
                                  "rendering is not the previous one extended), so assistant turns cannot be "
                                  "labelled apart; use a model whose template does, or prompt/response rows")
            pieces.append((text[len(done):], labelled))
            done = text
    return [(t, lab) for t, lab in pieces if t]


def encode_chat(rows: Sequence[dict[str, Any]], spec: TaskSpec, tokenizer: Any, *, max_length: int,
                prompt_format: str = "auto") -> CausalEncoding:
    """Token rows of chat data (see the module docstring): labels on the assistant turns only."""
    if not uses_chat(tokenizer, prompt_format):
        raise ConfigError(f"task {spec.name!r} has 'messages' rows, which need the tokenizer's chat template; set "
                          f"task.prompt_format to auto or chat and use a model whose tokenizer has one")
    out = CausalEncoding(counts={"examples": len(rows), "prompts_cut": 0, "answers_dropped": 0})
    field_name = spec.text_fields[0]
    for position, row in enumerate(rows):
        ids: list[int] = []
        labels: list[int] = []
        last_answer = 0
        for text, labelled in chat_segments(tokenizer, row[field_name]):
            piece = _ids(tokenizer, [text])[0]
            ids += piece
            labels += piece if labelled else [IGNORE_INDEX] * len(piece)
            last_answer = len(piece) if labelled else last_answer
        if not last_answer or last_answer >= max_length:
            out.counts["answers_dropped"] += 1
            continue
        if len(ids) > max_length:
            ids, labels = ids[len(ids) - max_length:], labels[len(labels) - max_length:]
            out.counts["prompts_cut"] += 1
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.example.append(position)
        out.choice.append(-1)
    if not out.input_ids:
        raise ConfigError(f"every one of the {len(rows)} chat rows has a last answer of task.max_length={max_length} "
                          f"tokens or more, so all were dropped; raise task.max_length")
    return out
