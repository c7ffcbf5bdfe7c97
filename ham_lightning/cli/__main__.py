"""``python -m ham_lightning.cli``: the ``ham-lightning`` command."""

from ham_lightning.cli.app import main

if __name__ == "__main__":
    main()
