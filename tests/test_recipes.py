"""The deployment recipes stay true (issue 13, item 6): examples/kubernetes/deployment.yaml,
examples/Dockerfile and examples/nginx/uvworker.conf (with the systemd units it fronts) are
read here, the uvworker command line each one runs is parsed with uvworker's own parser (a
renamed or removed option fails the test), and the numbers that must agree are checked:
probes against the listeners, grace periods against the shutdown arithmetic, proxy timeouts
against ours."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import wait_for

from uvworker.cli import parse
from uvworker.config import Config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# What keeps idle connections to a pod open longest by default: ingress-nginx's
# upstream-keepalive-timeout and the AWS ALB idle timeout, both 60 s.
BALANCER_IDLE = 60
GRACE_MARGIN = 5  # seconds left for lifespan shutdown and process exit after the drain
MASTER_MIB = 128  # the master, and pages the workers share, beside the workers' own memory


def uvworker(args: list[str], environ: dict[str, str] | None = None) -> Config:
    """The settings a recipe's command line gives, through the real CLI parser."""
    try:
        return Config(**parse(args, environ or {}))
    except SystemExit:
        pytest.fail(f"uvworker refuses the recipe's command line: {shlex.join(args)}")


def port_of(address: str) -> int:
    """The port of a HOST:PORT listener (--metrics-bind)."""
    host, colon, port = address.rpartition(":")
    assert colon and port.isdigit(), address
    return int(port)


# -- Kubernetes ----------------------------------------------------------------------------------


def manifest() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((EXAMPLES / "kubernetes" / "deployment.yaml").read_text())
    return {doc["kind"]: doc for doc in docs if doc}


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def test_kubernetes_probes_go_to_the_metrics_listener_the_args_open() -> None:
    pod = manifest()["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["uvworker"]
    config = uvworker(container["args"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": config.port, "metrics": port_of(config.metrics_bind)}
    assert config.host == "0.0.0.0" and config.metrics_bind.startswith("0.0.0.0:")  # reachable by the kubelet
    probes = {name: container[f"{name}Probe"]["httpGet"] for name in ("readiness", "liveness")}
    assert probes["readiness"]["path"] == "/readyz"
    assert probes["liveness"]["path"] == "/livez"
    for probe in probes.values():
        assert ports[probe["port"]] == port_of(config.metrics_bind)
    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port_of(config.metrics_bind)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_kubernetes_shutdown_arithmetic_holds() -> None:
    pod = manifest()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = uvworker(container["args"])
    # The kubelet's SIGKILL comes after the delay, the drain and a margin.
    assert pod["terminationGracePeriodSeconds"] >= (
        config.shutdown_delay + config.timeout_graceful_shutdown + GRACE_MARGIN
    )
    # Within the delay the readiness probe has seen /readyz say 503: the pod leaves the
    # endpoints while it still serves every request it gets.
    readiness = container["readinessProbe"]
    seen_within = readiness["periodSeconds"] * readiness["failureThreshold"] + readiness["timeoutSeconds"]
    assert seen_within <= config.shutdown_delay
    for probe in (readiness, container["livenessProbe"]):
        assert probe["timeoutSeconds"] < probe["periodSeconds"]
    # Proxies in front close their idle connections before the pod would.
    assert config.timeout_keep_alive > BALANCER_IDLE


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_kubernetes_args_serve_the_probes_and_drain_as_the_manifest_expects(tmp_path: Path) -> None:
    """The manifest's own command line (on loopback, with the example app): the probes'
    paths answer on the metrics port; on SIGTERM readiness turns 503 at once while requests
    are still served (the delay)."""
    (container,) = manifest()["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "main:app"
    sock = socket.create_server(("127.0.0.1", 0))
    app_url, probes = f"http://127.0.0.1:{sock.getsockname()[1]}", f"http://127.0.0.1:{free_port()}"
    kept = [arg for arg in args[1:] if not arg.startswith(("--host=", "--port=", "--metrics-bind="))]
    argv = ["examples.hello:app", *kept, "--fd", str(sock.fileno()), "--metrics-bind", probes.removeprefix("http://")]
    uvworker(argv)  # the same options, still accepted
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVWORKER_") and k != "WEB_CONCURRENCY"}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvworker", *argv], cwd=ROOT, env=env,
                                pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT)
    sock.close()
    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        return status(probes + "/readyz") == 200

    try:
        wait_for(ready, timeout=20)
        assert status(probes + "/livez") == 200
        assert httpx.get(app_url, timeout=5).text == "Hello, world!\n"
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: status(probes + "/readyz") == 503, timeout=container["readinessProbe"]["periodSeconds"])
        assert httpx.get(app_url, timeout=5).status_code == 200  # still serving: the delay runs
        assert status(probes + "/livez") == 200
    finally:
        proc.send_signal(signal.SIGQUIT)  # quick stop: the test need not wait out the delay
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        print((tmp_path / "server.log").read_text()[-3000:])


def test_kubernetes_memory_limit_is_above_what_recycling_allows() -> None:
    (container,) = manifest()["Deployment"]["spec"]["template"]["spec"]["containers"]
    config = uvworker(container["args"])
    assert config.workers and config.max_memory
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    # A worker is retired at once above twice --max-memory: the OOM killer must not come first.
    assert mebibytes(resources["limits"]["memory"]) >= config.workers * 2 * config.max_memory + MASTER_MIB
    assert mebibytes(resources["requests"]["memory"]) <= mebibytes(resources["limits"]["memory"])


def test_kubernetes_service_selects_the_pods_and_names_their_ports() -> None:
    docs = manifest()
    deployment, service = docs["Deployment"], docs["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} == names


# -- Dockerfile ----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = (EXAMPLES / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_cmd_exposes_its_ports_and_health_checks_readiness() -> None:
    instructions = dockerfile()
    environ = {}
    for kind, rest in instructions:
        if kind == "ENV":
            environ |= dict(pair.split("=", 1) for pair in shlex.split(rest))
    (cmd,) = [json.loads(rest) for kind, rest in instructions if kind == "CMD"]
    assert cmd[0] == "uvworker"
    config = uvworker(cmd[1:], environ)
    assert config.workers == int(environ["WEB_CONCURRENCY"])  # the supervisor runs, as PID 1
    exposed = {int(port) for kind, rest in instructions if kind == "EXPOSE" for port in rest.split()}
    assert exposed == {config.port, port_of(config.metrics_bind)}
    (health,) = [rest for kind, rest in instructions if kind == "HEALTHCHECK"]
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", health)
    assert url and int(url.group(1)) == port_of(config.metrics_bind) and url.group(2) == "/readyz", health
    comments = (EXAMPLES / "Dockerfile").read_text()
    stop_time = int(re.search(r"docker stop --time (\d+)", comments).group(1))  # type: ignore[union-attr]
    assert stop_time >= config.shutdown_delay + config.timeout_graceful_shutdown + GRACE_MARGIN


# -- nginx in front of the systemd units ------------------------------------------------------------


def nginx_blocks(text: str) -> list[Any]:
    """nginx configuration as a tree: [name, [args], children or None] per directive."""
    tokens = re.findall(r'"[^"]*"|[{};]|[^\s{};]+', re.sub(r"#[^\n]*", "", text))
    stack: list[list[Any]] = [[]]
    words: list[str] = []
    for token in tokens:
        if token == ";":
            stack[-1].append([words[0], words[1:], None])
            words = []
        elif token == "{":
            block: list[Any] = [words[0], words[1:], []]
            stack[-1].append(block)
            stack.append(block[2])
            words = []
        elif token == "}":
            stack.pop()
        else:
            words.append(token.strip('"'))
    return stack[0]


def directive(block: list[Any], name: str) -> list[str]:
    (found,) = [args for key, args, _ in block if key == name]
    return found


def child(tree: list[Any], name: str, *args: str) -> list[Any]:
    (found,) = [children for key, given, children in tree if key == name and tuple(given) == args]
    return found


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert match, value
    return int(match.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60}[match.group(2)]


def systemd_value(unit: str, key: str) -> str:
    (value,) = re.findall(rf"^{key}=(.*)$", (EXAMPLES / "systemd" / unit).read_text(), re.M)
    return value


def test_nginx_timeouts_fit_the_server_it_fronts() -> None:
    exec_start = shlex.split(systemd_value("uvworker.service", "ExecStart"))
    assert exec_start[0].endswith("/uvworker")
    environ = dict(pair.split("=", 1) for pair in shlex.split(systemd_value("uvworker.service", "Environment")))
    config = uvworker(exec_start[1:], environ)
    tree = nginx_blocks((EXAMPLES / "nginx" / "uvworker.conf").read_text())
    upstream = child(tree, "upstream", "uvworker")
    assert directive(upstream, "server") == [systemd_value("uvworker.socket", "ListenStream")]
    assert int(directive(upstream, "keepalive")[0]) > 0
    assert seconds(directive(upstream, "keepalive_timeout")[0]) < config.timeout_keep_alive
    server = child(tree, "server")
    main, websocket = child(server, "location", "/"), child(server, "location", "/ws/")
    for location in (main, websocket):
        assert directive(location, "proxy_pass") == ["http://uvworker"]
        assert directive(location, "proxy_http_version") == ["1.1"]  # keep-alive to the upstream
        headers = {args[0].lower(): args[1] for key, args, _ in location if key == "proxy_set_header"}
        assert headers["connection"] == "$connection_upgrade"  # never "close"
        assert {"x-forwarded-for", "x-forwarded-proto"} <= headers.keys()
    assert config.timeout_request and seconds(directive(main, "proxy_read_timeout")[0]) > config.timeout_request
    assert seconds(directive(websocket, "proxy_read_timeout")[0]) > config.ws_ping_interval
    assert "127.0.0.1" in config.forwarded_allow_ips.split(",")  # nginx's X-Forwarded-* are trusted
