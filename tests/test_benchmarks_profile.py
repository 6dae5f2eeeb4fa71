"""benchmarks/kernel_profile.py and the two benchmarks that use it, on the CPU: the kernel-name
rules, the profile of a real compiled training step (stock Inductor's and compile_norm's norm
kernels found in the forward and in the backward), training.py's model-step-only run and
torchao_prefill.py's dry run (a torchao FP8 tiny Llama, both granularities)."""

import inspect
import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_profile as KP  # noqa: E402

NAMES = {
    # Inductor-generated, original_aten names: stock norm forward, backward dx, dweight sums
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "norm",
    "triton_red_fused__to_copy_add_div_expand_mul_pow_sum_view_3": "norm",
    "triton_red_fused__to_copy_mul_sum_5": "norm",
    "triton_per_fused__to_copy_mul_sum_6": "norm",
    # compile_norm's ops inlined (names from AOTAutograd), its own kernels, Inductor's suffix
    "triton_red_fused_fused_add_rms_norm_2": "norm",
    "triton_red_fused_rms_norm_backward_view_0": "norm",
    "norm_quant_kernel": "norm",
    "norm_quant_kernel_0": "norm",
    "rms_norm_backward_kernel": "norm",
    "dweight_reduce_kernel": "norm",
    "triton_red_fused_quant_fp8_dynamic_rms_norm_1": "norm",  # a norm fused with a quantization
    "graph_1_cpp_fused_add_embedding_dense_backward_rms_norm_backward_view_5": "norm",
    "graph_0_cpp_fused__to_copy_add_arange_cumsum_embedding_mean_mul_pow_rsqrt_0": "norm",
    "compile_norm::rms_norm_mxfp8": "norm",
    # quantizations no norm absorbed
    "triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_t_transpose_view_5": "quant",
    "triton_poi_fused__to_copy_clamp_div_t_view_7": "quant",
    "triton_poi_fused_quant_fp8_dynamic_1": "quant",
    "compile_norm::quant_mxfp8": "quant",
    # other generated kernels: cumsum is not sum, a sum without mul, a mul + sum among other ops
    "triton_poi_fused_add_cumsum_ne_1": "other",
    "triton_red_fused_clone_squeeze_sum_transpose_view_4": "other",
    "triton_red_fused_add_cat_clone_mul_neg_slice_backward_sum_transpose_4": "other",
    "triton_poi_fused_mul_silu_3": "other",
    "triton_red_fused__log_softmax_nll_loss_forward_2": "other",
    # templates
    "triton_tem_fused_mm_8": "gemm",
    "triton_tem_fused__scaled_mm_2": "gemm",
    "triton_tem_fused_flex_attention_0": "attention",
    # library kernels (CUPTI names)
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas": "gemm",
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT": "gemm",
    "void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm90<cutlass::gemm::kernel::GemmUniversal<int> > >(int)": "gemm",
    "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>(int)": "gemm",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t> >(int)": "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul> >(int)": "other",
    "Memcpy DtoD (Device -> Device)": "other",
    # CPU events (the dry runs)
    "aten::mm": "gemm",
    "aten::_scaled_mm": "gemm",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::copy_": "other",
}


def test_kernel_names_are_classified():
    got = {name: KP.classify(name) for name in NAMES}
    assert got == NAMES


def test_own_kernel_names_come_from_the_kernels():
    pytest.importorskip("triton")
    from compile_norm.kernels import triton_backward_kernel, triton_kernel

    assert KP.OWN_KERNELS == {triton_kernel.norm_quant_kernel.fn.__name__,
                              triton_backward_kernel.rms_norm_backward_kernel.fn.__name__,
                              triton_backward_kernel.dweight_reduce_kernel.fn.__name__}


def test_cuda_kernels_take_the_phase_of_the_op_that_launched_them():
    """The CUDA path of the event walk, on torch's own FunctionEvents: a device event counts its
    own interval and is backward when its launching CPU op runs inside a backward node."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    if "linked_correlation_id" not in inspect.signature(FunctionEvent).parameters:
        pytest.skip("this torch's FunctionEvent names no launcher (the .kernels fallback is used)")
    backward = FunctionEvent(1, "CompiledFunctionBackward", 0, 0, 100)
    launch_bwd = FunctionEvent(2, "## Call CompiledFxGraph ##", 0, 10, 90)
    launch_bwd.set_cpu_parent(backward)
    launch_fwd = FunctionEvent(3, "## Call CompiledFxGraph ##", 0, 200, 300)

    def kernel(name, op, start, end):
        return FunctionEvent(0, name, 0, start, end, device_type=DeviceType.CUDA,
                             linked_correlation_id=op.id)

    events = [backward, launch_bwd, launch_fwd,
              kernel("rms_norm_backward_kernel", launch_bwd, 20, 32),
              kernel("norm_quant_kernel", launch_fwd, 210, 215),
              kernel("nvjet_tst_128x256", launch_fwd, 220, 260)]
    prof = type("Prof", (), {"events": lambda self: events})()
    assert list(KP._events(prof, cuda=True)) == [
        ("rms_norm_backward_kernel", 12, "backward", (20, 32)),
        ("norm_quant_kernel", 5, "forward", (210, 215)),
        ("nvjet_tst_128x256", 40, "forward", (220, 260))]


def test_idle_gaps_charge_each_wait_to_the_kernel_that_waited():
    # overlapping kernels (two streams) leave no gap; a wait is counted once, per call
    intervals = [(0, 10, "a"), (5, 12, "b"), (20, 30, "c"), (26, 31, "a"), (40, 41, "c")]
    assert KP.idle_gaps(intervals, iters=2) == (8.5, [("c", 8.5)])
    assert KP.idle_gaps([(3, 4, "a")]) == (0.0, [])


def test_profile_arguments_are_checked():
    with pytest.raises(ValueError, match="iters must be >= 1"):
        KP.profile(lambda: None, "cpu", iters=0)


def norm_kernels(row: dict) -> list[tuple[str, str]]:
    return [(k["name"], k["phase"]) for k in row["profile"]["norm_kernels"]]


def test_training_model_step_profile(tmp_path):
    """training.py --no-ops --models llama: one tiny Llama step per candidate, profiled. Both
    candidates' norm kernels are found, in the forward and in the backward: compile_norm's by
    its op names, stock Inductor's by rsqrt (forward) and pow + sum (backward)."""
    import training

    rc = training.main(["--dry-run", "--no-ops", "--models", "llama", "--layers", "1",
                        "--profile-iters", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "training.json").read_text())
    assert data["ops"] == []
    rows = {r["candidate"]: r for r in data["models"]}
    assert set(rows) == {"stock compile", "compile_norm"}
    cn, stock = rows["compile_norm"], rows["stock compile"]
    assert cn["fusion"]["pre_grad_canonicalize_matched"] == 3, cn["fusion"]  # 2 per layer + final
    assert cn["fusion"]["pre_grad_residual_matched"] == 2, cn["fusion"]
    cn_norms, stock_norms = norm_kernels(cn), norm_kernels(stock)
    # compile_norm's kernels say which graph they are from: the phase (the backward graph runs
    # inside the autograd engine) must agree
    assert {("backward" if "rms_norm_backward" in n else "forward", ph) for n, ph in cn_norms} == {
        ("forward", "forward"), ("backward", "backward")}, cn_norms
    assert any(KP._has(n, "rsqrt") and ph == "forward" for n, ph in stock_norms), stock_norms
    assert any(KP._has(n, "pow") and KP._has(n, "sum") and ph == "backward" for n, ph in stock_norms), stock_norms
    for r in (cn, stock):
        assert r["norm_fwd_us"] > 0 and r["norm_bwd_us"] > 0, r
        assert r["norm_fwd_us"] + r["norm_bwd_us"] == pytest.approx(r["norm_us"], abs=0.2)
    for r in (cn, stock):
        by = r["profile"]["by_category"]
        assert set(by) == set(KP.CATEGORIES)
        assert abs(sum(c["share"] for c in by.values()) - 1) < 1e-3
        assert r["norm_us"] == pytest.approx(by["norm"]["us"], abs=0.1) and r["norm_us"] > 0
        assert 0 < len(r["profile"]["top"]) <= 10
    md = (tmp_path / "training.md").read_text()
    assert "| llama | compile_norm |" in md and "Top 10 kernels, stock compile" in md


def test_training_models_argument_is_checked():
    import training

    with pytest.raises(SystemExit):
        training.main(["--dry-run", "--models", "llama,mistral"])


def test_torchao_prefill_dry_run(tmp_path):
    """torchao_prefill.py's dry run, one layer: per-row FP8 fuses every norm, residual add and
    activation quantization (lm_head's included) with logits as eager's; both candidates are
    profiled; the per-tensor row reports what did not fuse, with the reasons."""
    pytest.importorskip("torchao")
    import torchao_prefill

    # quantize_'s default would turn on coordinate-descent tuning process-wide; the benchmark
    # declines it (set_inductor_config=False), so it stays off for both candidates
    with torch._inductor.config.patch(coordinate_descent_tuning=False):
        rc = torchao_prefill.main(["--dry-run", "--layers", "1", "--profile-iters", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["coordinate_descent_tuning"] is False and data["meta"]["torchao_inductor_config"] is False
    rows = {r["granularity"]: r for r in data["rows"]}
    assert set(rows) == {"per_row", "per_tensor"}
    for r in rows.values():
        assert r["expected"] == {"canonicalize_matched": 3, "residual_matched": 2, "quant_matched": 3}
        fused = r["compile_norm"]["fused"]
        assert fused["canonicalize_matched"] == 3 and fused["residual_matched"] == 2, fused
        assert r["stock compile"]["fused"] == {}
        assert r["fusion_ok"] == all(fused.get(k, 0) == v for k, v in r["expected"].items())
        assert r["fusion_ok"] or r["reasons"], r
        if "not_run" not in r["compile_norm"]:  # this CPU's _scaled_mm runs the configuration
            assert r["numerics_ok"], r
            for name in ("compile_norm", "stock compile"):
                assert norm_kernels(r[name]), r[name]["profile"]
    # per-tensor at batch 1 too: the amax over dims 1 and 2 of [1, T, H] is read as per-tensor
    assert rows["per_row"]["fusion_ok"] and rows["per_tensor"]["fusion_ok"], rows
    md = (tmp_path / "results.md").read_text()
    assert "| per_row | 12 |" in md and "## per_tensor, T=12" in md
    assert "coordinate-descent tuning off (torchao's Inductor config not set)" in md
    assert rc == 0


def test_torchao_prefill_budget_skips_compiles(tmp_path, capsys):
    """Past --budget-s no compile starts: the rows say so and are not counted as failures."""
    pytest.importorskip("torchao")
    import torchao_prefill

    rc = torchao_prefill.main(["--dry-run", "--layers", "1", "--granularity", "per_row",
                               "--budget-s", "0", "--out", str(tmp_path)])
    assert rc == 0 and "compile_norm skipped in 1 rows (time budget" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["compile_norm"] == row["stock compile"] == {"skipped": "time budget (--budget-s)"}
    assert "compile_norm: skipped: time budget" in (tmp_path / "results.md").read_text()


def test_torchao_prefill_arguments_are_checked(capsys):
    import torchao_prefill

    with pytest.raises(SystemExit):
        torchao_prefill.main(["--dry-run", "--granularity", "per_col"])
    assert "--granularity: expected a comma list of per_row, per_tensor" in capsys.readouterr().err
