#!/usr/bin/env python3
"""ops/check_grafana.py DASHBOARD.json...: checks Grafana dashboards that ops/test ships.

Each file must parse as JSON, have a title and a uid, and take its data source from a
variable: a `datasource`-type templating variable or an `${DS_...}` import input. A panel,
target or templating query that names a fixed data source uid would break on every Grafana
whose Prometheus has another uid. Exits non-zero with one line per problem.
"""

import json
import re
import sys

VARIABLE = re.compile(r"^\$\{?([A-Za-z0-9_]+)\}?$")


def datasource_variables(dash):
    names = set()
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "datasource" and var.get("name"):
            names.add(var["name"])
    for inp in dash.get("__inputs", []):
        if inp.get("type") == "datasource" and inp.get("name"):
            names.add(inp["name"])
    return names


def datasource_refs(node, where):
    """Yields (where, datasource) for every `datasource` key under node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield where, value
            else:
                yield from datasource_refs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            title = value.get("title") if isinstance(value, dict) else None
            yield from datasource_refs(value, f"{where}[{title or i}]")


def check(path):
    problems = []
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        return [f"{path}: not JSON: {e}"]
    for key in ("title", "uid", "panels"):
        if not dash.get(key):
            problems.append(f"{path}: no {key}")
    variables = datasource_variables(dash)
    if not variables:
        problems.append(f"{path}: no datasource variable (templating type datasource, or __inputs)")
    refs = 0
    for where, ds in datasource_refs(dash.get("panels", []), "panels"):
        refs += 1
        uid = ds.get("uid") if isinstance(ds, dict) else ds
        m = VARIABLE.match(uid or "")
        if not m or m.group(1) not in variables:
            problems.append(f"{path}: {where}: data source {ds!r} is not one of the variables {sorted(variables)}")
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            ds = var.get("datasource")
            uid = ds.get("uid") if isinstance(ds, dict) else ds
            m = VARIABLE.match(uid or "")
            if not m or m.group(1) not in variables:
                problems.append(f"{path}: variable {var.get('name')}: data source {ds!r} is fixed")
    if refs == 0:
        problems.append(f"{path}: no panel names its data source")
    return problems


def main(paths):
    if not paths:
        print("usage: ops/check_grafana.py DASHBOARD.json...", file=sys.stderr)
        return 2
    problems = [p for path in paths for p in check(path)]
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"grafana: {len(paths)} dashboard(s) ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
