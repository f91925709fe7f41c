"""The compose stack's shape: what a `docker compose up` relies on, checked without an engine."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_every_long_running_service_has_a_healthcheck():
    for name, service in services().items():
        if name == "minio-buckets":  # a one-shot job
            continue
        build = service.get("build")
        dockerfile = ROOT / build["dockerfile"] if build else None
        in_image = dockerfile is not None and "HEALTHCHECK" in dockerfile.read_text()
        assert "healthcheck" in service or in_image, f"{name}: no healthcheck"


def test_builds_exist_and_profiles_cover_cpu_and_gpu():
    all_services = services()
    for name, service in all_services.items():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
    profiles = {p for s in all_services.values() for p in s.get("profiles", [])}
    assert profiles == {"cpu", "gpu"}
    for profile in ("cpu", "gpu"):
        members = {n for n, s in all_services.items() if profile in s.get("profiles", [])}
        assert members == {f"worker-{profile}", f"serve-{profile}"}


def test_dependencies_wait_for_health():
    all_services = services()
    for name, service in all_services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in all_services, f"{name} depends on unknown {dep}"
            assert cond["condition"] in ("service_healthy", "service_completed_successfully")
