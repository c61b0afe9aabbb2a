"""Tencent Cloud SMS (``SendSms`` 2021-01-11, sms.tencentcloudapi.com) as documented:

- https://cloud.tencent.com/document/api/382/55981 (SendSms: parameters, answer)
- https://cloud.tencent.com/document/api/213/30654 (signature v3, TC3-HMAC-SHA256)
- https://cloud.tencent.com/document/api/382/52075 (common and SMS error codes)

``POST /`` with a JSON body, ``X-TC-Action/Timestamp/Version/Region`` headers and a
``TC3-HMAC-SHA256`` ``Authorization`` re-checked here from the documentation (not with the
plugin's code). Every answer is HTTP 200: ``{"Response": {"Error": {...}, "RequestId"}}`` for a
refused request, ``SendStatusSet`` with a ``Code`` per number otherwise. A timestamp more than
five minutes off is ``AuthFailure.SignatureExpire``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import time
import uuid
from datetime import UTC, datetime

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

WINDOW_S = 300
_AUTH = re.compile(
    r"TC3-HMAC-SHA256 Credential=(?P<id>[^/]+)/(?P<date>\d{4}-\d{2}-\d{2})/(?P<service>[a-z0-9]+)/tc3_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;\-]+), Signature=(?P<sig>[0-9a-f]{64})"
)
_E164 = re.compile(r"\+[1-9]\d{6,14}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


class TencentSmsEmulator(Emulator):
    name = "tencent"
    routes = [("POST", "/", "api")]

    def __init__(
        self,
        secret_id: str = "AKIDHeraldTestSecretId",
        secret_key: str = "herald-test-secret-key",
        *,
        sdk_app_id: str = "1400006666",
        sign_names: set[str] | None = None,
        templates: set[str] | None = None,
    ) -> None:
        super().__init__()
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.sdk_app_id = sdk_app_id
        self.sign_names = sign_names
        self.templates = templates
        self._serial = itertools.count(1)

    # --- answers ----------------------------------------------------------------------------

    @staticmethod
    def _error(code: str, message: str) -> web.Response:
        error = {"Code": code, "Message": message}
        return web.json_response({"Response": {"Error": error, "RequestId": str(uuid.uuid4())}})

    def _reject(self, call: Call, code: str, message: str) -> web.Response:
        call.problems.append(f"{code}: {message}")
        return self._error(code, message)

    def _status(self, number: str, code: str, message: str, session: str = "") -> web.Response:
        ok = code == "Ok"
        status = {
            "SerialNo": f"5000:10457106691570536578{next(self._serial):05d}" if ok else "",
            "PhoneNumber": number,
            "Fee": 1 if ok else 0,
            "SessionContext": session,
            "Code": code,
            "Message": message,
            "IsoCode": "CN" if number.startswith("+86") else "US" if number.startswith("+1") else "",
        }
        return web.json_response({"Response": {"SendStatusSet": [status], "RequestId": str(uuid.uuid4())}})

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        number = (call.json().get("PhoneNumberSet") or [""])[0]
        if kind == "rate_limited":
            return self._status(number, "LimitExceeded.PhoneNumberThirtySecondLimit",
                                "the number of SMS messages sent from a single mobile number within 30 seconds "
                                "exceeds the upper limit")  # fmt: skip
        if kind == "invalid_recipient":
            return self._status(number, "InvalidParameterValue.IncorrectPhoneNumber", "incorrect number format")
        if kind == "auth":
            why = "The SecretId is not found, please ensure that your SecretId is correct."
            return self._error("AuthFailure.SecretIdNotFound", why)
        if kind == "quota":
            why = "The package balance is insufficient."
            return self._error("FailedOperation.InsufficientBalanceInSmsPackage", why)
        return self._error("InternalError", "An internal error has occurred. Retry your request.")

    # --- the endpoint -----------------------------------------------------------------------

    def _expected_signature(self, call: Call, stamp: int, signed: list[str]) -> str:
        # Canonical request from what arrived: method, URI, query, the signed headers (names and
        # values lower-cased, trimmed, sorted), the signed header list, SHA-256 of the body.
        canonical_headers = "".join(f"{name}:{call.headers.get(name, '').strip().lower()}\n" for name in signed)
        query = "&".join(f"{k}={v}" for k, v in sorted(call.query.items()))
        canonical = f"POST\n{call.path}\n{query}\n{canonical_headers}\n{';'.join(signed)}\n{_sha256(call.body)}"
        date = datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d")
        to_sign = f"TC3-HMAC-SHA256\n{stamp}\n{date}/sms/tc3_request\n{_sha256(canonical.encode())}"
        key = _mac(_mac(_mac(("TC3" + self.secret_key).encode(), date), "sms"), "tc3_request")
        return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()

    async def api(self, request: web.Request, call: Call) -> web.StreamResponse:
        h = call.headers
        if not h.get("content-type", "").lower().startswith("application/json"):
            return self._reject(call, "InvalidParameter", "Content-Type must be application/json")
        for name in ("authorization", "x-tc-action", "x-tc-timestamp", "x-tc-version"):
            if not h.get(name):
                return self._reject(call, "MissingParameter", f"missing header {name}")
        if h["x-tc-action"] != "SendSms":
            return self._reject(call, "InvalidAction", "The requested action does not exist.")
        if h["x-tc-version"] != "2021-01-11":
            return self._reject(call, "NoSuchVersion", "The API version does not exist.")
        if not h.get("x-tc-region"):
            return self._reject(call, "MissingParameter", "The Region parameter is required.")
        auth = _AUTH.fullmatch(h["authorization"])
        if auth is None:
            return self._reject(call, "AuthFailure.InvalidAuthorization", "Authorization header is malformed.")
        try:
            stamp = int(h["x-tc-timestamp"])
        except ValueError:
            return self._reject(call, "InvalidParameter", "X-TC-Timestamp is not a number.")
        if abs(time.time() - stamp) > WINDOW_S:
            return self._reject(call, "AuthFailure.SignatureExpire", "Signature expired, Timestamp is too far off.")
        if auth["id"] != self.secret_id:
            return self._reject(call, "AuthFailure.SecretIdNotFound", "The SecretId is not found.")
        signed = auth["signed"].split(";")
        date = datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d")
        if (
            auth["service"] != "sms"
            or auth["date"] != date
            or signed != sorted(signed)
            or not {"content-type", "host"} <= set(signed)
            or any(name not in h for name in signed)
        ):
            return self._reject(call, "AuthFailure.SignatureFailure", "credential scope or signed headers invalid")
        if not hmac.compare_digest(auth["sig"], self._expected_signature(call, stamp, signed)):
            return self._reject(call, "AuthFailure.SignatureFailure",
                                "The provided credentials could not be validated. Please check your signature is "
                                "correct.")  # fmt: skip
        try:
            body = json.loads(call.body)
        except ValueError:
            return self._reject(call, "FailedOperation.JsonParseFail", "request body is not JSON")
        if not isinstance(body, dict):
            return self._reject(call, "FailedOperation.JsonParseFail", "request body is not an object")
        numbers, app_id, template = body.get("PhoneNumberSet"), body.get("SmsSdkAppId"), body.get("TemplateId")
        if not numbers or not app_id or not template:
            return self._reject(call, "MissingParameter", "PhoneNumberSet, SmsSdkAppId and TemplateId are required")
        if not isinstance(numbers, list) or len(numbers) > 200:
            return self._reject(call, "LimitExceeded.PhoneNumberCountLimit", "too many numbers")
        if app_id != self.sdk_app_id:
            return self._reject(call, "InvalidParameterValue.SdkAppIdNotExist", "SdkAppId does not exist.")
        if self.templates is not None and template not in self.templates:
            return self._reject(call, "FailedOperation.TemplateIncorrectOrUnapproved", "template unapproved")
        sign_name = body.get("SignName")
        if any(str(n).startswith("+86") for n in numbers) and not sign_name:
            return self._reject(call, "MissingParameter", "SignName is required for Chinese mainland numbers")
        if sign_name and self.sign_names is not None and sign_name not in self.sign_names:
            return self._reject(call, "FailedOperation.SignatureIncorrectOrUnapproved", "signature unapproved")
        params = body.get("TemplateParamSet", [])
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            return self._reject(call, "InvalidParameterValue.TemplateParameterFormatError", "params must be strings")

        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        number = str(numbers[0])
        if not _E164.fullmatch(number):
            return self._status(number, "InvalidParameterValue.IncorrectPhoneNumber", "incorrect number format")
        return self._status(number, "Ok", "send success", str(body.get("SessionContext", "")))
