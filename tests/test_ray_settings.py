"""Ray Serve options without Ray: settings validation, CLI flags and env vars, and that nothing imports ray unless asked."""

import sys
import types

import pytest
from helpers import run_in_fresh_interpreter
from pydantic import ValidationError

from codedsmooth.cli import main
from codedsmooth.service.settings import ServeSettings


def test_plain_server_and_app_never_import_ray():
    code = (
        "import sys, codedsmooth.service as s, codedsmooth.cli as cli\n"
        "from codedsmooth.service.http.server import run_server\n"
        "app = s.create_app()\n"
        "cli.build_parser().parse_args(['serve', '--replicas', '2'])\n"
        "assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')][:5]\n"
    )
    run_in_fresh_interpreter(code)


RAY_LAUNCHER = "codedsmooth.service.ray.serve"  # the module ``codedsmooth serve --replicas`` starts Ray Serve from


def _serve_settings(monkeypatch, argv: list[str]) -> ServeSettings:
    """The settings ``codedsmooth serve ARGV`` hands to Ray Serve's launcher (recorded in its place: no Ray is started)."""
    handed = []
    launcher = types.ModuleType(RAY_LAUNCHER)
    launcher.run_ray_serve = lambda settings: handed.append(settings) or 0
    monkeypatch.setitem(sys.modules, RAY_LAUNCHER, launcher)
    assert main(["serve", *argv]) == 0
    (settings,) = handed
    return settings


def test_ray_options_are_flags_and_env_vars(monkeypatch):
    s = _serve_settings(
        monkeypatch,
        [
            "--replicas",
            "3",
            "--min-replicas",
            "1",
            "--max-replicas",
            "5",
            "--target-ongoing-requests",
            "8",
            "--num-cpus",
            "2",
            "--num-gpus",
            "0.5",
            "--ray-address",
            "auto",
        ],
    )
    assert (s.replicas, s.min_replicas, s.max_replicas, s.target_ongoing_requests) == (3, 1, 5, 8.0) and s.autoscaling
    assert (s.num_cpus, s.num_gpus, s.ray_address) == (2.0, 0.5, "auto")
    monkeypatch.setenv("CODEDSMOOTH_REPLICAS", "2")
    monkeypatch.setenv("CODEDSMOOTH_RAY_ADDRESS", "10.0.0.5:6379")
    s = _serve_settings(monkeypatch, [])
    assert s.replicas == 2 and s.ray_address == "10.0.0.5:6379" and not s.autoscaling
    assert _serve_settings(monkeypatch, ["--replicas", "4"]).replicas == 4  # the flag wins over the env var


def test_ray_options_are_validated():
    assert ServeSettings(replicas=2, min_replicas=1, max_replicas=4).autoscaling
    assert ServeSettings().replicas is None  # without --replicas: the plain server
    for bad in (
        dict(replicas=0),
        dict(min_replicas=1, max_replicas=2),  # autoscaling needs --replicas
        dict(ray_address="auto"),
        dict(replicas=2, min_replicas=1),  # both ends of the range
        dict(replicas=5, min_replicas=1, max_replicas=4),  # initial count inside the range
        dict(replicas=1, num_gpus=-1),
    ):
        with pytest.raises(ValidationError):
            ServeSettings(**bad)
