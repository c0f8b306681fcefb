"""How a benchmark's classes split into experiences: arithmetic that needs neither torch nor the
data, so that a recipe is checked against a built-in benchmark's class count before anything
heavy is imported (``config``) as well as when the benchmark is built."""

from __future__ import annotations

from cl_ext.errors import RecipeError


def split_sizes(n_classes: int, first_exp_classes: int | None, classes_per_exp: int) -> list[int]:
    first = classes_per_exp if first_exp_classes is None else first_exp_classes
    rest = n_classes - first
    if first < 1 or classes_per_exp < 1 or rest < 0 or rest % classes_per_exp:
        raise RecipeError(
            f"benchmark.options: {n_classes} classes cannot be split into a first experience of {first} "
            f"and further experiences of {classes_per_exp} classes each"
        )
    return [first] + [classes_per_exp] * (rest // classes_per_exp)
