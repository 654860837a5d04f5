"""``python -m examples.vtab``: the VTAB-1k experiment (a shell around ``pyro-ibdr vtab``).

See ``pyro_ibdr.experiments.vtab`` or ``python -m examples.vtab --help``.
"""

from pyro_ibdr.experiments.vtab import main

if __name__ == "__main__":
    main()
