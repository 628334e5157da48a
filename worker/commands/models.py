"""``embedfleet models DIR``: what a model folder is, and whether embedfleet serves it faithfully.

It tells a user before a job starts: the family (which code runs it), the kind, pooling,
prompts, dimensions and maximum length as read from the folder's files, and the verdict of the
loading check (``worker.models.loading``: the weights are loaded on the CPU and every tensor
accounted for), with the reason when the folder would be refused. Exit 0 when every folder
loads faithfully, 2 when one would be refused.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, List

import typer

from producer.cli import app, console, fail
from producer.errors import EmbedfleetError
from producer.logs import setup_logging
from producer.options import Verbose
from worker.commands.options import DEFAULT_TRUST_REMOTE_CODE, TrustRemoteCode
from worker.models.loading import Verdict, check_config, inspect_loading
from worker.models.resolve import ModelInfo, describe


def verdict_of(info: ModelInfo, load: bool) -> Verdict:
    """The loading check: a full load on the CPU, or (``load=False``) the config checks only."""
    if load:
        return inspect_loading(info)
    try:
        check_config(info)
    except EmbedfleetError as exc:
        return Verdict(False, str(exc))
    return Verdict(True, "config checked only (--no-load): the weights were not loaded")


def report(info: ModelInfo, verdict: Verdict) -> dict[str, Any]:
    """One folder's facts and verdict, as ``--json`` prints them."""
    return {"model": info.ref, "path": str(info.path), **info.facts(), "faithful": verdict.faithful,
            "reason": verdict.reason or None, "harmless": verdict.allowed}


def _outputs(entry: dict[str, Any]) -> str | None:
    """``dense, sparse, multivector (default: dense)`` for an embed model."""
    offered, default = entry.get("outputs") or [], entry.get("default_outputs") or []
    return f"{', '.join(offered)} (default: {', '.join(default)})" if offered else None


def _lines(entry: dict[str, Any]) -> list[str]:
    prompts = ", ".join(f"{name}{' (default)' if name == entry['default_prompt_name'] else ''}: {text!r}"
                        for name, text in entry["prompts"].items()) or "none"
    rows = [
        ("family", entry["family"]), ("kind", entry["kind"]),
        ("architecture", f"{entry['architecture']} (model_type {entry['model_type']!r})"),
        ("pooling", entry["pooling"]), ("normalize", entry["normalize"]), ("prompts", prompts),
        ("prompt template", entry["prompt_template"]), ("dimensions", entry["dimensions"]),
        ("max length", entry["max_length"]), ("labels", ", ".join(entry["labels"]) or None),
        ("remote code", ", ".join(entry["remote_code"]) or None),
        ("outputs", _outputs(entry)), ("inputs", ", ".join(entry.get("modalities") or ["text"])),
    ]
    lines = [f"[bold]{entry['model']}[/] ({entry['path']})"]
    lines += [f"  {name:16} {value}" for name, value in rows if value is not None]
    if entry["faithful"]:
        lines.append("  [green]loads faithfully[/]" + (f": {entry['reason']}" if entry["reason"] else ""))
        for reason, names in entry["harmless"].items():
            lines.append(f"    not used, harmless: {len(names)} tensor(s) ({reason})")
    else:
        lines.append(f"  [bold red]refused[/]: {entry['reason']}")
    return lines


@app.command("models")
def models_command(
    models: Annotated[List[str], typer.Argument(help="Model folders (or hub ids in the local cache, or 'default')")],
    trust_remote_code: TrustRemoteCode = DEFAULT_TRUST_REMOTE_CODE,
    load: Annotated[bool, typer.Option("--load/--no-load",
                                       help="Load the weights to check every tensor (default), or check the config only")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per folder instead of text")] = False,
    verbose: Verbose = False,
) -> None:
    """Print what a model folder is (family, kind, pooling, prompts, dims, max length) and whether it loads faithfully."""
    setup_logging(verbose)
    entries = []
    for ref in models:
        try:
            info = describe(ref, trust_remote_code=trust_remote_code)
        except EmbedfleetError as exc:
            raise fail(exc) from None
        entries.append(report(info, verdict_of(info, load)))
    if as_json:
        typer.echo(json.dumps(entries if len(entries) > 1 else entries[0], indent=2))
    else:
        for entry in entries:
            for line in _lines(entry):
                console.print(line, soft_wrap=True)
    raise typer.Exit(0 if all(entry["faithful"] for entry in entries) else 2)
