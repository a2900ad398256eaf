"""``python -m uvworker``: the command line."""

from uvworker.cli import main

if __name__ == "__main__":
    main()
