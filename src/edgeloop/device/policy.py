"""How a device's runtime serves: one dataclass, loaded from TOML.

A policy file (every key optional)::

    cascade = "cascade.json"   # serve this cascade (from `edgeloop cascade`) instead of
                               # the device's slot; relative paths from the policy's folder
    thresholds = [0.9, inf]    # override the cascade's thresholds, one per stage but the
                               # last (inf: that stage never answers)
    threads = 1                # onnxruntime intra-op threads per model

A wrong key or value is one line naming it and what was expected.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from edgeloop.errors import UsageError

__all__ = ["Policy"]


@dataclass(frozen=True)
class Policy:
    """The runtime's policy (see the module docstring for the TOML keys)."""

    cascade: Path | None = None     # a cascade.json to serve instead of the device's slot
    thresholds: tuple[float, ...] | None = None   # per stage but the last; inf = never
    threads: int = 1                # onnxruntime intra-op threads per model

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) \
                or self.threads < 1:
            raise UsageError(f"`threads` must be an integer >= 1; got {self.threads!r}")
        if self.thresholds is not None:
            t = self.thresholds
            if not isinstance(t, (list, tuple)) or not t or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
                    for v in t):
                raise UsageError("`thresholds` must be a non-empty list of numbers (inf: the "
                                 f"stage never answers); got {t!r}")
            object.__setattr__(self, "thresholds", tuple(float(v) for v in t))
            if self.cascade is None:
                raise UsageError("`thresholds` needs `cascade`: they override a cascade's "
                                 "thresholds")
        if self.cascade is not None and not isinstance(self.cascade, Path):
            if not isinstance(self.cascade, str) or not self.cascade:
                raise UsageError(f"`cascade` must be the path of a cascade.json; got "
                                 f"{self.cascade!r}")
            object.__setattr__(self, "cascade", Path(self.cascade))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a policy TOML file; relative paths in it are from the file's folder."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"policy file {str(p)!r} does not exist")
        try:
            d = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"policy file {str(p)!r} is not valid TOML ({e})") from None
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise UsageError(f"policy file {str(p)!r}: unknown key `{key}`; expected one "
                                 f"of {', '.join(known)}")
        try:
            policy = cls(**d)
        except UsageError as e:
            raise UsageError(f"policy file {str(p)!r}: {e}") from None
        if policy.cascade is not None and not policy.cascade.is_absolute():
            policy = cls(cascade=p.parent / policy.cascade, thresholds=policy.thresholds,
                         threads=policy.threads)
        return policy
