"""``python -m onetrick.cli``: the ``onetrick`` program."""
from onetrick.cli.main import run

if __name__ == "__main__":
    run()
