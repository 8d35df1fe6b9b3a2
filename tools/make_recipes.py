"""Write the shipped recipes, src/deepkd/configs/, from the tables in tools/recipe_tables/*.yaml (run once
after editing a table; a test checks that the committed recipes are exactly what this writes).

    python tools/make_recipes.py

Every recipe is complete (no hidden defaults matter for the published setting) and headed by the paper,
the table and the expected top-1 where a source lists one.

A table file holds ``vars`` (names every file's templates may use: base recipes, header sentences, row
tables) and ``families``. A family writes one recipe per row of ``rows`` (a list of mappings, the name of
one, or a ``grid``), skipping the rows whose ``when`` variable is unset or null:

- ``path``, ``header`` (a list of lines) and ``recipe`` (its sections) are templates, rendered with the
  row's variables over the family's ``vars`` over the files' ``vars``: a string that is one field,
  ``"{name}"`` or ``"{name[0]}"``, becomes that value (a number, a mapping, a list, another template;
  null where ``name`` is unset); any other string is ``str.format``-ed; ``{if: name, then: x, else: y}``
  picks by the value's truth; ``{lookup: name, in: {...}, default: x}`` picks by the value; a ``merge``
  key merges its mapping in.
- ``recipe`` starts from its ``base`` (a mapping of sections, or the name of one); a section ``x+``
  updates the base's ``x``, a section ``x`` replaces it and ``x: null`` removes it; a section that renders
  to null (an ``if`` whose branch is null) is left out.
  ``method_defaults: true`` writes the method's builder defaults after its name (the feature methods
  show every number that matters).
- A DeepKD method (``deepkd_*``) gets ``topk: false`` and a line saying where the dynamic top-k mask
  would end its ramp (``mask``, in the family or a row, replaces that line's template; ``mask: false``
  writes neither);
  ``topk: true`` writes the mask's ``_topk`` variant instead (the DeepKD paper's dagger rows).
"""
from __future__ import annotations

import inspect
import string
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[1] / "src" / "deepkd" / "configs"
TABLES = Path(__file__).resolve().parent / "recipe_tables"
ORDER = ["experiment", "seed", "output_dir", "data", "student", "teacher", "method", "optimizer", "schedule",
         "train"]


class _Fields(string.Formatter):
    """``str.format`` whose fields are rendered before use (a variable may hold another template)."""

    def get_value(self, key, args, kwargs):
        if key not in kwargs:
            raise KeyError(f"recipe table: no variable {key!r}")
        return render(kwargs[key], kwargs)


FIELDS = _Fields()


def value(name: str, env: dict) -> Any:
    """The rendered value of the field ``name`` (``x``, ``x[0]``, ``x.key``); None where ``x`` is not set."""
    first = name.split("[")[0].split(".")[0]
    return FIELDS.get_field(name, (), env)[0] if first in env else None


def render(template: Any, env: dict) -> Any:
    """``template`` with its fields filled from ``env`` (the module docstring says how)."""
    if isinstance(template, str):
        parsed = list(FIELDS.parse(template))
        if len(parsed) == 1 and parsed[0][0] == "" and parsed[0][1] and not parsed[0][2] and parsed[0][3] is None:
            return render(value(parsed[0][1], env), env)
        return FIELDS.vformat(template, (), env)
    if isinstance(template, list):
        return [render(item, env) for item in template]
    if not isinstance(template, dict):
        return template
    if "if" in template:
        return render(template["then"] if value(template["if"], env) else template.get("else"), env)
    if "lookup" in template:
        return render(template["in"].get(value(template["lookup"], env), template.get("default")), env)
    out: Dict[str, Any] = {}
    for key, item in template.items():
        if key == "merge":
            out.update(render(item, env))
        else:
            out[key] = render(item, env)
    return out


def method_defaults(method: dict) -> dict:
    """``method`` with its builder's defaults (the keys a recipe may set) after its name."""
    from deepkd.losses.base import PROVIDED
    from deepkd.losses.registry import method_builder

    params = inspect.signature(method_builder(method["name"])).parameters.values()
    found = {p.name: p.default for p in params if p.name not in PROVIDED and p.default is not inspect.Parameter.empty}
    return {"name": method["name"], **found, **method}


def build(family: dict, env: dict) -> dict:
    """The family's recipe for one row, its sections in ``ORDER`` (the base's, less those the family replaces,
    are rendered with the row's variables too)."""
    base = family.get("base", {})
    template = dict(env[base] if isinstance(base, str) else base)
    for key, section in family["recipe"].items():
        if key.endswith("+"):
            template[key[:-1]] = {**template[key[:-1]], **section}
        elif section is None:
            template.pop(key, None)
        else:
            template[key] = section
    recipe = render(template, env)
    if family.get("method_defaults"):
        recipe["method"] = method_defaults(recipe["method"])
    return {key: recipe[key] for key in ORDER if key in recipe and recipe[key] is not None}


def mask_ramp(schedule: dict) -> Tuple[int, str]:
    """deepkd's choice of the epoch where the dynamic top-k mask's ramp ends, and why."""
    if schedule["name"] == "step":
        return min(schedule["milestones"]), "the first LR decay"
    # the middle of the cosine decay after warm-up: the LR has halved, about as late as CIFAR's 150/240
    warmup = schedule.get("warmup_epochs", 0)
    after = f" after the {warmup}-epoch warm-up" if warmup else ""
    return (warmup + schedule["epochs"]) // 2, f"the middle of the cosine decay{after}, where the LR has halved"


def topk_mask(family: dict, recipe: dict, header: List[str], env: dict) -> None:
    """A DeepKD recipe's top-k mask: off with a line saying where its ramp would end, or on (``topk``)."""
    method, template = recipe["method"], env.get("mask", family.get("mask", "{TOPK_OFF}"))
    if template is False or not method["name"].startswith("deepkd"):
        return
    end, why = mask_ramp(recipe["schedule"])
    env = {**env, "end": end, "why": why, "start": method.get("warmup_epochs", 0)}
    if family.get("topk"):  # the paper's dagger rows: the dynamic top-k curriculum on NCKD
        recipe["method"] = {**method, "topk": True, "topk_ramp_end": end}
        recipe["experiment"] += "_topk"
        header.append(render("{TOPK_ON}", env))
    else:
        recipe["method"] = {**method, "topk": False}
        header.append(render(template, env))


def grid(spec: dict) -> List[dict]:
    """A grid's rows: one per filled cell, ``{**column's variables, row: row name, cell: value}``."""
    return [{**dict(zip(spec["column_vars"], column)), spec["row_var"]: name, spec["cell_var"]: cell}
            for name, cells in spec["rows"].items() for column, cell in zip(spec["columns"], cells)
            if cell is not None]


def rows(family: dict, env: dict) -> Iterator[dict]:
    """The variables of each recipe the family writes."""
    table = family["rows"]
    table = env[table] if isinstance(table, str) else table
    for row in grid(table) if isinstance(table, dict) else table:
        row_env = {**env, **family.get("vars", {}), **row}
        if "when" not in family or value(family["when"], row_env) is not None:
            yield row_env


def lines(header: list) -> List[str]:
    """Header lines, a list-valued line spread out and an empty one dropped."""
    out: List[str] = []
    for line in header:
        out.extend(line if isinstance(line, list) else [line] if line else [])
    return out


def load_tables(folder: Path = TABLES) -> Tuple[dict, List[dict]]:
    """The variables and families of every table file (a variable defined twice is an error)."""
    env: Dict[str, Any] = {}
    families: List[dict] = []
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        twice = set(env) & set(data.get("vars", {}))
        if twice:
            raise ValueError(f"{path.name}: variables {sorted(twice)} are already defined by another table")
        env.update(data.get("vars", {}))
        families.extend(data.get("families", []))
    return env, families


def recipes() -> Dict[str, str]:
    """Every recipe as ``{path relative to src/deepkd/configs: file text}``."""
    env, families = load_tables()
    written: Dict[str, str] = {}
    for family in families:
        for row_env in rows(family, env):
            path, recipe = render(family["path"], row_env), build(family, row_env)
            header = lines(render(family["header"], row_env))
            topk_mask(family, recipe, header, row_env)
            if path in written:
                raise ValueError(f"two families write {path}")
            written[path] = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(recipe, sort_keys=False)
    return written


def main(out: Optional[Path] = None) -> None:
    """Write the recipes under ``out`` (default: src/deepkd/configs), removing the recipes it no longer holds."""
    out = out or ROOT
    written = recipes()
    for stale in [p for p in out.rglob("*.yaml") if str(p.relative_to(out)) not in written]:
        stale.unlink()
    for name, text in written.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    print(f"wrote {len(written)} recipes under {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
