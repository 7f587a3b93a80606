"""`python -m qie`: edit images (one or a folder), print environment info, build the tiny model.

Examples:
    python -m qie edit photo.jpg --prompt "pure white background" --output out.png --model tiny
    python -m qie edit photos/ --prompt "remove the watermark" --output edited/ --steps 8
    python -m qie info
    python -m qie make-tiny ./tiny-qie
    python -m qie serve --model tiny --cache redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qie.cli.plan import add_plan_parser, cmd_plan
from qie.core.load_options import LoadOptions
from qie.core.models import prefer_expandable_segments, resolve_target
from qie.core.registry import DEFAULT_MODEL, VARIANTS
from qie.errors import InvalidRequestError, QieError
from qie.settings import Settings
from qie.speed.options import (
    ATTENTION_QUANT_MODES,
    COMPILE_MODES,
    STEP_CACHE_MODES,
    TRANSFORMER_GRAPHS_MODES,
    VAE_COMPILE_MODES,
)
from qie.versions import __version__

log = logging.getLogger("qie")


EDIT_EXAMPLES = """examples:
  python -m qie edit shoe.jpg --prompt "pure white background" --output shoe-white.png
  python -m qie edit shoe.jpg --prompt "pure white background" --output shoe.jpg --max-side 768
  python -m qie edit person.jpg shirt.png --prompt "the person wears the shirt" --output look.webp
  python -m qie edit photos/ --prompt "remove the watermark" --output edited/ --steps 20
  # the tiny random model (its output is noise; for trying the tools): seconds on a CPU
  python -m qie edit cat.jpg --prompt "a red hat" --output hat.png --model tiny \\
      --steps 2 --max-side 256 --condition-area output

A folder run skips inputs whose output exists (run it again to resume) and lists what it leaves out."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless it has none) and keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        blank = isinstance(default, str) and (not default.strip() or " " in default)
        return f"{text} (default: {default!r})" if blank else f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser: the same help format as the top level."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    """The `python -m qie` parser; engine flags default to the `QIE_*` variables in `settings` (read now)."""
    engine = LoadOptions.from_env(settings)
    parser = argparse.ArgumentParser(
        prog="python -m qie",
        description="Qwen-Image-Edit (2509, 2511), fast.",
        epilog=EDIT_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, the request log line, library notices"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_edit_parser(sub, engine)
    sub.add_parser("info", help="versions, device, free GPU memory and the models qie knows")
    _add_bench_parser(sub)
    _add_serve_parser(sub, engine)
    add_plan_parser(sub)
    _add_soak_and_tiny_parsers(sub, engine)
    return parser


def edit_parser(prog: str) -> argparse.ArgumentParser:
    """The `edit` subcommand's parser on its own, its usage line named `prog` (`qie.cli.parallel` uses it)."""
    sub = argparse.ArgumentParser(formatter_class=HelpFormatter).add_subparsers(parser_class=_Parser)
    parser = _add_edit_parser(sub, LoadOptions.from_env())
    parser.prog = prog
    return parser


def _add_edit_parser(sub, engine: LoadOptions) -> argparse.ArgumentParser:
    edit = sub.add_parser(
        "edit", help="edit one image (or 2-3 together), or every image in a folder", epilog=EDIT_EXAMPLES
    )
    edit.add_argument("inputs", nargs="+", help="1-3 image files edited together, or one folder (batch)")
    edit.add_argument("--prompt", required=True, help="the edit instruction")
    edit.add_argument(
        "--output",
        required=True,
        help="output file: .png, .jpg/.jpeg or .webp (edit parameters kept as PNG text or EXIF/XMP); "
        "a folder for a folder input (PNGs)",
    )
    edit.add_argument(
        "--rewrite",
        action="store_true",
        help="first let the text encoder rewrite --prompt into a precise instruction (printed, then used)",
    )
    edit.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG")
    edit.add_argument("--steps", type=int, default=40, help="denoising steps, 2-100 (fewer: faster, rougher)")
    edit.add_argument("--cfg", type=float, default=4.0, help="true CFG scale, 1-20 (1 turns CFG off: twice as fast)")
    edit.add_argument("--seed", type=int, default=None, help="random when omitted; saved in the output's metadata")
    edit.add_argument(
        "--height",
        type=int,
        help="output height in px, a multiple of 16 (with --width; default: the input's aspect at ~1024²)",
    )
    edit.add_argument("--width", type=int, help="output width in px, a multiple of 16 (with --height)")
    edit.add_argument("--max-side", type=int, help="cap the longer output side (px, at least 64)")
    edit.add_argument("--resize-to-input", action="store_true", help="return the result at the input's size")
    edit.add_argument(
        "--condition-area",
        choices=["auto", "model", "output"],
        default="auto",
        help="VAE-encode inputs at ~1024² (model) or at the output's area (output: faster for small outputs); "
        "auto (default): output under 0.6 MP",
    )
    edit.add_argument("--tile-size", type=int, help="VAE in Hann-blended tiles of this many px (less GPU memory)")
    region = edit.add_mutually_exclusive_group()
    region.add_argument("--box", help="edit only this region: x0,y0,x1,y1 in input pixels; the rest stays exact")
    region.add_argument("--mask", help="edit only where this mask image is white; the rest stays exact")
    LoadOptions.add_arguments(edit, engine)
    _add_speed_args(edit)
    return edit


# The bench's sections (`benchmarks/bench.py` and `benchmarks/bench_fast.py`: outside the installed
# package, so named here; `tests/cli/test_bench_sections.py` checks the two agree).
BENCH_SECTIONS = (
    "stock", "resident", "fp8", "budgets", "fast-budget", "fast", "quality", "compile", "encoders",
    "restart", "options", "batching", "lora", "placement",
)  # fmt: skip


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="GPU benchmark against stock diffusers (full-size random weights)")
    bench.add_argument(
        "--sections",
        default="stock,resident,fp8,budgets",
        help=f"comma list of {','.join(BENCH_SECTIONS)}",
    )
    bench.add_argument(
        "--compile-mode", choices=COMPILE_MODES, default="default", help="fast and quality sections' compile mode"
    )
    bench.add_argument(
        "--compile-modes",
        default="default,max-autotune-no-cudagraphs,reduce-overhead",
        help=f"compile section: comma list of {', '.join(COMPILE_MODES)}",
    )
    bench.add_argument("--attention", default="auto", help="fast and quality sections' attention backend")
    bench.add_argument(
        "--vae-compile",
        choices=VAE_COMPILE_MODES,
        default="auto",
        help="fast and quality sections: compile the VAE decoder too (auto: as --compile does, on the resident "
        "plans; the first edit's stage seconds say where its time went)",
    )
    bench.add_argument(
        "--transformer-graphs",
        choices=TRANSFORMER_GRAPHS_MODES,
        default="auto",
        help="fast and quality sections: the transformer's forward as CUDA graphs (auto: as --compile does, "
        "on the resident plans; the timed edits repeat the first one's shapes, so they replay)",
    )
    bench.add_argument(
        "--fast-psnr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fast section: the PSNR of its first size's rows against the same fast edits in bf16, eager, on a "
        "fresh pipeline with the same LoRA (default: %(default)s; ~1 min on an H200)",
    )
    bench.add_argument(
        "--attention-quant",
        choices=ATTENTION_QUANT_MODES,
        default="off",
        help="fast and quality sections' request attention_quant (fp8: FA3's fp8 forward on Hopper)",
    )
    bench.add_argument("--quality-steps", type=int, default=40, help="quality section: CFG steps of its edit")
    bench.add_argument("--sizes", default="1024,768", help="square output sizes, comma list")
    bench.add_argument("--budgets", default="24,16,10,8,6", help="emulated VRAM budgets in GiB, comma list")
    bench.add_argument("--probe-steps", type=int, default=4, help="CFG steps timed per configuration")
    bench.add_argument("--option-steps", type=int, default=20, help="CFG steps per edit in the options section")
    bench.add_argument(
        "--options-plan",
        choices=["fastest", "eager"],
        default="fastest",
        help="options section: the fastest plan (fp8 + compile on a GPU) or bf16 resident without compile",
    )
    bench.add_argument("--e2e-40", action="store_true", help="also time full 40-step CFG edits (slow)")
    bench.add_argument("--scale", choices=["full", "tiny"], default="full", help="tiny: check the bench on CPU")
    bench.add_argument(
        "--model-variant", choices=VARIANTS, default="2509", help="2511: zero_cond_t transformer (in the JSON)"
    )
    bench.add_argument("--device")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", default="benchmarks", help="folder for the JSON")
    bench.add_argument("--tag", default=None, help="JSON name suffix (default: UTC date-time)")
    bench.add_argument("--max-seconds", type=float, default=0, help="start no new measurement after this long")


def _add_soak_and_tiny_parsers(sub, engine: LoadOptions) -> None:
    soak = sub.add_parser("soak", help="many small edits in a row; report memory growth as JSON")
    soak.add_argument("--edits", type=int, default=200)
    soak.add_argument("--size", type=int, default=64, help="image side (px)")
    soak.add_argument("--steps", type=int, default=2)
    LoadOptions.add_arguments(soak, engine)

    tiny = sub.add_parser("make-tiny", help="save the tiny offline pipeline to a folder")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--variant", choices=VARIANTS, default="2509", help="2511: the zero_cond_t transformer")


# --- serve (Ray Serve; extra `qie[serve]`) ------------------------------------------------------
def _add_serve_parser(sub, engine: LoadOptions) -> None:
    serve = sub.add_parser("serve", help="HTTP edit service on Ray Serve (one replica per GPU)")
    LoadOptions.add_arguments(serve, engine)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="HTTP bind address; on loopback Ray's own ports stay on loopback too (0.0.0.0: every interface)",
    )
    serve.add_argument("--port", type=int, default=8000, help="HTTP port")
    serve.add_argument(
        "--cache",
        default="disk",
        help="result cache: disk (default), off, or redis://host:port/db (entries signed with QIE_CACHE_SECRET)",
    )
    serve.add_argument("--max-batch-size", type=int, default=2, help="requests denoised together (same shape)")
    serve.add_argument("--batch-wait-ms", type=float, default=50, help="how long a request waits for batch mates")
    serve.add_argument("--replicas", type=int, help="default: one per GPU")
    serve.add_argument("--autoscale", action="store_true", help="scale replicas with load (1 to one per GPU)")
    serve.add_argument("--max-replicas", type=int, help="upper bound with --autoscale (default: GPU count)")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from qie.serving.service import ServeSettings, run_forever
    except ImportError as exc:
        print(f"error: serve needs Ray Serve ({exc}); pip install 'qie[serve]'", file=sys.stderr)
        return 2
    settings = ServeSettings(
        load=LoadOptions.from_args(args),
        cache=args.cache,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000,
        replicas=args.replicas,
        autoscale=args.autoscale,
        max_replicas=args.max_replicas,
    )
    run_forever(settings, host=args.host, port=args.port)
    return 0


# --- speed options (README "Speed options") ---
def _add_speed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speed options", "per edit (the load-time ones are under engine)")
    group.add_argument("--mode", choices=["quality", "fast"], help="fast: the Lightning LoRA's steps, CFG off")
    group.add_argument(
        "--attention-quant",
        choices=ATTENTION_QUANT_MODES,
        default="off",
        help="quantized attention: fp8 runs FA3's fp8 forward on Hopper with fa3-fwd (~8%% faster steps, pixels "
        "move more), else SageAttention",
    )
    group.add_argument("--step-cache", choices=STEP_CACHE_MODES, default="off", help="reuse work between steps")
    group.add_argument("--step-cache-threshold", type=float, default=0.05, help="fbcache: residual change to reuse")
    group.add_argument("--step-cache-interval", type=int, default=3, help="taylorseer: full pass every N calls")
    group.add_argument("--early-exit-threshold", type=float, help="stop when x0 changes less than this (relative)")
    group.add_argument("--early-exit-patience", type=int, default=2, help="... for this many steps in a row")


def _speed_params(args: argparse.Namespace) -> dict:
    names = ("mode", "attention_quant", "step_cache", "step_cache_threshold", "step_cache_interval")
    names += ("early_exit_threshold", "early_exit_patience")
    return {name: getattr(args, name) for name in names}


# ---


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser(Settings.from_env())
    except QieError as exc:  # a bad QIE_* variable: the message names it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    prefer_expandable_segments()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from qie.telemetry import install_redaction

    install_redaction()
    if not args.verbose:
        quiet_library_notices()
    commands = {
        "edit": cmd_edit,
        "info": cmd_info,
        "make-tiny": cmd_make_tiny,
        "bench": cmd_bench,
        "serve": cmd_serve,
        "soak": cmd_soak,
        "plan": cmd_plan,
    }
    try:
        return commands[args.command](args)
    except QieError as exc:
        from qie.cli.messages import flag_names, in_cli_words

        print(f"error: {in_cli_words(str(exc), flag_names(parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def quiet_library_notices() -> None:
    """Without -v: no per-edit JSON request line, no diffusers 'experimental feature' notices."""
    logging.getLogger("qie.requests").setLevel(logging.WARNING)
    notices = logging.getLogger("diffusers.models.modeling_utils")
    notices.addFilter(lambda record: "experimental feature" not in record.getMessage())


def cmd_edit(args: argparse.Namespace) -> int:
    from qie.cli.folders import BatchReport, edit_folder, plan_folder
    from qie.core.outputs import check_output_file, check_output_folder

    options = LoadOptions.from_args(args)  # bad engine flags fail first, naming the flag
    inputs = [Path(p) for p in args.inputs]
    params = edit_params(args)
    # Everything that can be checked is checked before the model loads.
    if len(inputs) == 1 and inputs[0].is_dir():
        out_dir = check_output_folder(args.output)
        plan = plan_folder(inputs[0], out_dir)
        for line in plan.describe():
            print(line)
        report = BatchReport()
        try:
            edit_folder(_load_editor(options), plan, params, report, rewrite=args.rewrite)
        except KeyboardInterrupt:
            print(f"interrupted: {_progress(report)}; run the same command again to resume", file=sys.stderr)
            return 130
        except QieError as exc:  # a full disk: every later file would fail the same way
            print(f"stopped: {exc} to resume ({_progress(report)})", file=sys.stderr)
            return 1
        print(report.summary())
        return 0 if not report.failed else 1
    from qie.core.request import EditRequest

    output = check_output_file(args.output)
    EditRequest(images=inputs, **params)  # fail on bad input before loading the model
    return _edit_single(_load_editor(options), inputs, output, params, rewrite=args.rewrite)


def _load_editor(options: LoadOptions):
    """The editor for `options`. The input is checked before; here the model and device (an unknown
    `--model`, a GPU model with no GPU), and only then is the model code imported."""
    resolve_target(options.model, options.device, quiet=True)
    from qie.core.editor import Editor

    return Editor.load(options)


def _edit_single(editor, inputs: list[Path], output: Path, params: dict, *, rewrite: bool = False) -> int:
    from tqdm import tqdm

    from qie.cli.folders import edit_one

    bars: list[tqdm] = []

    def on_step(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="denoising", unit="step", leave=False, mininterval=0))
        bars[0].update(done - bars[0].n)

    try:
        result = edit_one(editor, inputs, output, params, on_step=on_step, rewrite=rewrite)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {output} was not written", file=sys.stderr)
        return 130
    finally:
        for bar in bars:
            bar.close()
    print(f"wrote {output}: {result.summary()}")
    return 0


def _progress(report) -> str:
    return f"{len(report.done)} of {report.total} edited, {len(report.skipped)} already done"


def edit_params(args: argparse.Namespace) -> dict:
    """The `EditRequest` fields given on an `edit` command line (also used by `qie.serving.parallel`)."""
    return {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "true_cfg_scale": args.cfg,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "max_side": args.max_side,
        "resize_to_input": args.resize_to_input,
        "condition_area": args.condition_area,
        "tile_size": args.tile_size,
        "box": _box(args.box),
        "mask": args.mask,
        **_speed_params(args),
    }


def _box(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InvalidRequestError(
            "box", text, "give four whole numbers x0,y0,x1,y1, e.g. --box 600,400,1000,700"
        ) from None


def cmd_info(args: argparse.Namespace) -> int:
    from qie.versions import installed, known_problems

    print(f"qie {__version__}")
    for name, version in installed().items():
        print(f"{name:16} {version or '-'}")
    try:
        import torch
    except ImportError:
        print("device           torch is not installed")
        return 0
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            print(f"cuda:{i:<11} {name}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    else:
        print("device           cpu (no CUDA GPU found)")
    for level, problem in known_problems():
        print(f"{logging.getLevelName(level).lower()}: {problem}")
    from qie.core.registry import registry_lines

    print(f"models (--model; default {DEFAULT_MODEL}; also a hub id or a pipeline folder):")
    for line in registry_lines():
        print(f"  {line}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.bench import run

    return run(args)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from qie.core.tiny import save_tiny_pipeline

    path = save_tiny_pipeline(args.path, seed=args.seed, variant=args.variant)
    print(f"saved the tiny pipeline to {path}; load it with --model {path}")
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    import json

    from benchmarks.soak import soak
    from qie.core.editor import Editor

    editor = Editor.load(LoadOptions.from_args(args))
    logging.getLogger("qie.requests").setLevel(logging.WARNING)  # one line per edit would drown the report
    report = soak(editor, args.edits, size=args.size, steps=args.steps)
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.failures == 0 else 1
