"""Phase 1, the environment: which GPU (name, SMs, L2, memory, clocks, driver), which
software (torch, triton, CUDA, Python), and the device-to-device copy bandwidth every GB/s
figure of the run is compared with (bytes read + written per second)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from . import common, plan

SMI_FIELDS = (
    "name",
    "driver_version",
    "memory.total",
    "clocks.max.sm",
    "clocks.max.memory",
    "clocks.sm",
    "clocks.mem",
    "power.limit",
    "temperature.gpu",
    "pcie.link.gen.current",
    "compute_mode",
    "mig.mode.current",
)


def nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:300]}
    first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return dict(zip(SMI_FIELDS, (v.strip() for v in first.split(","))))


def run(ctx: common.Context) -> dict:
    import torch

    from benchmarks import cli
    from benchmarks.timing import TimerSettings, copy_bandwidth

    device = torch.device(ctx.device)
    info = cli.device_info(device)
    record = {
        "slug": info["slug"],
        "label": info["label"],
        "versions": {
            **cli.versions(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()
            if torch.backends.cudnn.is_available()
            else None,
        },
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cli.cpu_name()},
        "device": {"name": info["device"], "detail": info["device_detail"]},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record["device"].update(
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            l2_bytes=getattr(props, "L2_cache_size", None),
            total_memory=props.total_memory,
            max_threads_per_sm=getattr(props, "max_threads_per_multi_processor", None),
            shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", None),
            warp_size=getattr(props, "warp_size", None),
        )
        record["nvidia_smi"] = nvidia_smi()
    else:
        record["nvidia_smi"] = (
            nvidia_smi() if shutil.which("nvidia-smi") else {"error": "no GPU: CPU rehearsal"}
        )
    common.write_json(ctx.record_path("env"), record)  # the facts first, in case the copy hangs

    # three measurements, the fastest is the ceiling (a clock still ramping up only slows a copy)
    scale = plan.bandwidth_scale(ctx.rehearsal)
    settings = TimerSettings(**scale.timer)
    samples = [copy_bandwidth(device, scale.copy_bytes, settings) for _ in range(3)]
    best = max(samples, key=lambda s: s["bytes_per_s"])
    record["copy"] = {**best, "samples_bytes_per_s": [s["bytes_per_s"] for s in samples]}
    d = record["device"]
    facts = [d["name"]]
    if "sm_count" in d:
        facts.append(
            f"{d['sm_count']} SMs, L2 {(d['l2_bytes'] or 0) / (1 << 20):.0f} MiB, "
            f"{d['total_memory'] / (1 << 30):.0f} GiB, sm_{d['capability'].replace('.', '')}"
        )
    smi = record["nvidia_smi"]
    if "driver_version" in smi:
        facts.append(f"driver {smi['driver_version']}, SM clock max {smi.get('clocks.max.sm')}")
    facts.append(f"torch {record['versions']['torch']}")
    facts.append(f"copy {best['bytes_per_s'] / 1e9:,.0f} GB/s")
    record["summary"] = "; ".join(facts)
    return record
