"""The retrieval-reuse knobs: flags through SGLang's real parser, the config (Engine API,
JSON) and the one-line errors that name the flag and the fix."""

import json
import math

import pytest

from sglang_pariskv.config import (
    DEFAULT_REUSE_KEEP,
    DEFAULT_REUSE_MAX_AGE,
    DEFAULT_REUSE_THRESHOLD,
    ParisKVConfig,
)
from sglang_pariskv.server_flags import ParisKVConfigError, config_from_args
from tests.test_plugin_flags import parse, parser  # noqa: F401


def test_defaults():
    cfg = ParisKVConfig()
    assert cfg.reuse_threshold == DEFAULT_REUSE_THRESHOLD
    assert cfg.reuse_max_age == DEFAULT_REUSE_MAX_AGE
    assert cfg.reuse_keep == DEFAULT_REUSE_KEEP
    assert cfg.reuse_kept == DEFAULT_REUSE_KEEP * cfg.topk
    assert cfg.reuses == (DEFAULT_REUSE_THRESHOLD > 0)
    assert not ParisKVConfig(reuse_threshold=0).reuses


def test_flags_set_the_knobs(parser):  # noqa: F811
    args = parse(parser, "--enable-pariskv", "--pariskv-reuse-threshold", "0.8",
                 "--pariskv-reuse-max-age", "8", "--pariskv-reuse-keep", "2")  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.reuse_threshold, cfg.reuse_max_age, cfg.reuses) == (0.8, 8, True)
    assert (cfg.reuse_keep, cfg.reuse_kept) == (2, 2 * cfg.topk)
    off = config_from_args(parse(parser, "--enable-pariskv", "--pariskv-reuse-threshold", "0"))
    assert not off.reuses
    # what the scheduler receives survives the JSON round trip
    assert ParisKVConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ParisKVConfig.from_dict(off.to_dict()) == off


def test_config_file_and_flag_override(parser, tmp_path):  # noqa: F811
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"reuse_threshold": 0.7, "reuse_max_age": 32}))
    cfg = config_from_args(parse(parser, "--enable-pariskv", "--pariskv-config", str(path),
                                 "--pariskv-reuse-threshold", "0.95"))  # fmt: skip
    assert (cfg.reuse_threshold, cfg.reuse_max_age) == (0.95, 32)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--pariskv-reuse-threshold", "1.5"], ["reuse_threshold=1.5", "[0, 1]",
                                                "--pariskv-reuse-threshold"]),
        (["--pariskv-reuse-threshold", "-0.1"], ["--pariskv-reuse-threshold", "every step"]),
        (["--pariskv-reuse-threshold", "nan"], ["--pariskv-reuse-threshold"]),
        (["--pariskv-reuse-threshold", "0.9", "--pariskv-reuse-max-age", "0"],
         ["reuse_max_age=0", "--pariskv-reuse-max-age"]),
        (["--pariskv-reuse-threshold", "0", "--pariskv-reuse-max-age", "8"],
         ["--pariskv-reuse-max-age 8", "--pariskv-reuse-threshold 0", "drop"]),
        (["--pariskv-reuse-threshold", "0.9", "--pariskv-reuse-keep", "0"],
         ["reuse_keep=0", "[1, 16]", "--pariskv-reuse-keep"]),
        (["--pariskv-reuse-threshold", "0.9", "--pariskv-reuse-keep", "17"],
         ["reuse_keep=17", "--pariskv-reuse-keep"]),
        (["--pariskv-reuse-keep", "2"],
         ["--pariskv-reuse-keep 2", "--pariskv-reuse-threshold 0", "drop"]),
    ],
)  # fmt: skip
def test_bad_values_fail_early_naming_the_flag(parser, flags, words):  # noqa: F811
    with pytest.raises(ParisKVConfigError) as e:
        config_from_args(parse(parser, "--enable-pariskv", *flags))
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_reuse_flags_need_enable_pariskv(parser):  # noqa: F811
    with pytest.raises(ParisKVConfigError, match="--pariskv-reuse-threshold given without"):
        config_from_args(parse(parser, "--pariskv-reuse-threshold", "0.9"))


@pytest.mark.parametrize("value", [True, "0.9", math.inf, 2])
def test_engine_api_config_is_checked(value):
    with pytest.raises(ParisKVConfigError, match="--pariskv-reuse-threshold"):
        ParisKVConfig(reuse_threshold=value)
    with pytest.raises(ParisKVConfigError, match="--pariskv-reuse-max-age"):
        ParisKVConfig(reuse_threshold=0.9, reuse_max_age=1.5)
