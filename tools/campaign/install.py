"""Phase 2, install: the carried resfuse wheel on this machine's torch, else a source build.

1. The carry folder is checked against its manifest (sizes and sha256: a truncated transfer
   is caught here, not as a strange import error later).
2. Liger-Kernel's pure-Python wheel is unpacked into build/campaign/site (on the campaign's
   path); ninja and setuptools into build/campaign/build-tools (only a source build uses them).
3. The resfuse wheel is unpacked into a folder of its own and checked in a clean interpreter
   run from outside the tree (tools/campaign/wheel_check.py): the stable-ABI wheel built
   against torch 2.14.1 loads on this torch and, on a GPU, its kernels agree with the
   reference. Its compiled library then goes next to the tree's package (resfuse/), which
   every later phase imports: the wheel's extension with the tree's Python, the same commit
   (the manifest's digest of csrc/ must be the tree's).
4. If the wheel does not load, or was built from other sources, the extension is built from
   source for this GPU alone (TORCH_CUDA_ARCH_LIST=<its arch>, MAX_JOBS=<cores>), and the
   record says why.

The rehearsal does all of it on CPU (no kernel runs), places the library in a scratch copy
of the package instead of the tree's, and builds the fallback in a scratch copy of the
sources when RESFUSE_CAMPAIGN_REHEARSE_BUILD=1 (CI sets it).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from . import carry, common

HERE = Path(__file__).resolve().parent


def unpack_wheel(wheel: Path, dest: Path, scripts: Path | None = None) -> list[str]:
    """A wheel is a zip: its files into ``dest``; ``<name>.data/scripts/*`` into ``scripts``
    (executable). Enough for pure-Python wheels and ninja's; no pip needed."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.endswith("/"):
                continue
            parts = name.split("/")
            if parts[0].endswith(".data") and len(parts) > 2:
                if parts[1] != "scripts" or scripts is None:
                    continue
                target = scripts / "/".join(parts[2:])
            else:
                target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
            if parts[0].endswith(".data"):
                target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            names.append(name)
    return names


# what the benchmarks import of each peer; flash-attn's norm module asks the GPU for its warp
# size when imported, so on CPU only the modules it imports are tried
PEER_IMPORTS = {
    "liger": (
        "liger_kernel.ops.fused_add_rms_norm",
        "liger_kernel.ops.rms_norm",
        "liger_kernel.ops.layer_norm",
    ),
    "flash-attn": (
        "flash_attn.utils.torch",
        "flash_attn.utils.library",
        "flash_attn.ops.triton.layer_norm",
    ),
}


def peer_imports(ctx: common.Context) -> dict:
    """Each carried peer imported on this torch / triton (an API it needs may be missing)."""
    out = {}
    for peer, modules in PEER_IMPORTS.items():
        if ctx.rehearsal and peer == "flash-attn":
            modules = modules[:-1]
        code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
        child = common.run_child(
            [common.python(), "-c", code, *modules],
            timeout=min(60, ctx.remaining()),
            env=common.child_env(ctx),
            cwd=ctx.root,
            echo=False,
        )
        out[peer] = "ok" if child.ok else (child.tail.splitlines()[-1] if child.tail else "failed")
    return out


def _setuptools_importable(ctx: common.Context) -> bool:
    probe = common.run_child(
        [common.python(), "-c", "import setuptools"],
        timeout=30,
        env=common.child_env(ctx),
        echo=False,
    )
    return probe.ok


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def check_wheel(ctx: common.Context, wheel: Path) -> dict:
    wheel_site = ctx.work_dir / "wheel-site"
    if wheel_site.exists():
        shutil.rmtree(wheel_site)
    unpack_wheel(wheel, wheel_site)
    env = {k: v for k, v in common.child_env(ctx).items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(wheel_site)
    with tempfile.TemporaryDirectory() as outside:  # away from the tree's resfuse/
        child = common.run_child(
            [common.python(), str(HERE / "wheel_check.py"), str(wheel_site), ctx.device],
            timeout=min(120, ctx.remaining()),
            env=env,
            cwd=Path(outside),
            log_path=ctx.log_dir / "install-wheel.log",
            prefix="  wheel: ",
        )
    result = _last_json(child.tail)
    result.update(ok=child.ok, seconds=round(child.seconds, 1), site=str(wheel_site))
    if not child.ok:
        result["error"] = child.tail.splitlines()[-1] if child.tail else f"exit {child.returncode}"
    return result


def place_extension(wheel_site: Path, package: Path) -> list[str]:
    """The wheel's compiled library and its build record next to ``package``'s modules."""
    package.mkdir(parents=True, exist_ok=True)
    placed = []
    for name in ("_C.abi3.so", "_cuda_build.json"):
        shutil.copy2(wheel_site / "resfuse" / name, package / name)
        placed.append(str(package / name))
    return placed


def _scratch_sources(ctx: common.Context) -> Path:
    """A copy of what setup.py builds from, for the rehearsal's fallback build."""
    src = ctx.work_dir / "fallback-src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for rel in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ctx.root / rel, src / rel)
    for rel in ("csrc", "resfuse", "triton_kernels", "benchmarks"):
        shutil.copytree(
            ctx.root / rel,
            src / rel,
            ignore=shutil.ignore_patterns("*.so", "__pycache__", "_cuda_build.json"),
        )
    return src


def source_build(ctx: common.Context, src: Path, arch: str, tools: Path, why: str) -> dict:
    env = common.child_env(
        ctx,
        {
            "TORCH_CUDA_ARCH_LIST": arch,
            "MAX_JOBS": str(os.cpu_count() or 4),
            "RESFUSE_FORCE_CUDA_BUILD": "1",
            "RESFUSE_PTXAS_LOG": str(ctx.log_dir / "ptxas-source-build.log"),
        },
    )
    env["PATH"] = f"{tools / 'bin'}{os.pathsep}{env['PATH']}"
    if not _setuptools_importable(ctx):
        env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{tools}"
    print(f"source build for sm_{arch.replace('.', '')} in {src} ({why})", flush=True)
    child = common.run_child(
        [common.python(), "setup.py", "build_ext", "--inplace"],
        cwd=src,
        env=env,
        timeout=ctx.remaining(),
        log_path=ctx.log_dir / "install-source-build.log",
        prefix="  build: ",
        echo=False,
    )
    built = sorted(str(p.relative_to(src)) for p in (src / "resfuse").glob("_C*.so"))
    result = {
        "why": why,
        "arch": arch,
        "dir": str(src),
        "ok": child.ok and bool(built),
        "seconds": round(child.seconds, 1),
        "built": built,
        "timed_out": child.timed_out,
    }
    if not result["ok"]:
        result["error"] = child.tail[-1500:]
    return result


def verify_import(ctx: common.Context, src: Path) -> dict:
    """What the later phases will see: resfuse imported from ``src`` with the campaign's path."""
    env = common.child_env(ctx)
    paths = [p for p in env["PYTHONPATH"].split(os.pathsep) if p != str(ctx.root)]
    env["PYTHONPATH"] = os.pathsep.join([str(src)] + paths)
    code = (
        "import json, resfuse; from resfuse import cuda_ext; "
        "print(json.dumps({'file': resfuse.__file__, 'load_error': cuda_ext._load(), "
        "'backends': {n: [s.available, s.reason] for n, s in resfuse.backends().items()}}))"
    )
    child = common.run_child(
        [common.python(), "-c", code],
        timeout=min(90, ctx.remaining()),
        env=env,
        cwd=src,
        echo=False,
    )
    out = _last_json(child.tail)
    out["ok"] = child.ok and out.get("load_error") == ""
    return out


def _arch(ctx: common.Context) -> str:
    if ctx.rehearsal:
        return "9.0"
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def run(ctx: common.Context) -> dict:
    record: dict = {}
    manifest, problems = carry.verify(ctx.carry_dir)
    record["carry"] = {
        k: manifest.get(k) for k in ("created", "commit", "wheel", "wheel_build", "carry_bytes")
    }
    record["carry"]["problems"] = problems
    tree_digest = common.sources_digest(ctx.root)
    record["carry"]["sources_match_tree"] = manifest.get("sources_digest") == tree_digest
    ctx.write_record("install", record)
    files = set(manifest.get("files", {}))

    # the peers and the build tools
    for path in (ctx.site_dir, ctx.work_dir / "build-tools"):
        if path.exists():
            shutil.rmtree(path)
    tools = ctx.work_dir / "build-tools"
    record["peers"] = {}
    liger = manifest.get("peers", {}).get("liger", {}).get("wheel")
    if liger and liger in files:
        unpack_wheel(ctx.carry_dir / liger, ctx.site_dir)
        record["peers"]["liger"] = f"unpacked {Path(liger).name}"
    else:
        record["peers"]["liger"] = "not carried"
    flash = ctx.carry_dir / "peers" / "flash_attn" / "ops" / "triton" / "layer_norm.py"
    record["peers"]["flash-attn"] = (
        f"Triton norm from {manifest['peers']['flash-attn']['sdist']}"
        if flash.exists()
        else "not carried"
    )
    record["peer_imports"] = peer_imports(ctx)
    for tool, rel in manifest.get("build_tools", {}).items():
        if rel in files:
            unpack_wheel(ctx.carry_dir / rel, tools, scripts=tools / "bin")
    ctx.write_record("install", record)

    # the resfuse wheel
    wheel = manifest.get("wheel")
    why_build = ""
    if not wheel or wheel not in files or any(wheel in p for p in problems):
        why_build = "no usable wheel in the carry: " + ("; ".join(problems) or "none listed")
    else:
        record["wheel"] = check_wheel(ctx, ctx.carry_dir / wheel)
        ctx.write_record("install", record)
        if not record["wheel"]["ok"]:
            why_build = f"the carried wheel failed: {record['wheel'].get('error')}"
        elif not record["carry"]["sources_match_tree"]:
            why_build = "the carried wheel was built from other csrc/ sources than the tree's"
    package = ctx.root / "resfuse" if not ctx.rehearsal else ctx.work_dir / "placed" / "resfuse"
    if not why_build:
        record["placed"] = place_extension(Path(record["wheel"]["site"]), package)

    rehearse_build = ctx.rehearsal and os.environ.get("RESFUSE_CAMPAIGN_REHEARSE_BUILD") == "1"
    if why_build or rehearse_build:
        src = _scratch_sources(ctx) if ctx.rehearsal else ctx.root
        record["source_build"] = source_build(
            ctx,
            src,
            _arch(ctx),
            tools,
            why_build or "rehearsal: the fallback path, in a scratch copy",
        )
        ctx.write_record("install", record)

    record["import"] = verify_import(ctx, ctx.root)
    used = "source build" if why_build else "carried wheel"
    cuda = record["import"].get("backends", {}).get("cuda", [False, "?"])
    if ctx.rehearsal:
        ok = record.get("wheel", {}).get("ok") and (
            not rehearse_build or record["source_build"]["ok"]
        )
        record["status"] = "ok" if ok and record["import"]["ok"] else "failed"
        record["summary"] = (
            f"wheel loads on torch {record.get('wheel', {}).get('torch')} "
            f"(kernels need a GPU); peers import: {record['peer_imports']}"
            + (
                f"; fallback build "
                f"{'ok' if record['source_build']['ok'] else 'FAILED'} in "
                f"{record['source_build']['seconds']:.0f} s"
                if rehearse_build
                else ""
            )
        )
    else:
        built_ok = not why_build or record["source_build"]["ok"]
        record["status"] = "ok" if built_ok and cuda[0] else "failed"
        record["summary"] = (
            f"{used}: cuda backend {'available' if cuda[0] else 'UNAVAILABLE: ' + cuda[1]}"
            + (
                f" ({why_build})"
                if why_build
                else f"; wheel built on torch {manifest['wheel_build'].get('torch')} runs on "
                f"torch {record['wheel'].get('torch')}"
            )
            + f"; peers import: {record['peer_imports']}"
        )
    return record
