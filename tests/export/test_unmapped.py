"""Weights read into the process's memory (sdrt/export/unmapped.py): same values, file mappings released."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sdrt.errors import UserError  # noqa: E402
from sdrt.export.unmapped import loaded_files, read_weights_into_memory  # noqa: E402
from sdrt.runtime.safetensors_file import SafetensorsFile  # noqa: E402


def _mapped(path: Path) -> bool:
    """Whether this process maps ``path`` (its weights are views of the file)."""
    return any(line.rstrip().endswith(str(path.resolve())) for line in open("/proc/self/maps"))


def test_unet_weights_are_read_into_memory_and_the_mapping_is_released(sd1_model, tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel

    # a copy only this test opens: other tests' models of sd1-tiny, still alive in this process, map the original
    folder = shutil.copytree(sd1_model / "unet", tmp_path / "unet")
    file = next(folder.glob("*.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
    assert _mapped(file), "diffusers maps safetensors (what this module works around)"
    reference = {k: v.clone() for k, v in unet.state_dict().items()}
    params = {k: id(p) for k, p in unet.named_parameters()}
    n = read_weights_into_memory(unet, folder)
    assert not _mapped(file), "every weight replaced: the file's mapping is gone"
    index = SafetensorsFile(file).header
    assert n == sum(e["data_offsets"][1] - e["data_offsets"][0] for e in index.values()) > 0
    state = unet.state_dict()
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    assert {k: id(p) for k, p in unet.named_parameters()} == params, "the same Parameter objects, new storage"


def test_half_precision_files_are_converted_and_foreign_names_left_alone(tmp_path):
    from safetensors.torch import save_file

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        half = {"0.weight": torch.randn(3, 4).half(), "0.bias": torch.randn(3).half(),
                "1.weight": torch.randn(5, 5).half(),  # a shape the model does not have: left alone
                "unknown": torch.randn(2).half()}
    save_file(half, tmp_path / "model.safetensors")
    before = net[1].weight.clone()
    n = read_weights_into_memory(net, tmp_path)
    assert n == (12 + 3) * 2
    assert net[0].weight.dtype == torch.float32
    assert torch.equal(net[0].weight, half["0.weight"].float())
    assert torch.equal(net[0].bias, half["0.bias"].float())
    assert torch.equal(net[1].weight, before)


def test_a_cut_short_file_is_an_error_naming_the_weight(tmp_path):
    from safetensors.torch import save_file

    net = torch.nn.Linear(64, 64)
    save_file({"weight": torch.randn(64, 64), "bias": torch.randn(64)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-100])
    with pytest.raises(UserError, match="truncated") as e:
        read_weights_into_memory(net, tmp_path)
    assert "'weight'" in str(e.value) or "'bias'" in str(e.value), "the error names the tensor"


def test_variant_files_beside_the_weights_are_not_read(tmp_path):
    """from_pretrained without a variant reads model.safetensors (or its shards), never model.fp16.*: their
    values, rounded to fp16, must not replace the ones it loaded, whatever order the names sort in."""
    from safetensors.torch import save_file

    net = torch.nn.Linear(8, 8)
    full = {"weight": torch.randn(8, 8) / 3, "bias": torch.randn(8) / 3}
    save_file(full, tmp_path / "model-00001-of-00002.safetensors")
    for name in ("model.fp16.safetensors", "model.fp16-00001-of-00002.safetensors"):
        save_file({k: v.half() for k, v in full.items()}, tmp_path / name)
    assert [p.name for p in loaded_files(tmp_path)] == ["model-00001-of-00002.safetensors"]
    read_weights_into_memory(net, tmp_path)
    assert torch.equal(net.weight, full["weight"]) and torch.equal(net.bias, full["bias"])
