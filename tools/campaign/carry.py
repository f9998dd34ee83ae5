"""``make gpu-carry``: fill build/carry/ with what the bare GPU machine lacks, checked to fit
the device tool's 64 MiB (the working tree travels in the same allowance).

    build/carry/
      manifest.json      every file with its size and sha256, the commit and the digest of the
                         extension's sources, what was left out and why
      wheels/            resfuse (the release wheel: sm_80..sm_120 + PTX, cp310-abi3, manylinux),
                         Liger-Kernel, ninja and setuptools (for a fallback source build)
      peers/flash_attn/  flash-attn's Triton norm and the two modules it imports, from the
                         sdist as they are; its package __init__ (which loads flash-attn's
                         CUDA extension) replaced by an empty one

The peers are measured side by side on the same GPU by the benchmarks only; nothing of
theirs is committed. Downloads are kept in build/carry-cache/ between runs.

    python tools/campaign/carry.py [--carry build/carry] [--no-build]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from campaign import common, plan  # noqa: E402
else:
    from . import common, plan

MANIFEST = "manifest.json"
WHEEL_GLOB = "resfuse-*-cp310-abi3-*.whl"
# the inputs of `make wheel`: a wheel older than any of them is rebuilt
WHEEL_INPUTS = (
    "setup.py",
    "pyproject.toml",
    "MANIFEST.in",
    "csrc/*",
    "resfuse/**/*.py",
    "resfuse/auto_tables/*.json",
    "triton_kernels/*.py",
    "benchmarks/*.py",
)


class CarryError(RuntimeError):
    pass


def _newest_input(root: Path) -> float:
    return max(
        p.stat().st_mtime for pattern in WHEEL_INPUTS for p in root.glob(pattern) if p.is_file()
    )


# setup.py's package_dir, the longest prefix first: where a wheel's file comes from
PACKAGE_DIRS = {
    "resfuse/triton_kernels/": "triton_kernels/",
    "resfuse/benchmarks/": "benchmarks/",
    "resfuse/": "resfuse/",
}


def _wheel_differs_from_tree(wheel: Path, root: Path) -> str:
    """'' when the wheel's Python files are the tree's; else the first that is not."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            prefix = next((p for p in PACKAGE_DIRS if name.startswith(p)), None)
            if prefix is None or not name.endswith(".py"):
                continue
            path = root / (PACKAGE_DIRS[prefix] + name[len(prefix) :])
            if not path.exists() or path.read_bytes() != z.read(name):
                return name
    return ""


def resfuse_wheel(root: Path, build: bool) -> Path:
    """dist/'s wheel, rebuilt with `make wheel` when it is missing or older than its inputs."""
    wheels = sorted((root / "dist").glob(WHEEL_GLOB))
    stale = ""
    if not wheels:
        stale = "no wheel in dist/"
    elif wheels[-1].stat().st_mtime < _newest_input(root):
        stale = f"{wheels[-1].name} is older than its sources"
    elif _wheel_differs_from_tree(wheels[-1], root):
        stale = f"{wheels[-1].name} holds another {_wheel_differs_from_tree(wheels[-1], root)}"
    if stale:
        if not build:
            raise CarryError(f"{stale}: run `make wheel` (or drop --no-build)")
        print(f"[carry] {stale}: make wheel", flush=True)
        subprocess.run(["make", "wheel"], cwd=root, check=True)
        wheels = sorted((root / "dist").glob(WHEEL_GLOB))
    if len(wheels) != 1:
        raise CarryError(f"expected one {WHEEL_GLOB} in dist/, found {[w.name for w in wheels]}")
    return wheels[0]


def wheel_build_info(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        if "resfuse/_C.abi3.so" not in names:
            raise CarryError(
                f"{wheel.name} has no compiled extension (resfuse/_C.abi3.so): it "
                "was built without nvcc or a CUDA torch"
            )
        return json.loads(z.read("resfuse/_cuda_build.json"))


def _pip_download(requirement: str, cache: Path, *extra: str, env=None) -> Path:
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""

    def found():  # distribution files are named <project>-<version>[-...].whl / .tar.gz
        def matches(p):
            parts = p.name.replace(".tar.gz", "").split("-")
            return (
                parts[0].lower().replace(".", "_") == name
                and len(parts) > 1
                and (not version or parts[1] == version)
                and p.name.endswith((".whl", ".tar.gz"))
            )

        return sorted(p for p in cache.iterdir() if matches(p))

    cache.mkdir(parents=True, exist_ok=True)
    if not found():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--dest",
            str(cache),
            requirement,
            *extra,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise CarryError(f"pip download {requirement} failed:\n{proc.stderr[-2000:]}")
    files = found()
    if not files:
        raise CarryError(f"pip download {requirement}: nothing saved in {cache}")
    return files[-1]


def flash_attn_norm(cache: Path, dest: Path) -> dict:
    """flash-attn's Triton norm module (and the two modules it imports) from its sdist, as
    the package ``flash_attn`` under ``dest``."""
    import os

    name, version = plan.FLASH_ATTN
    env = dict(os.environ, FLASH_ATTENTION_SKIP_CUDA_BUILD="TRUE")  # metadata without nvcc
    sdist = _pip_download(
        f"{name}=={version}", cache, "--no-binary", ":all:", "--no-build-isolation", env=env
    )
    if dest.exists():
        shutil.rmtree(dest)
    prefix = f"flash_attn-{version}/"
    with tarfile.open(sdist) as tar:
        for rel in plan.FLASH_ATTN_FILES:
            member = tar.extractfile(prefix + rel)
            if member is None:
                raise CarryError(f"{sdist.name} has no {rel}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(member.read())
    for package in ("flash_attn", "flash_attn/ops", "flash_attn/ops/triton", "flash_attn/utils"):
        (dest / package / "__init__.py").write_text(
            "# resfuse's GPU campaign: flash-attn's Triton norm alone, taken from the sdist "
            f"({sdist.name});\n# the package __init__, which loads flash-attn's CUDA extension, "
            "is left out.\n"
        )
    return {
        "sdist": sdist.name,
        "sdist_sha256": common.file_sha256(sdist),
        "files": list(plan.FLASH_ATTN_FILES),
    }


def tree_bytes(root: Path) -> int:
    """What the device tool copies of the working tree: tracked files and untracked ones git
    does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return sum(
        (root / n).stat().st_size for n in out.decode().split("\0") if n and (root / n).is_file()
    )


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _commit(root: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(root: Path = common.ROOT, carry: Path | None = None, build_wheel: bool = True) -> dict:
    carry = carry or root / plan.CARRY_DIR
    cache = root / "build" / "carry-cache"
    wheels = carry / "wheels"
    if carry.exists():
        shutil.rmtree(carry)
    wheels.mkdir(parents=True)

    wheel = resfuse_wheel(root, build_wheel)
    shutil.copy2(wheel, wheels / wheel.name)
    manifest = {
        "format": 1,
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": _commit(root),
        "sources_digest": common.sources_digest(root),
        "wheel": f"wheels/{wheel.name}",
        "wheel_build": wheel_build_info(wheel),
        "peers": {},
        "build_tools": {},
        "not_carried": dict(plan.NOT_CARRIED),
    }
    name, version = plan.LIGER
    liger = _pip_download(f"{name}=={version}", cache)
    shutil.copy2(liger, wheels / liger.name)
    manifest["peers"]["liger"] = {"wheel": f"wheels/{liger.name}"}
    manifest["peers"]["flash-attn"] = {"path": "peers", **flash_attn_norm(cache, carry / "peers")}
    for tool in plan.BUILD_TOOLS:
        whl = _pip_download(tool, cache, "--only-binary", ":all:")
        shutil.copy2(whl, wheels / whl.name)
        manifest["build_tools"][tool] = f"wheels/{whl.name}"
    manifest["files"] = {
        str(p.relative_to(carry)): {"bytes": p.stat().st_size, "sha256": common.file_sha256(p)}
        for p in sorted(carry.rglob("*"))
        if p.is_file()
    }
    manifest["carry_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    manifest["tree_bytes"] = tree_bytes(root)
    common.write_json(carry / MANIFEST, manifest)
    check_size(carry, manifest["tree_bytes"])
    return manifest


def check_size(carry: Path, tree: int) -> int:
    total = folder_bytes(carry) + tree
    if total > plan.CARRY_LIMIT_BYTES:
        raise CarryError(
            f"{carry} ({folder_bytes(carry) / 2**20:.1f} MiB) and the working tree "
            f"({tree / 2**20:.1f} MiB) exceed the device tool's "
            f"{plan.CARRY_LIMIT_BYTES >> 20} MiB"
        )
    return total


def verify(carry: Path) -> tuple[dict, list[str]]:
    """The manifest, and what is wrong with the carry folder (missing or changed files)."""
    path = carry / MANIFEST
    if not path.exists():
        return {}, [f"no {path}: run `make gpu-carry` here and carry {plan.CARRY_DIR}"]
    manifest = common.read_json(path)
    problems = []
    for rel, meta in manifest.get("files", {}).items():
        f = carry / rel
        if not f.exists():
            problems.append(f"missing {rel}")
        elif f.stat().st_size != meta["bytes"] or common.file_sha256(f) != meta["sha256"]:
            problems.append(f"changed {rel} (size or sha256 differs from the manifest)")
    return manifest, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--carry", type=Path, default=common.ROOT / plan.CARRY_DIR)
    ap.add_argument("--no-build", action="store_true", help="fail instead of running make wheel")
    args = ap.parse_args(argv)
    try:
        manifest = build(common.ROOT, args.carry.resolve(), build_wheel=not args.no_build)
    except (CarryError, subprocess.CalledProcessError) as e:
        print(f"gpu-carry: {e}", file=sys.stderr)
        return 1
    mib = 1 << 20
    print(
        f"[carry] {args.carry}: {len(manifest['files'])} files, {manifest['carry_bytes'] / mib:.1f} "
        f"MiB (+ tree {manifest['tree_bytes'] / mib:.1f} MiB, limit {plan.CARRY_LIMIT_BYTES // mib} "
        f"MiB); resfuse wheel for {manifest['wheel_build'].get('arch_list')} built against torch "
        f"{manifest['wheel_build'].get('torch')}, commit {manifest['commit']}"
    )
    for rel, meta in manifest["files"].items():
        if meta["bytes"] > 100_000:
            print(f"        {meta['bytes'] / mib:6.2f} MiB  {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
