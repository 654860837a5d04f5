"""The ``pyro-ibdr`` command: one group whose subcommands are the experiments.

    pyro-ibdr vtab --help
    pyro-ibdr commonsense --help
    pyro-ibdr report outputs/vtab
    pyro-ibdr predict outputs/vtab/posteriors/cifar10__ibdr__seed0.pt
    pyro-ibdr export outputs/vtab/posteriors/cifar10__ibdr__seed0.pt adapters/
"""

from __future__ import annotations

from pathlib import Path

import click

from .commonsense import main as commonsense
from .predict import export, predict
from .report import write_report
from .vtab import main as vtab


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyro-ibdr")
def main() -> None:
    """Bayesian LoRA fine-tuning with IBDR and its baselines: experiments from the command line."""


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(folder: Path) -> None:
    """Write FOLDER/report.md (tables and figures) from an experiment folder's stored results, without retraining."""
    try:
        path = write_report(folder)
    except (FileNotFoundError, ValueError) as error:
        raise click.UsageError(str(error)) from error
    click.echo(f"report: {path}")


main.add_command(vtab, name="vtab")
main.add_command(commonsense, name="commonsense")
main.add_command(report, name="report")
main.add_command(predict, name="predict")
main.add_command(export, name="export")

if __name__ == "__main__":
    main()
