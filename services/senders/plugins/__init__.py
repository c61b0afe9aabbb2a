"""Every provider plugin, by channel: adding a provider is one module, one line here and one
test (with its emulator under ``tests/emulators``). Imported only when used."""

from __future__ import annotations

import importlib
from functools import cache

from services.senders.plugins.base import Plugin

CATALOGUE: dict[str, dict[str, str]] = {
    "sms": {
        "aliyun": "services.senders.sms.aliyun:AliyunSms",
        "tencent": "services.senders.sms.tencent:TencentSms",
        "huawei": "services.senders.sms.huawei:HuaweiSms",
        "twilio": "services.senders.sms.twilio:TwilioSms",
    },
    "feishu": {"feishu": "services.senders.feishu.bot:FeishuBot"},
    "dingtalk": {"dingtalk": "services.senders.dingtalk.bot:DingTalkBot"},
    "wecom": {"wecom": "services.senders.wecom.bot:WeComBot"},
    "slack": {"slack": "services.senders.slack.webhook:SlackWebhook"},
    "teams": {"teams": "services.senders.teams.webhook:TeamsWebhook"},
    "discord": {"discord": "services.senders.discord.webhook:DiscordWebhook"},
    "telegram": {"telegram": "services.senders.telegram.bot:TelegramBot"},
    "flomo": {"flomo": "services.senders.flomo.api:Flomo"},
    "webhook": {"webhook": "services.senders.webhook.standard:StandardWebhook"},
    "push": {
        "fcm": "services.senders.push.fcm:Fcm",
        "apns": "services.senders.push.apns:Apns",
    },
    "wechat_mp": {"wechat_mp": "services.senders.wechat_mp.template:WeChatTemplate"},
    "bark": {"bark": "services.senders.bark.api:Bark"},
    "ntfy": {"ntfy": "services.senders.ntfy.api:Ntfy"},
    "gotify": {"gotify": "services.senders.gotify.api:Gotify"},
    "pushdeer": {"pushdeer": "services.senders.pushdeer.api:PushDeer"},
}


@cache
def plugin(channel: str, name: str) -> type[Plugin]:
    """The plugin class registered for ``channel``/``name`` (LookupError when there is none)."""
    try:
        target = CATALOGUE[channel][name]
    except KeyError:
        raise LookupError(f"no provider {name!r} for channel {channel!r}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
