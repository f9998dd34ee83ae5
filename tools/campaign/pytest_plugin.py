"""pytest plugin of the campaign's correctness phase (``-p campaign.pytest_plugin``).

``--campaign-shard I/K``: keep the tests the plan's rules select (tools/campaign/plan.py,
``CORRECTNESS_RULES``), then every K-th of them from the I-th; ``--campaign-limit N``: at most
N per rule (the rehearsal). ``--campaign-deadline T`` (time.time()): tests not started by then
are skipped as "not reached". ``--campaign-results FILE``: one JSON line per test as it ends,
and a first line with what was selected, so a shard killed from outside leaves its results.
"""

from __future__ import annotations

import json
import time

import pytest

from campaign import plan

NOT_REACHED = "campaign deadline: not reached"


def pytest_addoption(parser):
    group = parser.getgroup("campaign")
    group.addoption("--campaign-shard", default="0/1")
    group.addoption("--campaign-limit", type=int, default=0)
    group.addoption("--campaign-deadline", type=float, default=0.0)
    group.addoption("--campaign-results", default="")


def _function(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def rule_matches(rule: plan.TestRule, item) -> bool:
    """The rule's file (and test function, if named) and, if it names one, its backend."""
    function = _function(item.nodeid)
    if "::" in rule.path:
        if function != rule.path:
            return False
    elif not function.startswith(rule.path + "::"):
        return False
    return rule.backend is None or _backend(item) == rule.backend


def _backend(item):
    """The backend a test runs on: its ``backend`` (or, for the GPU-only sizes,
    ``kernel_backend``) parameter."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return callspec.params.get("backend", callspec.params.get("kernel_backend"))


def select(items, rules=plan.CORRECTNESS_RULES, limit: int = 0):
    """``(kept, per_rule)``: the items some rule keeps, in collection order, and for each rule
    how many items its path matched (``collected``), how many its backend matched
    (``matched``) and how many it kept."""
    keep = set()
    per_rule = []
    for rule in rules:
        on_path = [it for it in items if rule_matches(plan.TestRule(rule.path), it)]
        matched = [it for it in on_path if rule.backend is None or _backend(it) == rule.backend]
        kept = matched[:: rule.every]
        if limit:
            kept = kept[:limit]
        keep.update(id(it) for it in kept)
        per_rule.append(
            {
                "rule": rule.path,
                "backend": rule.backend,
                "every": rule.every,
                "collected": len(on_path),
                "matched": len(matched),
                "kept": len(kept),
            }
        )
    return [it for it in items if id(it) in keep], per_rule


def _write(config, obj):
    path = config.getoption("campaign_results")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")


def pytest_collection_modifyitems(session, config, items):
    index, count = (int(v) for v in config.getoption("campaign_shard").split("/"))
    kept, per_rule = select(items, limit=config.getoption("campaign_limit"))
    mine = kept[index::count]
    chosen = {id(it) for it in mine}
    _write(
        config,
        {
            "shard": f"{index}/{count}",
            "collected": len(items),
            "selected_all_shards": len(kept),
            "selected": len(mine),
            "rules": per_rule,
        },
    )
    deselected = [it for it in items if id(it) not in chosen]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = mine


def pytest_runtest_setup(item):
    deadline = item.config.getoption("campaign_deadline")
    if deadline and time.time() > deadline:
        pytest.skip(NOT_REACHED)


def _message(report) -> str:
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:300]
    text = getattr(report, "longreprtext", "") or str(report.longrepr)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ")]
    return "\n".join((errors or lines)[-6:])[-1200:]


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome
        message = _message(report)
        if report.skipped and NOT_REACHED in message:
            outcome = "not reached"
        _write(
            _CONFIG[0],
            {
                "nodeid": report.nodeid,
                "outcome": outcome,
                "seconds": round(report.duration, 3),
                "message": message,
            },
        )


_CONFIG = []  # pytest hands the reports no config: the one of this run


def pytest_configure(config):
    _CONFIG.append(config)
