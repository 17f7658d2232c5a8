import argparse

import pytest

from keel.config import EngineConfig, add_dataclass_arguments, dataclass_kwargs


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="pagesize"):
        EngineConfig.from_options("keel-demo", pagesize=16)


@pytest.mark.parametrize("kwargs,name", [
    (dict(page_size=0), "page_size"), (dict(mem_fraction=1.5), "mem_fraction"),
    (dict(dtype="int8"), "dtype"), (dict(device="tpu"), "device"), (dict(kv_cache_tokens=0), "kv_cache_tokens"),
    (dict(load_format="pt"), "load_format"),
])
def test_invalid_values_raise_naming_the_option(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EngineConfig(**kwargs)


def test_every_field_is_a_cli_flag_and_round_trips():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, EngineConfig)
    args = parser.parse_args(["--page-size", "16", "--kv-cache-tokens", "4096", "--model", "x", "--dtype",
                              "bfloat16"])
    config = EngineConfig(**dataclass_kwargs(args, EngineConfig))
    assert (config.page_size, config.kv_cache_tokens, config.model, config.dtype) == (16, 4096, "x", "bfloat16")
    assert EngineConfig(**dataclass_kwargs(parser.parse_args([]), EngineConfig)) == EngineConfig()
