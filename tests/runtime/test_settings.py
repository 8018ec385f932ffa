"""The settings table (sdrt.runtime.settings) walked through every entry point that takes a setting: `sdrt
generate`'s and `sdrt bench`'s options, `sdrt serve`'s limits, Pipeline.request. Each offers what it should,
with the table's default, and refuses the table's bad values in one line naming the setting. (The native HTTP
request: tests/serve/test_settings_http.py.)"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from sdrt.errors import UserError
from sdrt.runtime.settings import SETTING, TABLE, XL, check_size, shown
from tests.conftest import assert_one_line_error, run_cli

REQUEST_SETTINGS = [s for s in TABLE if s.pipeline]
BAD = [(s.name, bad) for s in TABLE for bad in s.bad]
# a value each family-bound setting may take on an SDXL model (the SD family refuses it)
XL_EXAMPLES = {"prompt_2": "y", "negative_prompt_2": "y", "original_size": (64, 64), "crop": (1, 1),
               "target_size": (64, 64), "aesthetic_score": 5.0, "negative_aesthetic_score": 3.0,
               "denoising_start": 0.5, "denoising_end": 0.5}


def _parser():
    from sdrt.cli import build_parser

    return build_parser()


def test_the_table_is_well_formed():
    names = [s.name for s in TABLE]
    assert len(names) == len(set(names)) and SETTING["prompt"].required
    for s in TABLE:
        assert s.families is None or set(s.families) <= {"sd", "sdxl", "sdxl-refiner"}, s.name
        assert set(s.modes) <= {"txt2img", "img2img"} and s.modes, s.name
        assert s.check is None or s.allowed, f"{s.name}: a check needs the allowed text its error says"
        assert s.flag is None or s.flag.startswith("--"), s.name
    assert {s.name for s in TABLE if s.families} == set(XL_EXAMPLES)
    assert all(s.families == XL for s in TABLE if s.families)


def test_pipeline_request_takes_every_setting_with_the_tables_default():
    from sdrt.runtime.pipeline import SETTINGS, Pipeline

    params = inspect.signature(Pipeline.request).parameters
    assert set(SETTINGS) == {s.name for s in REQUEST_SETTINGS} - {"prompt", "negative_prompt"}
    assert SETTINGS[:2] == ("steps", "guidance")   # Pipeline.generate lists them in this order
    for s in REQUEST_SETTINGS:
        want = inspect.Parameter.empty if s.required else s.default
        assert params[s.name].default == want, s.name


def test_generate_offers_every_flagged_setting_with_the_tables_default():
    from sdrt.runtime.cli import GENERATE_OPTIONS

    args = _parser().parse_args(["generate", "E", "a prompt"])
    flags = {s.name for s in TABLE if s.flag}
    assert set(GENERATE_OPTIONS) == flags and args.prompt == "a prompt"
    for name in flags:
        assert getattr(args, name) == SETTING[name].default, name
    assert _parser().parse_args(["generate", "E", "p", "--no-weighting"]).weighting is False
    # the request settings that are not options: the prompt (the argument) and the Python-only ones
    assert {s.name for s in REQUEST_SETTINGS} - flags == {"prompt", "init_latents", *XL_EXAMPLES} - {
        "prompt_2", "negative_prompt_2"}


def test_bench_offers_the_shared_settings_with_its_own_defaults_declared():
    from sdrt.bench.runner import Settings

    args = _parser().parse_args(["bench", "E"])
    own = Settings()
    for name in ("steps", "guidance", "scheduler", "seed", "height", "width"):
        assert getattr(args, name) == getattr(own, name), name
        option = next(a for a in _parser()._subparsers._group_actions[0].choices["bench"]._actions
                      if a.dest == name)
        assert option.option_strings == [SETTING[name].flag] and option.type is SETTING[name].type, name
    # where bench keeps the table's default, it is the table's
    assert (args.scheduler, args.height, args.width, args.guidance) == (None, None, None, SETTING["guidance"].default)


def test_serve_limits_have_one_default_everywhere():
    from sdrt.serve.engine import Engine, Limits
    from sdrt.serve.limits import LIMITS
    from sdrt.serve.server import ServeConfig

    args = _parser().parse_args(["serve", "E"])
    config = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    limits = {f.name: f.default for f in dataclasses.fields(Limits)}
    engine = {n: p.default for n, p in inspect.signature(Engine.__init__).parameters.items()}
    for s in LIMITS:
        assert getattr(args, s.name) == config[s.name] == s.default, s.name
        assert limits.get(s.name, engine.get(s.name)) == s.default, s.name


@pytest.mark.parametrize("flag, value", [("--max-batch", "0"), ("--max-queue", "0"), ("--timeout", "0"),
                                         ("--max-steps", "0"), ("--max-images", "0"), ("--max-pixels", "0")])
def test_serve_refuses_a_bad_limit_in_one_line(flag, value):
    from sdrt.serve.limits import LIMITS

    s = next(s for s in LIMITS if s.flag == flag)
    with pytest.raises(UserError) as e:
        s.value(s.type(value), flag)
    assert str(e.value) == f"{flag} {shown(s.type(value))}: must be {s.allowed}"


@pytest.fixture(scope="module")
def sd1(sd1_engine):
    from sdrt.runtime import Pipeline

    pipe = Pipeline(sd1_engine)
    yield pipe
    pipe.close()


@pytest.mark.parametrize("name, bad", [b for b in BAD if SETTING[b[0]].pipeline], ids=shown)
def test_pipeline_refuses_each_bad_value_in_one_line_naming_it(sd1, name, bad):
    args, kwargs = (([bad], {}) if name == "prompt" else (["x"], {name: bad}))
    with pytest.raises(UserError) as e:
        sd1.request(*args, **kwargs)
    message = str(e.value)
    assert name in message and "\n" not in message, message


@pytest.mark.parametrize("name", sorted(XL_EXAMPLES))
def test_a_family_that_does_not_take_a_setting_refuses_it_in_one_line(sd1, name):
    with pytest.raises(UserError) as e:
        sd1.request("x", **{name: XL_EXAMPLES[name]})
    assert str(e.value) == SETTING[name].family_refusal("sd") and name in str(e.value)


def test_img2img_only_settings_are_refused_in_txt2img_with_one_rule(sd1):
    s = SETTING["strength"]
    assert s.mode_refusal(0.5, img2img=True) is None and s.mode_refusal(None, img2img=False) is None
    for give, what in (("init_image (or init_latents)", None), ("--init-image", "--strength")):
        assert s.mode_refusal(0.5, False, what, give) == \
            f"{what or 'strength'} 0.5: only img2img uses it; give {give} too, or leave it out"
    with pytest.raises(UserError, match=r"^strength 0\.5: only img2img uses it"):
        sd1.request("x", strength=0.5)


def test_the_size_rule_is_one_function():
    assert check_size("height", 64, 8) == 64
    for bad in (0, -8, 33, 8.0, True):
        with pytest.raises(UserError, match=r"must be a positive multiple of 8 for this model"):
            check_size("height", bad, 8)


def _on_the_command_line(name, bad) -> bool:
    """A bad value the command line can carry: of the option's type (an int for a float option)."""
    s = SETTING[name]
    return bool(s.flag) and s.type is not bool and (isinstance(bad, s.type) or s.type is float and isinstance(bad, int))


@pytest.mark.parametrize("name, bad", [b for b in BAD if _on_the_command_line(*b)], ids=shown)
def test_generate_refuses_each_bad_value_in_one_line_naming_it(sd1_engine, tmp_path, name, bad):
    r = run_cli("generate", sd1_engine, "x", "--steps", 2, SETTING[name].flag, bad, "-q", "-o", tmp_path / "o.png")
    assert_one_line_error(r, name.split("_")[0])
    assert not (tmp_path / "o.png").exists()
