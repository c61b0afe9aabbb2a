"""The channels Herald delivers on and the address form of each, shared by ingest (a send's
``to`` is checked before it is accepted), the router and the senders.

Two kinds of channel:

- *addressed* channels carry the recipient in ``to``: an email address, an E.164 phone number,
  a Telegram chat id, a device token, an OpenID, a Bark device key, an ntfy topic ...;
- *endpoint* channels deliver to a destination that is itself configured (a group bot's
  webhook, a generic webhook endpoint, a Flomo or Gotify account): ``to`` names the configured
  provider (``"ops-alerts"``), so the address book of such channels is ``/api/v1/providers``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import phonenumbers

from shared.events import Channel, validate_email_address


class AddressError(ValueError):
    pass


def _email(value: str) -> str:
    try:
        return validate_email_address(value)
    except ValueError:
        raise AddressError("not a valid email address") from None


def _phone(value: str) -> str:
    """E.164 (``+8613800138000``); spaces and dashes are dropped."""
    compact = re.sub(r"[\s\-().]", "", value)
    if not compact.startswith("+"):
        raise AddressError("a phone number in E.164 form with its country code, e.g. +8613800138000")
    try:
        number = phonenumbers.parse(compact, None)
    except phonenumbers.NumberParseException:
        raise AddressError("not a phone number in E.164 form") from None
    if not phonenumbers.is_possible_number(number):
        raise AddressError("not a possible phone number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _pattern(pattern: str, what: str) -> Callable[[str], str]:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise AddressError(f"expected {what}")
        return value

    return check


# A configured provider's name (endpoint channels): letters, digits, - _ . and spaces inside.
PROVIDER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,62}[A-Za-z0-9_.\-]|[A-Za-z0-9]"
_endpoint = _pattern(PROVIDER_NAME, "the name of a configured provider of this channel")


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    channel: Channel
    address: str  # what ``to`` holds, for errors and the API catalogue
    check: Callable[[str], str]  # the normalised address, or AddressError
    endpoint: bool = False  # ``to`` names a configured provider
    # Content formats a send may ask for on this channel (plugins convert what they lack).
    formats: frozenset[str] = frozenset({"text", "markdown"})
    title_max: int = 256
    content_max: int = 20_000


_IM = frozenset({"text", "markdown", "card"})

CHANNELS: dict[Channel, ChannelSpec] = {
    s.channel: s
    for s in (
        ChannelSpec(Channel.EMAIL, "an email address", _email, formats=frozenset({"html", "text"}), title_max=998,
                    content_max=10_000_000),  # fmt: skip
        ChannelSpec(Channel.SMS, "a phone number in E.164 form", _phone, formats=frozenset({"text"}), content_max=1000),
        ChannelSpec(Channel.FEISHU, "a configured Feishu bot's name", _endpoint, endpoint=True, formats=_IM),
        ChannelSpec(Channel.DINGTALK, "a configured DingTalk bot's name", _endpoint, endpoint=True, formats=_IM),
        ChannelSpec(Channel.WECOM, "a configured WeCom bot's name", _endpoint, endpoint=True, formats=_IM),
        ChannelSpec(Channel.SLACK, "a configured Slack webhook's name", _endpoint, endpoint=True, formats=_IM),
        ChannelSpec(Channel.TEAMS, "a configured Teams webhook's name", _endpoint, endpoint=True, formats=_IM),
        ChannelSpec(Channel.DISCORD, "a configured Discord webhook's name", _endpoint, endpoint=True, formats=_IM),
        ChannelSpec(
            Channel.TELEGRAM,
            "a Telegram chat id (-1001234567890) or @channelusername",
            _pattern(r"-?\d{1,20}|@[A-Za-z][A-Za-z0-9_]{3,31}", "a chat id or @channelusername"),
            formats=_IM,
        ),
        ChannelSpec(Channel.FLOMO, "a configured Flomo account's name", _endpoint, endpoint=True,
                    formats=frozenset({"text", "markdown"})),  # fmt: skip
        ChannelSpec(Channel.WEBHOOK, "a configured webhook endpoint's name", _endpoint, endpoint=True,
                    formats=frozenset({"text", "markdown", "html", "card"}), content_max=1_000_000),  # fmt: skip
        ChannelSpec(
            Channel.PUSH,
            "a device registration token (FCM) or device token (APNs, hex)",
            _pattern(r"[A-Za-z0-9_:\-.]{16,4096}", "a device token"),
            formats=frozenset({"text"}),
            content_max=4000,
        ),
        ChannelSpec(
            Channel.WECHAT_MP,
            "a follower's OpenID",
            _pattern(r"[A-Za-z0-9_\-]{6,64}", "an OpenID"),
            formats=frozenset({"text"}),
        ),
        ChannelSpec(Channel.BARK, "a Bark device key", _pattern(r"[A-Za-z0-9]{8,64}", "a Bark device key"),
                    formats=frozenset({"text", "markdown"}), content_max=4000),  # fmt: skip
        ChannelSpec(Channel.NTFY, "an ntfy topic", _pattern(r"[A-Za-z0-9_\-]{1,64}", "an ntfy topic name"),
                    formats=frozenset({"text", "markdown"}), content_max=4096),  # fmt: skip
        ChannelSpec(Channel.GOTIFY, "a configured Gotify application's name", _endpoint, endpoint=True,
                    formats=frozenset({"text", "markdown"})),  # fmt: skip
        ChannelSpec(
            Channel.PUSHDEER,
            "a PushDeer push key",
            _pattern(r"PDU[A-Za-z0-9]{8,64}", "a PushDeer key (PDU...)"),
            formats=frozenset({"text", "markdown"}),
        ),
    )
}


def spec(channel: Channel | str) -> ChannelSpec:
    return CHANNELS[Channel(channel)]


def check_address(channel: Channel | str, value: str) -> str:
    """``value`` normalised for ``channel``, or :class:`AddressError` saying what was expected."""
    return spec(channel).check(value.strip())
