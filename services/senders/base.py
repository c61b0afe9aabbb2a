"""What every provider implements, and the exceptions that carry its decision.

Exception tree::

    DeliveryError(message, code)
     ├── Retryable(retry_after)   -- try again later (network, 4xx SMTP, throttling)
     └── Permanent                -- never retry (bad address, rejected content, auth)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from shared.events import DispatchV1
from shared.settings import Settings


class DeliveryError(Exception):
    def __init__(self, message: str, *, code: int = 2001) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Retryable(DeliveryError):
    def __init__(self, message: str, *, code: int = 2001, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Permanent(DeliveryError):
    pass


@dataclass(slots=True)
class SendResult:
    """A provider's answer to a successful attempt."""

    provider_message_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class Provider(Protocol):
    """One way of delivering on one channel (an SMTP account, an SMS vendor, a bot)."""

    name: ClassVar[str]
    channel: ClassVar[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> Provider: ...

    async def send(self, dispatch: DispatchV1) -> SendResult: ...

    async def close(self) -> None: ...
