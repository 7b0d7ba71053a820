"""``lowbit recipes``: the named recipes and every recipe key with its documentation."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one recipe's resolved values")


def run(args: argparse.Namespace) -> int:
    from lowbit.core.recipe import available_recipes, describe_keys, load_recipe

    if args.name:
        recipe = load_recipe(args.name)
        for section, values in recipe.to_dict().items():
            print(f"{section} = {values}")
        return 0
    print("recipes:")
    for name in available_recipes():
        print(f"  {name:<16} {load_recipe(name).description}")
    print("\nkeys (override with --set KEY=VALUE):")
    for key, doc, default in describe_keys():
        shown = "" if callable(default) or type(default).__name__ == "_MISSING_TYPE" else f" [default: {default!r}]"
        print(f"  {key:<26} {doc}{shown}")
    return 0
