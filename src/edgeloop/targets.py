"""Hardware profiles: the ISA-specific choices that decide how int8 should be laid out.

A profile chooses the quantized formats onnxruntime runs fastest *and correctly* on that
CPU family: QDQ vs QOperator, the activation type (U8S8: uint8 activations with int8
weights, vs S8S8), and ``reduce_range`` (7-bit weights).

Why x86 without VNNI needs 7-bit weights, and why S8S8 is not the answer there
(onnxruntime's MLAS, read in its source — ``qgemm.h``, ``platform.cpp``, ``mlasi.h``,
``qdq_s8_to_u8.cc`` — checked by running its AVX2 kernels under ``qemu-x86_64 -cpu
Haswell``, see tests/test_saturation.py, and measured natively on an AMD Zen 3 with AVX2
and no VNNI by benchmarks/bench_x86_layouts.py):

- onnxruntime's U8S8 kernels for AVX2 multiply uint8 activations by int8 weights with
  ``vpmaddubsw``, which adds each pair of adjacent products into a *saturating* int16.
  With a full 8-bit range, ``255 * 127 * 2 = 64770`` overflows int16 and results go wrong;
  with weights in [-64, 64] (``reduce_range``) the worst pair is ``255 * 128 = 32640``,
  which fits. VNNI (``vpdpbusd``) accumulates into int32 and never saturates.
- S8S8 does not avoid it: for QDQ models onnxruntime's ``QDQS8ToU8Transformer`` turns
  int8 activations into uint8 (zero point + 128) on every x86 CPU, so the same U8S8
  kernels run (and saturate: under emulation an S8S8 QDQ MatMul with full-range weights
  is off by 89%); for QOperator models MLAS has no AVX2 S8S8 GEMM (only with
  AVX-VNNI-INT8) and falls back to its portable C kernel, exact but slow. Instructions
  per run of a two-layer 512-wide MLP at batch 64, counted by callgrind (its CPU has AVX2
  but no AVX-512, so MLAS takes its AVX2 paths): U8S8 + 7-bit weights 5.3 M, S8S8 QDQ
  5.6 M (the same kernels after the conversion), S8S8 QOperator 43 M, float 7.5 M.
- Depthwise convolutions run a separate MLAS kernel that does not saturate (exact under
  emulation with full-range weights); U8U8 kernels do not use ``vpmaddubsw`` either.

- Natively on that Zen 3, for a 512-wide MLP with PyTorch's default init: U8S8 and S8S8
  QDQ with 8-bit weights are 8% off their own float-computed reference, 7-bit weights
  exact; S8S8 QOperator is exact and 3-6 times slower than float; 7-bit U8S8 QDQ is as fast
  as any correct layout (about 1.5x float at batch 1 and 64).

So ``x86-avx2`` is U8S8 + 7-bit weights in QDQ: the only fast layout that is also correct.
On arm64 onnxruntime keeps int8 QDQ activations as they are (``QDQIsInt8Allowed``) and MLAS
runs S8S8 on its ``sdot`` kernel (dot-product extension, int32 accumulation) or its NEON
X8S8 kernel; S8S8 QDQ is the layout onnxruntime's documentation recommends first, so the
arm64 profiles use it with full-range (symmetric, [-127, 127]) weights. Unlike the x86
choice, that one is taken from the source and the documentation, not run here.

:func:`saturation_risks` checks a quantized model against a profile without running it.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeloop.errors import one_of

__all__ = ["SAFE_WEIGHT", "TARGETS", "Machine", "SaturationRisk", "Target", "detect",
           "get_target", "saturation_risks", "this_machine"]

# Largest |int8 weight| whose products with uint8 activations, added in pairs, fit an
# int16: 255 * (64 + 64) = 32640 <= 32767. onnxruntime's reduce_range grid is [-64, 64].
SAFE_WEIGHT = 64


@dataclass(frozen=True)
class Target:
    """One hardware profile."""

    name: str
    description: str
    kind: str                         # the CPU family, as it should be named beside a figure
    activation_type: str = "uint8"    # uint8 (U8S8) or int8 (S8S8)
    reduce_range: bool = False        # 7-bit weights, for CPUs whose int8 dot products saturate
    quant_format: str = "QDQ"         # QDQ or QOperator
    saturates: bool = False           # U8S8 products add in saturating int16 pairs (no VNNI)
    provider: str = "CPUExecutionProvider"
    watts: float = 15.0               # package power under load, for energy estimates (W)

    @property
    def layout(self) -> str:
        """The integer layout in onnxruntime's words, e.g. ``U8S8, 7-bit weights, QDQ``."""
        acts = "U8S8" if self.activation_type == "uint8" else "S8S8"
        weights = "7-bit weights" if self.reduce_range else "8-bit weights"
        return f"{acts}, {weights}, {self.quant_format}"

    def to_dict(self) -> dict[str, object]:
        """The profile's fields and its :attr:`layout`, JSON-ready."""
        return {**asdict(self), "layout": self.layout}

    def weight_max(self, bits: int = 8) -> int:
        """The largest |integer weight| this profile allows at ``bits`` wide weights."""
        full = 2 ** (bits - 1) - 1
        return min(full, SAFE_WEIGHT) if self.reduce_range else full


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("x86-avx512-vnni", "x86-64 with AVX-512 VNNI or AVX-VNNI (int8 dot products)",
           "x86-64 VNNI (AVX-512 or AVX)", watts=35.0),
    Target("x86-avx2", "x86-64 with AVX2, no VNNI: int8 pairs saturate in int16",
           "x86-64 AVX2 (no VNNI)", reduce_range=True, saturates=True, watts=35.0),
    Target("arm64-dotprod", "arm64 NEON with the dot-product extension (sdot/udot)",
           "arm64 dot product", activation_type="int8", watts=5.0),
    Target("arm64-neon", "arm64 NEON without dot product", "arm64 NEON",
           activation_type="int8", watts=4.0),
    Target("generic", "any CPU; conservative choices", "unknown CPU", reduce_range=True,
           saturates=True, watts=15.0),
)}

_ISA_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "asimd", "asimddp")


@dataclass(frozen=True)
class Machine:
    """This computer as far as quantized kernels care: what it is and the profile it gets."""

    arch: str                 # platform.machine(), e.g. x86_64
    cpu: str                  # the CPU's model name, "" when the OS does not say
    isa: list[str] = field(default_factory=list)   # the instruction sets that decide the profile
    target: Target = TARGETS["generic"]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: the machine, its CPU kind and the profile's choices."""
        return {"arch": self.arch, "cpu": self.cpu, "isa": list(self.isa),
                "kind": self.target.kind, "target": self.target.to_dict()}


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return model, flags


def _profile(machine: str, flags: set[str]) -> Target:
    if machine in ("x86_64", "amd64"):
        if {"avx512_vnni", "avx_vnni"} & flags:
            return TARGETS["x86-avx512-vnni"]
        return TARGETS["x86-avx2"] if "avx2" in flags else TARGETS["generic"]
    if machine in ("aarch64", "arm64"):
        return TARGETS["arm64-dotprod"] if "asimddp" in flags else TARGETS["arm64-neon"]
    return TARGETS["generic"]


def this_machine() -> Machine:
    """This machine's CPU, the instruction sets that matter here and its profile."""
    arch = platform.machine().lower()
    model, flags = _cpuinfo()
    return Machine(arch=arch, cpu=model or platform.processor(),
                   isa=[f for f in _ISA_FLAGS if f in flags], target=_profile(arch, flags))


def detect() -> Target:
    """The profile that fits this machine's CPU."""
    return this_machine().target


def get_target(name: str) -> Target:
    """The profile called ``name``; ``auto`` detects this machine."""
    if name == "auto":
        return detect()
    if name not in TARGETS:
        raise one_of("target", ["auto", *TARGETS], name)
    return TARGETS[name]


@dataclass(frozen=True)
class SaturationRisk:
    """An integer Conv/MatMul/Gemm whose int16 pair sums can overflow on a profile."""

    node: str          # the compute node (QDQ: the float node between the Q/DQ pairs)
    op: str
    weight: str        # the int8 weight initializer
    max_weight: int    # its largest |value|; at most 64 is safe

    def __str__(self) -> str:
        return (f"{self.op} {self.node!r}: uint8 activations x int8 weights {self.weight!r} "
                f"up to |{self.max_weight}| (> {SAFE_WEIGHT}) saturate int16 pairs")


# QOperator ops: (activation input, activation zero point input, weight input); -1 = none.
_QOPERATOR = {
    "QLinearConv": (0, 2, 3), "QLinearMatMul": (0, 2, 3), "QGemm": (0, 2, 3),
    "ConvInteger": (0, 2, 1), "MatMulInteger": (0, 2, 1),
    "DynamicQuantizeMatMul": (-1, -1, 1), "MatMulIntegerToFloat": (0, 4, 1),
}
_QDQ_COMPUTE = ("Conv", "MatMul", "Gemm")


def saturation_risks(model: onnx.ModelProto, target: Target) -> list[SaturationRisk]:
    """The integer Conv/MatMul/Gemm of ``model`` (QDQ or QOperator) whose products could
    saturate onnxruntime's int16 pair sums on ``target``: 8-bit activations that run as
    uint8 (uint8, or int8 in QDQ, which onnxruntime converts to uint8 on x86) times constant
    int8 weights with some |w| > 64. Depthwise convolutions run a kernel that does not
    saturate and are left out. Empty on profiles that do not saturate (VNNI, arm64)."""
    from edgeloop._onnx import depthwise  # onnxruntime: not at `edgeloop targets` start-up

    if not target.saturates:
        return []
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def elem_type(name: str) -> int | None:
        if name in inits:
            return inits[name].data_type
        node = producer.get(name)
        if node is not None and node.op_type == "DynamicQuantizeLinear":
            return onnx.TensorProto.UINT8
        if node is not None and node.op_type == "QuantizeLinear":
            return elem_type(node.input[2]) if len(node.input) > 2 else onnx.TensorProto.UINT8
        return None

    def int8_weight(name: str) -> np.ndarray | None:
        t = inits.get(name)
        return numpy_helper.to_array(t) if t is not None and t.data_type == onnx.TensorProto.INT8 \
            else None

    risks: list[SaturationRisk] = []
    for node in graph.node:
        weight, act_type = None, None
        if node.op_type in _QOPERATOR:
            act, act_zp, w = _QOPERATOR[node.op_type]
            weight = node.input[w] if len(node.input) > w else None
            if act < 0:
                act_type = onnx.TensorProto.UINT8   # quantized to uint8 inside the op
            else:
                act_type = (elem_type(node.input[act_zp]) if len(node.input) > act_zp
                            and node.input[act_zp] else elem_type(node.input[act]))
                # only uint8 reaches the saturating kernels; an unknown type may be uint8
                act_type = onnx.TensorProto.UINT8 if act_type is None else act_type
        elif node.op_type in _QDQ_COMPUTE and len(node.input) > 1:
            deq = [producer.get(i) for i in node.input[:2]]
            if not all(d is not None and d.op_type == "DequantizeLinear" for d in deq):
                continue
            # x86 turns int8 QDQ activations into uint8: either 8-bit type runs as uint8
            for d, other in ((deq[1], deq[0]), (deq[0], deq[1])):
                if d.input[0] in inits and other.input[0] not in inits:
                    weight = d.input[0]
                    act_type = onnx.TensorProto.UINT8 if elem_type(other.input[0]) in (
                        onnx.TensorProto.UINT8, onnx.TensorProto.INT8) else None
                    break
        if weight is None or act_type != onnx.TensorProto.UINT8:
            continue
        w = int8_weight(weight)
        if w is None or depthwise(node, w.shape):
            continue
        peak = int(np.abs(w.astype(np.int16)).max()) if w.size else 0
        if peak > SAFE_WEIGHT:
            risks.append(SaturationRisk(node.name, node.op_type, weight, peak))
    return risks

