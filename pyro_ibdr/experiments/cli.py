"""The ``pyro-ibdr`` command: one group whose subcommands are the experiments.

    pyro-ibdr vtab --help
    pyro-ibdr commonsense --help
"""

from __future__ import annotations

import click

from .commonsense import main as commonsense
from .vtab import main as vtab


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyro-ibdr")
def main() -> None:
    """Bayesian LoRA fine-tuning with IBDR and its baselines: experiments from the command line."""


main.add_command(vtab, name="vtab")
main.add_command(commonsense, name="commonsense")

if __name__ == "__main__":
    main()
