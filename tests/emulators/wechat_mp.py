"""WeChat Official Account: the stable access token and template messages, as documented.

- ``POST /cgi-bin/stable_token`` ``{grant_type, appid, secret, force_refresh}``: checks the
  AppID (40013) and the AppSecret (40125); in normal mode hands back the current token while
  it is valid, a new one (invalidating the old) when forced or expired; answers
  ``{"access_token", "expires_in": 7200}``. It never consumes injected failures.
- ``POST /cgi-bin/message/template/send?access_token=``: the token must be one issued and
  current (41001 missing, 40001 invalid or not the latest, 42001 expired); the body needs
  ``touser`` (40003 invalid openid; 43004 when the user does not follow), ``template_id`` of
  the account (40037), ``data`` with a ``value`` for each keyword of the template and an
  http(s) ``url`` if any (47003 argument invalid); the same ``client_msg_id`` for the same user
  within ten minutes is not sent twice. Answers ``{"errcode": 0, "errmsg": "ok", "msgid"}``.

``expire_tokens()`` / ``invalidate_tokens()`` make the next send meet an expired (42001) or a
superseded (40001) token, ``revoke_token()`` one the token endpoint still hands out in normal
mode, to exercise the plugin's refresh.
"""

from __future__ import annotations

import secrets
import time

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

RID = " rid: 6757f1c2-0a1b2c3d-4e5f6a7b"


def _err(code: int, message: str) -> dict:
    return {"errcode": code, "errmsg": message + RID}


class WeChatMpApi(Emulator):
    name = "wechat_mp"
    routes = [
        ("POST", "/cgi-bin/stable_token", "stable_token"),
        ("POST", "/cgi-bin/message/template/send", "template_send"),
    ]

    def __init__(
        self, app_id: str = "wx1234567890abcdef", app_secret: str = "0123456789abcdef0123456789abcdef"
    ) -> None:
        super().__init__()
        self.app_id = app_id
        self.app_secret = app_secret
        self.followers = {"oABCD1234efgh5678ijkl9012mnop"}
        self.unsubscribed = {"oUNSUB1234efgh5678ijkl9012mn"}
        self.templates = {"TPL_ALERT_0001": ["content"], "TPL_ORDER_0002": ["first", "keyword1", "keyword2", "remark"]}
        self.token: str | None = None
        self.token_expires = 0.0
        self.superseded: set[str] = set()  # tokens replaced by a newer one
        self.revoked: set[str] = set()
        self.token_requests = 0
        self.sent: list[dict] = []
        self._client_msg_ids: dict[tuple[str, str], tuple[float, int]] = {}
        self._msgid = 2_000_000_000

    # --- test controls ------------------------------------------------------------------------

    def expire_tokens(self) -> None:
        self.token_expires = 0.0

    def revoke_token(self) -> None:
        """The send endpoint refuses the current token (40001) while the token endpoint still
        hands it out in normal mode: only a forced refresh gets a working one."""
        if self.token:
            self.revoked.add(self.token)

    def invalidate_tokens(self) -> None:
        """The current token is superseded (as when another system force-refreshed it)."""
        if self.token:
            self.superseded.add(self.token)
        self.token = None

    # --- endpoints -----------------------------------------------------------------------------

    async def stable_token(self, request: web.Request, call: Call) -> web.StreamResponse:
        self.token_requests += 1
        try:
            body = call.json()
        except ValueError:
            return self.reject(call, "not JSON", 200, _err(47001, "data format error"))
        if body.get("grant_type") != "client_credential":
            return self.reject(call, "grant_type", 200, _err(40002, "invalid grant type"))
        if body.get("appid") != self.app_id:
            return self.reject(call, "appid", 200, _err(40013, "invalid appid"))
        if body.get("secret") != self.app_secret:
            return self.reject(call, "secret", 200, _err(40125, "invalid appsecret"))
        force = body.get("force_refresh", False)
        if not isinstance(force, bool):
            return self.reject(call, "force_refresh", 200, _err(47001, "data format error"))
        call.verified = True  # the token endpoint does not consume injected failures
        now = time.time()
        if force or self.token is None or now >= self.token_expires:
            if self.token:
                self.superseded.add(self.token)
            self.token = "87_" + secrets.token_urlsafe(48)
            self.token_expires = now + 7200
        return web.json_response({"access_token": self.token, "expires_in": int(self.token_expires - now)})

    async def template_send(self, request: web.Request, call: Call) -> web.StreamResponse:
        token = call.query.get("access_token")
        if not token:
            return self.reject(call, "no token", 200, _err(41001, "access_token missing"))
        if token != self.token or token in self.revoked:
            return self.reject(
                call, "token", 200, _err(40001, "invalid credential, access_token is invalid or not latest")
            )
        if time.time() >= self.token_expires:
            return self.reject(call, "expired", 200, _err(42001, "access_token expired"))
        try:
            body = call.json()
        except ValueError:
            return self.reject(call, "not JSON", 200, _err(47001, "data format error"))
        touser = body.get("touser")
        if not isinstance(touser, str) or not touser:
            return self.reject(call, "touser", 200, _err(40003, "invalid openid"))
        template = self.templates.get(body.get("template_id"))
        if template is None:
            return self.reject(call, "template", 200, _err(40037, "invalid template_id"))
        data = body.get("data")
        if not isinstance(data, dict):
            return self.reject(call, "data", 200, _err(47003, "argument invalid! data is empty"))
        for keyword in template:
            item = data.get(keyword)
            if not isinstance(item, dict) or not isinstance(item.get("value"), str) or not item["value"]:
                return self.reject(
                    call, f"data.{keyword}", 200, _err(47003, f"argument invalid! data.{keyword}.value empty")
                )
        url = body.get("url")
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            return self.reject(call, "url", 200, _err(47003, "argument invalid! url invalid"))
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        if touser in self.unsubscribed:
            return web.json_response(_err(43004, "require subscribe"))
        if touser not in self.followers:
            return web.json_response(_err(40003, "invalid openid"))
        key = (touser, str(body.get("client_msg_id") or ""))
        seen = self._client_msg_ids.get(key)
        if key[1] and seen and time.time() - seen[0] < 600:
            return web.json_response({"errcode": 0, "errmsg": "ok", "msgid": seen[1]})
        self._msgid += 1
        if key[1]:
            self._client_msg_ids[key] = (time.time(), self._msgid)
        self.sent.append(body)
        return web.json_response({"errcode": 0, "errmsg": "ok", "msgid": self._msgid})

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        answers = {
            "rate_limited": _err(45011, "api minute-quota reach limit  mustslower  retry next minute"),
            "quota": _err(45009, "reach max api daily quota limit"),
            "auth": _err(48001, "api unauthorized"),
            "invalid_recipient": _err(43004, "require subscribe"),
            "server_error": _err(-1, "system error"),
        }
        return web.json_response(answers[kind])
