"""The order the suite runs in under pytest-xdist: the longest work first, each module kept whole
unless its tests are independent.

Why: on the 2-core CI machine the suite is CPU-bound, and with xdist's default ``load`` schedule
(consecutive chunks of the collection order) a 60-160 s test that starts last keeps one process
running while the others sit idle (the stop-26 profile: one process busy 1,307 s, another done
after 809 s). Under ``--dist loadfile`` (scripts/test.sh) this plugin makes it longest-first:

- tests are collected in the order of the seconds below, largest first (the rest keep pytest's
  order after them), and the scheduler hands out units in that order, one to each free process;
- a unit is a whole file (so a module-scoped fixture, a thin facade with its worker process, a
  moto server, a planned array job, is built once), except for the files in ``SPLIT``, whose
  tests only use function- or session-scoped fixtures: each of their tests is a unit, so the
  long tests of one file (the fleet's SIGKILL tests) run side by side. Collection fails if a
  file in ``SPLIT`` gains a module-scoped fixture.

(xdist's own ``loadgroup`` would do the grouping with marks, but with pytest 9 its renaming of
node ids has no effect, so it schedules every test alone.)

The seconds are what each file (or test) took in the stop-26 profile of the suite on the 2-core
machine (wall time under load: only their order matters). A file missing here runs after the
listed ones; nothing fails if the table is stale, the suite only gets a longer tail.
"""

from __future__ import annotations

from collections import Counter

import pytest

#: Seconds per file (all of its tests together), from the stop-26 profile.
FILE_SECONDS: dict[str, float] = {
    "tests/fleet/test_redis_fleet.py": 379,
    "tests/http/test_schemathesis.py": 248,
    "tests/backends/test_select.py": 220,
    "tests/fleet/test_local_devices.py": 173,
    "tests/models/test_jina_bert.py": 154,
    "tests/e2e/test_run_cli.py": 137,
    "tests/fleet/test_sqs_faults.py": 121,
    "tests/backends/test_onnx.py": 105,
    "tests/infra/test_array.py": 103,
    "tests/e2e/test_submit_errors.py": 97,
    "tests/fleet/test_devices_fleet.py": 93,
    "tests/backends/test_cpu_torch.py": 82,
    "tests/http/test_safety.py": 77,
    "tests/fleet/test_lost_broker.py": 73,
    "tests/fleet/test_isolation.py": 67,
    "tests/http/test_overload.py": 62,
    "tests/engine/test_engine.py": 61,
    "tests/http/test_processes.py": 53,
    "tests/e2e/test_storage_faults.py": 48,
    "tests/backends/test_openvino.py": 47,
    "tests/http/test_clients.py": 43,
    "tests/e2e/test_newcomer.py": 41,
    "tests/http/test_hostile.py": 39,
    "tests/engine/test_tokenizing.py": 38,
    "tests/http/test_coalesce.py": 35,
    "tests/http/test_peers.py": 34,
    "tests/backends/test_quality.py": 30,
    "tests/http/test_outputs_http.py": 30,
    "tests/fleet/test_hostile.py": 26,
    "tests/http/test_native_families.py": 23,
    "tests/fleet/test_sqs_fleet.py": 19,
    "tests/engine/test_scheduler.py": 16,
    "tests/engine/test_families.py": 16,
    "tests/http/test_cli.py": 16,
    "tests/e2e/test_outputs_cli.py": 16,
    "tests/models/test_splade.py": 15,
    "tests/e2e/test_families_cli.py": 14,
    "tests/http/test_publish.py": 14,
    "tests/e2e/test_images_cli.py": 13,
    "tests/fleet/test_refused_model.py": 12,
}

#: Seconds of single tests that take much more than their file's average (same profile).
TEST_SECONDS: dict[str, float] = {
    "tests/backends/test_select.py::test_auto_picks_a_passing_real_candidate": 160,
    "tests/fleet/test_redis_fleet.py::test_sigkill_workers_mid_job_every_row_exactly_once": 102,
    "tests/fleet/test_sqs_faults.py::test_sigkill_storm_on_sqs_every_row_once": 87,
    "tests/fleet/test_redis_fleet.py::test_poison_shard_is_parked_and_resubmission_redoes_only_it": 73,
    "tests/e2e/test_submit_errors.py::test_submit_errors_are_one_line_and_exit_2": 75,
    "tests/backends/test_cpu_torch.py::test_compiled_cpu_path_matches_eager": 60,
    "tests/backends/test_onnx.py::test_bundled_int8_is_per_token_and_of_equal_quality_where_dynamic_int8_is_not": 59,
    "tests/fleet/test_local_devices.py::test_run_on_two_cpu_engines_shares_the_job_and_survives_a_killed_engine": 60,
    "tests/models/test_jina_bert.py::test_an_8192_token_input_runs_whole": 44,
}

#: Files whose tests are scheduled one by one (no module-scoped fixture: checked at collection).
SPLIT = {
    "tests/fleet/test_redis_fleet.py",
    "tests/fleet/test_local_devices.py",
    "tests/fleet/test_sqs_faults.py",
    "tests/backends/test_select.py",
    "tests/http/test_schemathesis.py",
    "tests/e2e/test_submit_errors.py",
    "tests/models/test_jina_bert.py",
    "tests/backends/test_cpu_torch.py",
    "tests/fleet/test_lost_broker.py",
}

#: Fixture scopes that make a module one unit: splitting it would build the fixture on each process.
SHARED_SCOPES = {"module", "class", "package"}


def _shares_a_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(defs and defs[-1].scope in SHARED_SCOPES for defs in info.name2fixturedefs.values())


def _path(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sharing = {_path(item) for item in items if _shares_a_fixture(item)}
    per_file = Counter(_path(item) for item in items)

    def seconds(item: pytest.Item) -> float:
        path = _path(item)
        if path not in SPLIT:
            return FILE_SECONDS.get(path, 0.0)
        base = item.nodeid.split("[", 1)[0]
        return TEST_SECONDS.get(base, FILE_SECONDS.get(path, 0.0) / per_file[path])

    shared = sorted(sharing & SPLIT)
    if shared:
        raise pytest.UsageError(f"tests/schedule.py: {', '.join(shared)} use a module-scoped fixture, so their "
                                "tests cannot run on separate processes: take them out of SPLIT")
    weight = {id(item): seconds(item) for item in items}
    # stable: equal weights (one file's tests, the unlisted files) keep pytest's order
    items.sort(key=lambda item: -weight[id(item)])


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadfile`` with the files in ``SPLIT`` handed out test by test, in collection order."""
    if config.getvalue("dist") != "loadfile":
        return None  # any other mode: xdist's own scheduler
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path in SPLIT else path

    config.option.loadscopereorder = False  # keep the collection's longest-first order
    return LongestFirst(config, log)
