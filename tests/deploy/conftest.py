"""Tooling of the deployment tests (issue 12): the kustomize build of each overlay, the two
validators, the Dockerfile. How the manifests are validated: tests/deploy/README.md.

Every tool is required: a missing one fails the tests (``make install`` installs them all), it
never skips them."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# The tree holding Dockerfile, .dockerignore and deploy/ (the repository; another tree can be
# checked by pointing HERALD_DEPLOY_TREE at it). The code the manifests name is always REPO's.
TREE = Path(os.environ.get("HERALD_DEPLOY_TREE", REPO)).resolve()
K8S = TREE / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
CRD_DIR = Path(__file__).resolve().parent / "crd"
VENV_BIN = Path(sys.executable).parent

# API groups whose resources the Node validator checks (operators' CRDs); everything else must
# be a Kubernetes kind that kubernetes-validate knows.
CUSTOM_GROUPS = frozenset({"kafka.strimzi.io", "core.strimzi.io", "postgresql.cnpg.io", "monitoring.coreos.com"})


def tool(name: str) -> str:
    """A tool of the venv (the dev extra installs them); fails the test when it is not there."""
    path = VENV_BIN / name
    if not path.exists():
        pytest.fail(f"{path} not found: `make install` installs it (pyproject.toml, dev extra)", pytrace=False)
    return str(path)


def group_of(api_version: str) -> str:
    return api_version.split("/", 1)[0] if "/" in api_version else ""


@dataclass(frozen=True)
class Build:
    env: str
    text: str
    docs: tuple[dict, ...]

    def of_kind(self, *kinds: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") in kinds]

    def listing(self) -> str:
        return "\n".join(f"  {d.get('apiVersion')} {d.get('kind')} {ref(d)}" for d in self.docs)


def ref(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{doc.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


@functools.cache
def build(env: str) -> Build:
    overlay = K8S / "overlays" / env
    if not (overlay / "kustomization.yaml").exists() and not (overlay / "kustomization.yml").exists():
        pytest.fail(f"no overlay {overlay.relative_to(TREE)} (kustomization.yaml)", pytrace=False)
    kubectl = tool("kubectl")
    done = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, cwd=TREE,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {overlay.relative_to(TREE)} failed:\n{done.stderr}", pytrace=False)
    docs = tuple(d for d in yaml.safe_load_all(done.stdout) if d is not None)
    return Build(env, done.stdout, docs)


def npm_ci() -> None:
    """``npm ci`` in tests/deploy/crd when its node_modules is missing or older than the lock
    (``make install`` does the same)."""
    lock, installed = CRD_DIR / "package-lock.json", CRD_DIR / "node_modules" / ".package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail("node/npm not found: scripts/install-system-deps.sh installs them (make install)", pytrace=False)
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CRD_DIR, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"npm ci in {CRD_DIR} failed:\n{done.stdout}\n{done.stderr}", pytrace=False)


NODE_MAJOR = 20  # the oldest Node.js the validator's packages were tried on (README.md)


@functools.cache
def node_binary() -> str:
    """The `node` on PATH, when it is Node >= NODE_MAJOR (else the test fails, naming it)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: scripts/install-system-deps.sh installs it (make install)", pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    match = re.fullmatch(r"v(\d+)\..*", version)
    if not match or int(match.group(1)) < NODE_MAJOR:
        pytest.fail(
            f"{node} is Node {version or '?'}: tests/deploy needs Node >= {NODE_MAJOR} "
            "(scripts/install-system-deps.sh installs one from the npm registry)",
            pytrace=False,
        )
    return node


def validate_custom(text: str) -> tuple[int, list[dict]]:
    """Runs crd/validate.mjs on a multi-document YAML text (given as a file: no stdin pipe to
    depend on): its exit code and its JSON lines."""
    node = node_binary()
    npm_ci()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="herald-deploy-") as f:
        f.write(text)
        f.flush()
        done = subprocess.run(
            [node, str(CRD_DIR / "validate.mjs"), f.name], capture_output=True, text=True, timeout=60, cwd=CRD_DIR,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    if done.returncode not in (0, 1):
        pytest.fail(f"validate.mjs failed ({done.returncode}):\n{done.stderr}", pytrace=False)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@functools.cache
def custom_results(env: str) -> tuple[int, tuple[dict, ...]]:
    rc, lines = validate_custom(build(env).text)
    return rc, tuple(lines)


@pytest.fixture(params=OVERLAYS)
def built(request: pytest.FixtureRequest) -> Build:
    return build(request.param)


# --- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), in order

    def last(self, instruction: str) -> str | None:
        found = [args for ins, args in self.instructions if ins == instruction]
        return found[-1] if found else None


def dockerfile_stages(path: Path | None = None) -> list[Stage]:
    """The Dockerfile's stages: comments and parser directives dropped, continuations joined."""
    path = path or TREE / "Dockerfile"
    if not path.exists():
        pytest.fail(f"no {path.relative_to(TREE)}", pytrace=False)
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0], name, []))
        elif stages:
            stages[-1].instructions.append((instruction, args))
    return stages


def exec_form(args: str | None) -> list[str] | None:
    """ENTRYPOINT/CMD arguments as a list (exec form), or ["/bin/sh", "-c", ...] (shell form)."""
    if args is None:
        return None
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return ["/bin/sh", "-c", args]
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return ["/bin/sh", "-c", args]
    return value


def image_entrypoint() -> tuple[list[str], list[str]]:
    """ENTRYPOINT and CMD of the final stage (inherited from the stage it is built FROM)."""
    stages = dockerfile_stages()
    by_name = {s.name: s for s in stages if s.name}
    stage: Stage | None = stages[-1]
    entrypoint = cmd = None
    while stage is not None and (entrypoint is None or cmd is None):
        entrypoint = entrypoint if entrypoint is not None else exec_form(stage.last("ENTRYPOINT"))
        if cmd is None and stage.last("CMD") is not None:
            cmd = exec_form(stage.last("CMD"))
        stage = by_name.get(stage.base)
    return entrypoint or [], cmd or []


def image_env() -> dict[str, str]:
    """The ENV the final stage sets (and those of the stages it is built FROM)."""
    stages = dockerfile_stages()
    by_name = {s.name: s for s in stages if s.name}
    chain: list[Stage] = []
    stage: Stage | None = stages[-1]
    while stage is not None and stage not in chain:
        chain.insert(0, stage)
        stage = by_name.get(stage.base)
    env: dict[str, str] = {}
    for stage in chain:
        for ins, args in stage.instructions:
            if ins != "ENV":
                continue
            words = shlex.split(args)
            if words and "=" not in words[0]:  # legacy `ENV key value`
                env[words[0]] = " ".join(words[1:])
            else:
                env.update(w.split("=", 1) for w in words if "=" in w)
    return env
