"""The compose rewriter: realistic compose files are routed through the cache for the chosen
registries, everything else is left byte for byte, and --undo restores the files exactly."""

from __future__ import annotations

import subprocess
import sys

import yaml

from registry.compose import rewrite, undo
from registry.config import RegistrySettings, Settings
from registry.names import resolve
from tests.support.servers import ROOT

CACHE = "192.168.1.5:5050"

COMPOSE = """\
# Media stack (Atlantis)
x-common: &common
  restart: unless-stopped

services:
  sonarr:
    <<: *common
    image: lscr.io/linuxserver/sonarr:latest   # LinuxServer
    ports: ["8989:8989"]
  immich-server:
    image: "ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}"
    env_file: .env
  immich-ml:
    image: 'ghcr.io/immich-app/immich-machine-learning:${IMMICH_VERSION:-release}-cuda'
  exporter:
    image: quay.io/prometheus/node-exporter@sha256:4cb2b9019f1757be8482419002cb7afe028fdba35d47958829e4cfeaf6246d80
  postgres:
    image: postgres:16
  redis:
    image: docker.io/library/redis:7-alpine
  custom:
    image: ${CUSTOM_IMAGE}
  local:
    build: ./local
    image: registry.example.internal:5000/team/tool:1.2
  k8s:
    image:   registry.k8s.io/pause:3.9
"""


def test_routes_only_the_chosen_registries_and_keeps_everything_else():
    routed, changed = rewrite(COMPOSE, CACHE, {"lscr.io", "ghcr.io", "quay.io", "registry.k8s.io"})
    assert changed == 5
    services = yaml.safe_load(routed)["services"]
    assert services["sonarr"]["image"] == f"{CACHE}/lscr.io/linuxserver/sonarr:latest"
    assert services["immich-server"]["image"] == (
        f"{CACHE}/ghcr.io/immich-app/immich-server:${{IMMICH_VERSION:-release}}"
    )
    assert services["exporter"]["image"].startswith(f"{CACHE}/quay.io/prometheus/node-exporter@")
    assert services["k8s"]["image"] == f"{CACHE}/registry.k8s.io/pause:3.9"
    for name in ("postgres", "redis", "custom", "local"):
        assert services[name]["image"] == yaml.safe_load(COMPOSE)["services"][name]["image"]
    assert "# LinuxServer" in routed and "<<: *common" in routed
    # Routing twice changes nothing more.
    assert rewrite(routed, CACHE, {"lscr.io", "ghcr.io"}) == (routed, 0)


def test_undo_restores_the_file_exactly_crlf_included():
    for text in (COMPOSE, COMPOSE.replace("\n", "\r\n")):
        routed, changed = rewrite(text, CACHE, {"lscr.io", "ghcr.io", "quay.io", "registry.k8s.io"})
        restored, undone = undo(routed, CACHE)
        assert restored == text and undone == changed


def test_routed_references_resolve_to_their_registry():
    settings = Settings(
        storage_root=ROOT,
        registries=(
            RegistrySettings("docker.io", "https://registry-1.docker.io"),
            RegistrySettings("lscr.io", "https://lscr.io"),
            RegistrySettings("ghcr.io", "https://ghcr.io"),
        ),
    )
    routed, _ = rewrite(COMPOSE, CACHE, {"lscr.io", "ghcr.io"})
    image = yaml.safe_load(routed)["services"]["sonarr"]["image"]
    name = image.removeprefix(f"{CACHE}/").rsplit(":", 1)[0]
    target = resolve(settings, name, None)
    assert (target.registry.name, target.repository) == ("lscr.io", "linuxserver/sonarr")


def test_command_line_rewrites_in_place_and_undoes(tmp_path):
    path = tmp_path / "compose.yaml"
    path.write_text(COMPOSE)
    run = [sys.executable, "-m", "registry", "rewrite-compose", "--cache", CACHE]
    out = subprocess.run(
        [*run, "--registry", "ghcr.io", "--registry", "lscr.io", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "3 image reference(s) routed" in out
    assert f"{CACHE}/lscr.io/linuxserver/sonarr" in path.read_text()
    subprocess.run([*run, "--undo", str(path)], cwd=ROOT, check=True, capture_output=True)
    assert path.read_text() == COMPOSE
