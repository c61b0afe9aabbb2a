"""Template checks and sandboxed rendering (shared/templates.py): no I/O."""

from __future__ import annotations

import time

import pytest

from shared.errors import ErrorCode
from shared.template_store import TemplateStore
from shared.templates import (
    Renderer,
    TemplateHead,
    TemplateProblem,
    TemplateVersion,
    Variant,
    check,
    locale_chain,
)


def version(*variants: Variant, variables: list[str] | None = None, number: int = 1) -> TemplateVersion:
    return TemplateVersion(
        template_id=7,
        tenant_id="default",
        template_name="t",
        template_type="email",
        version=number,
        variables=variables or [],
        variants=list(variants),
    )


def email(content: str, subject: str | None = "Hi {{ name }}", **extra: object) -> Variant:
    return Variant(channel="email", subject=subject, content=content, **extra)


def problem(fn, *args, **kwargs) -> TemplateProblem:
    with pytest.raises(TemplateProblem) as caught:
        fn(*args, **kwargs)
    return caught.value


SSTI = [
    "{{ ''.__class__.__mro__ }}",
    "{{ name.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ name['__class__'] }}",
    "{{ name._private }}",
    "{{ config }}",
    "{{ self.__dict__ }}",
    "{% for x in ().__class__.__base__.__subclasses__() %}{{ x }}{% endfor %}",
]


@pytest.mark.parametrize("payload", SSTI)
def test_injection_payloads_are_refused_when_saved(payload: str) -> None:
    found = problem(check, ["name"], [email(payload)])
    assert found.code is ErrorCode.TEMPLATE_RENDER_FAILED
    assert found.field in ("variants.0.content", "variables")


def test_undeclared_variables_are_named_and_declared_ones_returned() -> None:
    found = problem(check, ["name"], [email("{{ code }} and {{ name }}")])
    assert found.field == "variables" and "code" in found.message and "name" not in found.message.split(":")[1]
    assert check(["name", "code", "unused"], [email("{{ code }}")]) == ["name", "code", "unused"]
    assert check(None, [email("{{ code }}{% for i in items %}{{ i }}{% endfor %}")]) == ["code", "items", "name"]


def test_syntax_errors_size_and_duplicate_variants() -> None:
    assert "line 2" in problem(check, None, [email("ok\n{% if %}")]).message
    assert problem(check, None, [email("x" * (64 * 1024 + 1))]).code is ErrorCode.INVALID_PARAMS
    twice = problem(check, None, [email("a"), email("b")])
    assert twice.code is ErrorCode.INVALID_PARAMS and twice.field == "variants.1"


def test_concatenation_still_escapes_in_html() -> None:
    out = Renderer().render(version(email("<p>{{ a ~ ' & ' ~ b }}</p>", subject="{{ a ~ b }}"), number=77), "email",
                            None, {"a": "<x>", "b": "y"})  # fmt: skip
    assert out.content == "<p>&lt;x&gt; &amp; y</p>" and out.subject == "<x>y"


def test_render_escapes_html_bodies_only_and_runs_if_and_for() -> None:
    tpl = version(
        email(
            "<p>{{ name }}</p>{% if vip %}<b>VIP</b>{% endif %}{% for i in items %}<i>{{ i }}</i>{% endfor %}",
            text_content="{{ name }}",
        ),
        variables=["name", "vip", "items"],
    )
    out = Renderer().render(tpl, "email", None, {"name": "<Tom & Jerry>", "vip": True, "items": [1, 2]})
    assert out.content == "<p>&lt;Tom &amp; Jerry&gt;</p><b>VIP</b><i>1</i><i>2</i>"
    assert out.subject == "Hi <Tom & Jerry>" and out.text_content == "<Tom & Jerry>"


def test_a_missing_variable_is_named() -> None:
    tpl = version(email("{{ code }}"), variables=["name", "code"])
    found = problem(Renderer().render, tpl, "email", None, {"name": "x"})
    assert found.code is ErrorCode.TEMPLATE_RENDER_FAILED and found.message == "missing template variable: code"


def test_huge_range_repetition_and_power_are_refused() -> None:
    renderer = Renderer()
    # (Versions are immutable, so the renderer caches by id and version: one number each here.)
    for number, source in enumerate(
        (
            "{% for i in range(100000000) %}{% endfor %}",
            "{% for i in range(200) %}{% for j in range(200) %}{% endfor %}{% endfor %}",
            "{{ 'x' * 100000000 }}",
            "{{ 10 ** 100000 }}",
        ),
        start=1,
    ):
        found = problem(renderer.render, version(email(source, subject=None), number=number), "email", None, {})
        assert found.code is ErrorCode.TEMPLATE_RENDER_FAILED, source
    small = version(email("{% for i in range(3) %}{{ i }}{% endfor %}", subject=None), number=9)
    ok = renderer.render(small, "email", None, {})
    assert ok.content == "012"


def test_locale_fallback_chain() -> None:
    assert locale_chain("zh-Hant-TW") == ["zh-Hant-TW", "zh-Hant", "zh", "default"]
    tpl = version(
        email("default body", subject="Hello"),
        Variant(channel="email", locale="zh", subject="你好", content="中文"),
        Variant(channel="email", locale="zh-TW", subject="您好", content="繁體"),
        Variant(channel="sms", content="code {{ 1 }}", format="text"),
    )
    r = Renderer()
    assert r.render(tpl, "email", "zh-CN", {}).content == "中文"
    assert r.render(tpl, "email", "zh-tw", {}).content == "繁體"
    assert r.render(tpl, "email", "fr", {}).content == "default body"
    assert r.render(tpl, "sms", "zh-CN", {}).content == "code 1"
    assert problem(r.render, tpl, "im", None, {}).code is ErrorCode.TEMPLATE_NOT_FOUND


def test_the_same_version_renders_the_same_and_is_compiled_once() -> None:
    renderer = Renderer()
    tpl = version(email("<p>{{ name }}</p>"), variables=["name"])
    first = renderer.render(tpl, "email", None, {"name": "a"})
    assert renderer.render(tpl, "email", None, {"name": "a"}) == first
    assert renderer.compiled == 2  # subject and content, once
    # A subject cannot gain header lines from a variable.
    assert renderer.render(tpl, "email", None, {"name": "x\r\nBcc: evil@example.com"}).subject == (
        "Hi x Bcc: evil@example.com"
    )


WORK_BOMBS = [
    "{% set r = range(1000) %}{% for a in r %}{% for b in r %}{% for c in r %}{% endfor %}{% endfor %}{% endfor %}",
    "{% for a in items %}{% for b in items %}{% for c in items %}{% endfor %}{% endfor %}{% endfor %}",
    "{% set l = [1] %}{% for x in l %}{% if l.append(x) %}{% endif %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ ((((9 ** 64) ** 64) ** 64) ** 64) ** 64 }}",
    "{{ '%0100000000d' % 1 }}",
    "{{ '%0100000000d'|format(1) }}",
    "{{ 'x'|center(100000000) }}",
    "{{ 'x'.ljust(100000000) }}",
    "{{ '{:>100000000}'.format(1) }}",
    "{% set s = 'x' * 1000 %}{{ s|replace('x', s)|replace('x', s) }}",
    "{{ range(9000)|join('x' * 100000) }}",
    "{% set s = 'x' * 100000 %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}"
    "{% set s = s ~ s %}{% set s = s ~ s %}{{ s|length }}",
    "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}"
    "{{ f('xx', 35) }}",
    "{% set s = 'x' * 100000 %}{% set s = s + s %}{% set s = s + s %}{% set s = s + s %}{% set s = s + s %}"
    "{% set s = s + s %}{% set s = s + s %}{{ s|length }}",
]


@pytest.mark.parametrize("source", WORK_BOMBS)
def test_templates_that_would_burn_cpu_or_memory_are_refused_quickly(source: str) -> None:
    tpl = version(email(source, subject=None), variables=["items"], number=abs(hash(source)) % 10**6 + 100)
    started = time.monotonic()
    found = problem(Renderer().render, tpl, "email", None, {"items": list(range(1000))})
    assert found.code is ErrorCode.TEMPLATE_RENDER_FAILED
    assert time.monotonic() - started < 5, "refused, but only after burning the time it should have saved"


def test_a_head_published_late_does_not_undo_a_newer_change() -> None:
    store = TemplateStore()
    store.put_version(version(email("<p>v1</p>", subject="s")))
    deleted = TemplateHead(template_id=7, tenant_id="default", template_name="t", version=2, deleted=True, revision=9)
    stale = TemplateHead(template_id=7, tenant_id="default", template_name="t", version=2, revision=8)
    store.apply(deleted.model_dump_json(by_alias=True).encode())
    store.apply(stale.model_dump_json(by_alias=True).encode())  # the PUT before the delete, published after it
    assert store.heads[("default", 7)].deleted and store.head("default", None, "t") is None
    assert problem(store.for_send, "default", 7, None, None).code is ErrorCode.TEMPLATE_NOT_FOUND
    assert store.missing_for_good("default", 7, 1) and not store.missing_for_good("default", 8, 1)
