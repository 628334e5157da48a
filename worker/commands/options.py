"""The engine options every command that loads an engine takes (run, worker, serve, shard, models),
declared once as Typer annotated types; their variables and defaults come from the settings."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from producer.options import default, envvar

DEFAULT_BACKEND: str = str(default("backend"))
DEFAULT_DTYPE: str = str(default("dtype"))

Backend = Annotated[str, typer.Option(
    "--backend", envvar=envvar("backend"),
    help="auto|torch|onnx|neuron (auto: measured at start on CPU, torch on GPUs)")]
Dtype = Annotated[str, typer.Option(
    "--dtype", envvar=envvar("dtype"),
    help="auto|float32|bfloat16|float16|int8 (int8: onnx only); the dtype asked for is the dtype used")]
Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda[:N]|mps|neuron[:core]")]
Devices = Annotated[Optional[str], typer.Option(
    "--devices", envvar=envvar("devices"),
    help="One engine process per device: 0,1,3 (GPU indices after CUDA_VISIBLE_DEVICES; 0,0: two on one GPU), "
    "cpu:N (the cores split into N engines), NeuronCores 0,1 or 0-1; default: every visible GPU for "
    "--device cuda/auto, every core of NEURON_RT_VISIBLE_CORES for --device neuron, one engine on CPU")]
MaxBatchTokens = Annotated[Optional[int], typer.Option(
    "--max-batch-tokens", min=1, help="A cap on one batch's tokens; when given, no memory profile runs")]
MemoryFraction = Annotated[Optional[float], typer.Option(
    "--memory-fraction", min=0.05, max=1.0, envvar=envvar("memory_fraction"),
    help=f"GPU: share of free memory the profiled batch budget may use (default {default('memory_fraction')})")]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code/--no-trust-remote-code", envvar=envvar("trust_remote_code"),
    help="Run the code a model folder ships (config auto_map); off: such folders are refused unless native")]
DEFAULT_TRUST_REMOTE_CODE: bool = bool(default("trust_remote_code"))
