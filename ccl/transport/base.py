"""What every transport answers: availability (with the reason when absent)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a mechanism can run here, and why not. Computed before anything is built."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok
