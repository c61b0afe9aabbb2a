"""Microsoft Teams incoming webhooks, both kinds a channel can have:

- a Workflows trigger (Power Automate "When a Teams webhook request is received"):
  ``POST /workflows/{id}/triggers/manual/paths/invoke?api-version=1&sp=/triggers/manual/run&sv=1.0&sig=...``;
  the ``sig`` query parameter is the URL's shared access signature (401
  ``DirectApiInvalidAuthorizationSignature`` when it does not match, 404 ``WorkflowNotFound``
  for an unknown flow); accepted requests are answered 202 with no body. Errors are JSON
  ``{"error": {"code", "message"}}`` (Azure Logic Apps' format), 429 with Retry-After.
- a legacy Office 365 connector: ``POST /webhookb2/{group}@{tenant}/IncomingWebhook/{id}/{owner}``
  answered 200 ``1``; a failed delivery is answered in text, "Webhook message delivery failed
  with error: Microsoft Teams endpoint returned HTTP error 429 with ContextId ..." -- with
  status 200 for throttling, as the docs warn ("connectors do not throw 429s").

Both check the body: a ``message`` whose attachments are Adaptive Cards
(``application/vnd.microsoft.card.adaptive``, type AdaptiveCard, a version, known element and
action types with their required properties, https URLs for Action.OpenUrl) of at most 28 KB
(413 beyond, the documented message size limit).
"""

from __future__ import annotations

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

_ELEMENTS = {"TextBlock": ("text",), "FactSet": ("facts",), "Image": ("url",), "ColumnSet": (), "Container": ("items",),
             "RichTextBlock": ("inlines",)}  # fmt: skip
_ACTIONS = {"Action.OpenUrl": ("url",), "Action.ShowCard": ("card",), "Action.ToggleVisibility": ()}
MAX_BYTES = 28 * 1024


def _delivery_failed(inner: int) -> str:
    return (
        "Webhook message delivery failed with error: Microsoft Teams endpoint returned HTTP error "
        f"{inner} with ContextId tcid=0,server=msgapi-production-eus-azsc2-4-170,cv=deadbeef.0.."
    )


def card_problems(body: object) -> list[str]:
    """Why Teams would refuse ``body`` as an Adaptive Card message (empty when it accepts it)."""
    if not isinstance(body, dict) or body.get("type") != "message":
        return ["type must be message"]
    attachments = body.get("attachments")
    if not isinstance(attachments, list) or not attachments:
        return ["attachments missing"]
    problems = []
    for i, attachment in enumerate(attachments):
        if attachment.get("contentType") != "application/vnd.microsoft.card.adaptive":
            problems.append(f"attachments[{i}].contentType")
            continue
        card = attachment.get("content")
        if not isinstance(card, dict) or card.get("type") != "AdaptiveCard":
            problems.append(f"attachments[{i}].content.type must be AdaptiveCard")
            continue
        if not isinstance(card.get("version"), str):
            problems.append(f"attachments[{i}].content.version")
        elements = card.get("body")
        if not isinstance(elements, list) or not elements:
            problems.append(f"attachments[{i}].content.body empty")
            continue
        for j, element in enumerate(elements):
            kind = element.get("type")
            if kind not in _ELEMENTS:
                problems.append(f"body[{j}]: unknown element {kind}")
                continue
            for required in _ELEMENTS[kind]:
                if not element.get(required):
                    problems.append(f"body[{j}].{required} missing")
            if kind == "FactSet":
                for fact in element.get("facts") or []:
                    if not isinstance(fact.get("title"), str) or not isinstance(fact.get("value"), str):
                        problems.append(f"body[{j}]: a fact needs title and value")
        for j, action in enumerate(card.get("actions") or []):
            kind = action.get("type")
            if kind not in _ACTIONS:
                problems.append(f"actions[{j}]: unknown action {kind}")
                continue
            for required in _ACTIONS[kind]:
                if not action.get(required):
                    problems.append(f"actions[{j}].{required} missing")
            if kind == "Action.OpenUrl" and not str(action.get("url", "")).startswith(("https://", "http://")):
                problems.append(f"actions[{j}].url not a URL")
    return problems


class TeamsWebhookApi(Emulator):
    name = "teams"
    routes = [
        ("POST", "/workflows/{flow}/triggers/manual/paths/invoke", "workflow"),
        ("POST", "/webhookb2/{hook:.+}", "connector_hook"),
    ]

    def __init__(
        self,
        flow: str = "3f2b9a41c5d84e0f9b7c1a2d3e4f5a6b",
        sig: str = "Xq3dN0aB-sig_value-12345678901234567890",
        connector: str = "aaaa1111-bbbb@cccc2222-dddd/IncomingWebhook/0123456789abcdef/eeee3333-ffff",
    ) -> None:
        super().__init__()
        self.flow = flow
        self.sig = sig
        self.connector = connector
        self.cards: list[dict] = []  # the accepted messages

    @property
    def workflow_url(self) -> str:
        return (
            f"{self.url}/workflows/{self.flow}/triggers/manual/paths/invoke"
            f"?api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={self.sig}"
        )

    @property
    def connector_url(self) -> str:
        return f"{self.url}/webhookb2/{self.connector}"

    def _json_error(self, call: Call, status: int, code: str, message: str) -> web.StreamResponse:
        return self.reject(call, f"{code}: {message}", status, {"error": {"code": code, "message": message}})

    async def _body(self, call: Call) -> tuple[dict | None, str]:
        if len(call.body) > MAX_BYTES:
            return None, "too large"
        try:
            return call.json(), ""
        except ValueError:
            return None, "not JSON"

    async def workflow(self, request: web.Request, call: Call) -> web.StreamResponse:
        if request.match_info["flow"] != self.flow:
            return self._json_error(
                call, 404, "WorkflowNotFound", f"The workflow '{request.match_info['flow']}' could not be found."
            )
        if (
            call.query.get("sp") != "/triggers/manual/run"
            or call.query.get("sv") != "1.0"
            or "api-version" not in call.query
        ):
            return self._json_error(call, 401, "DirectApiAuthorizationRequired", "The request must be authenticated.")
        if call.query.get("sig") != self.sig:
            return self._json_error(
                call,
                401,
                "DirectApiInvalidAuthorizationSignature",
                "The provided authorization signature for the request is invalid.",
            )
        body, why = await self._body(call)
        if why == "too large":
            return self._json_error(call, 413, "RequestEntityTooLarge", "The request content is larger than 28 KB.")
        if body is None or call.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return self._json_error(call, 400, "InvalidRequestContent", "The request content is not valid JSON.")
        problems = card_problems(body)
        if problems:
            return self._json_error(call, 400, "TriggerInputSchemaMismatch", "; ".join(problems))
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        self.cards.append(body)
        return web.Response(status=202)

    async def connector_hook(self, request: web.Request, call: Call) -> web.StreamResponse:
        if request.match_info["hook"] != self.connector:
            call.problems.append("unknown connector URL")
            return web.Response(status=404, text="")
        body, why = await self._body(call)
        if why == "too large":
            call.problems.append("too large")
            return web.Response(status=413, text=_delivery_failed(413))
        if body is None:
            call.problems.append("not JSON")
            return web.Response(status=400, text="Bad payload received by generic incoming webhook.")
        problems = card_problems(body) if "attachments" in body else ([] if body.get("text") else ["no text"])
        if problems:
            call.problems.extend(problems)
            return web.Response(status=400, text="Summary or Text is required.")
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        self.cards.append(body)
        return web.Response(status=200, text="1")

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        connector = call.path.startswith("/webhookb2/")
        if kind == "invalid_recipient":
            # Only a connector tells synchronously that the channel is gone (a workflow posts
            # after its 202): answered the connector's way on both routes.
            return web.Response(status=200, text=_delivery_failed(404))
        if kind in ("rate_limited", "quota"):  # Teams has no quota beyond its rate limits
            if connector:
                return web.Response(status=200, text=_delivery_failed(429))
            return web.json_response(
                {"error": {"code": "WorkflowTriggerIsThrottled", "message": "The workflow trigger is throttled."}},
                status=429,
                headers={"Retry-After": "9"},
            )
        if kind == "auth":
            if connector:
                return web.Response(status=404, text="")
            return web.json_response(
                {"error": {"code": "DirectApiInvalidAuthorizationSignature", "message": "signature invalid"}},
                status=401,
            )
        if connector:
            return web.Response(status=200, text=_delivery_failed(500))
        return web.json_response({"error": {"code": "ServiceUnavailable", "message": "try later"}}, status=503)
