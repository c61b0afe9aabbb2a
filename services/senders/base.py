"""What every provider implements, and the exceptions that carry its decision.

Exception tree::

    DeliveryError(message, code)
     ├── Retryable(retry_after)   -- try again later (network, 4xx SMTP, throttling)
     │    └── Deferred            -- not attempted: wait for a rate limit's slot (not an attempt)
     └── Permanent                -- never retry (bad address, rejected content, auth)

    Unavailable                   -- the sender's own dependency is down: no attempt was made
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from shared.events import DispatchV1
from shared.settings import Settings


class DeliveryError(Exception):
    """``sender_fault``: the sending identity (account, credentials, server) failed, not the
    message or its recipient; the provider may try another identity."""

    def __init__(self, message: str, *, code: int = 2001, sender_fault: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.sender_fault = sender_fault
        # Set by a channel with several providers: which one failed (named by the event).
        self.provider: str | None = None
        self.detail: dict[str, Any] = {}
        # Providers tried before this failure within the same attempt (smart routing's failover).
        self.tries: list[dict[str, Any]] = []
        # The request may have reached the provider (the connection broke or timed out after it
        # was written): trying another provider now could deliver the message twice.
        self.unsure = False


class Retryable(DeliveryError):
    def __init__(
        self, message: str, *, code: int = 2001, retry_after: float | None = None, sender_fault: bool = False
    ) -> None:
        super().__init__(message, code=code, sender_fault=sender_fault)
        self.retry_after = retry_after


class Permanent(DeliveryError):
    pass


class Deferred(Retryable):
    """Not attempted: the provider's rate limit has no slot for ``retry_after`` seconds. The
    dispatch waits on a retry topic and comes back as the same attempt (a deferral is not a
    failure, so it never uses up the message's retries)."""


class Unavailable(Exception):
    """Something the sender itself needs (its database) is down, so nothing was attempted.
    Not an attempt and not the dispatch's fault: the runner waits and tries the same dispatch
    again instead of spending one of its retries or dead-lettering it."""


@dataclass(slots=True)
class SendResult:
    """A provider's answer to a successful attempt."""

    provider_message_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    # The provider that delivered it, when the channel has several (the outcome event names it).
    provider: str | None = None
    # Providers that failed before it within the same attempt (smart routing's failover).
    tries: list[dict[str, Any]] = field(default_factory=list)


HealthHook = Callable[[dict[str, Any]], Awaitable[None]]
# Called (not awaited) by a provider in the same event-loop step as the message leaves for the
# provider, right after the write (SMTP: the content and its final dot), and only when the
# whole message went out in that write. The runner marks the dispatch handed there: a sender
# that dies from then on is not followed by a second send.
Handoff = Callable[[], None]


class Provider(Protocol):
    """One way of delivering on one channel (an SMTP pool, an SMS vendor, a bot).

    ``check`` validates the settings without I/O, so a bad configuration fails at start-up;
    ``open`` acquires what the provider needs (connections, its configuration); ``health``
    publishes changes of a sending identity's health (e.g. a mailbox disabled) to
    ``notify.provider-health``."""

    name: ClassVar[str]
    channel: ClassVar[str]

    @classmethod
    def check(cls, settings: Settings) -> None:
        """Raise when ``settings`` cannot work for this provider (no I/O)."""

    @classmethod
    async def open(cls, settings: Settings, health: HealthHook) -> Provider: ...

    async def send(self, dispatch: DispatchV1, handoff: Handoff | None = None) -> SendResult:
        """Deliver one attempt; calls ``handoff`` as the message leaves (see :data:`Handoff`).
        A provider that cannot tell when that is never calls it: the runner then errs towards
        sending again after a crash."""
        ...

    async def ready(self) -> None: ...

    async def close(self) -> None: ...
