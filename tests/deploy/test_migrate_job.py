"""The migration Job's name (issue 12, second review): herald-migrate-<hash>, a valid DNS label
of at most 63 characters, whatever the image reference, and a new name when the settings change
(a Job's pod template is immutable: the same name with a new template fails the apply)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import K8S, OVERLAYS, tool

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
IMAGES = (
    "registry.example.com/herald/herald:0.2.0",
    "registry.example.com/herald/herald:0.2.0@sha256:" + "a" * 64,
    "registry.example.com/herald/herald@sha256:" + "b" * 64,
    "registry.example.com:5000/herald/herald:0.2.0-rc.1",
    "registry.example.com/herald/herald",
)


def job_name(tree: Path, env: str) -> str:
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(tree / "overlays" / env)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    jobs = [d for d in yaml.safe_load_all(done.stdout) if d and d.get("kind") == "Job"]
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    assert not [d for d in yaml.safe_load_all(done.stdout) if d and d["metadata"]["name"].startswith("herald-release")]
    return jobs[0]["metadata"]["name"]


def set_image(tree: Path, env: str, image: str) -> None:
    path = tree / "overlays" / env / "kustomization.yaml"
    doc = yaml.safe_load(path.read_text())
    name, digest = image.split("@", 1) if "@" in image else (image, None)
    entry: dict = {"name": "herald"}
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        entry["newTag"] = tag
    entry["newName"] = name
    if digest:
        entry["digest"] = digest
    doc["images"] = [entry]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.parametrize("env", OVERLAYS)
@pytest.mark.parametrize("image", IMAGES)
def test_migration_job_name_follows_the_settings(env: str, image: str, tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    set_image(tree, env, image)
    first = job_name(tree, env)
    assert DNS_LABEL.fullmatch(first) and len(first) <= 63, first
    assert first.startswith("herald-migrate-"), first
    with (tree / "base" / "herald.env").open("a") as f:
        f.write("\nHERALD_TEST_SETTING_CHANGED=1\n")
    second = job_name(tree, env)
    assert DNS_LABEL.fullmatch(second) and len(second) <= 63, second
    assert second != first, "a settings change keeps the migration Job's name (immutable pod template)"


@pytest.mark.parametrize("env", OVERLAYS)
def test_migration_job_name_follows_the_release(env: str, tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    first = job_name(tree, env)
    path = tree / "overlays" / env / "kustomization.yaml"
    path.write_text(path.read_text().replace("release=0.1.0", "release=0.2.0"))
    assert job_name(tree, env) != first


@pytest.mark.parametrize("env", OVERLAYS)
def test_release_matches_the_image_tag(env: str) -> None:
    doc = yaml.safe_load((K8S / "overlays" / env / "kustomization.yaml").read_text())
    tag = next(i.get("newTag") for i in doc["images"] if i["name"] == "herald")
    gens = {g["name"]: g for g in doc["configMapGenerator"]}
    assert f"release={tag}" in gens["herald-release"]["literals"]
