"""Structural checks of the deployment artefacts: docker compose, Dockerfile, systemd, Grafana, alerts.

Docker cannot run where the tests run, so these files are checked by construction: the compose file
against the topology it mounts (every endpoint is a service exposing that port, every datacenter has
its `wmb run` service), the MariaDB flags and grants against what the capture requires, the Kafka
settings against the ones the test suite's own brokers run with (wmb/servers/kafka.py), the systemd
exit codes against the supervisor's, and every metric a dashboard or an alert queries against the
metric definitions in the code.  Each check returns a list of problems, so a failure names them all;
a few tests feed the checks broken input to prove they can fail.
"""

from __future__ import annotations

import configparser
import copy
import inspect
import json
import os
import re
import shlex
import tomllib
import urllib.parse
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from wmb.errors import ExitCode
from wmb.servers.kafka import KafkaServer
from wmb.supervisor import NO_RESTART, Supervisor, daemons_for
from wmb.topology import MASTER, Topology, load_topology

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_TOPOLOGY = ROOT / "deploy" / "compose" / "topology.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SYSTEMD = ROOT / "deploy" / "systemd"
DASHBOARD = ROOT / "deploy" / "grafana" / "wmb-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PACKAGES = ("wmb", "binlog_capture", "broker", "cache_updater")

Compose = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Compose:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def topology() -> Topology:
    # No environment: every secret in the compose topology has a ${NAME:-default}.
    return load_topology(COMPOSE_TOPOLOGY, env={})


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Container ports a service declares (``expose`` and the container side of ``ports``)."""
    ports = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            ports.add(int(spec["target"]))
        else:
            ports.add(int(str(spec).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def _args(service: dict[str, Any], key: str = "command") -> list[str]:
    value = service.get(key, [])
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _flag_values(args: list[str]) -> dict[str, str]:
    """``--name=value`` and ``--name value`` -> {name: value}; a bare ``--flag`` -> {flag: ""}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            out[name] = value
        i += 1
    return out


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(str(e).partition("=")[::2] for e in env)
    return {str(k): str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: container path -> host path (relative to the repository root)."""
    out = {}
    for vol in service.get("volumes", []):
        parts = str(vol).split(":")
        if parts[0].startswith((".", "/")):
            out[parts[1]] = parts[0]
    return out


def _endpoints(topo: Topology) -> Iterator[tuple[str, str, str, int]]:
    """(dc, what, host, port) of every server the topology names."""
    for dc_name, dc in topo.datacenters.items():
        for hp in dc.kafka.bootstrap.split(","):
            yield (dc_name, "kafka", *_hostport(hp))
        if dc.kafka.wan_bootstrap:
            for hp in dc.kafka.wan_bootstrap.split(","):
                yield (dc_name, "kafka-wan", *_hostport(hp))
        if dc.redis is not None:
            url = urllib.parse.urlsplit(dc.redis.url)
            assert url.hostname, dc.redis.url
            yield dc_name, "redis", url.hostname, url.port or 6379
        for name, server in dc.mysql.named():
            yield dc_name, f"mysql:{name}", server.host, server.port


def _kafka_service(compose: Compose, topo: Topology, dc: str) -> tuple[str, dict[str, Any]]:
    host, _ = _hostport(topo.dc(dc).kafka.bootstrap.split(",")[0])
    return host, compose["services"][host]


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    out = {}
    for item in value.split(","):
        name, _, rest = item.partition("://")
        out[name] = _hostport(rest)
    return out


# --------------------------------------------------------------------------------------------------
# checks (each returns its problems; the tests below run them on the real files and on broken ones)
# --------------------------------------------------------------------------------------------------


def check_endpoints(compose: Compose, topo: Topology) -> list[str]:
    services = compose["services"]
    problems = []
    for dc, what, host, port in _endpoints(topo):
        svc = services.get(host)
        if svc is None:
            problems.append(f"{dc} {what}: host {host!r} is not a compose service")
        elif port not in _container_ports(svc):
            problems.append(f"{dc} {what}: service {host!r} does not expose port {port}")
    return problems


def check_wmb_services(compose: Compose, topo: Topology) -> list[str]:
    services = compose["services"]
    raw = yaml.safe_load(COMPOSE_TOPOLOGY.read_text())
    problems = []
    for dc in topo.datacenters:
        name = f"wmb-{dc}"
        svc = services.get(name)
        if svc is None:
            problems.append(f"no service {name!r} for datacenter {dc!r}")
            continue
        args = _args(svc)
        if "run" not in args or _flag_values(args[args.index("run") :]).get("dc") != dc:
            problems.append(f"{name}: command {args} does not run `run --dc {dc}`")
            continue
        topo_path = _flag_values(args[args.index("run") :]).get("topology")
        mounted = _mounts(svc).get(topo_path or "")
        if mounted is None or (ROOT / mounted).resolve() != COMPOSE_TOPOLOGY:
            problems.append(f"{name}: --topology {topo_path} is not deploy/compose/topology.yaml mounted")
        if "build" not in svc:
            problems.append(f"{name}: not built from the Dockerfile")
        # Every daemon's metrics port, and the supervisor's /health on the base port.
        base = topo.dc(dc).metrics_port_base
        wanted = {base} | {d.metrics_port for d in daemons_for(topo, dc, "topology.yaml")}
        missing = wanted - _container_ports(svc)
        if missing:
            problems.append(f"{name}: does not expose metrics ports {sorted(missing)}")
        health = " ".join(_args(svc.get("healthcheck", {}), "test"))
        if f"127.0.0.1:{base}/health" not in health:
            problems.append(f"{name}: healthcheck does not query /health on {base}: {health!r}")
        # Every ${NAME} the datacenter's part of the topology reads must reach the container.
        refs = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", json.dumps(raw["datacenters"][dc])))
        missing_env = refs - set(_env(svc))
        if missing_env:
            problems.append(f"{name}: environment lacks {sorted(missing_env)}")
        # It waits for its datacenter's servers to be healthy (and the link, for a relay).
        depends = svc.get("depends_on", {})
        # (Its own wan_bootstrap is for the other datacenters' relays.)
        servers = {host for d, what, host, _ in _endpoints(topo) if d == dc and what != "kafka-wan"}
        for route in topo.routes_to(dc):
            servers |= {h for d, w, h, _ in _endpoints(topo) if d == route.from_ and w == "kafka-wan"}
        for server in sorted(servers):
            cond = depends.get(server, {}).get("condition") if isinstance(depends, dict) else None
            if cond != "service_healthy":
                problems.append(f"{name}: depends_on {server} is not condition service_healthy")
    return problems


def check_mariadb(compose: Compose, topo: Topology) -> list[str]:
    services = compose["services"]
    problems = []
    domains: dict[str, str] = {}
    for dc_name, dc in topo.datacenters.items():
        for server_name, server in dc.mysql.named():
            svc = services.get(server.host)
            if svc is None:
                problems.append(f"{dc_name}.{server_name}: no service {server.host!r}")
                continue
            where = f"{server.host}"
            if not str(svc.get("image", "")).startswith("mariadb:11."):
                problems.append(f"{where}: image {svc.get('image')!r} is not mariadb:11.x")
            flags = _flag_values(_args(svc))
            if "log-bin" not in flags:
                problems.append(f"{where}: no --log-bin")
            elif not flags["log-bin"]:
                # Without a base name the binlog is named after the container's host name, which
                # changes when the container is recreated: the binlog index would be lost.
                problems.append(f"{where}: --log-bin needs a base name")
            for flag, value in (
                ("binlog-format", "ROW"),
                ("binlog-row-image", "FULL"),
                ("binlog-row-metadata", "FULL"),
                ("server-id", str(server.server_id)),
            ):
                if flags.get(flag) != value:
                    problems.append(f"{where}: --{flag} is {flags.get(flag)!r}, not {value!r}")
            if server.log_slave_updates and "log-slave-updates" not in flags:
                problems.append(f"{where}: topology says log_slave_updates but no --log-slave-updates")
            domain = flags.get("gtid-domain-id")
            if domain is None:
                problems.append(f"{where}: no --gtid-domain-id")
            elif domain in domains:
                problems.append(f"{where}: --gtid-domain-id={domain} also used by {domains[domain]}")
            else:
                domains[domain] = where
            if "healthcheck" not in svc:
                problems.append(f"{where}: no healthcheck")
    return problems


_GRANT_RE = re.compile(r"GRANT\s+(.+?)\s+ON\s+(\S+)\s+TO\s+'wmb'@'%'", re.IGNORECASE)


def grants_of(script: str) -> dict[str, set[str]]:
    """``{"*.*": {"REPLICATION SLAVE", ...}, "app.*": {...}}`` from the GRANT lines of a script."""
    out: dict[str, set[str]] = {}
    for privs, on in _GRANT_RE.findall(script):
        names = {p.strip().upper().replace("ALL PRIVILEGES", "ALL") for p in privs.split(",")}
        out.setdefault(on.replace("`", ""), set()).update(names)
    return out


def check_grants(compose: Compose, topo: Topology) -> list[str]:
    services = compose["services"]
    problems = []
    for dc_name, dc in topo.datacenters.items():
        for server_name, server in dc.mysql.named():
            svc = services[server.host]
            scripts = {
                path: ROOT / host
                for path, host in _mounts(svc).items()
                if path.startswith("/docker-entrypoint-initdb.d/")
            }
            user_scripts = [p for p in scripts.values() if "IDENTIFIED BY" in p.read_text()]
            if len(user_scripts) != 1:
                problems.append(f"{server.host}: {len(user_scripts)} init scripts create the wmb user")
                continue
            script = user_scripts[0]
            text = script.read_text()
            if script.suffix == ".sh" and os.access(script, os.X_OK):
                # The image *executes* an executable .sh, without its docker_process_sql function.
                problems.append(f"{script.name}: must not be executable (the image sources it)")
            # The password the script sets is the one the topology connects with.
            raw = yaml.safe_load(COMPOSE_TOPOLOGY.read_text())
            raw_server = raw["datacenters"][dc_name]["mysql"]
            raw_server = raw_server[MASTER] if server_name == MASTER else raw_server["replicas"][server_name]
            script_var = re.search(r"docker_sql_escape_string_literal \"\$\{?([A-Za-z_]\w*)", text)
            if script_var is None:
                problems.append(f"{script.name}: the password does not come from the environment")
            elif _env(svc).get(script_var.group(1)) != raw_server["password"]:
                problems.append(
                    f"{server.host}: {script_var.group(1)}={_env(svc).get(script_var.group(1))!r} "
                    f"but the topology's password is {raw_server['password']!r}"
                )
            grants = grants_of(text)
            if "ALL" in grants.get("*.*", set()):
                problems.append(f"{script.name}: ALL ON *.* is not a minimal grant")
            captured = sorted(
                {
                    g.split(".")[0]
                    for s in topo.sources.values()
                    if s.dc == dc_name and s.server == server_name
                    for g in s.include
                }
            )
            if captured:  # a capture source: read the binlog, read the rows, write the heartbeat
                need = {
                    "*.*": {"REPLICATION SLAVE", "REPLICATION CLIENT"},
                    "wmb.*": {"INSERT", "UPDATE", "CREATE"},
                    **{f"{db}.*": {"SELECT"} for db in captured},
                }
            else:
                applied = sorted(
                    {t.split(".")[0] for r in topo.replicas if r.server == server_name for t in r.tables}
                )
                need = {f"{db}.*": {"ALL"} for db in [*applied, "wmb"]}
            for on, privs in need.items():
                lacking = privs - grants.get(on, set())
                if lacking:
                    problems.append(f"{script.name}: lacks {sorted(lacking)} ON {on}")
    return problems


# Properties of wmb/servers/kafka.py that name hosts, ports or paths of the test brokers: the
# compose services set their own, checked separately.
_KAFKA_LOCAL = {
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "controller.quorum.voters",
    "log.dirs",
}


def kafka_reference_properties(tmp: Path) -> dict[str, str]:
    props = KafkaServer(tmp / "kafka", wan_advertised_port=19092, port=9092).properties()
    return {k: v for k, v in props.items() if k not in _KAFKA_LOCAL}


def check_kafka(compose: Compose, topo: Topology, reference: dict[str, str]) -> list[str]:
    problems = []
    cluster_ids: set[str] = set()
    for dc in topo.datacenters:
        name, svc = _kafka_service(compose, topo, dc)
        env = _env(svc)
        if not str(svc.get("image", "")).startswith("apache/kafka:4."):
            problems.append(f"{name}: image {svc.get('image')!r} is not apache/kafka:4.x")
        for prop, value in reference.items():
            key = "KAFKA_" + prop.replace(".", "_").upper()
            if env.get(key) != value:
                problems.append(f"{name}: {key} is {env.get(key)!r}, the tested brokers use {value!r}")
        listeners = _listeners(env.get("KAFKA_LISTENERS", ""))
        advertised = _listeners(env.get("KAFKA_ADVERTISED_LISTENERS", ""))
        protocols = dict(p.split(":") for p in env.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "").split(","))
        for listener in listeners:
            if listener not in protocols:
                problems.append(f"{name}: listener {listener} has no security protocol")
            if listeners[listener][1] not in _container_ports(svc):
                problems.append(f"{name}: listener {listener} port {listeners[listener][1]} not exposed")
        bootstrap_port = _hostport(topo.dc(dc).kafka.bootstrap.split(",")[0])[1]
        if listeners.get("PLAINTEXT", ("", 0))[1] != bootstrap_port:
            problems.append(f"{name}: PLAINTEXT listener is not on the bootstrap port {bootstrap_port}")
        if advertised.get("PLAINTEXT") != (name, bootstrap_port):
            problems.append(f"{name}: advertises PLAINTEXT as {advertised.get('PLAINTEXT')}")
        node_id = env.get("KAFKA_NODE_ID")
        voters = env.get("KAFKA_CONTROLLER_QUORUM_VOTERS", "")
        if voters != f"{node_id}@{name}:{listeners.get('CONTROLLER', ('', 0))[1]}":
            problems.append(
                f"{name}: KAFKA_CONTROLLER_QUORUM_VOTERS={voters!r} is not this node's controller"
            )
        cluster_id = env.get("CLUSTER_ID", "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id) or cluster_id in cluster_ids:
            problems.append(f"{name}: CLUSTER_ID {cluster_id!r} is not a fresh 22-character id")
        cluster_ids.add(cluster_id)
        if "healthcheck" not in svc:
            problems.append(f"{name}: no healthcheck")
    return problems


def check_link(compose: Compose, topo: Topology) -> list[str]:
    """The link emulator sits between every wan_bootstrap and its cluster's WAN listener."""
    services = compose["services"]
    problems = []
    wan_dcs = [dc for dc, d in topo.datacenters.items() if d.kafka.wan_bootstrap]
    if not wan_dcs:
        return ["no datacenter has a wan_bootstrap: nothing goes through the link"]
    for dc in wan_dcs:
        wan_bootstrap = topo.dc(dc).kafka.wan_bootstrap
        assert wan_bootstrap is not None
        link_host, link_port = _hostport(wan_bootstrap)
        kafka_name, kafka = _kafka_service(compose, topo, dc)
        link = services.get(link_host)
        if link is None:
            problems.append(f"{dc}: wan_bootstrap host {link_host!r} is not a service")
            continue
        entry = _args(link, "entrypoint")
        if entry[-2:] != ["-m", "wmb.linkemu"]:
            problems.append(f"{link_host}: entrypoint {entry} is not `python -m wmb.linkemu`")
        flags = _flag_values(_args(link))
        if _hostport(flags.get("listen", ":0"))[1] != link_port:
            problems.append(f"{link_host}: --listen {flags.get('listen')!r} is not port {link_port}")
        env = _env(kafka)
        wan = _listeners(env.get("KAFKA_LISTENERS", "")).get("WAN")
        if wan is None:
            problems.append(f"{kafka_name}: no WAN listener")
            continue
        if flags.get("target") != f"{kafka_name}:{wan[1]}":
            problems.append(f"{link_host}: --target {flags.get('target')!r} is not {kafka_name}:{wan[1]}")
        if _listeners(env.get("KAFKA_ADVERTISED_LISTENERS", "")).get("WAN") != (link_host, link_port):
            problems.append(f"{kafka_name}: WAN is not advertised as the link's {link_host}:{link_port}")
        if float(flags.get("delay-ms", "0")) != 20.0:
            problems.append(f"{link_host}: --delay-ms is {flags.get('delay-ms')!r}, not 20")
    return problems


def check_healthchecks(compose: Compose) -> list[str]:
    problems = []
    for name, svc in compose["services"].items():
        if svc.get("profiles"):
            continue  # optional extras (monitoring)
        test = svc.get("healthcheck", {}).get("test")
        if not test or test == ["NONE"]:
            problems.append(f"{name}: no healthcheck")
        depends = svc.get("depends_on", {})
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on without conditions")
        else:
            for dep, spec in depends.items():
                if dep not in compose["services"]:
                    problems.append(f"{name}: depends_on unknown service {dep!r}")
                elif (
                    spec.get("condition") == "service_healthy"
                    and "healthcheck" not in compose["services"][dep]
                ):
                    problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
    return problems


# --- metric names ---------------------------------------------------------------------------------

_METRIC_DEF = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']", re.MULTILINE
)
_PROMQL_BUILTIN = {"up"}


def exported_metrics() -> set[str]:
    """Every series name the code exports, from its prometheus_client definitions (with suffixes)."""
    names: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for kind, name in _METRIC_DEF.findall(path.read_text(encoding="utf-8")):
                if kind == "Counter":
                    base = name.removesuffix("_total")
                    names |= {f"{base}_total", f"{base}_created"}
                elif kind == "Histogram":
                    names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
                elif kind == "Summary":
                    names |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
                elif kind == "Info":
                    names.add(f"{name}_info")
                else:
                    names.add(name)
    return names


def queried_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not labels, functions or keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and label_replace arguments
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = match.group(0)
        after = expr[match.end() :].lstrip()
        if after.startswith("(") or word in {"and", "or", "unless", "bool", "offset"}:
            continue  # a function or an operator
        if word.startswith("__") or re.fullmatch(r"\d.*", word):
            continue
        names.add(word)
    return names


def check_metrics(exprs: list[str], exported: set[str]) -> list[str]:
    problems = []
    for expr in exprs:
        if expr.count("(") != expr.count(")") or expr.count("[") != expr.count("]"):
            problems.append(f"unbalanced brackets: {expr}")
        for name in sorted(queried_metrics(expr) - exported - _PROMQL_BUILTIN):
            problems.append(f"{name!r} is not exported by the code (in: {expr.strip()[:120]})")
    return problems


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in sub.get("targets", [])]
    return exprs


def alert_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in doc["groups"] for rule in group["rules"]]


# --- systemd --------------------------------------------------------------------------------------


def parse_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


# --------------------------------------------------------------------------------------------------
# tests: compose
# --------------------------------------------------------------------------------------------------


def test_compose_topology_loads(topology: Topology) -> None:
    assert set(topology.datacenters) == {"bj", "gz"}
    # With real secrets in the environment too.
    env = {"MYSQL_BJ_PASSWORD": "a", "MYSQL_GZ_PASSWORD": "b", "REDIS_GZ_PASSWORD": "c"}
    topo = load_topology(COMPOSE_TOPOLOGY, env=env)
    master = topo.dc("bj").mysql.master
    assert master is not None and master.password.get_secret_value() == "a"


def test_every_topology_endpoint_is_a_compose_service(compose: Compose, topology: Topology) -> None:
    assert check_endpoints(compose, topology) == []


def test_every_datacenter_has_its_wmb_run_service(compose: Compose, topology: Topology) -> None:
    assert check_wmb_services(compose, topology) == []


def test_every_service_has_a_healthcheck_and_waits_on_conditions(compose: Compose) -> None:
    assert check_healthchecks(compose) == []


def test_mariadb_services_carry_the_binlog_settings(compose: Compose, topology: Topology) -> None:
    assert check_mariadb(compose, topology) == []


def test_mariadb_init_scripts_grant_the_minimum(compose: Compose, topology: Topology) -> None:
    assert check_grants(compose, topology) == []


def test_kafka_services_run_kraft_with_the_tested_settings(
    compose: Compose, topology: Topology, tmp_path: Path
) -> None:
    reference = kafka_reference_properties(tmp_path)
    for must in ("process.roles", "transaction.state.log.replication.factor", "controller.listener.names"):
        assert must in reference
    assert check_kafka(compose, topology, reference) == []


def test_link_sits_between_gz_and_bj_kafka_wan_listener(compose: Compose, topology: Topology) -> None:
    assert check_link(compose, topology) == []


def test_compose_commands_use_real_cli_options(compose: Compose) -> None:
    from wmb import cli as cli_module
    from wmb.linkemu import command as linkemu_command

    cli_module._register()
    group_opts = {o for p in cli_module.cli.params for o in getattr(p, "opts", [])} | {
        o for p in cli_module.cli.params for o in getattr(p, "secondary_opts", [])
    }
    run_opts = {o for p in cli_module.cli.commands["run"].params for o in getattr(p, "opts", [])}
    for name, svc in compose["services"].items():
        if not name.startswith("wmb-"):
            continue
        args = _args(svc)
        at = args.index("run")
        assert {a for a in args[:at] if a.startswith("-")} <= group_opts, name
        assert {a.split("=")[0] for a in args[at + 1 :] if a.startswith("-")} <= run_opts, name
    # The link's arguments parse with the real click command (nothing is started).
    link_args = _args(compose["services"]["link"])
    ctx = linkemu_command().make_context("linkemu", list(link_args))
    assert ctx.params["delay_ms"] == 20.0 and ctx.params["control_port"] is not None


def test_checks_catch_a_broken_compose(compose: Compose, topology: Topology, tmp_path: Path) -> None:
    broken = copy.deepcopy(compose)
    services = broken["services"]
    services["redis-gz"]["expose"] = ["6380"]
    services["mariadb-bj"]["command"] = [
        a for a in services["mariadb-bj"]["command"] if "binlog-row-metadata" not in a
    ]
    services["mariadb-gz"]["command"] = [
        "--server-id=7" if a.startswith("--server-id") else a for a in services["mariadb-gz"]["command"]
    ]
    services["kafka-gz"]["environment"]["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] = "3"
    services["link"]["command"] = ["--listen=0.0.0.0:19092", "--target=kafka-bj:9092", "--delay-ms=20"]
    services["wmb-gz"]["command"] = ["run", "--dc", "bj"]
    del services["redis-bj"]["healthcheck"]
    assert any("redis-gz" in p and "6379" in p for p in check_endpoints(broken, topology))
    assert any("binlog-row-metadata" in p for p in check_mariadb(broken, topology))
    assert any("server-id" in p for p in check_mariadb(broken, topology))
    reference = kafka_reference_properties(tmp_path)
    assert any("TRANSACTION_STATE" in p for p in check_kafka(broken, topology, reference))
    assert any("--target" in p for p in check_link(broken, topology))
    assert any("wmb-gz" in p for p in check_wmb_services(broken, topology))
    assert any("redis-bj" in p for p in check_healthchecks(broken))


def test_grant_parser() -> None:
    script = (
        "GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'wmb'@'%';\n"
        "GRANT SELECT ON `app`.* TO 'wmb'@'%';\nGRANT ALL PRIVILEGES ON wmb.* TO 'wmb'@'%';"
    )
    assert grants_of(script) == {
        "*.*": {"REPLICATION SLAVE", "REPLICATION CLIENT"},
        "app.*": {"SELECT"},
        "wmb.*": {"ALL"},
    }


# --------------------------------------------------------------------------------------------------
# tests: image
# --------------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_shape() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install" in runs and "pip wheel" in runs and " ." in runs
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["wmb"]
    assert "HEALTHCHECK" in dict(instructions) and "/health" in dict(instructions)["HEALTHCHECK"]


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if fnmatch(rel, pat) or fnmatch(rel, pat + "/*") or fnmatch(rel, "*/" + pat):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (".venv/bin/python", "deps/kafka/target/libs/x.jar", ".wmb/sandbox/state.json",
                 ".pytest_cache/v", ".mypy_cache/x", "wmb/__pycache__/x.pyc"):  # fmt: skip
        assert _dockerignored(path, patterns), path
    copied = [
        rest.split()[0]
        for word, rest in _dockerfile_instructions()
        if word == "COPY" and not rest.startswith("--from")
    ]
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: missing"
                assert not _dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    assert copied


def test_package_data_ships_every_non_python_file() -> None:
    """`pip install .` (the image) only ships the non-.py files that package-data names."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data: dict[str, list[str]] = config["tool"]["setuptools"].get("package-data", {})
    missing = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            rel_to_pkg = path.relative_to(ROOT / package).as_posix()
            globs = package_data.get(package, []) + package_data.get("*", [])
            if not any(fnmatch(rel_to_pkg, g) for g in globs):
                missing.append(f"{package}/{rel_to_pkg}")
    assert missing == [], f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"


# --------------------------------------------------------------------------------------------------
# tests: monitoring
# --------------------------------------------------------------------------------------------------


def test_metric_extraction_sees_the_code() -> None:
    exported = exported_metrics()
    assert {"wmb_supervisor_restarts_total", "wmb_supervisor_daemon_up"} <= exported
    assert "wmb_supervisor_restarts_total_total" not in exported


def test_queried_metrics_parser() -> None:
    expr = (
        'max by (hop) (label_replace(wmb_a_seconds, "hop", "x:$1", "source", "(.*)") '
        'or sum(rate(wmb_b_total{job=~"wmb.*"}[$__rate_interval]))) > 5 and on (route) up == 0'
    )
    assert queried_metrics(expr) == {"wmb_a_seconds", "wmb_b_total", "up"}


def test_grafana_dashboard(topology: Topology) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
    exprs = dashboard_exprs(dash)
    assert check_metrics(exprs, exported_metrics()) == []
    queried = set().union(*(queried_metrics(e) for e in exprs))
    # lag of every hop, throughput in events, records and bytes, and the error series
    for needed in (
        "wmb_capture_seconds_behind_source",
        "wmb_relay_lag_seconds",
        "wmb_cache_lag_seconds",
        "wmb_apply_lag_seconds",
        "wmb_capture_events_total",
        "wmb_relay_records_total",
        "wmb_relay_bytes_total",
        "wmb_supervisor_restarts_total",
        "wmb_cache_dlq_total",
        "wmb_cache_stale_rejected_total",
        "wmb_apply_conflicts_total",
    ):
        assert needed in queried, needed


def test_checks_catch_an_unknown_metric() -> None:
    problems = check_metrics(
        ["rate(wmb_relay_recordz_total[5m])", "sum(wmb_cache_lag_seconds"], exported_metrics()
    )
    assert any("wmb_relay_recordz_total" in p for p in problems)
    assert any("unbalanced" in p for p in problems)


def test_alert_rules() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = alert_rules(doc)
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule.get("alert")
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"].get("summary")
    names = {r["alert"] for r in rules}
    assert {
        "WmbLagWarning",
        "WmbLagCritical",
        "WmbLinkDown",
        "WmbDaemonDown",
        "WmbDeadLettersGrowing",
    } <= names
    assert check_metrics([r["expr"] for r in rules], exported_metrics()) == []


def test_prometheus_scrapes_every_daemon(topology: Topology) -> None:
    doc = yaml.safe_load(PROMETHEUS.read_text())
    targets = {t for job in doc["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for dc in topology.datacenters:
        base = topology.dc(dc).metrics_port_base
        ports = {base} | {d.metrics_port for d in daemons_for(topology, dc, "topology.yaml")}
        assert {f"wmb-{dc}:{p}" for p in ports} <= targets, dc
    assert "/etc/prometheus/alerts.yml" in doc["rule_files"]


# --------------------------------------------------------------------------------------------------
# tests: systemd
# --------------------------------------------------------------------------------------------------


def test_systemd_wmb_unit() -> None:
    unit = parse_unit(SYSTEMD / "wmb@.service")
    svc = unit["Service"]
    assert re.search(r"\brun --dc %i\b", svc["ExecStart"])
    assert svc["Restart"] == "on-failure"
    codes = {int(c) for c in svc["RestartPreventExitStatus"].split()}
    assert codes == {int(c) for c in NO_RESTART} == {2, 3, 4, 5, 6, 7}
    assert ExitCode.MISMATCH not in codes  # `wmb verify`'s code, never a daemon's
    assert svc["EnvironmentFile"] == "/etc/wmb/%i.env"
    assert svc["KillSignal"] == "SIGTERM"
    # The supervisor SIGKILLs its daemons after its own stop timeout: systemd must wait longer.
    stop_timeout_s = inspect.signature(Supervisor).parameters["stop_timeout_s"].default
    assert int(svc["TimeoutStopSec"]) == 30 > stop_timeout_s
    for key, value in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ):
        assert svc.get(key) == value, key
    assert svc["User"] not in ("root", "0")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_lag_timer() -> None:
    service = parse_unit(SYSTEMD / "wmb-lag.service")["Service"]
    assert service["Type"] == "oneshot"
    assert re.search(r"\blag --warn 5 --crit 30$", service["ExecStart"])
    timer = parse_unit(SYSTEMD / "wmb-lag.timer")
    assert timer["Timer"]["Unit"] == "wmb-lag.service"
    assert timer["Timer"]["OnCalendar"] in ("minutely", "*-*-* *:*:00")
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_unit_parser_fails_on_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "x.service"
    broken.write_text("Restart=always\n")  # no section header
    with pytest.raises(configparser.MissingSectionHeaderError):
        parse_unit(broken)
