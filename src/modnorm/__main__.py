"""``python -m modnorm``: the ``modnorm`` command, where its script is not on the PATH."""

from modnorm.cli import run

if __name__ == "__main__":
    run()
