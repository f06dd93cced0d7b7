"""A problem found in a user's input: says where (file, case, region), what, and what to do."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    message: str
    file: str | None = None
    case: str | None = None
    region: str | int | None = None
    hint: str | None = None
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.case is not None:
            where.append(f"case '{self.case}'")
        if self.region is not None:
            where.append(f"region {self.region}")
        text = f"{self.severity.upper()}: " + (" ".join(where) + ": " if where else "") + self.message
        if self.hint:
            text += f" -> {self.hint}"
        return text


class WeakDatasetError(Exception):
    """Raised with every problem at once, so a user fixes them in one go."""

    def __init__(self, problems: list[Problem], title: str = "invalid weak dataset"):
        self.problems = [p for p in problems if p.severity == "error"] or list(problems)
        lines = [f"{title}: {len(self.problems)} problem(s)"] + [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))
