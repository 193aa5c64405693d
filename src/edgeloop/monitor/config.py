"""The monitor's knobs, with defaults and units."""

from __future__ import annotations

from dataclasses import dataclass, fields

from edgeloop.errors import UsageError

__all__ = ["DEFAULT_DETECTORS", "DETECTORS", "MonitorConfig"]

# every detector the monitor can run, as "method:signal"
DETECTORS = ("adwin:confidence", "page-hinkley:entropy", "kswin:confidence",
             "chi2:inputs", "chi2:class-mix", "cbpe:accuracy")
DEFAULT_DETECTORS = ("adwin:confidence", "page-hinkley:entropy", "chi2:inputs",
                     "chi2:class-mix", "cbpe:accuracy")


@dataclass(frozen=True)
class MonitorConfig:
    """How a :class:`~edgeloop.monitor.Monitor` watches. Counts are in watched samples
    (rows of the model's input in the calls watched) unless said otherwise."""

    detectors: tuple[str, ...] = DEFAULT_DETECTORS   # KSWIN is off by default: ~0.2 ms
    #                                                  per update (a scipy KS test)
    sample_every: int = 3         # every k-th call is watched (1: all); the others cost a
    #                               counter (the budget: <= 5% of a 27 us model's latency)
    block: int = 1024             # calls buffered, then processed together (fixed costs
    #                               per block are large next to a 30 us model: amortised)
    window: int = 1000            # samples per windowed test, estimate and history entry
    #                               (a window closes at the first block end after them)
    inputs_every: int = 4         # the input test sees every k-th call's input (the input
    #                               path costs as much as all the rest)
    alpha: float = 1e-4           # false-alarm probability of one windowed test
    #                               (over all features at once: Bonferroni)
    adwin_delta: float = 0.002    # ADWIN's confidence parameter (river's default)
    adwin_every: int = 1          # samples averaged into each ADWIN update (averaging
    #                               costs it power: its bound wants many points)
    ph_every: int = 32            # samples averaged into each Page-Hinkley update
    ph_delta: float = 0.25        # Page-Hinkley's tolerance, in standard errors of a mean
    ph_threshold: float = 20.0    # Page-Hinkley's alarm level, same unit
    kswin_every: int = 64         # samples averaged into each KSWIN update
    kswin_alpha: float = 1e-4
    accuracy_drop: float = 0.05   # accuracy below the golden set's by more than this (and
    #                               more than 3 standard errors) raises an alert
    hold: int = 5000              # samples an alert stays raised after its last detection
    save_every: int = 20000       # samples between saves of the state ...
    save_seconds: float = 60.0    # ... or seconds, whichever comes first (checked per block)
    history: int = 100            # windows (and feedback evaluations) kept
    recent: int = 256             # sampled inputs kept (and saved) for the updater to check
    #                               a candidate on while drifted
    max_detector_bytes: int = 16384   # a detector's pickled state above this is reset
    seed: int = 0                 # KSWIN's sampling

    def __post_init__(self) -> None:
        for name in self.detectors:
            if name not in DETECTORS:
                raise UsageError(f"`detectors` must be some of {', '.join(DETECTORS)}; "
                                 f"got {name!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool) and v <= 0 \
                    and f.name != "seed":
                raise UsageError(f"`{f.name}` must be positive; got {v!r}")
        if not 0 < self.alpha < 1 or not 0 < self.kswin_alpha < 1:
            raise UsageError(f"`alpha` and `kswin_alpha` must be in (0, 1); got "
                             f"{self.alpha}, {self.kswin_alpha}")
