"""Hardware profiles: the ISA-specific choices that decide how int8 should be laid out.

A profile chooses the quantized formats onnxruntime runs fastest on that CPU family:
QDQ vs QOperator, the activation type (U8S8: uint8 activations with int8 weights, vs
S8S8), and ``reduce_range`` (7-bit weights) where int8 dot products can saturate on CPUs
without VNNI / dot-product instructions (AVX2's ``vpmaddubsw`` adds pairs into int16).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from edgeloop.errors import one_of

__all__ = ["TARGETS", "Target", "detect", "get_target"]


@dataclass(frozen=True)
class Target:
    """One hardware profile."""

    name: str
    description: str
    activation_type: str = "uint8"    # uint8 (U8S8) or int8 (S8S8)
    reduce_range: bool = False        # 7-bit weights, for CPUs whose int8 dot products saturate
    quant_format: str = "QDQ"         # QDQ or QOperator
    provider: str = "CPUExecutionProvider"
    watts: float = 15.0               # package power under load, for energy estimates (W)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("x86-avx512-vnni", "x86-64 with AVX-512 VNNI (int8 dot products)", watts=35.0),
    Target("x86-avx2", "x86-64 with AVX2, no VNNI: int8 pairs saturate in int16",
           reduce_range=True, watts=35.0),
    Target("arm64-dotprod", "arm64 NEON with the dot-product extension (sdot/udot)",
           activation_type="int8", watts=5.0),
    Target("arm64-neon", "arm64 NEON without dot product", activation_type="int8", watts=4.0),
    Target("generic", "any CPU; conservative choices", reduce_range=True, watts=15.0),
)}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def detect() -> Target:
    """The profile that fits this machine's CPU."""
    machine = platform.machine().lower()
    flags = _cpu_flags()
    if machine in ("x86_64", "amd64"):
        if {"avx512_vnni", "avx_vnni"} & flags:
            return TARGETS["x86-avx512-vnni"]
        return TARGETS["x86-avx2"] if "avx2" in flags else TARGETS["generic"]
    if machine in ("aarch64", "arm64"):
        return TARGETS["arm64-dotprod"] if "asimddp" in flags else TARGETS["arm64-neon"]
    return TARGETS["generic"]


def get_target(name: str) -> Target:
    """The profile called ``name``; ``auto`` detects this machine."""
    if name == "auto":
        return detect()
    if name not in TARGETS:
        raise one_of("target", ["auto", *TARGETS], name)
    return TARGETS[name]
