"""The benchmark's own logic, on the tiny model on CPU (its numbers mean nothing here; its checks do)."""

import argparse
import json

import pytest

pytestmark = pytest.mark.slow  # every benchmark section on the tiny model


def test_bench_tiny_writes_json_with_bit_exact_stock_and_ratios(tmp_path, monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    from benchmarks.bench import run

    # Both paths VAE-encode the input at the output's area (not ~1024²): same comparison, CPU-cheap.
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr("qie.core.grouping.VAE_IMAGE_SIZE", 64 * 64)

    args = argparse.Namespace(
        sections="stock,resident,fast,options,batching,lora",
        sizes="64",
        budgets="",
        probe_steps=2,
        option_steps=3,
        e2e_40=False,
        scale="tiny",
        model_variant="2509",
        device="cpu",
        seed=0,
        out=str(tmp_path),
        tag="t",
        max_seconds=0,
    )
    assert run(args) == 0
    data = json.loads((tmp_path / "bench-t.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    stock, staged = rows["stock diffusers (resident, sdpa)"], rows["qie resident (sdpa)"]
    assert stock["max_abs_vs_ref"] == 0  # stock == qie's staged path with fixes off, bit for bit
    assert staged["max_abs_vs_ref"] == 0
    assert staged["ratio_step_cfg"] > 0 and stock["step_s_nocfg"] > 0
    assert data["meta"]["scale"] == "tiny" and data["errors"] == []
    assert data["meta"]["model_variant"] == "2509" and {r["model_variant"] for r in data["rows"]} == {"2509"}
    assert {"fast_8", "fast_4"} <= {k for r in data["rows"] for k in r["e2e_s"]}
    assert any(r["name"].startswith("condition_area=output") for r in data["rows"])
    assert [b["batch"] for b in data["batching"]] == [1, 2, 4]
    lora = rows["qie resident + fused user LoRA"]
    assert lora["step_s_cfg"] > 0 and lora["max_abs_vs_ref"] > 0  # the fused LoRA does change the image
    assert stock["profile"]["forward_s"] > 0 and not stock["notes"]  # the profile's trigger is a valid edit


def test_fast_path_sections_on_the_tiny_model(tmp_path, monkeypatch):
    """fast, quality and encoders keep the row schema; compile (CUDA only) is skipped on the CPU."""
    from benchmarks.bench import run
    from qie.cli.main import build_parser

    monkeypatch.setattr("qie.core.grouping.VAE_IMAGE_SIZE", 64 * 64)
    argv = ["bench", "--sections", "fast,quality,encoders,compile", "--sizes", "64", "--scale", "tiny"]
    argv += ["--device", "cpu", "--out", str(tmp_path), "--tag", "f", "--probe-steps", "2", "--quality-steps", "3"]
    args = build_parser().parse_args(argv)
    assert run(args) == 0
    data = json.loads((tmp_path / "bench-f.json").read_text())
    assert data["errors"] == []
    rows = {r["name"].split(" + ")[0].split(" (")[0]: r for r in data["rows"]}
    fast4, fast8 = rows["fast mode 4 steps"], rows["fast mode 8 steps"]
    for row in (fast4, fast8):
        assert row["plan"] == "resident" and row["size"] == 64 and row["step_s_nocfg"] > 0 and row["peak_gib"] is None
        assert row["notes"][0] == "condition_area=auto: output"
    assert fast4["e2e_s"]["fast_4"] > 0 and fast8["e2e_s"]["fast_8"] > 0 and fast8["e2e_s"]["first_edit"] > 0
    # against the same fast edits on a fresh pipeline: the same plan and precision on the CPU, so equal
    assert fast4["psnr_vs_ref"] == fast8["psnr_vs_ref"] == float("inf")
    assert "first_edit" not in fast4["e2e_s"]  # only the section's first edit compiles
    profile = fast4["profile"]
    assert profile["categories_s"]["gemm"] > 0 and profile["floors_s"]["attention"] > 0
    assert profile["counts"]["image_tokens"] == 2 * 4 * 4 and profile["host_syncs"] == {}
    quality = rows["quality 3 steps CFG"]
    assert quality["step_s_cfg"] > 0 and quality["e2e_s"]["quality_3_cfg"] > 0
    assert quality["e2e_40_cfg_s"] is None and quality["e2e_40_cfg_measured"] is False  # 3 steps here, not 40
    assert quality["profile"]["categories_s"]["attention"] > 0
    plain, fp8 = rows["encoders: plain"], rows["encoders: text encoder fp8 storage"]
    assert plain["text_encode_s"] > 0 and plain["decode_s"] > 0 and fp8["psnr_vs_ref"] > 30
    assert not any(name.startswith("compile mode") for name in rows)  # needs CUDA


def test_an_unknown_section_stops_the_bench_before_it_starts(tmp_path):
    from benchmarks.bench import run
    from qie.cli.main import build_parser

    out = tmp_path / "out"
    args = build_parser().parse_args(["bench", "--sections", "stock,turbo", "--out", str(out)])
    with pytest.raises(SystemExit, match="--sections: unknown section 'turbo'"):
        run(args)
    assert not out.exists()  # no bench was made (nor a clock trace started)


def test_an_unknown_compile_mode_stops_the_bench(tmp_path):
    from benchmarks.bench import run
    from qie.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--compile-modes", "default,turbo", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--compile-modes: unknown mode 'turbo'"):
        run(args)


def test_fast_mode_under_a_budget_runs_on_the_stream_plan(tmp_path, monkeypatch):
    """The budgets section's fast-mode rows (CUDA only in the bench) on the tiny model, the GPU calls stubbed."""
    import torch

    from benchmarks.bench import Bench
    from benchmarks.bench_fast import run_fast_under_budget
    from qie.cli.main import build_parser

    monkeypatch.setattr("qie.core.grouping.VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: argparse.Namespace(total_memory=80 * 2**30))
    argv = ["bench", "--scale", "tiny", "--device", "cpu", "--out", str(tmp_path), "--tag", "b", "--budgets", "10"]
    args = build_parser().parse_args(argv)
    args.sizes, args.budgets = [64], [10.0]
    bench = Bench(args)
    run_fast_under_budget(bench, 10.0, size=64)
    rows = {r.name: r for r in bench.rows}
    eight, four = rows["fast mode 8 steps @ 10 GiB (stream)"], rows["fast mode 4 steps @ 10 GiB (stream)"]
    assert eight.plan == "stream" and eight.size == 64 and eight.e2e_s["fast_8"] > 0 and four.e2e_s["fast_4"] > 0


def test_placement_section_rows(tmp_path, monkeypatch):
    """The placement section (fp8-te-stream on a GPU) on the tiny model's stream plan, which runs on a CPU."""
    from benchmarks.bench import Bench
    from benchmarks.placement import VAE_CHOICES, run_placement
    from qie.cli.main import build_parser

    monkeypatch.setattr("qie.core.grouping.VAE_IMAGE_SIZE", 64 * 64)
    argv = ["bench", "--scale", "tiny", "--device", "cpu", "--out", str(tmp_path), "--tag", "p"]
    args = build_parser().parse_args(argv)
    args.sizes = [64]
    bench = Bench(args)
    editor = bench.editor
    monkeypatch.setattr(bench, "editor", lambda pipe, plan, **kw: editor(pipe, "stream", budget_gib=10, **kw))
    run_placement(bench)
    assert len(bench.rows) == len(VAE_CHOICES) + 1  # every VAE choice with the bf16 encoder, then the fp8 encoder
    first, *others = bench.rows
    assert first.psnr_vs_ref is None and all(r.psnr_vs_ref is not None for r in others)
    assert all(r.e2e_s["text_encode"] > 0 and r.e2e_s["decode"] > 0 for r in bench.rows)


def test_a_measurement_whose_warm_up_ran_is_not_skipped_past_max_seconds(tmp_path):
    """--max-seconds stops new work; a row whose compile warm-up already ran is still measured."""
    from types import SimpleNamespace

    from benchmarks.bench import Bench

    args = argparse.Namespace(max_seconds=1, out=str(tmp_path), probe_steps=2, scale="tiny", model_variant="2509")
    args.device, args.seed, args.tag = "cpu", 0, "t"
    bench = Bench(args)
    bench.t0 -= 10  # ten seconds into a one-second budget
    probe = SimpleNamespace(step_s=0.5, e2e_s=2.0, peak_gib=None, stage_peaks_gib={}, timings={}, image=None)
    with pytest.raises(TimeoutError, match="--max-seconds 1"):
        bench.measure("new work", "resident", 64, lambda *_: probe)
    row = bench.measure("after its warm-up", "resident", 64, lambda *_: probe, started=True)
    assert row.step_s_cfg == 0.5 and row.e2e_40_cfg_s == 2.0 + 38 * 0.5


def test_the_restart_section_runs_two_processes_on_one_cache(tmp_path):
    """Cold, then warm: two child processes, one shared cache folder, both first edits in one row."""
    from benchmarks.bench import run
    from qie.cli.main import build_parser

    argv = ["bench", "--sections", "restart", "--sizes", "64", "--scale", "tiny", "--device", "cpu"]
    args = build_parser().parse_args([*argv, "--out", str(tmp_path), "--tag", "r"])
    assert run(args) == 0
    data = json.loads((tmp_path / "bench-r.json").read_text())
    assert data["errors"] == []
    (row,) = data["rows"]
    assert row["name"].startswith("restart: first edit (2 CFG steps)") and row["size"] == 64
    e2e = row["e2e_s"]
    assert e2e["first_edit_cold"] > 0 and e2e["first_edit_warm"] > 0
    assert e2e["process_cold"] > e2e["first_edit_cold"] and e2e["process_warm"] > e2e["first_edit_warm"]
    assert row["step_s_cfg"] > 0


def test_the_restart_child_runs_with_this_runs_speed_flags(tmp_path):
    """A restart measured with other compile, attention or VAE options than the run's is not its restart."""
    from types import SimpleNamespace

    import torch

    from benchmarks.bench_fast import restart_command
    from qie.cli.main import build_parser

    argv = ["bench", "--sections", "restart", "--scale", "tiny", "--device", "cpu", "--compile-mode", "max-autotune"]
    argv += ["--attention", "native", "--attention-quant", "fp8", "--vae-compile", "off"]
    args = build_parser().parse_args(argv)
    bench = SimpleNamespace(args=args, variant="2511", device=torch.device("cpu"))
    command = restart_command(bench, 64, str(tmp_path))
    assert command[1:4] == ["-m", "qie", "bench"]
    flags = dict(zip(command[4::2], command[5::2], strict=True))
    assert flags["--sections"] == "quality" and flags["--sizes"] == "64" and flags["--model-variant"] == "2511"
    assert flags["--compile-mode"] == "max-autotune" and flags["--attention"] == "native"
    assert flags["--attention-quant"] == "fp8" and flags["--vae-compile"] == "off" and flags["--out"] == str(tmp_path)
    assert build_parser().parse_args(command[3:]).vae_compile == "off"  # the child's parser takes them all


def test_a_profile_pauses_the_editors_transformer_graphs_and_restores_them(tmp_path):
    """A replayed graph never calls the transformer: the profile runs the forward with the graphs paused."""
    from types import SimpleNamespace

    import torch

    from benchmarks.bench import Bench, Row

    args = argparse.Namespace(max_seconds=0, out=str(tmp_path), probe_steps=2, scale="tiny", model_variant="2509")
    args.device, args.seed, args.tag = "cpu", 0, "g"
    bench = Bench(args)
    layer, graphs = torch.nn.Linear(4, 4), object()
    editor = SimpleNamespace(graphs=graphs)

    def edit():  # as an edit runs: the graphs, when on, stand in for the transformer's call
        if editor.graphs is None:
            layer(torch.randn(2, 4))

    row = Row(name="fast", size=64, plan="resident")
    bench.profile(row, layer, edit, editor)
    assert not any(n.startswith("profile failed") for n in row.notes), row.notes
    assert row.profile["forward_s"] > 0 and row.profile["transformer_graphs"].startswith("paused")
    assert editor.graphs is graphs
    bench.profile(row, layer, edit)  # without the editor, the graphs stay on and there is no call to profile
    assert "profile failed: RuntimeError: Linear was not called by the trigger" in row.notes
