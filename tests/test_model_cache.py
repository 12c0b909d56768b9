"""The cache as `thrifty models`, `rm` and `show` see it, and a model's sampling defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thrifty import hub
from thrifty.cli import main
from thrifty.errors import ThriftyError
from thrifty.generation_defaults import GenerationDefaults


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A registry model `tiny` pulled and converted, a converted local GGUF, and a conversion
    that never finished."""
    home = tmp_path / "home"
    monkeypatch.setenv("THRIFTY_HOME", str(home))
    entry = hub.RegistryModel("tiny", ("tiny==1",), ("tiny.gguf",), "tiny.gguf", 1000, "0", "")
    monkeypatch.setitem(hub.REGISTRY, "tiny", entry)
    gguf = home / "models" / "tiny" / "tiny.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"\0" * 1000)
    (gguf.parent / "tiny.gguf.sha256").write_text("0\n")

    def converted(name: str, source: Path | None, size: int) -> Path:
        d = home / "converted" / name
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\0" * size)
        if source is not None:
            (d / hub.CONVERTED_MARKER).write_text(json.dumps({"source": str(source)}))
        return d

    converted("tiny-0123456789ab", gguf, 5000)
    converted("My-Model-ba9876543210", tmp_path / "elsewhere" / "My-Model.gguf", 300)
    converted("Broken-aaaaaaaaaaaa", None, 7)
    return home


def test_models_are_listed_by_name_with_their_disk_size(cache):
    rows = {m.name: m for m in hub.models_by_name()}
    assert sorted(rows) == ["Broken-aaaaaaaaaaaa", "My-Model", "tiny"]
    tiny = rows["tiny"]
    assert tiny.kind == "registry" and len(tiny.files) == 2
    marker = len((cache / "converted" / "tiny-0123456789ab" / hub.CONVERTED_MARKER).read_bytes())
    assert tiny.size_bytes == 1000 + 5000 + marker  # the .gguf and its conversion
    assert rows["My-Model"].kind == "converted"
    assert rows["Broken-aaaaaaaaaaaa"].kind == "unusable"


def test_rm_removes_a_model_with_its_conversions(cache, capsys):
    assert main(["rm", "tiny"]) == 0
    assert capsys.readouterr().out.startswith("removed tiny (")
    assert not (cache / "models" / "tiny").exists()
    assert not (cache / "converted" / "tiny-0123456789ab").exists()
    assert sorted(m.name for m in hub.models_by_name()) == ["Broken-aaaaaaaaaaaa", "My-Model"]
    assert main(["rm", "My-Model"]) == 0
    assert main(["rm", "Broken-aaaaaaaaaaaa"]) == 0
    assert hub.models_by_name() == []


def test_rm_of_an_unknown_model_is_one_error_line(cache, capsys):
    assert main(["rm", "nope"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: no cached model named 'nope'")
    assert "tiny" in err[0]  # it says what is cached
    with pytest.raises(ThriftyError):
        hub.remove("nope")


def test_run_takes_a_lone_model_name_as_a_model():
    assert hub.names_a_model("smollm2-135m-instruct")
    assert hub.names_a_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.names_a_model("./x.gguf")
    assert not hub.names_a_model("Tell me a story.")
    assert not hub.names_a_model("hi")


# --- generation defaults ------------------------------------------------------------------


def test_defaults_without_a_generation_config_are_thriftys(tmp_path):
    assert GenerationDefaults.from_dir(tmp_path) == GenerationDefaults()
    (tmp_path / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    d = GenerationDefaults.from_dir(tmp_path)
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.7, 0.9, 0, 1.0)


def test_defaults_from_a_generation_config(tmp_path):
    # Qwen2.5's own generation_config.json; the fields it leaves out are off.
    config = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
              "repetition_penalty": 1.05}  # fmt: skip
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    d = GenerationDefaults.from_dir(tmp_path)
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert d.source.endswith("generation_config.json")
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6}')
    d = GenerationDefaults.from_dir(tmp_path)
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.6, 1.0, 0, 1.0)
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.6}')
    assert GenerationDefaults.from_dir(tmp_path).temperature == 0  # transformers: greedy


@pytest.mark.parametrize(
    "bad", ['{"temperature": -1}', '{"top_p": 0}', '{"top_k": 1.5}', '{"temperature": "hot"}']
)
def test_a_bad_generation_config_is_a_clear_error(tmp_path, bad):
    (tmp_path / "generation_config.json").write_text(bad)
    with pytest.raises(ThriftyError, match="generation_config.json"):
        GenerationDefaults.from_dir(tmp_path)


def test_fill_keeps_what_was_asked():
    d = GenerationDefaults()
    filled = d.fill({"temperature": 0.0, "top_p": None})
    assert filled == {"temperature": 0.0, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0}


def test_help_says_the_defaults(capsys):
    for command in ("run", "chat", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "temperature 0.7, top_p 0.9, top_k 0, repetition_penalty 1" in text, command
