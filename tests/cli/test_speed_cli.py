"""The command line's speed options reach the request and the load call."""

from qie.cli.main import _speed_params, build_parser
from qie.core.load_options import LoadOptions
from qie.core.request import EditRequest


def test_speed_flags_become_request_fields_and_load_arguments(photo):
    args = build_parser().parse_args(
        ["edit", "in.jpg", "--prompt", "p", "--output", "o.png", "--mode", "fast", "--step-cache", "fbcache"]
        + ["--step-cache-threshold", "0.1", "--early-exit-threshold", "0.02", "--attention-quant", "fp8"]
        + ["--fast-lora", "lora.safetensors", "--fast-steps", "4", "--attention", "_native_cudnn"]
    )
    request = EditRequest(images=[photo], prompt="p", **_speed_params(args))
    assert (request.mode, request.step_cache, request.step_cache_threshold) == ("fast", "fbcache", 0.1)
    assert (request.early_exit_threshold, request.early_exit_patience, request.attention_quant) == (0.02, 2, "fp8")
    options = LoadOptions.from_args(args)
    assert (options.attention, options.fast_lora, options.fast_steps) == ("_native_cudnn", "lora.safetensors", 4)
