"""``python -m bespoke`` (and ``torchrun -m bespoke``) run the CLI."""

from bespoke.cli import main

if __name__ == "__main__":
    main()
