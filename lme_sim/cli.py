"""The ``lme-sim`` command line."""

from __future__ import annotations

import logging
import sys

import click


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (model loads, caches, statistics).")
def main(verbose: bool) -> None:
    """lme-sim: lifelong knowledge-editing simulator."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.group()
def world() -> None:
    """The embedded synthetic knowledge world."""


@world.command("build")
@click.option("--name", default="default", show_default=True, help="World name (see lme_sim.world.WORLDS).")
def world_build(name: str) -> None:
    """Generate the world and train (or load from cache) its model."""
    from .world import get_world_config
    from .world_model import load_world_model, world_cache_dir, world_stats, TrainConfig

    try:
        cfg = get_world_config(name)
    except ValueError as e:
        raise click.UsageError(str(e))
    model, tok, w = load_world_model(cfg)
    stats = world_stats(name)
    click.echo(f"world {name!r}: {len(w.facts)} facts, {len(w.subjects)} subjects, {len(w.relations)} relations, "
               f"{len(w.changes)} dated changes; model accuracy {stats['accuracy']:.3f} "
               f"(trained in {stats['seconds']} s); cached at {world_cache_dir(cfg, TrainConfig())}")


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False))
def validate(scenario: str) -> None:
    """Check a scenario file without running it."""
    scn = _load_scenario_or_exit(scenario)
    click.echo(f"{scenario}: ok ({scn.editor.method} on {scn.model}, {scn.data.n_edits} edits)")


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False))
def run(scenario: str) -> None:
    """Run a scenario (in process) and print a summary."""
    from .runner import run_in_process

    run_in_process(_load_scenario_or_exit(scenario))


def _load_scenario_or_exit(path: str):
    """The validated scenario, or one line naming the file and field and exit code 2."""
    from .scenario import ScenarioError, load_scenario

    try:
        return load_scenario(path)
    except ScenarioError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
