"""``python -m examples.commonsense``: the commonsense-reasoning experiment (a shell around ``pyro-ibdr commonsense``).

See ``pyro_ibdr.experiments.commonsense`` or ``python -m examples.commonsense --help``.
"""

from pyro_ibdr.experiments.commonsense import main

if __name__ == "__main__":
    main()
