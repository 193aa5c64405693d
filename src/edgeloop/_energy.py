"""Energy figures, shared by ``edgeloop bench`` and the device runtime: the RAPL package
counters where Linux exposes them (``/sys/class/powercap/intel-rapl:N``), otherwise an
estimate from CPU time and a target profile's package power, always labelled which.

Nothing here imports onnxruntime or torch: the device install reads these too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RAPL_ROOT", "Energy", "RaplCounter", "estimate_energy", "rapl_domains",
           "read_number"]

RAPL_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True)
class Energy:
    """Energy spent over a run, and where the figure comes from."""

    joules: float
    per_inference_mj: float   # millijoules per inference (a bench: per batch run)
    source: str               # "rapl" (measured) or "estimate" (CPU time x profile watts)
    note: str = ""


def estimate_energy(cpu_seconds: float, *, watts: float, cores: int) -> float:
    """Joules for ``cpu_seconds`` of CPU time when ``watts`` is the package power with all
    ``cores`` busy: each core-second costs ``watts / cores`` joules."""
    return cpu_seconds * watts / max(cores, 1)


def read_number(path: Path) -> float | None:
    """The number a ``/sys`` file holds, None when it is missing or not a number."""
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def rapl_domains(root: Path | None = None) -> list[Path]:
    """Top-level RAPL package domains under ``root`` (default :data:`RAPL_ROOT`):
    ``intel-rapl:N``, not their ``:N:M`` subzones, which the package already counts."""
    root = RAPL_ROOT if root is None else root
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("intel-rapl:*")
                  if p.name.count(":") == 1 and read_number(p / "energy_uj") is not None)


class RaplCounter:
    """Package energy since this counter was made, from the RAPL counters under ``root``
    (default :data:`RAPL_ROOT`); :attr:`readable` is False where there are none.

    Each counter wraps around at its ``max_energy_range_uj`` (about 262 kJ: hours at tens
    of watts). :meth:`joules` adds the change since its previous call and allows for one
    wrap in between, so call it at least once per wrap period on long runs.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.domains = rapl_domains(root)
        self._last = self._read()
        self._joules = 0.0

    @property
    def readable(self) -> bool:
        """Whether this machine exposes RAPL package counters."""
        return bool(self.domains)

    def _read(self) -> list[float]:
        return [read_number(d / "energy_uj") or 0.0 for d in self.domains]

    def joules(self) -> float:
        """Joules the packages used since the counter was made (0.0 when not readable)."""
        now = self._read()
        for d, before, after in zip(self.domains, self._last, now, strict=True):
            delta = after - before
            if delta < 0:   # the counter wrapped around
                delta += read_number(d / "max_energy_range_uj") or 0.0
            self._joules += delta / 1e6
        self._last = now
        return self._joules
