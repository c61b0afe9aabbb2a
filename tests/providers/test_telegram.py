"""Telegram Bot API sendMessage against its emulation (HTML parse mode)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from services.senders.telegram.bot import TelegramBot, TelegramConfig, escape, markdown_to_html
from shared.errors import ErrorCode
from tests.emulators.telegram import EntityError, TelegramBotApi, parse_html
from tests.providers.conftest import message

TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
OTHER = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsXX"


@pytest.fixture
async def api():
    async with TelegramBotApi(TOKEN) as emu:
        yield emu


def bot(api, http, token=TOKEN) -> TelegramBot:
    return TelegramBot(TelegramConfig(bot_token=token, api_base=api.url), http)


async def test_send_text(api, http):
    result = await bot(api, http).send(message("123456789", "a < b && c > d", title="Load <high>"))
    assert result.provider_message_id == "1" and result.detail == {"chat_type": "private"}
    (call,) = api.calls
    assert call.verified and call.method == "POST" and call.path == f"/bot{TOKEN}/sendMessage"
    assert call.headers["content-type"] == "application/json"
    assert call.json() == {
        "chat_id": 123456789,
        "text": "<b>Load &lt;high&gt;</b>\na &lt; b &amp;&amp; c &gt; d",
        "parse_mode": "HTML",
    }
    assert api.sent[0]["text"] == "Load <high>\na < b && c > d"  # what the user reads


async def test_send_to_channel_username_and_options(api, http):
    api.chats["@herald_news"] = "channel"
    options = {"silent": True, "protect_content": True, "disable_link_preview": True, "message_thread_id": 7}
    await bot(api, http).send(message("@herald_news", "hi", options=options))
    body = api.calls[0].json()
    assert body["chat_id"] == "@herald_news"
    assert body["disable_notification"] is True and body["protect_content"] is True
    assert body["link_preview_options"] == {"is_disabled": True} and body["message_thread_id"] == 7


def test_markdown_to_html():
    source = "\n".join(
        [
            "# Deploy *done*",
            "**bold** and _it_ and ~~gone~~ and `x<y`, snake_case_name stays, 2 * 3 * 4",
            "- item [docs](https://example.com/a?b=1&c=2)",
            "1. first",
            "> quoted & <b>",
            "```python",
            "if a < b:\n    print('<&>')",
            "```",
            r"escaped \*star\* and [evil](javascript:alert(1))",
        ]
    )
    assert markdown_to_html(source) == "\n".join(
        [
            "<b>Deploy <i>done</i></b>",
            "<b>bold</b> and <i>it</i> and <s>gone</s> and <code>x&lt;y</code>, snake_case_name stays, 2 * 3 * 4",
            '• item <a href="https://example.com/a?b=1&amp;c=2">docs</a>',
            "1. first",
            "<blockquote>quoted &amp; &lt;b&gt;</blockquote>",
            '<pre><code class="language-python">if a &lt; b:\n    print(&#x27;&lt;&amp;&gt;&#x27;)</code></pre>',
            "escaped *star* and [evil](javascript:alert(1))",
        ]
    )
    # Whatever the input, Telegram's parser accepts the result.
    for nasty in ("**unclosed", "<<>>&&;", "*a **b* c**", "[x](https://e.com/<)", "`", "_a_b_", "> q\n> r"):
        parse_html(markdown_to_html(nasty))


def test_emulator_refuses_bad_html():
    # The emulator's check is real: unescaped markup is refused, as Telegram does.
    for bad in ("a < b", "<script>x</script>", "<b>open", "a & b", "<a href='javascript:x'>x</a>", "<b><i></b></i>"):
        with pytest.raises(EntityError):
            parse_html(bad)
    assert parse_html(escape("a < b & <script>")) == "a < b & <script>"


async def test_markdown_sent(api, http):
    await bot(api, http).send(message("123456789", "**hot** <now>", format="markdown", title="T"))
    assert api.calls[0].json()["text"] == "<b>T</b>\n<b>hot</b> &lt;now&gt;"
    assert api.calls[0].verified


async def test_card_with_button(api, http):
    card = Card(
        title="Build #42 <failed>",
        text="see **log**",
        fields=[CardField(title="branch", value="main & dev")],
        url="https://ci.example.com/42",
        button="Open build",
        color="red",
    )
    await bot(api, http).send(message("-1001234567890", "", format="card", card=card))
    body = api.calls[0].json()
    assert body["chat_id"] == -1001234567890
    assert body["text"] == "<b>Build #42 &lt;failed&gt;</b>\n\nsee <b>log</b>\n\n<b>branch</b>: main &amp; dev"
    assert body["reply_markup"] == {"inline_keyboard": [[{"text": "Open build", "url": "https://ci.example.com/42"}]]}
    assert api.calls[0].verified


async def test_invalid_option_named(api, http):
    with pytest.raises(Permanent) as err:
        await bot(api, http).send(message("123456789", options={"message_thread_id": "abc"}))
    assert "message_thread_id" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    with pytest.raises(Permanent) as err:
        await bot(api, http).send(message("123456789", options={"bogus": 1}))
    assert "bogus" in err.value.message
    assert api.calls == []


async def test_wrong_token(api, http):
    with pytest.raises(Permanent) as err:
        await bot(api, http, OTHER).send(message("123456789"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert TOKEN not in err.value.message and OTHER not in err.value.message
    assert api.calls[0].status == 401 and not api.calls[0].verified


async def test_chat_not_found_and_blocked(api, http):
    with pytest.raises(Permanent) as err:
        await bot(api, http).send(message("987654321"))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault
    api.blocked.add("123456789")
    with pytest.raises(Permanent) as err:
        await bot(api, http).send(message("123456789"))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and "blocked" in err.value.message


async def test_too_long(api, http):
    with pytest.raises(Permanent) as err:
        await bot(api, http).send(message("123456789", "x" * 4097))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and "too long" in err.value.message
    # Entities do not count: 4096 visible characters with escapes is fine.
    await bot(api, http).send(message("123456789", "<" * 4096))
    assert api.calls[-1].verified


async def test_injected_failures(api, http):
    plugin = bot(api, http)
    api.fail("rate_limited")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("123456789"))
    assert err.value.code == ErrorCode.RATE_LIMITED and err.value.retry_after == 7.0
    assert not isinstance(err.value, QuotaExceeded)

    api.fail("invalid_recipient")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("123456789"))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault

    api.fail("server_error")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("123456789"))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED

    api.fail("auth")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("123456789"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault

    api.fail("quota")  # no quota in the Bot API: flood control
    with pytest.raises(Retryable) as err:
        await plugin.send(message("123456789"))
    assert err.value.code == ErrorCode.RATE_LIMITED
    assert [c.injected for c in api.calls] == ["rate_limited", "invalid_recipient", "server_error", "auth", "quota"]


async def test_connection_refused(http):
    emu = TelegramBotApi(TOKEN)
    await emu.start()
    base = emu.url
    await emu.stop()
    plugin = TelegramBot(TelegramConfig(bot_token=TOKEN, api_base=base), http)
    with pytest.raises(Retryable):
        await plugin.send(message("123456789"))


def test_config():
    with pytest.raises(ValidationError):
        TelegramConfig(bot_token="not-a-token")
    assert TelegramConfig(bot_token=TOKEN).api_base == "https://api.telegram.org"
