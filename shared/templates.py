"""Message templates: the model, the checks made when one is saved, and sandboxed rendering.

A template holds **variants**: one per channel and locale (``email`` + ``zh-CN``, ``sms`` +
``default``, ...). Seed 004's ``subject``/``content`` are the variant of the template's own type
in the ``default`` locale. A send picks the variant of its channel whose locale is the first
found in the chain ``zh-Hant-TW → zh-Hant → zh → default``.

Rendering uses Jinja2's :class:`~jinja2.sandbox.SandboxedEnvironment` with ``StrictUndefined``
and no globals but a bounded ``range``: HTML bodies are autoescaped; subjects, text, markdown and
JSON bodies are not (JSON bodies should use ``|tojson``). Checks made when a template is saved,
so that a bad one never reaches a send:

- every field parses (2004 naming the field and line);
- no attribute or item whose name starts with ``_`` (``__class__``, ``_secret``), the start of
  every known sandbox escape (2004);
- the variables the template reads are among the declared ``variables`` (2004 naming them);
  undeclared names such as ``config`` or ``cycler`` are therefore refused too;
- each field is at most ``HERALD_TEMPLATE_MAX_BYTES`` (default :data:`MAX_FIELD_BYTES`; 1001).

Rendering also bounds the work: every loop step, call and filter counts towards
:data:`MAX_ITERATIONS` per render (loops are rewritten at parse time to iterate through a
counter), ``*``/``**``/``%``, widths and format strings cannot build huge values, lists and dicts
cannot be changed (the immutable sandbox), and each field's output is at most
:data:`MAX_OUTPUT_BYTES`. ``~`` and ``+`` results are
bounded too. A worker process with resource limits would be the complete answer (see the note
in docs/decisions.md).
"""

from __future__ import annotations

import contextvars
import operator
import re
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import ErrorCode

MAX_FIELD_BYTES = 64 * 1024
MAX_OUTPUT_BYTES = 512 * 1024
MAX_ITERATIONS = 10_000
MAX_VARIANTS = 50

Format = Literal["html", "text", "markdown", "json"]
# The field of a variant that is HTML (autoescaped) when the variant's format is html.
_FIELDS = ("subject", "content", "text_content")


class Variant(BaseModel):
    """One channel's (and locale's) version of a template."""

    model_config = ConfigDict(extra="forbid")

    channel: str = Field(min_length=1, max_length=20, pattern=r"^[a-z][a-z0-9_]*$")
    locale: str = Field(default="default", max_length=35, pattern=r"^(default|[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*)$")
    format: Format = "html"
    subject: str | None = None
    content: str = Field(min_length=1)
    text_content: str | None = None  # email: the plain-text alternative of an HTML body


class TemplateVersion(BaseModel):
    """One version of a template, as stored in history and on the config topic."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["notify.config.template.v1"] = Field(default="notify.config.template.v1", alias="schema")
    template_id: int
    tenant_id: str
    template_name: str
    template_type: str
    version: int = Field(ge=1)
    variables: list[str] = Field(default_factory=list)
    variants: list[Variant] = Field(min_length=1, max_length=MAX_VARIANTS)


class TemplateHead(BaseModel):
    """A template's current version, name and whether it is deleted (config topic)."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["notify.config.template-head.v1"] = Field(default="notify.config.template-head.v1", alias="schema")
    template_id: int
    tenant_id: str
    template_name: str
    version: int = Field(ge=1)
    is_active: bool = True
    deleted: bool = False
    # Grows with every change of the template: a reader keeps the head with the highest.
    revision: int = 0


def version_key(tenant_id: str, template_id: int, version: int) -> bytes:
    return f"template:{tenant_id}:{template_id}:{version}".encode()


def head_key(tenant_id: str, template_id: int) -> bytes:
    return f"template:{tenant_id}:{template_id}".encode()


class TemplateProblem(Exception):
    """A template or a render refused: ``code`` (2004, 1001, 2003), the field it concerns."""

    def __init__(self, code: ErrorCode, message: str, field: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


# --- the sandbox -------------------------------------------------------------------------

_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("template_budget")


def _spend(n: int) -> None:
    budget = _budget.get(None)
    if budget is None:
        return
    budget[0] -= n
    if budget[0] < 0:
        raise SecurityError(f"template does more than {MAX_ITERATIONS} iterations")


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_ITERATIONS:
        raise SecurityError(f"range of more than {MAX_ITERATIONS} items")
    return r


def _sized(value: Any) -> Any:
    """The result of a ``~``: refused when too large. (Checked after the join: one join of two
    values under the limit is at most twice the limit.)"""
    if isinstance(value, str) and len(value) > MAX_OUTPUT_BYTES:
        raise SecurityError("value too large")
    return value


def _counted(iterable: Any) -> Any:
    """Every loop iterates through this (see :meth:`_Sandbox._parse`): each step is charged."""
    for item in iterable:
        _spend(1)
        yield item


_LOOP_GLOBAL = "herald_loop"
_CONCAT_GLOBAL = "herald_concat"


class _Bounds(NodeTransformer):
    """Rewrites a parsed template so that every loop iterates through :func:`_counted` and every
    ``~`` goes through a size check (the sandbox has no hook for either)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(_LOOP_GLOBAL, "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name(_CONCAT_GLOBAL, "load"), [node], [], None, None, lineno=node.lineno)


# A width or precision in a format string ("%0100000000d", "{:>100000000}") builds that much.
_WIDE_FORMAT = re.compile(r"\d{6,}")


def _too_big(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_OUTPUT_BYTES


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with work bounds: loops and calls charge the render's budget, repetition,
    powers, widths and format strings are bounded, lists and dicts cannot be changed."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Bounds().visit(super()._parse(source, name, filename))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _spend(1)
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise SecurityError("argument too large")
        if any(isinstance(a, str) and _WIDE_FORMAT.search(a) for a in args) and getattr(__obj, "__name__", "") in (
            "format",
            "format_map",
        ):
            raise SecurityError("format width too large")
        return super().call(__context, __obj, *args, **kwargs)

    def format_string(self, s: str, args: Any, kwargs: Any, format_func: Any = None) -> str:
        if _WIDE_FORMAT.search(s):
            raise SecurityError("format width too large")
        return super().format_string(s, args, kwargs, format_func)

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "+":
            if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
                if len(left) + len(right) > MAX_OUTPUT_BYTES:
                    raise SecurityError("value too large")
            return operator.add(left, right)
        if operator_name == "%":
            if isinstance(left, str) and _WIDE_FORMAT.search(left):
                raise SecurityError("format width too large")
            return operator.mod(left, right)
        if operator_name == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right > 0 and right * abs(left).bit_length() > 4096:
                    raise SecurityError("power too large")
            elif isinstance(right, int | float) and abs(right) > 4096:
                raise SecurityError("exponent too large")
            return operator.pow(left, right)
        # Repeating a string or list builds a value as large as the factor asks.
        if isinstance(left, str | list | tuple) or isinstance(right, str | list | tuple):
            count = right if isinstance(left, str | list | tuple) else left
            size = len(left if isinstance(left, str | list | tuple) else right)
            if isinstance(count, int) and size * count > MAX_OUTPUT_BYTES:
                raise SecurityError("repetition too large")
        return operator.mul(left, right)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return not attr.startswith("_") and super().is_safe_attribute(obj, attr, value)


def _environment(autoescape: bool) -> _Sandbox:
    env = _Sandbox(undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=True)
    env.globals.clear()  # no cycler, joiner, lipsum, namespace, dict: only what is declared
    env.globals["range"] = _range
    env.globals[_LOOP_GLOBAL] = _counted
    env.globals[_CONCAT_GLOBAL] = _sized
    for name, fn in list(env.filters.items()):
        env.filters[name] = _bounded_filter(fn)
    return env


def _bounded_filter(fn: Any) -> Any:
    """Filters are called directly, not through the sandbox's ``call``: the same bounds."""

    def bounded(*args: Any, **kwargs: Any) -> Any:
        _spend(1)
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise SecurityError("argument too large")
        if fn.__name__ in ("do_format", "sync_do_format") or fn.__name__.endswith("format"):
            if any(isinstance(a, str) and _WIDE_FORMAT.search(a) for a in args):
                raise SecurityError("format width too large")
        result = fn(*args, **kwargs)
        if isinstance(result, str) and len(result) > MAX_OUTPUT_BYTES:
            raise SecurityError("filter result too large")
        return result

    for attr in ("jinja_pass_arg",):  # pass_context / pass_environment markers
        if hasattr(fn, attr):
            setattr(bounded, attr, getattr(fn, attr))
    return bounded


_HTML = _environment(True)
_PLAIN = _environment(False)
_ALLOWED_GLOBALS = frozenset({"range", "loop", _LOOP_GLOBAL, _CONCAT_GLOBAL})


def _env_for(variant: Variant, field: str) -> _Sandbox:
    return _HTML if variant.format == "html" and field == "content" else _PLAIN


def variant_fields(variant: Variant) -> list[tuple[str, str]]:
    return [(f, getattr(variant, f)) for f in _FIELDS if getattr(variant, f) is not None]


# --- checks when saving ------------------------------------------------------------------


def check(
    variables: list[str] | None,
    variants: list[Variant],
    *,
    where: str = "variants",
    max_bytes: int = MAX_FIELD_BYTES,
) -> list[str]:
    """Refuse a template that could not render safely; answers the variables it uses (the
    declared ones when given, which must include every one used)."""
    seen: set[tuple[str, str]] = set()
    used: set[str] = set()
    for i, variant in enumerate(variants):
        if (variant.channel, variant.locale) in seen:
            raise TemplateProblem(
                ErrorCode.INVALID_PARAMS, f"two variants for {variant.channel}/{variant.locale}", f"{where}.{i}"
            )
        seen.add((variant.channel, variant.locale))
        if variant.channel == "email" and not variant.subject:
            raise TemplateProblem(ErrorCode.INVALID_PARAMS, "an email variant needs a subject", f"{where}.{i}.subject")
        for name, source in variant_fields(variant):
            field = f"{where}.{i}.{name}"
            if len(source.encode()) > max_bytes:
                raise TemplateProblem(ErrorCode.INVALID_PARAMS, f"at most {max_bytes} bytes", field)
            try:
                tree = _env_for(variant, name).parse(source)
            except TemplateSyntaxError as exc:
                raise TemplateProblem(
                    ErrorCode.TEMPLATE_RENDER_FAILED, f"syntax error on line {exc.lineno}: {exc.message}", field
                ) from None
            _refuse_private_access(tree, field)
            used |= meta.find_undeclared_variables(tree) - _ALLOWED_GLOBALS
    if variables is None:
        return sorted(used)
    undeclared = sorted(used - set(variables))
    if undeclared:
        raise TemplateProblem(
            ErrorCode.TEMPLATE_RENDER_FAILED,
            f"uses variables not declared in variables: {', '.join(undeclared)}",
            "variables",
        )
    return list(dict.fromkeys(variables))


def _refuse_private_access(tree: nodes.Template, field: str) -> None:
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        name = node.attr if isinstance(node, nodes.Getattr) else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            name = node.arg.value
        if name is not None and name.startswith("_"):
            raise TemplateProblem(
                ErrorCode.TEMPLATE_RENDER_FAILED, f"access to '{name}' is not allowed in a template", field
            )


# --- rendering ---------------------------------------------------------------------------


def locale_chain(locale: str | None) -> list[str]:
    """``zh-Hant-TW`` → ``zh-Hant-TW``, ``zh-Hant``, ``zh``, ``default`` (compared case-blind)."""
    chain: list[str] = []
    if locale and locale != "default":
        parts = locale.split("-")
        chain = ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]
    return [*chain, "default"]


def pick_variant(version: TemplateVersion, channel: str, locale: str | None) -> Variant:
    of_channel = {v.locale.lower(): v for v in version.variants if v.channel == channel}
    if not of_channel:
        raise TemplateProblem(
            ErrorCode.TEMPLATE_NOT_FOUND,
            f"template {version.template_id} has no variant for channel {channel}",
            "template_id",
        )
    for candidate in locale_chain(locale):
        if candidate.lower() in of_channel:
            return of_channel[candidate.lower()]
    # No default for this channel: the variant the template lists first for it.
    return next(v for v in version.variants if v.channel == channel)


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str | None
    content: str
    text_content: str | None
    format: Format
    locale: str


class Renderer:
    """Compiles each (template, version, variant, field) once and renders it in the sandbox."""

    def __init__(self, max_cached: int = 4096) -> None:
        self._compiled: dict[tuple, Any] = {}
        self._max = max_cached

    def render(self, version: TemplateVersion, channel: str, locale: str | None, variables: dict[str, Any]) -> Rendered:
        variant = pick_variant(version, channel, locale)
        out: dict[str, str | None] = {f: None for f in _FIELDS}
        token = _budget.set([MAX_ITERATIONS])
        try:
            for name, _source in variant_fields(variant):
                text = self._compile(version, variant, name).render(variables)
                if len(text.encode()) > MAX_OUTPUT_BYTES:
                    raise TemplateProblem(
                        ErrorCode.TEMPLATE_RENDER_FAILED, f"renders more than {MAX_OUTPUT_BYTES} bytes", name
                    )
                out[name] = text.strip() if name == "subject" else text
        except UndefinedError as exc:
            raise TemplateProblem(
                ErrorCode.TEMPLATE_RENDER_FAILED, f"missing template variable: {_undefined_name(exc)}", "template_vars"
            ) from None
        except SecurityError as exc:
            raise TemplateProblem(ErrorCode.TEMPLATE_RENDER_FAILED, f"refused: {exc}", "template_vars") from None
        except (RecursionError, MemoryError):
            raise TemplateProblem(
                ErrorCode.TEMPLATE_RENDER_FAILED,
                "refused: the template recurses or grows without bound",
                "template_vars",
            ) from None
        except (TemplateError, TypeError, ValueError, ArithmeticError, AttributeError) as exc:
            raise TemplateProblem(
                ErrorCode.TEMPLATE_RENDER_FAILED, f"rendering failed: {exc}"[:300], "template_vars"
            ) from None
        finally:
            _budget.reset(token)
        subject = out["subject"]
        if subject is not None and any(c in subject for c in "\r\n\x00"):
            subject = " ".join(subject.split())  # a variable must not add header lines
        return Rendered(subject, out["content"] or "", out["text_content"], variant.format, variant.locale)

    def _compile(self, version: TemplateVersion, variant: Variant, name: str) -> Any:
        key = (version.tenant_id, version.template_id, version.version, variant.channel, variant.locale, name)
        compiled = self._compiled.get(key)
        if compiled is None:
            if len(self._compiled) >= self._max:
                self._compiled.clear()
            compiled = _env_for(variant, name).from_string(getattr(variant, name))
            self._compiled[key] = compiled
        return compiled

    @property
    def compiled(self) -> int:
        return len(self._compiled)


def _undefined_name(exc: UndefinedError) -> str:
    # StrictUndefined's messages: "'code' is undefined", "'dict object' has no attribute 'x'".
    message = str(exc.message or exc)
    if message.endswith(" is undefined"):
        return message[: -len(" is undefined")].strip("'")
    return message
