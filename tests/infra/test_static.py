"""Static validation of the infrastructure files: CloudFormation, Dockerfiles, docker-compose.

No Docker engine or AWS account is here, so each file is checked by the tool its ecosystem
uses (cfn-lint, hadolint, the compose CLI's own schema validation) plus checks of the properties
the issue asks for; every check is also run on a broken copy to prove it can fail.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, tool

TEMPLATE = REPO / "infra" / "aws" / "embedfleet.yaml"
DOCKERFILES = sorted((REPO / "infra" / "docker").glob("Dockerfile.*"))
COMPOSE = REPO / "docker-compose.yml"


def run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------- CloudFormation
def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    from cfnlint.decode import decode

    template, matches = decode(str(path))
    assert not matches, matches
    return template


def test_cfn_lint_passes() -> None:
    result = run([tool("cfn-lint"), str(TEMPLATE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_fails_on_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace("AttemptDurationSeconds", "AttemptDurationSecs"))
    result = run([tool("cfn-lint"), str(broken)])
    assert result.returncode != 0
    assert "AttemptDurationSecs" in result.stdout


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def test_queues_have_dead_letter_queues_with_embedfleet_names() -> None:
    template = load_template()
    queues = resources(template, "AWS::SQS::Queue")
    work = queues["WorkQueue"]["Properties"]
    assert work["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["WorkDeadLetterQueue", "Arn"]}
    # The names the workers derive: queue_name("embed", slug) with '.' -> '-' for SQS, DLQ suffix.
    from producer.broker import DLQ_SUFFIX, sqs_name
    from producer.jobs import inline_queue_name, queue_name

    slug = template["Parameters"]["ModelSlug"]["Default"]
    expected = sqs_name(queue_name("embed", slug))
    assert work["QueueName"]["Fn::Sub"].replace("${ModelSlug}", slug) == expected
    dlq = queues["WorkDeadLetterQueue"]["Properties"]["QueueName"]["Fn::Sub"]
    assert dlq.replace("${ModelSlug}", slug) == expected + DLQ_SUFFIX
    # inline calls: their own queue, no redrive (consumed without acknowledgement)
    inline = queues["InlineQueue"]["Properties"]
    assert inline["QueueName"]["Fn::Sub"].replace("${ModelSlug}", slug) == sqs_name(inline_queue_name("embed", slug))
    assert "RedrivePolicy" not in inline


def test_batch_compute_environments_are_spot_gpu_and_inf2() -> None:
    template = load_template()
    envs = resources(template, "AWS::Batch::ComputeEnvironment")
    types = {name: env["Properties"]["ComputeResources"]["InstanceTypes"] for name, env in envs.items()}
    assert all(env["Properties"]["ComputeResources"]["Type"] == "SPOT" for env in envs.values())
    assert {t.split(".")[0] for t in types["GpuComputeEnvironment"]} == {"g5", "g6"}
    assert {t.split(".")[0] for t in types["Inf2ComputeEnvironment"]} == {"inf2"}
    queues = resources(template, "AWS::Batch::JobQueue")
    assert {q["Properties"]["ComputeEnvironmentOrder"][0]["ComputeEnvironment"]["Ref"] for q in queues.values()} == set(envs)


def test_job_definitions_run_one_shard_and_retry_spot_reclaims() -> None:
    template = load_template()
    jobs = resources(template, "AWS::Batch::JobDefinition")
    assert set(jobs) == {"GpuShardJobDefinition", "Inf2ShardJobDefinition"}
    for job in jobs.values():
        props = job["Properties"]
        command = props["ContainerProperties"]["Command"]
        assert command[:3] == ["shard", "--job-manifest", "Ref::manifest"]
        retry = props["RetryStrategy"]
        assert retry["Attempts"] > 1
        rules = retry["EvaluateOnExit"]
        assert rules[0] == {"OnStatusReason": "Host EC2*", "Action": "RETRY"}
        assert {"OnExitCode": "75", "Action": "RETRY"} in rules  # a transient failure with attempts left
        assert rules[-1] == {"OnReason": "*", "Action": "EXIT"}  # real failures are not retried
        environment = {e["Name"]: e["Value"] for e in props["ContainerProperties"]["Environment"]}
        assert environment["EMBEDFLEET_SHARD_ATTEMPTS"] == str(retry["Attempts"])  # the last one records a failure
    gpu = jobs["GpuShardJobDefinition"]["Properties"]["ContainerProperties"]["ResourceRequirements"]
    assert {"Type": "GPU", "Value": "1"} in gpu
    inf2 = jobs["Inf2ShardJobDefinition"]["Properties"]["ContainerProperties"]
    assert inf2["LinuxParameters"]["Devices"][0]["HostPath"] == "/dev/neuron0"
    assert inf2["Command"][-4:] == ["--backend", "neuron", "--device", "neuron"]


def _statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for resource in template["Resources"].values():
        props = resource.get("Properties", {})
        for policy in props.get("Policies", []):
            found.extend(policy["PolicyDocument"]["Statement"])
        if resource["Type"] == "AWS::IAM::ManagedPolicy":
            found.extend(props["PolicyDocument"]["Statement"])
    return found


def test_iam_is_least_privilege() -> None:
    statements = _statements(load_template())
    assert statements
    for statement in statements:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all("*" not in action for action in actions), statement
        if statement["Resource"] == "*":  # only read-only Batch describe calls take no resource
            assert set(actions) <= {"batch:DescribeJobs", "batch:ListJobs"}, statement


# ---------------------------------------------------------------------------- Dockerfiles
KNOWN_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                      "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_problems(text: str) -> list[str]:
    """What keeps a Dockerfile from being a multi-stage, non-root, signal-correct worker image."""
    import dockerfile

    try:
        commands = dockerfile.parse_string(text)
    except dockerfile.GoParseError as exc:
        return [f"parse error: {exc}"]
    problems = [f"line {c.start_line}: unknown instruction {c.cmd}" for c in commands if c.cmd not in KNOWN_INSTRUCTIONS]
    froms = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    if len(froms) < 2:
        problems.append("not multi-stage (fewer than two FROM)")
        return problems
    final = commands[froms[-1]:]
    if not any(c.cmd == "COPY" and any(f.startswith("--from=") for f in c.flags) for c in final):
        problems.append("the final stage copies nothing from a build stage")
    users = [c.value[0] for c in final if c.cmd == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the final stage runs as root (no non-root USER)")
    entry = [c for c in final if c.cmd == "ENTRYPOINT"]
    if not entry or not entry[-1].json:
        problems.append("ENTRYPOINT is missing or in shell form (a shell would swallow SIGTERM)")
    elif "tini" not in entry[-1].value[0] and "embedfleet" != entry[-1].value[0]:
        problems.append("ENTRYPOINT starts neither tini nor embedfleet")
    if not any(c.cmd == "STOPSIGNAL" and c.value[0] == "SIGTERM" for c in final):
        problems.append("no STOPSIGNAL SIGTERM")
    volumes = [v for c in final if c.cmd == "VOLUME" for v in c.value]
    env = {c.value[i]: c.value[i + 1] for c in final if c.cmd == "ENV" for i in range(0, len(c.value) - 1, 2)}
    if "/models" not in volumes:
        problems.append("no VOLUME for the model cache (/models)")
    elif not env.get("HF_HOME", "").startswith("/models"):
        problems.append("HF_HOME is not inside the model cache volume")
    return problems


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path: Path) -> None:
    assert dockerfile_problems(path.read_text()) == []


def test_all_three_worker_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.neuron"]


@pytest.mark.parametrize("mutation, problem", [
    (("USER 1000:1000", "USER root"), "runs as root"),
    (('ENTRYPOINT ["/usr/bin/tini", "--", "embedfleet"]', "ENTRYPOINT embedfleet worker"), "shell form"),
    (('VOLUME ["/models"]', ""), "no VOLUME"),
    (("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL"), "STOPSIGNAL"),
    (("COPY --from=build", "COPY"), "copies nothing"),
    (("WORKDIR /home/embedfleet", "WORKDIRR /home/embedfleet"), "unknown instruction"),
])
def test_dockerfile_check_fails_on_broken_files(mutation: tuple[str, str], problem: str) -> None:
    text = (REPO / "infra" / "docker" / "Dockerfile.cpu").read_text()
    assert mutation[0] in text
    problems = dockerfile_problems(text.replace(mutation[0], mutation[1]))
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    result = run([tool("hadolint"), "--no-color", "--failure-threshold", "info", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text((REPO / "infra" / "docker" / "Dockerfile.cpu").read_text().replace(
        "WORKDIR /src", "WORKDIR src"))  # relative WORKDIR: DL3000
    result = run([tool("hadolint"), "--no-color", str(broken)])
    assert result.returncode != 0 and "DL3000" in result.stdout


# ---------------------------------------------------------------------------- compose
def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    """The compose CLI validates against the compose-spec schema without a Docker engine."""
    return run([tool("docker-compose"), "-f", str(path), "--project-directory", str(REPO), "config", "--quiet"])


def test_compose_file_is_valid() -> None:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("mutation", [
    ("condition: service_healthy", "condition: service_ready"),
    ("stop_grace_period: 30s", "stop_grace_periodd: 30s"),
    ("    depends_on:\n      redis:\n        condition: service_healthy\n    restart: unless-stopped",
     "    depends_on: [rediss]\n    restart: unless-stopped"),
])
def test_compose_validation_fails_on_broken_files(tmp_path: Path, mutation: tuple[str, str]) -> None:
    text = COMPOSE.read_text()
    assert mutation[0] in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(mutation[0], mutation[1], 1))
    assert compose_config(broken).returncode != 0


def test_compose_runs_redis_worker_facade_and_a_one_shot_producer() -> None:
    result = run([tool("docker-compose"), "-f", str(COMPOSE), "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    import json

    services = json.loads(result.stdout)["services"]
    assert set(services) == {"redis", "worker", "facade", "producer"}
    worker, producer = services["worker"], services["producer"]
    assert worker["build"]["dockerfile"] == "infra/docker/Dockerfile.cpu"
    assert worker["command"][0] == "worker" and worker["environment"]["EMBEDFLEET_BROKER"].startswith("redis://redis")
    assert any(v["target"] == "/models" and v["type"] == "volume" for v in worker["volumes"])
    assert producer["restart"] == "no"
    script = " ".join(producer["command"])
    assert "submit /data/sample-corpus.parquet" in script and "status /out/sample --wait" in script
    mounts = {v["target"]: v for v in producer["volumes"]}
    assert mounts["/data"]["source"].endswith("/data") and mounts["/data"].get("read_only")
    assert mounts["/out"]["source"] == next(v["source"] for v in worker["volumes"] if v["target"] == "/out")
    assert (REPO / "data" / "sample-corpus.parquet").is_file()
    assert services["facade"]["ports"][0]["target"] == 8000


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert "**" in lines and "!producer/" in lines and "!worker/" in lines
    # every path a Dockerfile COPYs from the context is let through
    for path in DOCKERFILES:
        copied = {word for line in path.read_text().splitlines() if line.startswith("COPY ") and "--from" not in line
                  for word in line.split()[1:-1]}
        assert copied <= {"pyproject.toml", "README.md", "producer", "worker"}, (path.name, copied)


def test_compose_yaml_parses_with_anchors() -> None:
    data = yaml.safe_load(COMPOSE.read_text())
    assert data["services"]["worker"]["image"] == "embedfleet:cpu"
