"""benchmarks.profiling on CPU: the captured call is replayed and timed; a module never called is an error."""

import pytest
import torch

from benchmarks.profiling import capture_call, profile_forward


def test_profile_replays_the_first_call_and_times_it():
    layer = torch.nn.Linear(16, 16)
    calls = []
    layer.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    summary = profile_forward(layer, lambda: (layer(torch.randn(3, 16)), layer(torch.randn(5, 16))), repeats=2)
    assert summary["forward_s"] > 0 and summary["h2d_s"] == 0.0
    assert summary["host_s"] > 0 and any("addmm" in name or "linear" in name for name in summary["host_top_s"])
    assert summary["host_s"] >= max(summary["host_top_s"].values())
    assert calls[2:] == [torch.Size([3, 16])] * (1 + 2 + 2)  # warm-up, timed, profiled: the first call's input


def test_capture_names_a_module_that_was_not_called():
    with pytest.raises(RuntimeError, match="Linear was not called"):
        capture_call(torch.nn.Linear(2, 2), lambda: None)


# Kernel names as the profiler reports them on Hopper (cuBLAS/cuBLASLt, cuDNN, flash, FA3, PyTorch's
# own kernels, Inductor's Triton kernels) and as aten ops on CPU.
KERNELS = {
    "gemm": [
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel"
        "__5x_cublas",
        "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_execute_segment_k_off_kernel"
        "__5x_cublas",
        "nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT",
        "ampere_bf16_s16816gemm_bf16_256x128_ldg8_f2f_stages_64x3_tn",
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>"
        "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true>",
        "triton_tem_fused_mm_0",
        "triton_tem_fused_addmm_gelu_1",
        "aten::addmm",
        "aten::mm",
    ],
    "attention": [
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
        "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, false>"
        "(pytorch_flash::Flash_fwd_params)",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
        "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)",
        "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<cute::tuple<>>>>",
        "triton_tem_fused_flex_attention_0",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
    ],
    "elementwise": [
        "triton_per_fused_add_mul_native_layer_norm_3",
        "triton_poi_fused_add_mul_view_as_complex_5",
        "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
        "c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul> >",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>",
        "aten::native_layer_norm",
        "aten::mul",
        "aten::gelu",
        "qie_qk_norm_rope",  # qie.speed.qk_prologue's Triton kernel
        "triton_poi_fused__scaled_dot_product_flash_attention_add_mul_3",
    ],
    "quantize": [
        "triton_red_fused__to_copy_abs_amax_clamp_div_mul_reciprocal_0",
        "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::"
        "float8_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda(float)#1}, std::array<char*, 2ul> >",
        "qie_gelu_quantize_rows",  # qie.memory.fp8_mlp's Triton kernel
        # Inductor's fp8 cast of the values, named after the FA3 op it feeds
        "triton_poi_fused__flash_attn_forward__to_copy_cat_clamp_clone_div_expand_maximum_4",
        "triton_red_fused__flash_attn_forward__to_copy_amax_cat_clamp_clone_div_expand_maximum_5",
    ],
    "copies": [
        "Memcpy DtoD (Device -> Device)",
        "Memcpy HtoD (Pinned -> Device)",
        "Memset (Device)",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::OpaqueType<2u>>",
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
        "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>",
        "triton_poi_fused__to_copy_clone_3",
        "triton_poi_fused_cat_2",
        "aten::copy_",
    ],
    "other": [
        "void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<int>",
        "aten::nonzero",
    ],
}


@pytest.mark.parametrize("category,name", [(c, n) for c, names in KERNELS.items() for n in names])
def test_classify_real_kernel_names(category, name):
    from benchmarks.profiling import classify

    assert classify(name) == category


def test_device_busy_is_the_union_of_kernel_intervals():
    from types import SimpleNamespace

    from benchmarks.profiling import device_busy_s

    def kernel(start, end, device=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [kernel(0, 10), kernel(5, 20), kernel(30, 40), kernel(0, 100, torch.autograd.DeviceType.CPU)]
    assert device_busy_s(events) == pytest.approx(30e-6)  # [0, 20] and [30, 40]; the CPU op is not GPU work
    assert device_busy_s([kernel(0, 1, torch.autograd.DeviceType.CPU)]) is None


def test_full_size_forward_counts_match_the_model_and_scale_with_tokens():
    """The full-size config at 1024² (8192 image + 230 text tokens): ~1.7e14 FLOPs, ~5.2e13 of it attention."""
    from diffusers import QwenImageTransformer2DModel

    from benchmarks.floors import PEAKS, floors, forward_counts

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel().to(torch.bfloat16)
    counts = forward_counts(transformer, 8192, 230)
    assert counts.precision == "bf16" and counts.quantize_bytes == 0
    assert counts.flops == pytest.approx(1.67e14, rel=0.02)
    assert counts.attention_flops == pytest.approx(4 * 8422**2 * 3072 * 60)
    assert counts.weight_bytes == pytest.approx(40.8e9, rel=0.02)  # ~20B parameters in bf16
    floor = floors(counts, PEAKS["H200"])
    assert floor["total"] == pytest.approx(0.2175, rel=0.02)  # the bf16 floor the H100/H200 runs quote
    half, none = (forward_counts(transformer, n, 230).linear_flops_bf16 for n in (4096, 0))
    assert counts.linear_flops_bf16 - half == pytest.approx(half - none)  # linear in the image tokens
    assert none > 0  # the text stream's layers


def test_fp8_layers_count_at_the_fp8_rate_and_pay_for_quantizing():
    from diffusers import QwenImageTransformer2DModel

    from benchmarks.floors import PEAKS, floors, forward_counts

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(num_layers=2).to(torch.bfloat16)
    bf16 = forward_counts(transformer, 8192, 230)
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks."):
            module.weight = torch.nn.Parameter(module.weight.to(torch.float8_e4m3fn), requires_grad=False)
    fp8 = forward_counts(transformer, 8192, 230)
    assert fp8.precision == "fp8" and fp8.quantize_bytes > 0
    assert fp8.linear_flops_fp8 + fp8.linear_flops_bf16 == pytest.approx(bf16.linear_flops_bf16)
    assert floors(fp8, PEAKS["H200"])["gemm"] < 0.6 * floors(bf16, PEAKS["H200"])["gemm"]


def test_profile_of_the_tiny_transformer_splits_by_category_with_floors(tiny_editor):
    """The whole path on CPU: aten ops classified, idle measured, counts taken from the captured call."""
    transformer = tiny_editor.pipe.transformer
    cfg = transformer.config
    hidden = torch.randn(1, 2 * 64, cfg.in_channels)
    text = torch.randn(1, 20, cfg.joint_attention_dim)
    kwargs = dict(
        hidden_states=hidden,
        encoder_hidden_states=text,
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 8, 8), (1, 8, 8)]],
        return_dict=False,
    )
    summary = profile_forward(transformer, lambda: transformer(**kwargs), repeats=1, device_name="NVIDIA H100")
    seconds = summary["categories_s"]
    assert set(seconds) == {"gemm", "attention", "elementwise", "quantize", "copies", "other", "idle"}
    assert seconds["gemm"] > 0 and seconds["attention"] > 0 and seconds["elementwise"] > 0
    assert seconds["quantize"] == 0
    assert summary["counts"]["image_tokens"] == 128 and summary["counts"]["text_tokens"] == 20
    assert summary["peaks"] == "H100" and summary["floors_s"]["gemm"] > 0
    assert set(summary["over_floor_s"]) == set(seconds)


def test_gc_pauses_are_counted_while_inside_and_not_after():
    import gc

    from benchmarks.profiling import GcPauses

    with GcPauses() as pauses:
        gc.collect(1)
        gc.collect(2)
    assert pauses.collections[1] == 1 and pauses.collections[2] == 1 and pauses.seconds > 0
    gc.collect()
    assert pauses.collections[2] == 1 and pauses._callback not in gc.callbacks
    assert pauses.summary()["gc_collections"] == pauses.collections


def test_profiles_tear_cupti_down_so_later_launches_are_not_slowed(monkeypatch):
    """Kineto leaves CUPTI attached after a profile unless told otherwise (pytorch/pytorch#144455)."""
    import importlib
    import os

    import benchmarks.profiling

    monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    importlib.reload(benchmarks.profiling)
    assert os.environ["TEARDOWN_CUPTI"] == "1"


def test_device_time_counts_the_kernels_launched_apart_from_copies():
    from types import SimpleNamespace

    from benchmarks.profiling import split_device_time

    def event(key, us, count, device=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(key=key, device_type=device, self_device_time_total=us, count=count)

    events = [
        event("nvjet_sm90_gemm", 300.0, 600),
        event("triton_poi_fused_add_0", 50.0, 1200),
        event("Memcpy HtoD (Pageable -> Device)", 20.0, 3),
        event("Memset (Device)", 1.0, 5),
        event("aten::mm", 999.0, 7, torch.autograd.DeviceType.CPU),
    ]
    split = split_device_time(events)
    assert split["top_kernels_s"]["nvjet_sm90_gemm"] == pytest.approx(300e-6, abs=1e-4)
    assert split["kernels"] == 1800 and split["kernel_s"] == pytest.approx(350e-6)
    assert split["h2d_s"] == pytest.approx(20e-6) and split["other_copies_s"] == pytest.approx(1e-6)


def test_kernels_whose_names_share_their_first_80_characters_add_up_in_the_top_table():
    from types import SimpleNamespace

    from benchmarks.profiling import split_device_time, sum_by_prefix

    stem = "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<"
    events = [
        SimpleNamespace(key=stem + tail, device_type=torch.autograd.DeviceType.CUDA, self_device_time_total=us, count=1)
        for tail, us in (("fp8>", 40.0), ("bf16>", 60.0))
    ]
    assert split_device_time(events)["top_kernels_s"] == {stem[:80]: pytest.approx(100e-6, abs=1e-6)}
    assert sum_by_prefix([("ab", 1.0), ("ac", 2.0), ("b", 4.0)], chars=1) == {"a": 3.0, "b": 4.0}


def test_idle_report_finds_each_gap_in_its_stage_with_the_host_ops_over_it():
    from benchmarks.profiling import idle_report

    ms = 1000.0  # the profiler's spans are in microseconds
    device = [
        (0, 2 * ms, "vae_encode"),
        (1 * ms, 3 * ms, "vae_tail"),  # overlaps the first: one busy span [0, 3] ms
        (8 * ms, 9 * ms, "text_encoder"),
        (9.01 * ms, 20 * ms, "transformer"),  # 0.01 ms after: below the smallest gap counted
        (40 * ms, 50 * ms, "outside the stages"),
    ]
    stages = [(0, 6 * ms, "condition_encode"), (6 * ms, 10 * ms, "text_encode"), (10 * ms, 24 * ms, "denoise")]
    host = [(3.5 * ms, 5.5 * ms, "aten::copy_"), (4 * ms, 8 * ms, "aten::to"), (21 * ms, 22 * ms, "aten::cat")]
    report = idle_report(device, stages, host, top=2)
    assert report["wall_ms"] == 24 and report["gap_count"] == 2
    assert report["idle_ms"] == pytest.approx(5 + 4)  # [3, 8] in condition_encode, [20, 24] up to the last stage's end
    assert report["by_stage"]["condition_encode"] == {"idle_ms": 5, "wall_ms": 6}
    assert report["by_stage"]["denoise"]["idle_ms"] == 4 and report["by_stage"]["text_encode"]["idle_ms"] == 0
    longest = report["gaps"][0]
    assert (longest["stage"], longest["at_ms"], longest["ms"]) == ("condition_encode", 3, 5)
    assert (longest["before"], longest["after"]) == ("vae_tail", "text_encoder")
    assert longest["host_ops"] == {"aten::to": 4, "aten::copy_": 2}
    assert report["gaps"][1]["host_ops"] == {"aten::cat": 1}
    assert idle_report(device, [], host)["idle_ms"] is None


def test_split_spans_keeps_ranges_out_of_the_gpu_work():
    from types import SimpleNamespace

    from benchmarks.profiling import split_spans

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device, annotation=False):
        return SimpleNamespace(
            name=name,
            device_type=device,
            is_user_annotation=annotation,
            time_range=SimpleNamespace(start=start, end=end),
        )

    events = [
        event("qie.denoise", 0, 100, cpu, True),
        event("qie.denoise", 1, 99, cuda, True),  # the stage's GPU-side span
        event("## Call CompiledFxGraph f1 ##", 5, 90, cuda, True),
        event("sm90_fp8_gemm", 10, 20, cuda),
        event("aten::copy_", 2, 4, cpu),
    ]
    device, stages, host = split_spans(events)
    assert device == [(10, 20, "sm90_fp8_gemm")]
    assert stages == [(0, 100, "denoise")]
    assert host == [(2, 4, "aten::copy_")]
