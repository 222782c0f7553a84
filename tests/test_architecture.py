"""docs/architecture.md names every product module (a module added without a line there
fails here), and the package layout keeps the rules the page states."""

from __future__ import annotations

import ast
import re

from tests.support.servers import ROOT


def product_modules() -> list[str]:
    found = [*(ROOT / "registry").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]
    return sorted(str(path.relative_to(ROOT)) for path in found)


def test_every_product_module_is_on_the_architecture_page():
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:registry|workers)/[\w/]+\.py)`", page))
    missing = [module for module in product_modules() if module not in named]
    assert not missing, f"docs/architecture.md does not name {missing}"
    gone = sorted(named - set(product_modules()))
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"


def test_package_inits_only_re_export():
    """An __init__.py holds a docstring, imports, __all__ and at most a lazy __getattr__
    that imports and returns: no class, no other function, no other statement."""
    for module in product_modules():
        if not module.endswith("__init__.py"):
            continue
        for node in ast.parse((ROOT / module).read_text()).body:
            allowed = isinstance(node, ast.Import | ast.ImportFrom | ast.If) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            )
            if isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                allowed = bool(names) and all(n == "__all__" or n.isupper() for n in names)
            if isinstance(node, ast.FunctionDef):
                allowed = node.name == "__getattr__"
            assert allowed, f"{module}:{node.lineno} is more than a re-export"


def test_no_module_outside_coordination_talks_to_redis():
    """Redis commands are sent by registry/coordination/ only (rq's own keys aside, which
    workers/gc.py reaches through rq): elsewhere a client is only passed along."""
    commands = re.compile(
        r"\b(redis|pipe|client|connection)\.(get|set|delete|exists|hset|hget|hgetall|"
        r"hincrby|zadd|zrange\w*|zrem|zscore|sadd|srem|smembers|setex|mget|incr|incrby|"
        r"expire|pexpire|pttl|publish|pipeline|scan_iter|eval|flushall)\("
    )
    offenders = []
    for module in product_modules():
        if module.startswith("registry/coordination/"):
            continue
        for number, line in enumerate((ROOT / module).read_text().splitlines(), 1):
            if commands.search(line):
                offenders.append(f"{module}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_no_product_module_is_over_500_lines():
    long = {
        module: count
        for module in product_modules()
        if (count := len((ROOT / module).read_text().splitlines())) > 500
    }
    assert not long, long
