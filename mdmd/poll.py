"""The DMClient poll schedule provisioned at enrollment (MS-MDE2 2.2.9.3):
a value both the configuration and the provisioning document use."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PollSchedule"]

_MIN_REMAINING_INTERVAL = 1440  # minutes; MS-MDE2 2.2.9.3


@dataclass(frozen=True)
class PollSchedule:
    """DMClient ``Poll`` schedule (MS-MDE2 2.2.9.3), intervals in minutes.

    Defaults are the spec's recommended sigmoid schedule: 15 min x 5, then
    60 min x 10, then daily forever (remaining_retries 0 = infinite).
    """

    first_interval: int = 15
    first_retries: int = 5
    second_interval: int = 60
    second_retries: int = 10
    remaining_interval: int = 1440
    remaining_retries: int = 0
    poll_on_login: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError unless the schedule obeys MS-MDE2 2.2.9.3."""
        numbers = {
            "first_interval": self.first_interval,
            "first_retries": self.first_retries,
            "second_interval": self.second_interval,
            "second_retries": self.second_retries,
            "remaining_interval": self.remaining_interval,
            "remaining_retries": self.remaining_retries,
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"poll {name} must be a non-negative integer, got {value!r}")
        if not any(numbers.values()):
            raise ValueError("poll schedule must not set all six values to 0")
        if self.first_retries == 0:
            # "The server MUST NOT set NumberOfFirstRetries to 0" (0 = infinite
            # first schedule, which disables the other two).
            raise ValueError("poll first_retries (NumberOfFirstRetries) must not be 0")
        if 0 < self.remaining_interval < _MIN_REMAINING_INTERVAL:
            raise ValueError(
                "poll remaining_interval (IntervalForRemainingScheduledRetries) must be 0 "
                f"or at least {_MIN_REMAINING_INTERVAL} minutes, got {self.remaining_interval}"
            )
