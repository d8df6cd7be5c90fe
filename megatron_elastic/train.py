"""``python -m megatron_elastic.train --config RECIPE.yaml [section.key=value ...]``

Runs one training stage of a recipe (``examples/*/pretrain.yaml``, ``stage1*.yaml``,
``stage2*.yaml``) in this process; launch one process per GPU/CPU rank with ``torchrun`` or
``srun`` (see ``slurm/``). A save directory that already holds a checkpoint is resumed.
Exit status: 0 done or preempted-and-saved, 2 bad input (before any compute), 3 NaN/inf loss.
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m megatron_elastic.train",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--config", required=True, help="stage recipe YAML")
    parser.add_argument(
        "overrides", nargs="*", help="recipe overrides, e.g. train.steps=100 checkpoint.save=DIR"
    )
    args = parser.parse_args(argv)

    from megatron_elastic.training.recipe import load_train_recipe
    from megatron_elastic.training.trainer import Trainer

    recipe = load_train_recipe(args.config, args.overrides)
    trainer = Trainer(recipe)
    try:
        return trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main())
