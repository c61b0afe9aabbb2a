"""Aliyun SMS (Dysmsapi ``SendSms``, 2017-05-25, RPC style) as documented:

- https://help.aliyun.com/en/sms/developer-reference/api-dysmsapi-2017-05-25-sendsms
- https://help.aliyun.com/document_detail/25490.htm (V2 RPC request syntax and signature)
- https://help.aliyun.com/zh/sms/developer-reference/api-error-codes

``GET`` or ``POST /`` (form body), every parameter signed with HMAC-SHA1 over
``METHOD&%2F&percentEncode(sorted, encoded query)`` keyed by ``AccessKeySecret + "&"``. The
check below is written from the documentation, independently of the plugin. Errors answer
``{"RequestId", "HostId", "Code", "Message", "Recommend"}``: signature and key errors with HTTP
400/404, business errors (``isv.*``) with HTTP 200.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

HOST_ID = "dysmsapi.aliyuncs.com"
TIMESTAMP_WINDOW_S = 31 * 60  # "有效期为31分钟" (V2 RPC common parameters)
REQUIRED = (
    "AccessKeyId",
    "Action",
    "SignatureMethod",
    "SignatureNonce",
    "SignatureVersion",
    "Timestamp",
    "Version",
    "Signature",
    "PhoneNumbers",
    "SignName",
    "TemplateCode",
)
# "国内短信：+/+86/0086/86 或无任何前缀的 11 位手机号码；国际/港澳台消息：国际区号+号码"
_MAINLAND = re.compile(r"(?:\+|\+86|0086|86)?(1\d{10})")
_INTERNATIONAL = re.compile(r"[1-9]\d{6,14}")


def _rfc3986(value: str) -> str:
    # The documented recipe: URL-encode (UTF-8), then "+" -> "%20", "*" -> "%2A", "%7E" -> "~".
    return quote(value, safe="").replace("+", "%20").replace("*", "%2A").replace("%7E", "~")


class AliyunSmsEmulator(Emulator):
    name = "aliyun"
    routes = [("POST", "/", "send_sms"), ("GET", "/", "send_sms")]

    def __init__(
        self,
        access_key_id: str = "LTAI5tHeraldTestKey",
        access_key_secret: str = "herald-test-secret",
        *,
        sign_names: set[str] | None = None,
        template_codes: set[str] | None = None,
    ) -> None:
        super().__init__()
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.sign_names = sign_names  # None: any signature is approved
        self.template_codes = template_codes  # None: any template is approved
        self.nonces: set[str] = set()
        self._biz = itertools.count(1)

    # --- answers ----------------------------------------------------------------------------

    @staticmethod
    def _error(code: str, message: str, status: int = 200) -> web.Response:
        body = {
            "RequestId": str(uuid.uuid4()).upper(),
            "HostId": HOST_ID,
            "Code": code,
            "Message": message,
            "Recommend": f"https://api.aliyun.com/troubleshoot?q={code}",
        }
        return web.json_response(body, status=status)

    def _reject(self, call: Call, code: str, message: str, status: int) -> web.Response:
        call.problems.append(f"{code}: {message}")
        return self._error(code, message, status)

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        if kind == "rate_limited":
            return self._error("isv.BUSINESS_LIMIT_CONTROL", "触发分钟级流控Permits:1")
        if kind == "auth":
            return self._error("InvalidAccessKeyId.NotFound", "Specified access key is not found.", 404)
        if kind == "invalid_recipient":
            return self._error("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")
        if kind == "quota":
            return self._error("isv.AMOUNT_NOT_ENOUGH", "账户余额不足")
        return self._error(
            "InternalError", "The request processing has failed due to some unknown error, exception or failure.", 500
        )

    # --- the endpoint -----------------------------------------------------------------------

    def _string_to_sign(self, method: str, params: dict[str, str]) -> str:
        pairs = sorted((k, v) for k, v in params.items() if k != "Signature")
        canonical = "&".join(f"{_rfc3986(k)}={_rfc3986(v)}" for k, v in pairs)
        return f"{method}&{_rfc3986('/')}&{_rfc3986(canonical)}"

    async def send_sms(self, request: web.Request, call: Call) -> web.StreamResponse:
        params = dict(call.query)
        if call.method == "POST":
            content_type = call.headers.get("content-type", "")
            if not content_type.startswith("application/x-www-form-urlencoded"):
                return self._reject(call, "MissingParameter", f"unsupported content type {content_type!r}", 400)
            try:
                params.update(parse_qsl(call.body.decode(), keep_blank_values=True, strict_parsing=bool(call.body)))
            except (UnicodeDecodeError, ValueError):
                return self._reject(call, "InvalidParameter", "the form body does not parse", 400)
        missing = [p for p in REQUIRED if not params.get(p)]
        if missing:
            return self._reject(call, f"MissingParameter.{missing[0]}", f"{missing[0]} is mandatory", 400)
        if params["Action"] != "SendSms":
            return self._reject(call, "InvalidAction.NotFound", "Specified api is not found", 404)
        if params["Version"] != "2017-05-25":
            return self._reject(call, "InvalidVersion", "Specified parameter Version is not valid.", 400)
        if params.get("Format", "XML").upper() != "JSON":
            return self._reject(call, "InvalidParameter", "only Format=JSON answers are emulated", 400)
        if params["SignatureMethod"] != "HMAC-SHA1" or params["SignatureVersion"] != "1.0":
            return self._reject(call, "InvalidParameter", "SignatureMethod/SignatureVersion", 400)
        try:
            stamp = datetime.strptime(params["Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        except ValueError:
            why = "Specified time stamp or date value is not well formatted."
            return self._reject(call, "InvalidTimeStamp.Format", why, 400)
        if abs(time.time() - stamp) > TIMESTAMP_WINDOW_S:
            return self._reject(call, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.", 400)
        if params["AccessKeyId"] != self.access_key_id:
            return self._reject(call, "InvalidAccessKeyId.NotFound", "Specified access key is not found.", 404)
        expected = base64.b64encode(
            hmac.new(
                f"{self.access_key_secret}&".encode(),
                self._string_to_sign(call.method, params).encode(),
                hashlib.sha1,
            ).digest()
        ).decode()
        if not hmac.compare_digest(expected, params["Signature"]):
            return self._reject(
                call,
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation.",
                400,
            )
        if params["SignatureNonce"] in self.nonces:
            return self._reject(call, "SignatureNonceUsed", "Specified signature nonce was used already.", 400)
        self.nonces.add(params["SignatureNonce"])

        # the operation's parameters
        numbers = params["PhoneNumbers"].split(",")
        if len(numbers) > 1000:
            return self._reject(call, "isv.MOBILE_COUNT_OVER_LIMIT", "手机号码数量超过限制", 200)
        for number in numbers:
            if not (_MAINLAND.fullmatch(number) or _INTERNATIONAL.fullmatch(number)):
                return self._reject(call, "isv.MOBILE_NUMBER_ILLEGAL", "非法手机号", 200)
        if self.sign_names is not None and params["SignName"] not in self.sign_names:
            return self._reject(call, "isv.SMS_SIGNATURE_ILLEGAL", "该账号下找不到对应签名", 200)
        if self.template_codes is not None and params["TemplateCode"] not in self.template_codes:
            return self._reject(call, "isv.SMS_TEMPLATE_ILLEGAL", "该账号下找不到对应模板", 200)
        if "TemplateParam" in params:
            try:
                variables = json.loads(params["TemplateParam"])
            except ValueError:
                variables = None
            if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
                return self._reject(call, "isv.INVALID_JSON_PARAM", "JSON参数不合法，只接受字符串值", 200)

        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        return web.json_response(
            {
                "Code": "OK",
                "Message": "OK",
                "BizId": f"9006197469364984{next(self._biz):03d}^0",
                "RequestId": str(uuid.uuid4()).upper(),
            }
        )
