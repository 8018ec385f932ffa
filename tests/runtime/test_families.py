"""Model families are adapters chosen from the manifest: every layer asks the adapter, none tests a name."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sdrt.errors import UserError
from sdrt.runtime.families import FAMILIES, SDXL, Family, SDXLRefiner, family_class

SDRT = Path(__file__).resolve().parents[2] / "sdrt"


def test_each_manifest_family_has_an_adapter_and_an_unknown_one_is_refused_in_one_line():
    assert family_class(None) is Family and family_class("sd") is Family   # manifests older than SDXL support
    assert family_class("sdxl") is SDXL and family_class("sdxl-refiner") is SDXLRefiner
    with pytest.raises(UserError) as e:
        family_class("sd3")
    assert "'sd3'" in str(e.value) and all(name in str(e.value) for name in FAMILIES) and "\n" not in str(e.value)


def test_no_layer_tests_a_family_by_name():
    """A new family must not quietly take another's branches: no `family != "sd"` (or ==) outside the adapters.
    (A single file's `family` is its original layout, sd1/sd2/sdxl, each with configs of its own: not a model
    family, and not looked at here.)"""
    names = "|".join(re.escape(n) for n in FAMILIES)
    pattern = re.compile(rf"""[!=]=\s*["']({names})["']|["']({names})["']\s*[!=]=|\.xl\b""")
    offenders = [f"{p.relative_to(SDRT)}:{i}: {line.strip()}" for p in SDRT.rglob("*.py")
                 if p.name not in ("families.py", "single_file.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and "single.family" not in line]
    assert offenders == []


def test_the_manifest_lacking_a_familys_numbers_is_refused_naming_them(sd1_engine):
    import json

    from sdrt.runtime.manifest import ModelNumbers

    model = json.loads((sd1_engine / "sdrt.json").read_text())["model"]
    assert ModelNumbers.from_dict(model).text_encoder_components == ("text_encoder",)
    with pytest.raises(UserError, match="sdxl model lacks text_encoders, pooled_dim, time_ids"):
        ModelNumbers.from_dict(dict(model, family="sdxl"))


def test_export_reads_the_unet_inputs_and_text_outputs_from_the_adapter():
    pytest.importorskip("torch")
    from sdrt.export.graphs import graph_io

    for name, cls in FAMILIES.items():
        inputs, _ = graph_io("unet", {"family": name})
        assert inputs == ("sample", "timestep", "encoder_hidden_states") + cls.unet_conditioning
        _, text_out = graph_io("text_encoder", {"family": name})
        assert ("penultimate_hidden_state" in text_out) == cls.penultimate_text
    assert graph_io("unet", {"family": "sdxl", "guidance_embedding_dim": 8})[0][-1] == "timestep_cond"


def test_sdxl_time_ids_follow_the_manifest_layout_and_guidance_order():
    from types import SimpleNamespace

    base = SimpleNamespace(time_ids=("original_height", "original_width", "crop_top", "crop_left",
                                     "target_height", "target_width"))
    req = SimpleNamespace(height=64, width=96, original_size=None, crop=(3, 4), target_size=None, aesthetic_score=6.0,
                          negative_aesthetic_score=2.5, batch=2, guided=True)
    ids = SDXL(base).time_ids(req)
    assert ids.shape == (4, 6) and ids.dtype == np.float32
    np.testing.assert_array_equal(ids[0], [64, 96, 3, 4, 64, 96])    # the base's unguided rows equal its guided ones
    refiner = SimpleNamespace(time_ids=("original_height", "original_width", "crop_top", "crop_left", "aesthetic_score"))
    ids = SDXLRefiner(refiner).time_ids(req)
    np.testing.assert_array_equal(ids[:2], [[64, 96, 0, 0, 2.5]] * 2)  # negative score, no crop (diffusers)
    np.testing.assert_array_equal(ids[2:], [[64, 96, 3, 4, 6.0]] * 2)
