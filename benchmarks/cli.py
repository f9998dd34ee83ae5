"""``python -m benchmarks`` / ``resfuse-bench``: run the benchmarks and write the report.

    python -m benchmarks                      # the full GPU report, or the CPU default
    python -m benchmarks --preset quick       # a short GPU run
    python -m benchmarks --ops add_rms_norm --dtypes bfloat16 --hidden 4096 8192
    python -m benchmarks --ops norm_add_rms_norm rms_norm_add   # Gemma2/3's and OLMo2's adds
    python -m benchmarks --resume             # go on with an interrupted run

Writes ``report.md``, ``results.json`` and PNG plots to ``benchmarks/results/<device>/`` in a
source checkout (``./resfuse-bench-results/<device>/`` otherwise; ``--out`` to choose).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import resfuse
from resfuse.auto_table import slug  # the name auto's tables go by, too

from . import implementations, kernels, patched_model, report, transformer
from .timing import TimerSettings, copy_bandwidth, keep_freed_memory
from .traffic import DIRECTIONS, OPS


@dataclass(frozen=True)
class Preset:
    description: str
    dtypes: tuple
    rows: tuple
    hidden: tuple
    transformer: transformer.TransformerConfig
    ops: tuple = OPS
    directions: tuple = DIRECTIONS
    styles: tuple = transformer.STYLES
    max_elements: Optional[int] = 1 << 30  # 2 GiB per bf16 tensor: eager fwd+bwd fits 80 GB
    impls: Optional[tuple] = None  # None: every implementation
    timer: TimerSettings = field(default_factory=TimerSettings)
    # the report's static kernel model section (tools/kernel_model.py): it compiles every
    # kernel for the GPU, a minute or two
    kernel_model: bool = True
    # a Hugging Face Llama unpatched and after resfuse.patch (benchmarks/patched_model.py);
    # None: not in this preset (the GPU campaign runs its own, larger one)
    patched_model: Optional[patched_model.PatchedModelConfig] = None


PRESETS = {
    "full": Preset(
        "GPU: every op, bf16 and fp16, rows 4K-64K x hidden 768-64K",
        dtypes=("bfloat16", "float16"),
        rows=(4096, 16384, 65536),
        hidden=(768, 1024, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536),
        transformer=transformer.GPU_DEFAULT,
    ),
    "quick": Preset(
        "GPU: every op in bf16 at 16K rows, a smaller transformer",
        dtypes=("bfloat16",),
        rows=(16384,),
        hidden=(1024, 2048, 4096, 8192, 16384),
        transformer=transformer.GPU_DEFAULT.with_(layers=4, batch=4),
    ),
    # resfuse's CPU kernels against eager and torch.compile (issue 16's targets: see
    # kernels.CPU_COPY_TARGET): every op in the two dtypes CPU models run in
    "cpu": Preset(
        "CPU: every op in bf16 and fp32 at 4K rows x hidden 768-4K, a small transformer, "
        "a tiny Llama patched vs unpatched",
        dtypes=("bfloat16", "float32"),
        rows=(4096,),
        hidden=(768, 1024, 2048, 4096),
        transformer=transformer.CPU_DEFAULT,
        timer=TimerSettings(cpu_budget_s=0.3, cpu_min_calls=3, cpu_max_calls=20),
        patched_model=patched_model.CPU_TINY_LLAMA,
    ),
    "tiny": Preset(
        "seconds, any device: the harness end to end (what the tests run)",
        dtypes=("bfloat16",),
        rows=(64,),
        hidden=(32, 64),
        transformer=transformer.TransformerConfig(
            hidden=64, layers=2, heads=4, ffn=128, seq=16, batch=2
        ),
        impls=("eager-hf", "eager-torch", "resfuse-cpu", "resfuse-torch", "resfuse-triton"),
        timer=TimerSettings(
            warmup_ms=1, rep_ms=2, cuda_min_calls=3, cpu_budget_s=0.0, cpu_min_calls=2
        ),
        kernel_model=False,
        patched_model=patched_model.TINY_LLAMA,
    ),
}


# --------------------------------------------------------------------------- device facts


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "label": "GPU",
            "device": props.name,
            "slug": slug(props.name),
            "device_detail": f"{props.multi_processor_count} SMs, "
            f"{props.total_memory / (1 << 30):.0f} GiB, "
            f"sm_{props.major}{props.minor}, CUDA {torch.version.cuda}",
        }
    name = cpu_name()
    return {
        "label": "CPU",
        "device": f"CPU: {name}",
        "slug": "cpu-" + slug(name),
        "device_detail": f"{torch.get_num_threads()} threads",
    }


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "resfuse": resfuse.__version__,
        "python": platform.python_version(),
    }


def default_results_root() -> Path:
    """``benchmarks/results`` in a source checkout (editable install included), else a
    folder in the working directory: never inside site-packages."""
    here = Path(__file__).resolve().parent
    if (here.parent / "setup.py").exists():
        return here / "results"
    return Path.cwd() / "resfuse-bench-results"


# --------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar when available and wanted; a no-op otherwise."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, desc=label, unit="run", dynamic_ncols=True, file=sys.stderr
                )
            except ImportError:
                pass

    def __call__(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- run


def new_results(
    device: torch.device, info: dict, preset_name: str, command: str, impls: list
) -> dict:
    """An empty run (report.py's format): what ran where, with which backends and
    implementations; the measurements are added to it."""
    backend_status = resfuse.backends()
    return {
        "meta": {
            **info,
            **versions(),
            "preset": preset_name,
            "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "backends": {
                n: {"available": s.available, "reason": s.reason} for n, s in backend_status.items()
            },
            "backends_summary": ", ".join(
                f"{n}: {'yes' if s.available else 'no'}"
                for n, s in backend_status.items()
                if n != "auto"
            ),
        },
        "implementations": {
            i.name: {
                "family": i.family,
                "description": i.description,
                "unavailable": i.unavailable(device),
            }
            for i in impls
        },
        "kernels": [],
        "transformer": [],
        "plots": [],
    }


def parse_config(base: transformer.TransformerConfig, items: list[str]):
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if (
            not sep
            or key not in transformer.TransformerConfig.__dataclass_fields__
            or key == "style"
        ):
            raise SystemExit(
                f"--transformer-config takes KEY=VALUE with KEY one of hidden, "
                f"layers, heads, ffn, seq, batch, dtype; got {item!r}"
            )
        changes[key] = value if key == "dtype" else int(value)
    return base.with_(**changes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resfuse-bench",
        description="Run resfuse's benchmarks "
        "(kernels and the reference transformer) and write the report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(f"  {k:<6} {v.description}" for k, v in PRESETS.items()),
    )
    p.add_argument(
        "--preset",
        choices=["auto", *PRESETS],
        default="auto",
        help="auto: full on a GPU, cpu otherwise",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--ops", nargs="+", choices=OPS)
    p.add_argument("--dtypes", nargs="+", choices=list(kernels.DTYPES))
    p.add_argument("--rows", nargs="+", type=int)
    p.add_argument("--hidden", nargs="+", type=int)
    p.add_argument("--directions", nargs="+", choices=DIRECTIONS)
    p.add_argument("--impls", nargs="+", choices=list(implementations.BY_NAME))
    p.add_argument("--max-elements", type=int, help="skip shapes with more rows x hidden")
    p.add_argument("--styles", nargs="+", choices=transformer.STYLES)
    p.add_argument(
        "--transformer-config",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override the preset's transformer size, e.g. layers=4 seq=1024",
    )
    p.add_argument(
        "--fused-backend",
        default="auto",
        choices=["auto", "cuda", "triton", "cpu", "torch"],
        help="resfuse backend of the transformer's fused variant",
    )
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--no-transformer", action="store_true")
    p.add_argument(
        "--no-patched-model",
        action="store_true",
        help="leave out the preset's Hugging Face Llama, unpatched vs resfuse.patch",
    )
    p.add_argument("--out", type=Path, help="output folder (default: results/<device>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the measurements in OUT/results.json and run only the rest",
    )
    p.add_argument(
        "--kernel-model",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the report's static kernel model section (default: every preset but tiny)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--fresh-pages",
        action="store_true",
        help="CPU: leave glibc's malloc as it is (outputs of 32 MiB and more then fault "
        "their pages in on every call); by default a CPU run keeps freed memory",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite report.md and the plots from OUT/results.json",
    )
    return p


def run(argv: Optional[list[str]] = None) -> tuple[dict, Path]:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset_name = (
        args.preset if args.preset != "auto" else ("full" if device.type == "cuda" else "cpu")
    )
    preset = PRESETS[preset_name]
    info = device_info(device)
    out_dir = args.out or default_results_root() / info["slug"]
    if args.report_only:
        results = report.read_json(out_dir / report.JSON_NAME)
        report.write_all(results, out_dir)
        return results, out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    impls = implementations.select(list(args.impls or preset.impls or implementations.BY_NAME))
    cases = (
        []
        if args.no_kernels
        else kernels.plan(
            args.ops or preset.ops,
            args.dtypes or preset.dtypes,
            args.rows or preset.rows,
            args.hidden or preset.hidden,
            args.max_elements or preset.max_elements,
        )
    )
    directions = args.directions or preset.directions
    cfg = parse_config(preset.transformer, args.transformer_config)
    styles = [] if args.no_transformer else list(args.styles or preset.styles)

    previous = _previous(out_dir, info) if args.resume else None
    skip = (
        {kernels.key_of(r) for r in previous["kernels"] if r.get("error") is None}
        if previous
        else set()
    )
    kept = [r for r in previous["kernels"] if kernels.key_of(r) in skip] if previous else []
    done_styles = {t["config"]["style"]: t for t in previous["transformer"]} if previous else {}

    program = "python -m benchmarks"
    if argv is None and not sys.argv[0].endswith(".py"):
        program = Path(sys.argv[0]).name  # the resfuse-bench console script
    command = program + " " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = new_results(device, info, preset_name, command.strip(), impls)
    if device.type == "cpu":
        results["meta"]["cpu_memory"] = (
            "glibc malloc's defaults (--fresh-pages): outputs of 32 MiB and more are new "
            "pages on every call"
            if args.fresh_pages
            else keep_freed_memory()
        )
    results["kernels"] = kept
    n_kernel = sum(
        1
        for c in cases
        for i in impls
        for d in directions
        if kernels.record_key(c, i.name, d) not in skip
    )
    n_transformer = len(transformer.VARIANTS) * sum(1 for s in styles if s not in done_styles)
    patched = None if args.no_patched_model else preset.patched_model
    done_patched = previous.get("patched_models") if previous else None
    n_patched = len(patched.variants) if patched and not done_patched else 0
    progress = Progress(
        n_kernel + n_transformer + n_patched,
        f"{info['label']} benchmarks",
        enabled=not args.no_progress,
    )
    try:
        # a resumed run goes on comparing with the copy measurements it started with
        results["copy"] = (
            previous["copy"] if previous else copy_bandwidth(device, settings=preset.timer)
        )

        def checkpoint(records):
            results["kernels"] = kept + records
            report.write_json(results, out_dir / report.JSON_NAME)

        if cases:
            new = kernels.run(
                cases,
                impls,
                directions,
                device,
                results["copy"]["bytes_per_s"],
                preset.timer,
                progress,
                skip,
                checkpoint=checkpoint,
            )
            results["kernels"] = kept + new
            results["copy"] = _best_copy(
                results["copy"], copy_bandwidth(device, settings=preset.timer)
            )
            kernels.rescale_to_copy(results["kernels"], results["copy"]["bytes_per_s"])
        for style in styles:
            if style in done_styles:
                results["transformer"].append(done_styles[style])
                continue
            results["transformer"].append(
                transformer.compare(
                    cfg.with_(style=style),
                    device,
                    transformer.VARIANTS,
                    backend=args.fused_backend,
                    progress=progress,
                )
            )
            report.write_json(results, out_dir / report.JSON_NAME)
        if patched is not None:
            results["patched_models"] = done_patched or [_patched_model(patched, device, progress)]
            report.write_json(results, out_dir / report.JSON_NAME)
    finally:
        progress.close()
    if args.kernel_model if args.kernel_model is not None else preset.kernel_model:
        report.write_json(results, out_dir / report.JSON_NAME)
        results["kernel_model"] = kernel_model(out_dir / report.JSON_NAME)
    else:
        why = "--no-kernel-model" if args.kernel_model is False else f"the {preset_name} preset"
        results["kernel_model"] = {"skipped": f"not asked for ({why}; --kernel-model computes it)"}
    report.write_all(results, out_dir)
    return results, out_dir


def _patched_model(cfg: patched_model.PatchedModelConfig, device, progress) -> dict:
    """The preset's patched-model record, or one saying why it could not run."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return {"model": "transformers.LlamaModel", "skipped": f"transformers: {e}"}
    return patched_model.compare(cfg, device, progress=progress)


# the source checkout's static kernel model (a tool, not part of the installed package)
KERNEL_MODEL = Path(__file__).resolve().parent.parent / "tools" / "kernel_model.py"
KERNEL_MODEL_TIMEOUT_S = 1800


def kernel_model(results_path: Path) -> dict:
    """The report's static kernel model section for this run: ``{"markdown",
    "comparison_markdown", "gpu", "problems"}``, or ``{"skipped": why}``. Runs
    ``python -m tools.kernel_model --json --results results.json`` in a subprocess (its
    compiles need Triton's JIT, which a CPU run may have replaced with the interpreter)."""
    if not KERNEL_MODEL.exists():
        return {"skipped": "tools/kernel_model.py is not here (a source checkout has it)"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "tools.kernel_model", "--json", "--results", str(results_path)]
    try:
        proc = subprocess.run(
            cmd,
            cwd=KERNEL_MODEL.parent.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=KERNEL_MODEL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"the model took over {KERNEL_MODEL_TIMEOUT_S} s"}
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"skipped": lines[-1] if lines else f"exit status {proc.returncode}"}
    out = json.loads(proc.stdout)
    return {
        "gpu": out["rows"][0]["gpu"] if out["rows"] else None,
        "markdown": out["markdown"],
        "comparison_markdown": out.get("comparison_markdown", ""),
        "problems": sum(1 for r in out["rows"] if r["problems"]),
    }


def _best_copy(first: dict, second: dict) -> dict:
    """The copy bandwidth is measured before and after the kernels; the faster of the two is
    the ceiling (a busy machine, a clock ramping up can only make a copy slower)."""
    samples = first.get("samples_bytes_per_s", [first["bytes_per_s"]]) + [second["bytes_per_s"]]
    best = first if first["bytes_per_s"] >= second["bytes_per_s"] else second
    return {**best, "bytes_per_s": max(samples), "samples_bytes_per_s": samples}


def _previous(out_dir: Path, info: dict) -> Optional[dict]:
    path = out_dir / report.JSON_NAME
    if not path.exists():
        return None
    previous = report.read_json(path)
    if previous.get("meta", {}).get("device") != info["device"]:
        raise SystemExit(
            f"--resume: {path} was measured on {previous['meta'].get('device')}, "
            f"not on {info['device']}"
        )
    return previous


def main(argv: Optional[list[str]] = None) -> None:
    results, out_dir = run(argv)
    label = results["meta"]["label"]
    print(f"{label} report: {out_dir / report.REPORT_NAME}")
    bad = [
        t["config"]["style"] + "/" + v["variant"]
        for t in results["transformer"]
        for v in t["variants"]
        if not v["agrees"]
    ]
    if bad:
        print(f"warning: outside the tolerance of the reference: {', '.join(bad)}")


if __name__ == "__main__":
    main()
