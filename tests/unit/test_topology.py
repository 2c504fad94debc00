"""The topology model, its cross-checks and `wmb config check` (pure: no servers needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from wmb.cli import _register, cli
from wmb.errors import ConfigError, ExitCode
from wmb.topology import (
    ConflictPolicy,
    Consistency,
    MaskKind,
    Ordering,
    Topology,
    check_topology,
    load_topology,
    parse_topology,
)

REPO = Path(__file__).resolve().parents[2]
ROOT_TOPOLOGY = REPO / "topology.yaml"
BROKEN_DIR = Path(__file__).parent / "topologies"
BROKEN = sorted(BROKEN_DIR.glob("*.yaml"))

SECRET = "Sup3r-s3cret-PaSS"

MINIMAL = """
version: 1
datacenters:
  bj:
    kafka: {bootstrap: "127.0.0.1:9092"}
    mysql: {master: {host: 127.0.0.1, user: wmb, password: "${PW}", server_id: 1}}
sources:
  main: {dc: bj}
"""


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    _register()
    return CliRunner()


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <error text>'"
    return first.removeprefix("# expect: ")


# -- the root topology.yaml ------------------------------------------------------------------------


def test_root_topology_passes() -> None:
    topo = load_topology(ROOT_TOPOLOGY, env={})
    assert check_topology(ROOT_TOPOLOGY, env={}) == []
    assert set(topo.datacenters) == {"bj", "gz"}
    assert topo.dc("bj").mysql.master is not None
    assert topo.dc("gz").mysql.master is None
    assert [r.name for r in topo.routes_to("gz")] == ["bj->gz"]
    assert [c.name for c in topo.caches_in("gz")] == ["usercache"]
    assert [r.server for r in topo.replicas_in("gz")] == ["gzrep1"]
    assert [s.name for s in topo.sources_in("bj")] == ["main"]


def test_root_topology_passes_via_cli(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["config", "check", str(ROOT_TOPOLOGY)], env={"WMB_TOPOLOGY": None})
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"OK: {ROOT_TOPOLOGY}: 2 datacenters, 1 sources, 1 routes, 1 caches, 1 replicas"
    )


def test_cli_default_path_from_env(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["config", "check", "--json"], env={"WMB_TOPOLOGY": str(ROOT_TOPOLOGY)})
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.output) == {"ok": True, "path": str(ROOT_TOPOLOGY), "errors": []}


def test_cli_default_path_is_cwd_topology_yaml(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "topology.yaml").write_text(ROOT_TOPOLOGY.read_text())
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["config", "check"], env={"WMB_TOPOLOGY": None})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: topology.yaml: 2 datacenters")


def test_real_entry_point_exit_codes() -> None:
    """Through `wmb`'s main() (standalone_mode=False), where a lost exit code would show."""
    ok = subprocess.run(
        [sys.executable, "-m", "wmb.cli", "config", "check", str(ROOT_TOPOLOGY)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "wmb.cli", "config", "check", str(BROKEN_DIR / "unknown_dc_in_route.yaml")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == ExitCode.CONFIG
    assert "routes[0].to: unknown datacenter 'sz'" in bad.stderr


# -- broken variants ------------------------------------------------------------------------------


def test_enough_broken_variants() -> None:
    assert len(BROKEN) >= 10


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_variant_is_refused(path: Path, runner: CliRunner) -> None:
    expected = _expected(path)
    errors = check_topology(path, env={})
    assert any(expected in line for line in errors), errors
    with pytest.raises(ConfigError) as info:
        load_topology(path, env={})
    assert expected in str(info.value)

    result = runner.invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == ExitCode.CONFIG
    assert expected in result.output
    as_json = runner.invoke(cli, ["config", "check", "--json", str(path)])
    assert as_json.exit_code == ExitCode.CONFIG
    report = orjson.loads(as_json.stdout)
    assert report["ok"] is False
    assert any(expected in line for line in report["errors"])


def test_every_error_is_listed_one_per_line() -> None:
    text = ROOT_TOPOLOGY.read_text()
    text = text.replace("to: gz", "to: sz").replace("server_id: 2", "server_id: 1")
    text = text.replace('key: "user:{id}"', 'key: "user:{email}"')
    errors = check_topology_text(text)
    assert "routes[0].to: unknown datacenter 'sz'" in errors
    assert any(e.startswith("datacenters.gz.mysql.replicas.gzrep1.server_id: server_id 1") for e in errors)
    assert any(e.startswith("caches[0].tables['app.users'].key: placeholder {email}") for e in errors)
    with pytest.raises(ConfigError) as info:
        parse_topology(text, env={})
    assert str(info.value).splitlines() == errors


def test_structural_errors_are_all_listed() -> None:
    text = ROOT_TOPOLOGY.read_text()
    text = text.replace("port: 3307", "port: nope").replace("ordering: database", "ordering: dtabase")
    text = text.replace("ddl: apply", "ddl: apply\n    dll: skip")
    errors = check_topology_text(text)
    assert errors == [
        "datacenters.gz.mysql.replicas.gzrep1.port: Input should be a valid integer, "
        "unable to parse string as an integer",
        "sources.main.ordering: Input should be 'database', 'table' or 'row'",
        "replicas[0].dll: unknown field (did you mean 'ddl'?)",
    ]


MASK_KEY_LINE = "    mask_key: ${WMB_MASK_KEY:-sandbox-only-mask-key}"


def check_topology_text(text: str, env: dict[str, str] | None = None) -> list[str]:
    try:
        parse_topology(text, env={} if env is None else env)
    except ConfigError as exc:
        return str(exc).splitlines()
    return []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("tables:\n      app.users:", "tables:\n      app.users:\n        bogus: 1"), "unknown field"),
        (('key: "user:{id}"', 'key: "user:{id!r}"'), "placeholder {id} in 'user:{id!r}' must be a plain"),
        (('key: "user:{id}"', 'key: "user:x"'), "lacks primary_key column(s) id"),
        (('include: ["app.*"]', 'include: ["app"]'), "sources.main.include[0]: bad table pattern 'app'"),
        (("epoch: 1", "epoch: 0"), "epoch: Input should be greater than or equal to 1"),
        (("version: 1", "version: 2"), "version: Input should be 1"),
        (('"redis://127.0.0.1:6380/0"', '"http://x"'), "datacenters.gz.redis.url: must start with"),
        (("source: main\n    tombstone", "source: other\n    tombstone"), "caches[0].source: unknown source"),
        (("server: gzrep1", "server: gzrep2"), "replicas[0].server: unknown server 'gzrep2'"),
        (("  gz:\n", "  GZ:\n"), "datacenters.GZ (key): bad name 'GZ'"),
        (('"127.0.0.1:9093"', '"nohostport"'), "datacenters.gz.kafka.bootstrap: bad bootstrap"),
        (
            ("    dc: bj\n    server: master", "    dc: bj\n    server: master\n    start: {file: x}"),
            "go together",
        ),
        (
            ("    dc: bj\n    server: master", "    dc: bj\n    server: master\n    start: {gtid: nope}"),
            "sources.main.start: not a MariaDB GTID",
        ),
        (('exclude: ["app.tmp_*"]', 'exclude: ["app.users"]'), "source 'main' does not capture app.users"),
        ((MASK_KEY_LINE, ""), "sources.main.mask_key: hash masks need"),
        ((MASK_KEY_LINE, "    mask_key: ${WMB_MASK_KEY}"), "environment variable WMB_MASK_KEY is not set"),
    ],
)
def test_more_refusals(change: tuple[str, str], expected: str) -> None:
    text = ROOT_TOPOLOGY.read_text()
    assert change[0] in text
    errors = check_topology_text(text.replace(change[0], change[1], 1))
    assert any(expected in e for e in errors), errors


def test_excluded_pk_column_is_refused() -> None:
    text = ROOT_TOPOLOGY.read_text().replace(
        'key: "user:{id}"\n        primary_key: [id]',
        'key: "user:{password_hash}"\n        primary_key: [password_hash]',
    )
    errors = check_topology_text(text)
    assert errors == [
        "caches[0].tables['app.users']: column 'password_hash' is dropped by sources.main.exclude_columns"
    ]


def test_capturing_an_applied_server_is_refused() -> None:
    text = ROOT_TOPOLOGY.read_text().replace(
        "  - dc: gz\n    server: gzrep1", "  - dc: bj\n    server: master"
    )
    errors = check_topology_text(text)
    assert any("sources.main.server: bj.master is also a target of `replicas`" in e for e in errors), errors


def test_cycle_with_loop_protection_is_allowed() -> None:
    text = (BROKEN_DIR / "cycle_without_loop_protection.yaml").read_text()
    topo = parse_topology(text.replace("loop_protection: false", "loop_protection: true"), env={})
    assert [r.name for r in topo.routes] == ["bj->gz", "gz->bj"]
    # Loop protection: bj's changes reach gz and stop there.
    assert [s.name for s in topo.sources_reaching("bj")] == ["bjmain", "gzmain"]
    assert topo.route_path("bjmain", "bj") == []


# -- env expansion and secrets -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "env", "value"),
    [
        ("${PW}", {"PW": "x"}, "x"),
        ("${PW:-dflt}", {}, "dflt"),
        ("${PW:-dflt}", {"PW": ""}, "dflt"),  # like the shell: unset or empty
        ("${PW}", {"PW": ""}, ""),
        ("a${PW}b${Q:-c}", {"PW": "-"}, "a-bc"),
        ("p$$w${PW}", {"PW": "1"}, "p$w1"),
        ("$${PW}", {}, "${PW}"),
        ("lone$dollar", {}, "lone$dollar"),
        ("${PW:-}", {}, ""),
    ],
)
def test_env_expansion(raw: str, env: dict[str, str], value: str) -> None:
    topo = parse_topology(MINIMAL.replace("${PW}", raw), env=env)
    master = topo.server("bj", "master")
    assert master.password.get_secret_value() == value


def test_env_expansion_applies_to_non_secret_fields_and_converts() -> None:
    text = MINIMAL.replace("server_id: 1", 'server_id: "${SID:-7}"')
    assert parse_topology(text, env={"PW": ""}).server("bj", "master").server_id == 7
    errors = check_topology_text(text, env={"PW": "", "SID": "x"})
    assert errors == [
        "datacenters.bj.mysql.master.server_id: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]


@pytest.mark.parametrize("raw", ["${PW", "${1BAD}", "${}"])
def test_malformed_reference_is_an_error_without_the_value(raw: str) -> None:
    errors = check_topology_text(MINIMAL.replace("${PW}", SECRET + raw))
    assert errors and errors[0].startswith("datacenters.bj.mysql.master.password: malformed ${...}")
    assert SECRET not in "\n".join(errors)


def test_missing_env_var_names_field_and_variable() -> None:
    errors = check_topology_text(MINIMAL, env={})
    assert errors == [
        "datacenters.bj.mysql.master.password: environment variable PW is not set "
        "(set it, or write ${PW:-default})"
    ]


def test_default_env_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", SECRET)
    assert parse_topology(MINIMAL).server("bj", "master").password.get_secret_value() == SECRET


def test_password_never_shown(runner: CliRunner, tmp_path: Path) -> None:
    env = {"MYSQL_BJ_PASSWORD": SECRET, "MYSQL_GZ_PASSWORD": SECRET, "REDIS_GZ_PASSWORD": SECRET}
    topo = load_topology(ROOT_TOPOLOGY, env=env)
    assert topo.server("bj", "master").password.get_secret_value() == SECRET
    gz_redis = topo.dc("gz").redis
    assert gz_redis is not None and gz_redis.password is not None
    shown = [
        repr(topo),
        str(topo),
        topo.model_dump_json(),
        str(topo.model_dump()),
        orjson.dumps(topo.redacted()).decode(),
    ]
    ok = runner.invoke(cli, ["config", "check", str(ROOT_TOPOLOGY)], env=env)
    show = runner.invoke(cli, ["config", "show", str(ROOT_TOPOLOGY)], env=env)
    show_dc = runner.invoke(cli, ["config", "show", "--dc", "gz", str(ROOT_TOPOLOGY)], env=env)
    assert ok.exit_code == show.exit_code == show_dc.exit_code == 0
    shown += [ok.output, show.output, show_dc.output]

    # Errors next to a secret, and errors *about* a secret field, never carry it.
    broken = ROOT_TOPOLOGY.read_text().replace("port: 3307", "port: [1]").replace("prot", "port")
    broken = broken.replace('url: "redis://127.0.0.1:6380/0"', f'url: "redis://u:{SECRET}@127.0.0.1:6380/0"')
    broken = broken.replace('password: "${MYSQL_BJ_PASSWORD:-wmb}"', "password: {nested: " + SECRET + "}")
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    bad = runner.invoke(cli, ["config", "check", str(path)], env=env)
    bad_json = runner.invoke(cli, ["config", "check", "--json", str(path)], env=env)
    assert bad.exit_code == bad_json.exit_code == ExitCode.CONFIG
    errors = check_topology(path, env=env)
    assert any(e.startswith("datacenters.gz.redis.url: must not carry credentials") for e in errors), errors
    assert any(e.startswith("datacenters.bj.mysql.master.password:") for e in errors), errors
    with pytest.raises(ConfigError) as info:
        load_topology(path, env=env)
    shown += [bad.output, bad_json.output, "\n".join(errors), str(info.value), repr(info.value)]
    for text in shown:
        assert SECRET not in text


# -- accessors and helpers ------------------------------------------------------------------------


def _root(**env: str) -> Topology:
    return load_topology(ROOT_TOPOLOGY, env=env)


def test_accessors() -> None:
    topo = _root()
    assert topo.dc("bj").name == "bj"
    assert topo.dc("gz").kafka.remote_bootstrap == "127.0.0.1:19093"
    assert topo.source("main").name == "main"
    assert topo.server("gz", "gzrep1").port == 3307
    assert topo.routes_from("bj") == topo.routes_to("gz") == topo.routes
    assert topo.routes_from("gz") == [] and topo.routes_to("bj") == []
    assert topo.caches_in("bj") == [] and topo.replicas_in("bj") == []
    assert topo.sources_in("gz") == []
    assert [s.name for s in topo.sources_reaching("gz")] == ["main"]
    assert topo.source_for(topo.caches[0]).name == "main"
    assert topo.source_for(topo.replicas[0]).name == "main"
    assert topo.topic_in("main", "bj") == topo.topic_in("main", "gz") == "wmb.main.changes"
    assert topo.route_path("main", "gz") == topo.routes
    for bad in (lambda: topo.dc("sz"), lambda: topo.source("x"), lambda: topo.server("gz", "master")):
        with pytest.raises(ConfigError):
            bad()


def test_topic_prefixes_chain_over_hops() -> None:
    text = (BROKEN_DIR / "two_paths.yaml").read_text()
    text = text.replace("  - {from: bj, to: gz}\n", "")
    text = text.replace("{from: bj, to: sh}", "{from: bj, to: sh, topic_prefix: bj.}")
    text = text.replace("{from: sh, to: gz}", "{from: sh, to: gz, topic_prefix: sh.}")
    topo = parse_topology(text, env={})
    assert topo.topic_in("main", "sh") == "bj.wmb.main.changes"
    assert topo.topic_in("main", "gz") == "sh.bj.wmb.main.changes"
    assert [r.name for r in topo.route_path("main", "gz")] == ["bj->sh", "sh->gz"]


def test_source_table_rules() -> None:
    src = _root().source("main")
    assert src.ordering is Ordering.DATABASE
    assert src.captures("app.users") and src.captures("app.orders")
    assert not src.captures("app.tmp_x") and not src.captures("other.t")
    assert not parse_topology(MINIMAL, env={"PW": ""}).source("main").captures("mysql.user")
    assert src.column_excluded("app.users", "password_hash")
    assert not src.column_excluded("app.users", "email")
    assert src.mask_for("app.users", "email") is MaskKind.HASH
    assert src.mask_for("app.users", "name") is None
    assert src.effective_replication_server_id == 1001
    derived = parse_topology(MINIMAL, env={"PW": ""}).source("main").effective_replication_server_id
    assert 4_200_000_000 <= derived < 4_290_000_000


def test_cache_and_replica_helpers() -> None:
    topo = _root()
    users = topo.caches[0].tables["app.users"]
    assert users.key_fields == ["id"]
    assert topo.caches[0].tables["app.orders"].consistency is Consistency.AFTER_REPLICA
    rep = topo.replicas[0]
    assert rep.covers("app.orders") and not rep.covers("other.t")
    assert rep.conflicts.for_table("app.counters") is ConflictPolicy.OVERWRITE
    assert rep.conflicts.for_table("app.users") is ConflictPolicy.HALT


def test_model_is_frozen() -> None:
    topo = _root()
    with pytest.raises(ValueError):
        setattr(topo, "epoch", 2)  # noqa: B010 - the point is a plain assignment


def test_model_validate_runs_cross_checks() -> None:
    data: dict[str, Any] = {
        "datacenters": {"bj": {"kafka": {"bootstrap": "h:1"}}},
        "routes": [{"from": "bj", "to": "sz"}],
    }
    with pytest.raises(ConfigError, match=re.escape("routes[0].to: unknown datacenter 'sz'")):
        Topology.model_validate(data)


# -- docs stay in step with the model -------------------------------------------------------------


def test_docs_mention_every_field() -> None:
    from pydantic import BaseModel

    import wmb.topology as t

    docs = (REPO / "docs" / "configuration.md").read_text()
    models = [
        obj
        for obj in vars(t).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == t.__name__
    ]
    missing = [
        f"{m.__name__}.{f.alias or n}"
        for m in models
        if not m.__name__.startswith("_")
        for n, f in m.model_fields.items()
        if f"`{f.alias or n}`" not in docs
    ]
    assert not missing, f"fields not documented in docs/configuration.md: {missing}"
    undocumented = [
        f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items() if not f.description
    ]
    assert not undocumented, f"fields without a docstring: {undocumented}"


def test_unquoted_numeric_password_gets_a_hint_without_its_value() -> None:
    errors = check_topology_text(MINIMAL.replace('"${PW}"', "987654321"))
    assert errors == [
        "datacenters.bj.mysql.master.password: Input should be a valid string "
        "(YAML read a number or a boolean here: put the value in quotes)"
    ]
